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
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from config import ConfigError, add_config_arguments, load_config
from dataset_v1 import AnnotationError, AudioError
from humdial.scoring import HumDialScorer
from inference import check_audio_readable
from models.checkpoint import CheckpointError, check_model_files
from prompting import PromptError
from runner import (CheckpointWriteError, NonFiniteLossError, Runner, build_datasets, build_model,
                    check_fresh_output_dir, resolve_resume, resume_changes)
from utils import (DistInfo, FolderInUse, barrier, destroy_distributed, error_message, hold_folder, init_distributed,
                   seed_everything, setup_logging)

log = logging.getLogger("salmonn.train")

# --dryrun: these model keys come from the tiny embedded default, the rest of the config stays the user's.
DRYRUN_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
DRYRUN_MODEL_KEYS = ("llm_path", "whisper_path", "beats_path", "random_init", "qformer_hidden_size",
                     "qformer_num_layers", "qformer_num_heads", "qformer_intermediate_size",
                     "qformer_initializer_range", "torch_dtype")
DRYRUN_DATASETS_KEYS = ("whisper_path",)  # the original configs name Whisper here too: the tiny one's features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "experiment YAML (model/datasets/run/generate); several merge in order",
                         required=True)
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint (auto: the latest in run.output_dir); same as run.resume")
    parser.add_argument("--resume-with-changes", action="store_true",
                        help="resume although settings that alter the run (lr schedule, seed, batch size, data, "
                             "model) differ from the checkpoint's: they apply from its step on, listed in the log")
    parser.add_argument("--dryrun", action="store_true",
                        help="check your data and run settings end to end with the tiny embedded model (no download) "
                             "instead of the configured one; writes to <run.output_dir>_dryrun")
    return parser.parse_args(argv)


def dryrun_config(cfg: DictConfig) -> DictConfig:
    """The config with the tiny model of configs/demo.yaml in place of the real one, and its own output folder."""
    tiny_cfg = load_config(str(DRYRUN_CONFIG))  # with the defaults of the keys demo.yaml leaves out
    for section, keys in (("model", DRYRUN_MODEL_KEYS), ("datasets", DRYRUN_DATASETS_KEYS)):
        tiny = tiny_cfg[section]
        for key in keys:
            cfg[section][key] = (str(DRYRUN_CONFIG.parents[1] / tiny[key]) if key.endswith("_path") and tiny[key]
                                 else tiny[key])
    cfg.model.ckpt = ""  # the tiny checkpoint fits the demo's LoRA, not yours: the trained parts start fresh
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("--dryrun: run.device is %s but no CUDA device is visible: the tiny model runs on the CPU",
                    cfg.run.device)
        cfg.run.device = "cpu"
    cfg.run.output_dir = f"{cfg.run.output_dir}_dryrun"
    return cfg


def save_resolved_config(cfg: DictConfig, path: Path) -> None:
    """The config a run starts with (config.yaml), or resumes with when it changed (config_from_step<N>.yaml). An
    existing file is never written over: config.yaml stays the config the run started with."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")


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
    resumed = None if cfg.run.evaluate else resume_point(cfg, args.resume_with_changes)
    if not cfg.run.evaluate:
        check_fresh_output_dir(output_dir, cfg.run.resume)
    dist_info = init_distributed(cfg.run.device, cfg.run)
    with hold_folder(output_dir, "train.py") if dist_info.is_main else nullcontext():
        return run(cfg, args, dist_info, resumed)


def resume_point(cfg: DictConfig, with_changes: bool) -> tuple[int, list[str]] | None:
    """(step, changed settings) of the checkpoint a run resumes from, None for a fresh run. Settings that alter the
    run may differ from the checkpoint's only when asked (--resume-with-changes): resuming with another lr, seed,
    batch size or data gives a run that is neither the old one nor a new one."""
    path = resolve_resume(cfg.run.resume, Path(cfg.run.output_dir))
    if path is None:
        return None
    ckpt = Runner.read_training_checkpoint(path)
    changes = resume_changes(cfg, ckpt)
    if changes and not with_changes:
        raise ConfigError(f"{path} was trained with other settings: {'; '.join(changes)}. Resume with the same "
                          "settings, pass --resume-with-changes to apply these from its step on, or start a fresh "
                          "run in another run.output_dir")
    return ckpt["step"], changes


def run(cfg: DictConfig, args: argparse.Namespace, dist_info: DistInfo, resumed: tuple[int, list[str]] | None
        ) -> int:
    """Training (or run.evaluate's decode) in an output folder this process holds."""
    output_dir = Path(cfg.run.output_dir)
    setup_logging(str(output_dir), dist_info.rank)
    log.info("config %s resolved:\n%s", " + ".join(args.cfg_path), OmegaConf.to_yaml(cfg))
    if resumed and resumed[1]:
        log.warning("resuming at step %d with changed settings, applied from there on: %s", resumed[0],
                    "; ".join(resumed[1]))
    if dist_info.is_main and resumed is None:
        save_resolved_config(cfg, output_dir / "config.yaml")
    elif dist_info.is_main and resumed[1]:
        save_resolved_config(cfg, output_dir / f"config_from_step{resumed[0]}.yaml")
    log.info("%d process(es), this one rank %d on %s", dist_info.world_size, dist_info.rank, dist_info.device)

    check_model_files(cfg.model)  # what to download where, before any data or weights are read
    splits = ["test"] if cfg.run.evaluate else ["train", "valid"]
    datasets = build_datasets(cfg, splits)
    for dataset in datasets.values():  # a missing, unreadable or truncated clip fails now, not mid-run
        check_audio_readable(dataset)
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    runner = Runner(cfg, model, datasets, dist_info, HumDialScorer())
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
    except (ConfigError, FileNotFoundError, CheckpointError, AnnotationError, AudioError, PromptError,
            FolderInUse, CheckpointWriteError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
