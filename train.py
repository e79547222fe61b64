"""Train (or, with run.evaluate: true, decode) SALMONN from one YAML config.

    python train.py --cfg-path configs/demo.yaml                                  # one CPU or GPU
    torchrun --nproc_per_node 8 train.py --cfg-path configs/config.yaml  # DDP (run.fsdp: true shards)
    python train.py --cfg-path configs/demo.yaml --options run.optims.max_epoch=1 --resume auto
    python train.py --cfg-path configs/config.yaml --dryrun   # your data and run settings, the tiny model
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from config import ConfigError, load_config
from dataset_v1 import AnnotationError, AudioError
from models.salmonn import CheckpointError
from prompting import PromptError
from runner import NonFiniteLossError, Runner, build_datasets, build_model, check_fresh_output_dir
from utils import barrier, destroy_distributed, init_distributed, seed_everything, setup_logging

log = logging.getLogger("salmonn.train")

# --dryrun: these model keys come from the tiny embedded default, the rest of the config stays the user's.
DRYRUN_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
DRYRUN_MODEL_KEYS = ("llm_path", "whisper_path", "beats_path", "random_init", "qformer_hidden_size",
                     "qformer_num_layers", "qformer_num_heads", "qformer_intermediate_size",
                     "qformer_initializer_range", "torch_dtype")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="experiment YAML (model/datasets/run/generate)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. run.batch_size_train=4 run.optims.init_lr=1e-4")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint (auto: the latest in run.output_dir); same as run.resume")
    parser.add_argument("--dryrun", action="store_true",
                        help="check your data and run settings end to end with the tiny embedded model (no download) "
                             "instead of the configured one; writes to <run.output_dir>_dryrun")
    return parser.parse_args(argv)


def dryrun_config(cfg: DictConfig) -> DictConfig:
    """The config with the tiny model of configs/demo.yaml in place of the real one, and its own output folder."""
    tiny = load_config(str(DRYRUN_CONFIG)).model  # with the defaults of the keys demo.yaml leaves out
    for key in DRYRUN_MODEL_KEYS:
        cfg.model[key] = str(DRYRUN_CONFIG.parents[1] / tiny[key]) if key.endswith("_path") and tiny[key] else tiny[key]
    cfg.model.ckpt = ""  # the tiny checkpoint fits the demo's LoRA, not yours: the trained parts start fresh
    cfg.run.output_dir = f"{cfg.run.output_dir}_dryrun"
    return cfg


def save_resolved_config(cfg: DictConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.cfg_path, args.options, required_sections=("model", "datasets"))
    if args.resume is not None:
        cfg.run.resume = args.resume
    if args.dryrun:
        cfg = dryrun_config(cfg)
    if cfg.model.merge_lora:
        raise ConfigError("model.merge_lora: true is for inference (cli_inference.py, evaluate.py, web_demo.py): "
                          "train.py trains and validates the LoRA unmerged; set it to false")
    needed = "test_ann_path" if cfg.run.evaluate else "train_ann_path"
    if not cfg.datasets[needed]:
        raise ConfigError(f"datasets.{needed} is empty: nothing to {'decode' if cfg.run.evaluate else 'train on'}")
    output_dir = Path(cfg.run.output_dir)
    if not cfg.run.evaluate:
        check_fresh_output_dir(output_dir, cfg.run.resume)
    dist_info = init_distributed(cfg.run.device)
    setup_logging(str(output_dir), dist_info.rank)
    log.info("config %s resolved:\n%s", args.cfg_path, OmegaConf.to_yaml(cfg))
    if dist_info.is_main:
        save_resolved_config(cfg, output_dir)
    log.info("%d process(es), this one rank %d on %s", dist_info.world_size, dist_info.rank, dist_info.device)

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
        barrier()  # every rank done before teardown: gloo torn down under a finishing peer can abort it at exit
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    finally:
        destroy_distributed()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main() for the command line: a config or missing-file error is one line, not a traceback."""
    try:
        return main(argv)
    except (ConfigError, FileNotFoundError, CheckpointError, AnnotationError, AudioError, PromptError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
