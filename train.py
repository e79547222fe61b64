"""Train (or, with run.evaluate: true, decode) SALMONN from one YAML config.

    python train.py --cfg-path configs/demo.yaml                                  # one CPU or GPU
    torchrun --nproc_per_node 8 train.py --cfg-path configs/finetune_humdial.yaml  # DDP (run.fsdp: true shards)
    python train.py --cfg-path configs/demo.yaml --options run.optims.max_epoch=1 --resume auto
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from utils import ConfigError, destroy_distributed, init_distributed, load_config, seed_everything, setup_logging

log = logging.getLogger("salmonn.train")

SPLITS = {"train": "train_ann_path", "valid": "valid_ann_path", "test": "test_ann_path"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="experiment YAML (model/datasets/run/generate)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. run.batch_size_train=4 run.optims.init_lr=1e-4")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint (auto: the latest in run.output_dir); same as run.resume")
    return parser.parse_args(argv)


def build_model(cfg: DictConfig):
    """SALMONN from the `model:` section (loading the LLM can take minutes for the real model)."""
    from models.salmonn import SALMONN

    log.info("building the model (LLM %s, Whisper %s, BEATs %s)...", cfg.model.llama_path, cfg.model.whisper_path,
             cfg.model.beats_path or "none")
    t0 = time.perf_counter()
    model = SALMONN.from_config(cfg.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model built in %.1f s: %.2fM parameters, %.2fM trainable", time.perf_counter() - t0, total / 1e6,
             trainable / 1e6)
    return model


def build_datasets(cfg: DictConfig, splits: list[str]) -> dict[str, Dataset]:
    """The splits whose annotation path is set; feature extraction happens lazily in the data loader."""
    from dataset_v1 import build_dataset

    datasets = {}
    for split in splits:
        ann_path = cfg.datasets[SPLITS[split]]
        if not ann_path:
            continue
        datasets[split] = build_dataset(ann_path, cfg.datasets, split, cfg.model, seed=cfg.run.seed)
        log.info("%s split: %d samples from %s", split, len(datasets[split]), ann_path)
    return datasets


def save_resolved_config(cfg: DictConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg_path, args.options, required_sections=("model", "datasets"))
    if args.resume is not None:
        cfg.run.resume = args.resume
    needed = "test_ann_path" if cfg.run.evaluate else "train_ann_path"
    if not cfg.datasets[needed]:
        raise ConfigError(f"datasets.{needed} is empty: nothing to {'decode' if cfg.run.evaluate else 'train on'}")
    dist_info = init_distributed(cfg.run.device)
    output_dir = Path(cfg.run.output_dir)
    setup_logging(str(output_dir), dist_info.rank)
    log.info("config %s resolved:\n%s", args.cfg_path, OmegaConf.to_yaml(cfg))
    if dist_info.is_main:
        save_resolved_config(cfg, output_dir)
    log.info("%d process(es), this one rank %d on %s", dist_info.world_size, dist_info.rank, dist_info.device)

    from runner import NonFiniteLossError, Runner

    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    splits = ["test"] if cfg.run.evaluate else ["train", "valid"]
    datasets = build_datasets(cfg, splits)
    runner = Runner(cfg, model, datasets, dist_info)
    try:
        if cfg.run.evaluate:
            runner.evaluate("test")
        else:
            summary = runner.train()
            log.info("done: %d steps, best %s, %d skipped steps", summary["step"], summary["best"],
                     summary["skipped_steps"])
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    finally:
        destroy_distributed()
    return 0


def cli() -> int:
    """main() for the command line: a config or missing-file error is one line, not a traceback."""
    try:
        return main()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
