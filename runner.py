"""The training recipe: optimisation, validation, decoding, checkpoints and exact resume.

One `Runner` drives one process; `torchrun` starts several of them for DDP/FSDP. Everything it needs comes
from the config's `run:` and `generate:` sections.

Conventions that the tests rely on:
- a *step* is one optimizer step of `accum_grad_iters` micro-batches per process; an *epoch* is
  `iters_per_epoch` steps (or one pass over the data when `epoch_based`), and the lr schedule is per step;
- the loss of a step is the sum of token NLLs over all its micro-batches and ranks divided by the number of
  target tokens they hold, so 2 processes x batch b give the same update as 1 process x batch 2b, and k
  accumulated micro-batches the same as one batch k times as large;
- data order depends only on (seed, data epoch), and a checkpoint records how many batches of the current data
  epoch were consumed, so a resumed run sees the same batches, RNG draws and updates as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate.data_loader import SkipBatchSampler
from transformers.trainer_pt_utils import get_length_grouped_indices
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler, Subset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from config import SCHEMA, ConfigError, config_to_dict
from dataset_v1 import build_dataset, collate
from inference import decode, write_decode_outputs
from metrics import Scorer
from models.llm import decoder_layer_classes
from models.checkpoint import CheckpointError, load_checkpoint_dict, read_checkpoint, to_original_name
from models.salmonn import SALMONN
from utils import (
    DistInfo,
    all_reduce_sum,
    atomic_file,
    autocast,
    autocast_dtype,
    barrier,
    broadcast_object,
    file_fingerprint,
    gather_objects,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("salmonn.runner")

CHECKPOINT_RE = re.compile(r"^checkpoint_step(\d+)\.pth$")
BEST_NAME = "checkpoint_best.pth"
# What a training checkpoint holds (Runner.save_checkpoint writes them; docs/design.md says what each means).
CHECKPOINT_FIELDS = ("model", "optimizer", "scheduler", "scaler", "config", "epoch", "step", "rng", "data_position",
                     "world_size", "skipped_steps", "best", "valid")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and run.nonfinite_loss is 'stop'."""


class OutputDirInUse(ConfigError):
    """A fresh run was pointed at a folder that holds another run's checkpoints."""


# ----------------------------------------------------------------------------------------------------------
# small pure helpers


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, warmup_start_lr: float, init_lr: float,
                     min_lr: float) -> float:
    """The original SALMONN/LAVIS schedule: linear warm-up from warmup_start_lr to init_lr, then a cosine from
    init_lr to min_lr over the whole run (the cosine's phase counts the warm-up steps too, as in the original)."""
    if step < warmup_steps:
        return min(init_lr, warmup_start_lr + (init_lr - warmup_start_lr) * step / max(warmup_steps, 1))
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: no weight decay on norms, biases and other 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters (check the model.freeze_* and model.lora keys)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk): the ones written before are intact."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through utils.atomic_file: a crash mid-write never leaves a truncated checkpoint, and a failed
    write (a full disk) leaves no temporary file and says so."""
    try:
        with atomic_file(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError ("unexpected pos ...")
        free = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointWriteError(f"cannot write {path}: {str(e).strip().splitlines()[-1]} ({free:.0f} MiB free "
                                   "on its disk: is it full?); the checkpoints written before are intact") from e


def step_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in output_dir, oldest first."""
    found = []
    for path in output_dir.glob("checkpoint_step*.pth"):
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """run.resume: '' -> None, 'auto' -> the latest step checkpoint in output_dir (None if there is none)."""
    if not resume:
        return None
    if resume == "auto":
        found = step_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume: checkpoint not found: '{resume}'")
    return path


def check_fresh_output_dir(output_dir: Path, resume: str) -> None:
    """Refuse to start a fresh run (no run.resume) in a folder that holds checkpoints: its checkpoint_best.pth,
    metrics.jsonl and step checkpoints belong to another run, which a new one would silently replace or prune."""
    if resume:
        return
    found = sorted(p.name for p in output_dir.glob("checkpoint_*.pth"))
    if found:
        raise OutputDirInUse(
            f"run.output_dir '{output_dir}' already holds a run ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}): continue it with --resume auto, choose another run.output_dir, "
            "or move the old run aside yourself")


# Settings that never change what a run trains (prefixes of dotted keys): they may differ when it resumes.
RESUME_FREE = ("run.resume", "run.output_dir", "run.evaluate", "run.num_workers", "run.log_freq",
               "run.save_every_steps", "run.keep_last", "run.valid_every_steps", "run.valid_decode_samples",
               "run.alignment_check", "run.best_metric", "generate.", "judge.", "submission.")


def resume_changes(cfg: DictConfig, ckpt: dict[str, Any]) -> list[str]:
    """How `cfg` differs from the config a checkpoint was trained with, in the settings that alter what a run
    trains (lr schedule, seed, batch size, data, model), as "key: old -> new". A key the checkpoint predates
    counts as its default."""
    stored, given, defaults = _flat(ckpt["config"]), _flat(config_to_dict(cfg)), _flat(SCHEMA)
    changes = [f"{key}: {stored.get(key, defaults.get(key))!r} -> {value!r}" for key, value in sorted(given.items())
               if not key.startswith(RESUME_FREE) and stored.get(key, defaults.get(key)) != value]
    digests = annotation_digests(cfg)
    changes += [f"the content of datasets.{SPLITS[split]} (sha256 {old[:12]}... -> {digests.get(split, 'none')[:12]}"
                "...)" for split, old in ckpt.get("data", {}).items() if digests.get(split) != old]
    return changes


def annotation_digests(cfg: DictConfig) -> dict[str, str]:
    """sha256 of the training and validation annotation files that exist (of each file of a list, joined by +):
    what a run was trained on."""
    paths = {split: cfg.datasets.get(SPLITS[split]) for split in ("train", "valid")} if "datasets" in cfg else {}
    files = {split: [path] if isinstance(path, str) else list(path) for split, path in paths.items() if path}
    return {split: "+".join(file_fingerprint(f)["sha256"] for f in fs) for split, fs in files.items()
            if all(Path(f).is_file() for f in fs)}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"run.optims.init_lr": value, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _every(step: int, period: int) -> bool:
    """True every `period` steps (never for period 0)."""
    return period > 0 and step % period == 0


def batch_size_of(batch: dict[str, Any]) -> int:
    return len(batch["id"])


# ----------------------------------------------------------------------------------------------------------
# data


def length_grouped_indices(lengths: list[float], batch_size: int, world_size: int, rank: int, seed: int) -> list[int]:
    """`run.group_by_length`: one rank's samples for a data epoch, shuffled by `seed`, then sorted by length
    within mega-batches of up to 50 global batches (transformers' grouping), so that a batch's samples are alike
    in length and little of it is padding. Ranks take every world_size-th index of one shared order, as
    DistributedSampler does: at each step their batches are alike in length, and every rank gets as many."""
    order = get_length_grouped_indices(lengths, batch_size * world_size, generator=torch.Generator().manual_seed(seed))
    order += order[: (-len(order)) % world_size]
    return order[rank::world_size]


class BatchStream:
    """An endless stream of training micro-batches, epoch after epoch, in an order fixed by (seed, data epoch).

    `position` = (data epoch, batches of it consumed); a stream built from a position continues exactly there.
    """

    def __init__(self, make_loader: Callable[[int, int], DataLoader], epoch: int = 0, batch: int = 0):
        self.make_loader = make_loader
        self.epoch, self.batch = epoch, batch
        self.iterator: Iterator[dict[str, Any]] = iter(make_loader(epoch, batch))

    def next(self) -> dict[str, Any]:
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self.iterator = iter(self.make_loader(self.epoch, 0))
            batch = next(self.iterator)
        self.batch += 1
        return batch

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


@dataclass
class StepResult:
    loss: float
    acc: float
    tokens: int
    samples: int
    grad_norm: float
    skipped: bool


# ----------------------------------------------------------------------------------------------------------
# building the model and data, and the runner


SPLITS = {"train": "train_ann_path", "valid": "valid_ann_path", "test": "test_ann_path"}


def build_model(cfg: DictConfig):
    """SALMONN from the `model:` section (loading the LLM can take minutes for the real model)."""
    log.info("building the model (LLM %s, Whisper %s, BEATs %s)...", cfg.model.llm_path, cfg.model.whisper_path,
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
    datasets = {}
    for split in splits:
        ann_path = cfg.datasets[SPLITS[split]]
        if not ann_path:
            continue
        datasets[split] = build_dataset(ann_path, cfg.datasets, split, cfg.model, seed=cfg.run.seed)
        log.info("%s split: %d samples from %s", split, len(datasets[split]), ann_path)
    return datasets


def fsdp_wrap(model: nn.Module, amp_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2 (`fully_shard`): each decoder layer of the LLM (its `_no_split_modules` class: LlamaDecoderLayer,
    Qwen3DecoderLayer, ...) is a shard unit, then the whole model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype
          else MixedPrecisionPolicy())
    layers = decoder_layer_classes(model.llama_model)
    for module in model.modules():
        if isinstance(module, layers):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def error_rates(records: list[dict[str, Any]]) -> dict[str, float]:
    """WER (CER for Chinese) of the ASR records, `asr/<lang>/<wer|cer>`: the alignment check's scores."""
    scores = Scorer().score([r for r in records if r["task"].startswith("asr")])
    return {k: v for k, v in scores.items() if k.endswith(("/wer", "/cer"))}


class Runner:
    """Trains, validates and decodes one SALMONN model with the settings of `cfg.run`."""

    def __init__(self, cfg: DictConfig, model: nn.Module, datasets: dict[str, Dataset], dist_info: DistInfo,
                 scorer: Scorer | None = None):
        self.cfg, self.run_cfg = cfg, cfg.run
        self.scorer = scorer or Scorer()  # the scripts hand in a challenge's scorer (humdial.scoring.HumDialScorer)
        self.datasets = datasets
        self.dist = dist_info
        self.device = dist_info.device
        self.output_dir = Path(self.run_cfg.output_dir)
        self.audio_seconds: list[float] | None = None  # per training sample, read once for group_by_length
        self.amp_dtype = autocast_dtype(self.run_cfg.precision, self.device, model.llm_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._check_run_config()

        self.iters_per_epoch = self._iters_per_epoch()
        self.total_steps = self.run_cfg.optims.max_epoch * self.iters_per_epoch
        self.step = 0
        self.skipped_steps = 0
        self.best = {"metric": self.run_cfg.best_metric, "value": None, "step": None}
        self.data_position = {"epoch": 0, "batch": 0}
        self.rng_restored = False
        self.writer = None
        self.data_digests = annotation_digests(cfg)  # what a resume checks the data against

        self.model = model.to(self.device)
        self.resume_path = resolve_resume(self.run_cfg.resume, self.output_dir)
        checkpoint = self.read_training_checkpoint(self.resume_path) if self.resume_path else None
        if checkpoint is not None:  # weights go in before wrapping: FSDP then shards the resumed weights
            load_checkpoint_dict(self.model, checkpoint, source=str(self.resume_path))
        if self.run_cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.padding_free = self.run_cfg.padding_free  # the training forward packs each micro-batch in one row
        self.wrapped = self._wrap(self.model)
        optims = self.run_cfg.optims
        self.optimizer = torch.optim.AdamW(param_groups(self.wrapped, optims.weight_decay), lr=optims.init_lr,
                                           betas=(optims.beta1, optims.beta2), eps=optims.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine_lr(step, self.total_steps, optims.warmup_steps, optims.warmup_start_lr,
                                          optims.init_lr, optims.min_lr) / optims.init_lr,
        )
        if checkpoint is not None:
            self._restore_training_state(checkpoint)

    # ---------------------------------------------------------------- setup
    def _check_run_config(self) -> None:
        """What config.py cannot check alone (its ranges cover sizes, rates and counts)."""
        if self.run_cfg.fsdp and not self.dist.distributed:
            raise ConfigError("run.fsdp: true needs several processes (start with torchrun --nproc_per_node N)")

    def _iters_per_epoch(self) -> int:
        if not self.run_cfg.epoch_based or "train" not in self.datasets:  # (run.evaluate has no train split)
            return self.run_cfg.iters_per_epoch
        batches = len(self._train_loader(0, 0))
        steps = batches // self.run_cfg.accum_grad_iters
        if steps < 1:
            raise ConfigError(f"epoch_based: the training split gives {batches} batches per process, fewer than "
                             f"run.accum_grad_iters={self.run_cfg.accum_grad_iters}")
        return steps

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP (or FSDP) across processes; the bare model on one."""
        if not self.dist.distributed:
            return model
        if self.run_cfg.fsdp:
            return fsdp_wrap(model, self.amp_dtype)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _autocast(self):
        return autocast(self.amp_dtype, self.device)

    # ---------------------------------------------------------------- data
    def _train_loader(self, data_epoch: int, skip_batches: int) -> DataLoader:
        """The data epoch's batches for this rank, in an order fixed by (seed, data epoch), minus the first
        `skip_batches` (already consumed before a resume; they are never loaded)."""
        dataset = self.datasets["train"]
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(data_epoch)
        if self.run_cfg.group_by_length:
            if self.audio_seconds is None:
                self.audio_seconds = dataset.audio_seconds()
            sampler = length_grouped_indices(self.audio_seconds, self.run_cfg.batch_size_train, self.dist.world_size,
                                             self.dist.rank, seed=self.run_cfg.seed + data_epoch)
        else:
            sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=self.run_cfg.seed, drop_last=False)
            sampler.set_epoch(data_epoch)
        batches = BatchSampler(sampler, self.run_cfg.batch_size_train, drop_last=False)
        if skip_batches:
            batches = SkipBatchSampler(batches, skip_batches=skip_batches)
        # A generator of its own: worker seeds must not draw from (and so shift) the global RNG.
        generator = torch.Generator().manual_seed(self.run_cfg.seed + data_epoch)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                          num_workers=self.run_cfg.num_workers, generator=generator,
                          pin_memory=self.device.type == "cuda")

    def _eval_loader(self, split: str, limit: int = 0) -> DataLoader:
        """This rank's share of a split, in order, no sample repeated (FSDP pads so every rank runs alike)."""
        dataset = self.datasets[split]
        indices = list(range(len(dataset)))[: limit or None]
        if self.run_cfg.fsdp:
            pad = (-len(indices)) % self.dist.world_size
            indices = indices + indices[:pad]
        share = Subset(dataset, indices[self.dist.rank:: self.dist.world_size])
        return DataLoader(share, sampler=SequentialSampler(share), batch_size=self.run_cfg.batch_size_eval,
                          collate_fn=collate, num_workers=self.run_cfg.num_workers,
                          generator=torch.Generator().manual_seed(self.run_cfg.seed),
                          pin_memory=self.device.type == "cuda")

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepResult:
        """Forward/backward every micro-batch, normalise the gradients by the step's target tokens over all
        micro-batches and ranks, clip, and update (or stop/skip on a non-finite loss)."""
        self.wrapped.train()
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss_sum, tokens, correct, samples
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = nullcontext() if last or not isinstance(self.wrapped, DistributedDataParallel) \
                else self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    out = self.wrapped(batch)
                self.scaler.scale(out["loss_sum"]).backward()
            totals += torch.stack([out["loss_sum"].detach().double(), out["num_tokens"].double(),
                                   out["correct"].double(), torch.tensor(batch_size_of(batch), device=self.device,
                                                                         dtype=torch.float64)])
        all_reduce_sum(totals)
        loss_sum, tokens, correct, samples = totals.tolist()
        loss = loss_sum / max(tokens, 1.0)
        if not math.isfinite(loss):
            return self._nonfinite(f"loss ({loss})", loss, int(tokens), int(samples))

        self.scaler.unscale_(self.optimizer)
        # DDP/FSDP average gradients over ranks: times world size over the step's tokens gives sum / tokens.
        factor = self.dist.world_size / max(tokens, 1.0)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.run_cfg.grad_clip or float("inf")))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # (fp16: the scaler skips the step)
            return self._nonfinite(f"gradient norm ({grad_norm})", loss, int(tokens), int(samples))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(loss=loss, acc=correct / max(tokens, 1.0), tokens=int(tokens), samples=int(samples),
                          grad_norm=grad_norm, skipped=False)

    def _nonfinite(self, what: str, loss: float, tokens: int, samples: int) -> StepResult:
        """Stop (run.nonfinite_loss: stop) or skip the step, before any weight changes."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.run_cfg.nonfinite_loss == "stop":
            latest = step_checkpoints(self.output_dir)
            last_good = f"{latest[-1][1]}" if latest else "none written yet"
            raise NonFiniteLossError(
                f"non-finite {what} at step {self.step + 1}; training stopped before the update, so the "
                f"weights are unchanged. Last good checkpoint: {last_good}. Try a lower run.optims.init_lr, "
                f"run.precision: bf16 or fp32, or run.nonfinite_loss: skip to skip such steps.")
        self.skipped_steps += 1
        log.warning("non-finite %s at step %d: step skipped (%d skipped so far)", what, self.step + 1,
                    self.skipped_steps)
        self.scheduler.step()
        return StepResult(loss=loss, acc=0.0, tokens=tokens, samples=samples, grad_norm=float("nan"), skipped=True)

    # ---------------------------------------------------------------- training loop
    def train(self) -> dict[str, Any]:
        """Train to max_epoch * iters_per_epoch steps, validating and checkpointing on the way."""
        if "train" not in self.datasets:
            raise ValueError("training needs datasets.train_ann_path")
        if self.resume_path is None and self.run_cfg.resume == "auto":
            log.info("run.resume=auto: no checkpoint in %s, starting from scratch", self.output_dir)
        if not self.rng_restored:
            seed_everything(self.run_cfg.seed + self.dist.rank)
        self._open_logs()

        stream = BatchStream(self._train_loader, **self.data_position)
        per_step = self.run_cfg.batch_size_train * self.run_cfg.accum_grad_iters * self.dist.world_size
        log.info("training: %d steps (%d epochs x %d steps), %d samples per step (%d per process x %d accumulation "
                 "x %d processes), precision %s, output %s", self.total_steps, self.run_cfg.optims.max_epoch,
                 self.iters_per_epoch, per_step, self.run_cfg.batch_size_train, self.run_cfg.accum_grad_iters,
                 self.dist.world_size, self.amp_dtype or "fp32", self.output_dir)
        with logging_redirect_tqdm():
            last_valid = self._train_loop(stream)
        self._close_logs()
        return {"step": self.step, "best": self.best, "skipped_steps": self.skipped_steps, "valid": last_valid}

    def _train_loop(self, stream: BatchStream) -> dict[str, float]:
        """Steps until total_steps; returns the last validation metrics."""
        last_valid: dict[str, float] = {}
        with tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.dist.is_main,
                  dynamic_ncols=True) as bar:  # closed on an error too: its message then gets a line of its own
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                micro_batches = [stream.next() for _ in range(self.run_cfg.accum_grad_iters)]
                lr = self.optimizer.param_groups[0]["lr"]
                result = self.train_step(micro_batches)
                self.step += 1
                self.data_position = stream.position
                seconds = time.perf_counter() - t0
                self._log_step(result, lr, seconds, bar)

                end_of_epoch = self.step % self.iters_per_epoch == 0
                valid: dict[str, float] = {}
                if end_of_epoch or _every(self.step, self.run_cfg.valid_every_steps):
                    valid = self.validate()
                    last_valid = valid or last_valid
                if end_of_epoch or valid or _every(self.step, self.run_cfg.save_every_steps):
                    self.save_checkpoint(valid)
        return last_valid

    # ---------------------------------------------------------------- logging
    def _open_logs(self) -> None:
        if not self.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics_log()
        self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.step + 1)

    def _close_logs(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _truncate_metrics_log(self) -> None:
        """On resume, drop lines logged after the checkpoint's step (a killed run may have logged a few more) and a
        last line cut short (a power loss), with a warning; a broken line elsewhere is an error naming it."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                step = json.loads(line)["step"] if line.strip() else None
            except (ValueError, KeyError, TypeError) as e:
                if number < len(lines):
                    raise ConfigError(f"{self.metrics_path}:{number}: not a metrics line ({e}); fix or remove "
                                      "the line") from e
                log.warning("%s:%d: last line cut short (a power loss?); dropped it", self.metrics_path, number)
                continue
            if step is not None and step <= self.step:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _log_step(self, result: StepResult, lr: float, seconds: float, bar: tqdm) -> None:
        samples_per_s = result.samples / max(seconds, 1e-9)
        tokens_per_s = result.tokens / max(seconds, 1e-9)
        epoch = (self.step - 1) // self.iters_per_epoch
        self._append_metrics({"kind": "train", "step": self.step, "epoch": epoch, "loss": result.loss,
                              "acc": result.acc, "lr": lr, "grad_norm": result.grad_norm,
                              "samples_per_s": samples_per_s, "skipped": result.skipped})
        if not self.dist.is_main:
            return
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
        if self.step % self.run_cfg.log_freq == 0 or self.step == 1:
            for name, value in (("loss", result.loss), ("acc", result.acc), ("lr", lr),
                                ("grad_norm", result.grad_norm), ("samples_per_s", samples_per_s),
                                ("tokens_per_s", tokens_per_s), ("skipped_steps", self.skipped_steps)):
                self.writer.add_scalar(f"train/{name}", value, self.step)
            log.info("step %d/%d epoch %d: loss %.4f acc %.3f lr %.3e grad_norm %.3f %.1f samples/s %.0f tokens/s",
                     self.step, self.total_steps, epoch, result.loss, result.acc, lr, result.grad_norm,
                     samples_per_s, tokens_per_s)

    # ---------------------------------------------------------------- validation and decoding
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss and token accuracy (all ranks), plus decode metrics on a subset if configured."""
        if "valid" not in self.datasets:
            return {}
        log.info("validating at step %d", self.step)
        model = self.model  # under DDP: the bare module (no gradient sync); under FSDP: the sharded model
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in self._eval_loader("valid"):
            with self._autocast():
                out = model(batch)
            totals += torch.stack([out["loss_sum"].double(), out["num_tokens"].double(), out["correct"].double()])
        all_reduce_sum(totals)
        loss_sum, tokens, correct = totals.tolist()
        metrics = {"loss": loss_sum / max(tokens, 1.0), "acc": correct / max(tokens, 1.0)}
        if self.run_cfg.valid_decode_samples:
            records = self.decode("valid", limit=self.run_cfg.valid_decode_samples)
            metrics.update(broadcast_object(self.scorer.score(records) if self.dist.is_main else None))
            metrics.update(self.alignment_check(records))
        self.wrapped.train()
        if self.dist.is_main:
            log.info("valid at step %d: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            for name, value in metrics.items():
                self.writer.add_scalar(f"valid/{name}", value, self.step)
        self._append_metrics({"kind": "valid", "step": self.step, **metrics})
        return metrics

    def alignment_check(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """`run.alignment_check`: the decoded ASR samples again with their audio silenced (zeros of the same
        length), scored as `silenced/<task>/<lang>/<wer|cer>`. A connector that has aligned to the LLM scores far
        better with the audio; one that has not scores the same (stage 1's first question: is it listening?)."""
        dataset = self.datasets["valid"]
        asr = broadcast_object(any(r["task"].startswith("asr") for r in records) if self.dist.is_main else None)
        if not (self.run_cfg.alignment_check and asr) or getattr(dataset, "silence_audio", True):
            return {}
        self.datasets["valid_silenced"] = copy.copy(dataset)
        self.datasets["valid_silenced"].silence_audio = True
        silenced = self.decode("valid_silenced", limit=self.run_cfg.valid_decode_samples)
        scores = broadcast_object({f"silenced/{k}": v for k, v in error_rates(silenced).items()}
                                  if self.dist.is_main else None)
        if self.dist.is_main:
            audio = error_rates(records)
            log.info("alignment check at step %d: %s", self.step, "; ".join(
                f"{k} {v:.1f} with audio, {scores['silenced/' + k]:.1f} silenced" for k, v in audio.items()))
        return scores

    @torch.no_grad()
    def decode(self, split: str, limit: int = 0) -> list[dict[str, Any]]:
        """Decode a split with the `generate:` settings: [{id, task, prompt, prediction, reference, language,
        emotions}] in dataset order on rank 0 (an empty list on the other ranks)."""
        self.model.eval()
        records = list(decode(self.model, self._eval_loader(split, limit), config_to_dict(self.cfg.generate),
                              self.amp_dtype, self.scorer, full_params=self._full_params,
                              show_progress=self.dist.is_main))
        shards = gather_objects(records)
        if not self.dist.is_main:
            return []
        # Rank r decoded samples r, r + W, ...: interleave back into dataset order (FSDP padding dropped).
        merged = [rec for group in zip(*[s + [None] * (max(map(len, shards)) - len(s)) for s in shards])
                  for rec in group if rec is not None]
        n = min(len(self.datasets[split]), limit) if limit else len(self.datasets[split])
        return merged[:n]

    def _full_params(self):
        """generate() bypasses forward(): under FSDP gather the full parameters for it."""
        if not self.run_cfg.fsdp:
            return nullcontext()
        return _Unsharded(self.wrapped)

    def evaluate(self, split: str = "test") -> Path:
        """`run.evaluate: true`: decode a split into <output_dir>/eval_<annotation name>/, the files evaluate.py
        writes (predictions.jsonl, submission_<task>.csv, scores.json). Returns that folder."""
        if split not in self.datasets:
            raise ValueError(f"run.evaluate needs datasets.{split}_ann_path")
        ann_path = self.cfg.datasets[f"{split}_ann_path"]
        out_dir = self.output_dir / f"eval_{Path(ann_path).stem}"
        records = self.decode(split)
        if self.dist.is_main:
            info = {"annotation": str(ann_path), "generate": config_to_dict(self.cfg.generate)}
            scores, _ = write_decode_outputs(records, out_dir, self.cfg, info, self.scorer)
            log.info("wrote %d predictions to %s; scores: %s", len(records), out_dir,
                     ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) or "none (no references)")
        barrier()
        return out_dir

    # ---------------------------------------------------------------- checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained tensors under the original SALMONN names, on CPU. Under FSDP every rank takes part in the
        gather and only rank 0 gets the tensors."""
        if not self.run_cfg.fsdp:
            return {k: v.cpu() for k, v in self.model.trainable_state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return {}
        trained = [name for name, p in self.model.named_parameters() if p.requires_grad]
        return {to_original_name(name): full[name] for name in trained}

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.run_cfg.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.wrapped, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if not self.run_cfg.fsdp:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.wrapped, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    def save_checkpoint(self, valid_metrics: dict[str, float]) -> None:
        """Write checkpoint_step<N>.pth (and checkpoint_best.pth when the best metric improved); keep the last
        run.keep_last step checkpoints. Every rank takes part (RNG states, FSDP gathers); rank 0 writes."""
        is_best = self._update_best(valid_metrics)
        state = {
            "model": self.trainable_state_dict(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": config_to_dict(self.cfg),
            "epoch": self.step // self.iters_per_epoch,
            "step": self.step,
            "rng": gather_objects(rng_state()),  # one per rank
            "data_position": dict(self.data_position),
            "world_size": self.dist.world_size,
            "skipped_steps": self.skipped_steps,
            "best": dict(self.best),
            "valid": dict(valid_metrics),
            "data": self.data_digests,
        }
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / f"checkpoint_step{self.step}.pth"
            atomic_save(state, path)
            log.info("saved %s", path)
            if is_best:
                atomic_save(state, self.output_dir / BEST_NAME)
                log.info("new best %s = %.4f at step %d: saved %s", self.best["metric"], self.best["value"],
                         self.step, self.output_dir / BEST_NAME)
            for _, old in step_checkpoints(self.output_dir)[: -self.run_cfg.keep_last]:
                old.unlink()
        barrier()

    def _update_best(self, valid_metrics: dict[str, float]) -> bool:
        name = self.run_cfg.best_metric
        if name not in valid_metrics:
            if valid_metrics:
                log.warning("run.best_metric '%s' is not among the validation metrics %s", name, sorted(valid_metrics))
            return False
        value = valid_metrics[name]
        better = self.best["value"] is None or (
            value > self.best["value"] if self.run_cfg.best_metric_mode == "max" else value < self.best["value"])
        if better:
            self.best = {"metric": name, "value": value, "step": self.step}
        return better

    @staticmethod
    def read_training_checkpoint(path: Path) -> dict[str, Any]:
        """A checkpoint this runner wrote (read_checkpoint's checks, then every field a resume needs)."""
        log.info("reading checkpoint %s", path)
        ckpt = read_checkpoint(path)
        missing = [k for k in CHECKPOINT_FIELDS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} cannot resume training: it lacks {missing} (a weights-only checkpoint "
                                  "such as salmonn_v1.pth goes in model.ckpt instead)")
        return ckpt

    def _restore_training_state(self, ckpt: dict[str, Any]) -> None:
        """Optimizer, schedule, scaler, counters, data position and RNG: everything beyond the weights."""
        self._load_optimizer_state(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = ckpt["step"]
        self.skipped_steps = ckpt["skipped_steps"]
        self.best = ckpt["best"]
        self.data_position = ckpt["data_position"]
        if ckpt["world_size"] == self.dist.world_size:
            set_rng_state(ckpt["rng"][self.dist.rank])
            self.rng_restored = True
        else:
            log.warning("checkpoint was written by %d processes, this run has %d: data order and RNG streams "
                        "differ from an uninterrupted run", ckpt["world_size"], self.dist.world_size)
        self._apply_optimizer_settings()
        log.info("resumed at step %d (epoch %d, data epoch %d, batch %d)", self.step, ckpt["epoch"],
                 self.data_position["epoch"], self.data_position["batch"])

    def _apply_optimizer_settings(self) -> None:
        """The config's optimizer settings and lr schedule over those a checkpoint restored. They are the same
        values unless --resume-with-changes changed them: then the run follows the new schedule from its step on,
        not an lr of neither schedule."""
        optims = self.run_cfg.optims
        self.scheduler.base_lrs = [optims.init_lr] * len(self.optimizer.param_groups)
        for group, lr_lambda in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group.update(initial_lr=optims.init_lr, lr=optims.init_lr * lr_lambda(self.scheduler.last_epoch),
                         betas=(optims.beta1, optims.beta2), eps=optims.eps)
        self.optimizer.param_groups[0]["weight_decay"] = optims.weight_decay  # (group 1: norms and biases, none)


class _Unsharded:
    """FSDP2: every shard unit holds its full parameters and keeps them across forward calls. generate() needs
    this: it bypasses the root's forward(), and ranks stop after different numbers of tokens, so per-layer
    all-gathers inside it would not line up across ranks."""

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self) -> None:
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def __exit__(self, *exc: Any) -> None:
        for unit in self.units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
