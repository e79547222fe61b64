"""SALMONN at real size on CPU, in bf16, through the normal loading path: the proof that the full-size model loads,
trains and answers, with the memory and time of each phase.

    python -m scripts.make_real_shape_assets --out /data/real7b --llm 7b   # random weights, real shapes and formats
    python -m benchmarks.bench_real_size --assets /data/real7b --llm 7b   # ~15 GB RAM, ~15 min on 2 cores

Phases, each in this one process, with the peak resident set size (VmHWM, reset between phases through
/proc/self/clear_refs) and the resident size after it:
1. loading without waste: Whisper loaded whole and its encoder kept (the old path) vs its encoder only (ours);
2. build: `runner.build_model` on configs/finetune_humdial_7b.yaml pointed at the artifacts, `model.torch_dtype:
   bfloat16`, `from_pretrained`, and the released-format checkpoint loaded strictly;
3. training steps (`Runner.train_step`: forward, backward, clipping, AdamW) on a 5-turn dialogue of the demo
   corpus (with --count-flops, FLOPs counted by torch.utils.flop_counter): per-turn (five 30 s Whisper passes,
   88 speech tokens a turn), packed + trimmed + padding-free (one Whisper pass, the turns' windows only), and
   per-turn with run.gradient_checkpointing;
4. a short greedy generation for the same dialogue: time to first token and per token.
Writes `bench_real_size.json` into --out and prints a table; the memory plan's CPU prediction sits beside the
measured growth of a training step (parameters + activations).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import WhisperModel

from benchmarks.common import TokenClock, cpu_name
from config import add_config_arguments, load_config
from dataset_v1 import build_dataset, collate, read_annotation
from models.salmonn import SALMONN
from runner import Runner, build_model
from tools.real_size import BEATS_FILE, RELEASED_CHECKPOINT, VICUNA_FOLDER, WHISPER_FOLDER
from utils import init_distributed, seed_everything, setup_logging

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"7b": ROOT / "configs/finetune_humdial_7b.yaml", "13b": ROOT / "configs/config.yaml"}
DIALOGUE_ANN = ROOT / "data/demo/ann/train.json"


def memory_kib() -> dict[str, int]:
    """VmHWM (peak resident set since the last reset) and VmRSS of this process, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak() -> None:
    """Frees what can be freed (glibc keeps freed heap memory otherwise, and a phase would reuse it unseen) and
    restarts the peak count at the current resident size."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


class Phase:
    """Times a block and records its peak and final resident memory in GiB (peak counted from the block's start)."""

    def __init__(self, results: dict[str, Any], name: str, json_path: Path):
        self.results, self.name, self.json_path = results, name, json_path

    def __enter__(self) -> "Phase":
        reset_peak()
        self.start_gib = memory_kib()["VmRSS"] / 2**20
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        seconds = time.perf_counter() - self.start
        memory = memory_kib()
        self.results[self.name] = {"seconds": round(seconds, 2), "rss_before_gib": round(self.start_gib, 2),
                                   "peak_rss_gib": round(memory["VmHWM"] / 2**20, 2),
                                   "rss_after_gib": round(memory["VmRSS"] / 2**20, 2)}
        self.json_path.write_text(json.dumps(self.results, indent=2))  # a run killed later keeps what it measured
        print(f"{self.name:<62} {seconds:8.1f} s   peak {memory['VmHWM'] / 2**20:6.2f} GiB   after "
              f"{memory['VmRSS'] / 2**20:6.2f} GiB", flush=True)


def five_turn_index(ann_path: Path) -> int:
    """The first 5-turn trajectory dialogue of the demo corpus (turns of 2.6-5.2 s, HumDial-shaped)."""
    for i, entry in enumerate(read_annotation(ann_path)):
        if len(entry.get("turns", [])) == 5 and entry["task"] == "emotional_trajectory":
            return i
    raise ValueError(f"{ann_path}: no 5-turn emotional_trajectory dialogue")


def phase_timer(model: SALMONN, runner: Runner) -> dict[str, list[float]]:
    """Hooks that record when the encoders, the forward and the optimizer step start and end."""
    marks: dict[str, list[float]] = {}

    def mark(name: str):
        return lambda *_args, **_kwargs: marks.setdefault(name, []).append(time.perf_counter())

    for name, module in (("forward", model), ("whisper", model.speech_encoder), ("beats", model.beats),
                         ("llm", model.llama_model)):
        module.register_forward_pre_hook(mark(f"{name}_start"))
        module.register_forward_hook(mark(f"{name}_end"))
    runner.optimizer.register_step_pre_hook(mark("step_start"))
    runner.optimizer.register_step_post_hook(mark("step_end"))
    return marks


def step_phases(marks: dict[str, list[float]]) -> dict[str, float]:
    """Seconds per part of the last training step, from `phase_timer`'s marks."""
    last = {name: values[-1] for name, values in marks.items()}

    def spent(name: str) -> float:
        return sum(end - start for start, end in zip(marks[f"{name}_start"], marks[f"{name}_end"])
                   if start >= last["forward_start"])

    return {"forward_s": round(last["forward_end"] - last["forward_start"], 2),
            "whisper_s": round(spent("whisper"), 2), "beats_s": round(spent("beats"), 2),
            "llm_forward_s": round(last["llm_end"] - last["llm_start"], 2),
            "backward_s": round(last["step_start"] - last["forward_end"], 2),
            "optimizer_s": round(last["step_end"] - last["step_start"], 2)}


def compare_whisper_loading(folder: Path, results: dict[str, Any], json_path: Path) -> None:
    """Peak memory of the old path (the whole Whisper, decoder included, then its encoder) and of ours."""
    with Phase(results, "whisper: whole model, keep encoder", json_path):
        encoder = WhisperModel.from_pretrained(folder, local_files_only=True, dtype=torch.bfloat16).encoder
    del encoder
    with Phase(results, "whisper: encoder only (ours)", json_path):
        encoder = SALMONN._load_whisper_encoder(folder, random_init=False, dtype=torch.bfloat16)
    del encoder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", required=True, help="folder written by scripts.make_real_shape_assets")
    ap.add_argument("--llm", choices=sorted(CONFIG), default="7b")
    add_config_arguments(ap, "default: the released recipe of --llm")
    ap.add_argument("--count-flops", action="store_true",
                    help="count each training step's FLOPs (torch.utils.flop_counter, attention on PyTorch's math "
                         "path); the counter and that path then add to the step's time and memory")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated in the inference phase")
    ap.add_argument("--out", default=None, help="folder for bench_real_size.json (default: a new temporary one)")
    args = ap.parse_args(argv)
    assets = Path(args.assets)
    paths = {"llm_path": assets / VICUNA_FOLDER[args.llm], "whisper_path": assets / WHISPER_FOLDER,
             "beats_path": assets / f"{BEATS_FILE}.pt", "ckpt": assets / RELEASED_CHECKPOINT[args.llm]}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        print(f"error: missing {', '.join(missing)}: write them with python -m scripts.make_real_shape_assets "
              f"--out {assets} --llm {args.llm}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_real_size_"))
    if (out / "bench_real_size.json").exists():
        print(f"error: {out / 'bench_real_size.json'} exists (choose another --out)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench_real_size.json"

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, "
                               f"{torch.get_num_threads()} threads", "torch": torch.__version__, "llm": args.llm}
    results["baseline_rss_gib"] = round(memory_kib()["VmRSS"] / 2**20, 2)
    compare_whisper_loading(paths["whisper_path"], results, json_path)

    options = [f"model.{k}={v}" for k, v in paths.items()] + [
        f"datasets.train_ann_path={DIALOGUE_ANN}", "datasets.valid_ann_path=", "datasets.test_ann_path=",
        "run.device=cpu", f"run.output_dir={out / 'run'}", "run.batch_size_train=1", "run.num_workers=0",
        "model.lora_dropout=0.0", *args.options]
    cfg = load_config(args.cfg_path or str(CONFIG[args.llm]), options, required_sections=("model", "datasets"))
    dist_info = init_distributed("cpu")
    setup_logging(None, dist_info.rank)
    seed_everything(cfg.run.seed)
    with Phase(results, "build + load checkpoint (bf16)", json_path):
        model = build_model(cfg)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    results["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    index = five_turn_index(DIALOGUE_ANN)
    train_set = build_dataset(str(DIALOGUE_ANN), cfg.datasets, "train", cfg.model, seed=cfg.run.seed)
    packed_set = build_dataset(str(DIALOGUE_ANN), {**cfg.datasets, "turn_mode": "packed"}, "train",
                               {**cfg.model, "trim_speech_padding": True}, seed=cfg.run.seed)
    runner = Runner(cfg, model, {"train": train_set}, dist_info)
    marks = phase_timer(model, runner)
    positions = []
    model.llama_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: positions.append(int(kwargs["inputs_embeds"].shape[1])), with_kwargs=True)
    # (mode, dataset, trim_speech_padding and padding_free, gradient checkpointing): checkpointing last, as it
    # stays on once enabled
    steps = [("per_turn", train_set, False, False), ("packed + trimmed + padding-free", packed_set, True, False),
             ("per_turn", train_set, False, True)]
    for mode, dataset, lean, checkpointing in steps:
        name = f"train step, {mode}, checkpointing {'on' if checkpointing else 'off'}"
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.cfg["trim_speech_padding"] = model.padding_free = lean
        batch = collate([dataset[index]])
        counter = FlopCounterMode(display=False) if args.count_flops else contextlib.nullcontext()
        # counting: PyTorch's math attention, as the counter has no formula for the fused CPU kernel
        attention = sdpa_kernel(SDPBackend.MATH) if args.count_flops else contextlib.nullcontext()
        with Phase(results, name, json_path), counter, attention:
            step = runner.train_step([batch])
        results[name] |= step_phases(marks) | {"loss": round(step.loss, 4), "llm_positions": positions[-1]}
        if args.count_flops:
            results[name]["flops_counted"] = counter.get_total_flops()
    model.cfg["trim_speech_padding"] = model.padding_free = False

    test_set = build_dataset(str(DIALOGUE_ANN), cfg.datasets, "test", cfg.model, seed=cfg.run.seed)
    prompt_batch = collate([test_set[index]])
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "num_beams": 1,
                "do_sample": False}
    model.eval()
    clock = TokenClock(torch.device("cpu"))
    with Phase(results, f"generate {args.new_tokens} tokens", json_path):
        start = time.perf_counter()
        model.generate(prompt_batch, settings, streamer=clock)
    results[f"generate {args.new_tokens} tokens"] |= {
        "ttft_s": round(clock.times[0] - start, 2),
        "tpot_s": round((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1), 3)}

    json_path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
