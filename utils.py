"""Config loading and validation, logging, seeding and distributed helpers shared by the scripts.

The config is one YAML per experiment with `model:`, `datasets:`, `run:` and `generate:` sections (the
original SALMONN layout). `load_config` merges `--options a.b=c` overrides, checks every key against the
schema below (so a misspelt key fails at start, naming the closest known key) and fills defaults.
"""

from __future__ import annotations

import difflib
import logging
import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf

from models.salmonn import DEFAULTS as MODEL_DEFAULTS


class ConfigError(ValueError):
    """A config that cannot be run: unknown, missing, retired or mistyped key."""


REQUIRED = "???"  # OmegaConf's marker for a value that must be given

# Every known key per section with its default. A nested dict is a sub-section (run.optims).
# A default of None accepts any type; otherwise the value must have the default's type (int is accepted
# where a float is expected).
SCHEMA: dict[str, dict[str, Any]] = {
    # The model's keys and defaults live with the model (models/salmonn.py); the two paths must be given.
    "model": {**MODEL_DEFAULTS, "llama_path": REQUIRED, "whisper_path": REQUIRED},
    "datasets": {
        "train_ann_path": "",  # annotation JSON written by convert.py (relative audio paths: its folder)
        "valid_ann_path": "",
        "test_ann_path": "",
        "turn_mode": "per_turn",  # per_turn: one <SpeechHere> slot per user turn | concat: the original fine-tune
        "text_inputs": "audio",  # audio | audio+transcript | audio+transcript+replies
        "concat_gap_s": 0.5,  # silence between turns in concat mode
        "silence_audio": False,  # ablation: every clip replaced by zeros of the same length
        # None = the model section's value
        "whisper_path": None,
        "prompt_path": None,
        "test_prompt_path": None,
        "prompt_template": None,
    },
    "run": {
        "seed": 42,
        "output_dir": "outputs/run",
        "evaluate": False,  # only decode the test split to <output_dir>/predictions_test.json
        "resume": "",  # '' | 'auto' (latest checkpoint in output_dir) | path to a checkpoint
        "device": "auto",  # auto (cuda if available) | cuda | cpu
        "precision": "auto",  # auto (bf16 on GPUs that support it, else fp16; fp32 on CPU) | bf16 | fp16 | fp32
        "fsdp": False,  # shard the model over the ranks (LLMs that do not fit one GPU)
        "log_freq": 5,
        "epoch_based": False,  # True: an epoch is one pass over the training data
        "iters_per_epoch": 3000,  # optimizer steps per epoch when epoch_based is False
        "accum_grad_iters": 1,
        "batch_size_train": 8,  # per process
        "batch_size_eval": 8,
        "num_workers": 4,
        "group_by_length": False,  # batches of samples of alike audio length: less padding, faster steps
        "grad_clip": 1.0,  # max global grad norm; 0 = no clipping
        "nonfinite_loss": "stop",  # stop | skip (skip the step and count it)
        "valid_every_steps": 0,  # 0 = validate at the end of each epoch only
        "valid_decode_samples": 0,  # decode this many validation samples and score them with metrics.py
        "best_metric": "acc",  # a validation metric name: loss, acc, or a decode metric (e.g. wer)
        "best_metric_mode": "max",  # max | min
        "save_every_steps": 0,  # 0 = checkpoint at the end of each epoch only
        "keep_last": 2,  # step/epoch checkpoints kept besides checkpoint_best.pth
        "optims": {
            "max_epoch": 30,
            "warmup_steps": 3000,
            "warmup_start_lr": 1e-6,
            "init_lr": 3e-5,
            "min_lr": 1e-5,
            "weight_decay": 0.05,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
        },
    },
    "generate": {
        "max_new_tokens": 200,
        "num_beams": 4,
        "do_sample": False,
        "min_length": 1,
        "temperature": 1.0,
        "top_p": 0.9,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
    },
}

# Keys of the original SALMONN configs that this repo does not use, and what to do instead.
RETIRED: dict[str, str] = {
    "run.amp": "use run.precision: auto | bf16 | fp16 | fp32",
    "run.use_distributed": "distributed runs start with torchrun; remove the key",
    "run.world_size": "torchrun sets the world size (--nproc_per_node/--nnodes); remove the key",
    "run.dist_url": "torchrun sets the rendezvous; remove the key",
    "run.gpu": "torchrun sets LOCAL_RANK; remove the key",
    "run.job_name": "use run.output_dir",
    "model.device_8bit": "8-bit loading is not supported; remove the key",
    "datasets.prefix": "audio paths resolve against the annotation file's folder (convert.py writes them so)",
}

# Keys whose value must be one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.torch_dtype": ("float32", "bfloat16", "float16"),
    "datasets.turn_mode": ("per_turn", "concat"),
    "datasets.text_inputs": ("audio", "audio+transcript", "audio+transcript+replies"),
    "run.device": ("auto", "cuda", "cpu"),
    "run.precision": ("auto", "bf16", "fp16", "fp32"),
    "run.nonfinite_loss": ("stop", "skip"),
    "run.best_metric_mode": ("max", "min"),
}

# Sections that are always present (filled with defaults when the file has none).
ALWAYS_PRESENT = ("run", "generate")


def load_config(cfg_path: str | list[str], options: list[str] | None = None,
                required_sections: tuple[str, ...] = ()) -> DictConfig:
    """Read a YAML config (several are merged in order, a later file winning), apply `key=value` overrides,
    validate it against SCHEMA and fill defaults.

    Raises ConfigError naming the offending key (with the closest known key for a misspelling).
    """
    paths = [cfg_path] if isinstance(cfg_path, (str, os.PathLike)) else list(cfg_path)
    files = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        files.append(loaded)
    user = OmegaConf.merge(*files, _parse_options(options or []))
    user_dict = OmegaConf.to_container(user, resolve=True)

    resolved: dict[str, Any] = {}
    _check_unknown(user_dict, SCHEMA, prefix="")
    for section, schema in SCHEMA.items():
        if section in user_dict:
            given = user_dict[section] if user_dict[section] is not None else {}
            resolved[section] = _fill_section(given, schema, prefix=section)
        elif section in ALWAYS_PRESENT:
            resolved[section] = _fill_section({}, schema, prefix=section)
    for section in required_sections:
        if section not in resolved:
            raise ConfigError(f"{' + '.join(map(str, paths))}: the `{section}:` section is required")
    return OmegaConf.create(resolved)


def _parse_options(options: list[str]) -> DictConfig:
    """`["a.b=c", ...]` -> config; values are parsed as YAML (numbers, bools, lists)."""
    for option in options:
        if "=" not in option:
            raise ConfigError(f"--options expects key=value, got {option!r}")
    return OmegaConf.from_dotlist(options)


def _check_unknown(given: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
    """Fail on the first key that the schema does not know, suggesting the closest known one."""
    for key, value in given.items():
        name = f"{prefix}{key}"
        if name in RETIRED:
            raise ConfigError(f"config key `{name}` is not used by this repo: {RETIRED[name]}")
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown config key `{name}`{hint} (known keys here: {known})")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key `{name}` must be a section (a mapping), got {value!r}")
            _check_unknown(value, schema[key], prefix=f"{name}.")


def _fill_section(given: dict[str, Any], schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Merge `given` over the defaults, failing on a missing required key or a mistyped value."""
    out: dict[str, Any] = {}
    for key, default in schema.items():
        name = f"{prefix}.{key}"
        if isinstance(default, dict):
            out[key] = _fill_section(given.get(key) or {}, default, prefix=name)
            continue
        value = given.get(key, default)
        if value == REQUIRED:
            raise ConfigError(f"required config key `{name}` is missing")
        _check_type(name, value, default)
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"config key `{name}` must be one of {', '.join(CHOICES[name])}, got {value!r}")
        out[key] = value
    return out


def _check_type(name: str, value: Any, default: Any) -> None:
    if default is None or default == REQUIRED or value is None:
        return
    expected = type(default)
    ok = isinstance(value, expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if expected is int and isinstance(value, bool):
        ok = False
    if not ok:
        raise ConfigError(f"config key `{name}` must be {expected.__name__}, got {value!r} ({type(value).__name__})")


def config_to_dict(cfg: DictConfig | ListConfig) -> dict[str, Any]:
    """Plain-Python copy of a config (for checkpoints, which load with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------------------------------------------------
# logging


def setup_logging(output_dir: str | None = None, rank: int = 0, filename: str = "train.log") -> logging.Logger:
    """Log INFO to stdout (rank 0 only) and, when output_dir is given, to <output_dir>/<filename> (rank 0)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(output_dir) / filename, mode="a", encoding="utf-8")
        file.setFormatter(fmt)
        root.addHandler(file)
    return logging.getLogger("salmonn")


# ----------------------------------------------------------------------------------------------------------
# seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors/lists/numbers, so a checkpoint loads with torch.load(weights_only=True)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


# ----------------------------------------------------------------------------------------------------------
# distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, local rank, world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes (env://): nccl on GPUs, gloo on CPU.

    Without torchrun's variables this is a single process on `device` (auto = cuda if available).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but no CUDA device is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=timedelta(minutes=30),
            device_id=torch_device if device == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op on one process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list on one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
