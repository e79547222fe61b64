"""One command for a GPU: full-size SALMONN-13B and -7B (random weights, bf16) trained and decoded on one GPU,
with the memory plan's prediction beside every measured peak. Sized to finish in under 10 minutes on one
H100/H200 (~2 minutes of steps and generations per LLM size, plus building).

    python -m benchmarks.gpu_check                       # 13B and 7B, results in outputs/gpu_check/
    python -m benchmarks.gpu_check --llm 7b --out DIR    # one size
    python -m benchmarks.gpu_check --llm 13b qwen2.5-7b  # Vicuna-13B and Qwen2.5-7B
    python -m benchmarks.gpu_check --small               # the whole script on CPU with the tiny demo model (CI)

Per LLM size:
- build: configs/config.yaml (13B) or configs/finetune_humdial_7b.yaml (7B) with `model.random_init: true` on
  config-only folders (tools/real_size.py: whisper-large-v2, BEATs cpt2, Vicuna), built under
  `torch.device("cuda")` so the weights are made on the GPU, in model.torch_dtype;
- training: `Runner.train_step` (forward, backward, clipping, AdamW) on HumDial-shaped dialogues (5 user turns of
  ~4 s of noise, the demo corpus's prompts and answers), the recipe's batch per GPU, without and then with
  run.gradient_checkpointing, each row timed after an untimed pass over its batches (the warm-up): samples/s,
  LLM tokens/s, MFU (FLOPs counted once, without checkpointing, by torch's FlopCounterMode: model FLOPs, so the
  recomputation of checkpointing is not credited), and peak memory (torch.cuda.max_memory_allocated, reset after
  the warm-up; timings synchronised);
- inference: the measurement of benchmarks/bench_inference.py (benchmarks/common.bench_duration): TTFT and
  TPOT at batch 1 for 10 s and 30 s of audio, answers/s at batch 4 and 16 (greedy, a forced answer length),
  peak memory of each batch;
- beside each peak, memory_plan's prediction for the same shapes (allocated bytes, docs/memory.md).
It first checks what it needs (CUDA unless --small, free GPU memory, disk, packages) and stops with one line
if something is missing. Results: gpu_check-<time>.json and .md in --out (never overwriting a file).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import soundfile as sf
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import PeakMemory, bench_duration, peak_flops, synchronize
from config import load_config
from dataset_v1 import build_dataset, collate, load_feature_extractor
from models import WHISPER_CONV_STRIDE
from prompting import question_messages
from runner import Runner, build_model
from tools import memory_plan as mp
from tools.real_size import write_config_folders
from utils import autocast_dtype, init_distributed, seed_everything, setup_logging

ROOT = Path(__file__).resolve().parents[1]
# the fine-tune recipe per LLM (a Qwen LLM runs the 7B recipe with its own folder: same connector, LoRA, batch)
RECIPE = {"13b": ROOT / "configs/config.yaml", "7b": ROOT / "configs/finetune_humdial_7b.yaml",
          "qwen2.5-7b": ROOT / "configs/finetune_humdial_7b.yaml",
          "qwen3-8b": ROOT / "configs/finetune_humdial_7b.yaml"}
PACKAGES = ("torch", "transformers", "peft", "accelerate", "omegaconf", "sentencepiece", "safetensors", "soundfile",
            "soxr", "numpy", "tqdm")
TEMPLATES = ROOT / "data/demo/ann/train.json"  # 5-turn demo dialogues: prompts, answers, transcripts
TURNS, TURN_SECONDS = 5, 4.0
MIN_DISK_MIB = 256


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one run measures: full size on a GPU, or the tiny demo on CPU (--small)."""
    steps: int  # timed training steps per checkpointing setting (after one warm-up step)
    audio_seconds: tuple[float, ...]  # inference clips (at most the encoder's window)
    batch_sizes: tuple[int, ...] = (4, 16)
    new_tokens: int = 64
    repeats: int = 3


FULL = Setting(steps=5, audio_seconds=(10.0, 30.0))
SMALL = Setting(steps=2, audio_seconds=(2.5, 5.0), new_tokens=8, repeats=1)


def fail(message: str) -> NoReturn:
    raise SystemExit(f"gpu_check: {message}")


# ------------------------------------------------------------------------------------------------ preconditions
def check_packages() -> dict[str, str]:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"missing packages: {', '.join(missing)} (pip install -r requirements.txt)")
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft")}


def check_disk(*folders: Path) -> None:
    for folder in folders:
        free = shutil.disk_usage(folder).free / 2**20
        if free < MIN_DISK_MIB:
            fail(f"{folder} has {free:.0f} MiB free; needs {MIN_DISK_MIB} MiB (synthetic audio, configs, results)")


def check_gpu(needed: int) -> dict[str, Any]:
    """The GPU, and that it has `needed` bytes free."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        fail(f"no CUDA device visible (torch {torch.__version__}, {build}); run with --small for the CPU check")
    free, total = torch.cuda.mem_get_info()
    if free < needed:
        fail(f"{torch.cuda.get_device_name()} has {free / mp.GIB:.1f} GiB free of {total / mp.GIB:.1f}; the "
             f"largest phase needs ~{needed / mp.GIB:.1f} GiB (memory_plan): free the GPU or pass --llm 7b")
    return {"name": torch.cuda.get_device_name(), "total_gib": total / mp.GIB, "free_gib": free / mp.GIB}


def planned_need(llms: list[str], batches: dict[str, int]) -> int:
    """The largest device peak memory_plan predicts for these runs (training without checkpointing and the
    largest inference batch)."""
    needs = []
    for llm in llms:
        s = mp.released_shape(llm)
        needs.append(mp.training_plan(s, mp.Dialogue.uniform(TURNS, TURN_SECONDS), batches[llm]).device)
        for seconds in FULL.audio_seconds:
            needs.append(mp.inference_plan(s, mp.Dialogue((seconds,)), max(FULL.batch_sizes), 1,
                                           FULL.new_tokens).device)
    return max(needs)


def results_paths(out: Path) -> tuple[Path, Path]:
    """gpu_check-<UTC time>[-n].json and .md, names that no earlier run has used."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    n, name = 1, stem
    while (out / f"{name}.json").exists() or (out / f"{name}.md").exists():
        n += 1
        name = f"{stem}-{n}"
    return out / f"{name}.json", out / f"{name}.md"


# ------------------------------------------------------------------------------------------------ building
def recipe_config(llm: str | None, folders: dict[str, Path] | None, work: Path, device: str, batch: int | None):
    """The recipe's config pointed at config-only folders with random weights (full size), or configs/demo.yaml
    (small); one micro-batch per step, no checkpoint written, no resume."""
    options = [f"run.output_dir={work / 'run'}", "run.resume=''", f"run.device={device}", "run.epoch_based=false",
               "run.accum_grad_iters=1", "run.num_workers=0", "datasets.train_ann_path=''",
               "datasets.valid_ann_path=''", "datasets.test_ann_path=''"]
    if folders is None:
        path = ROOT / "configs/demo.yaml"
    else:
        path = RECIPE[llm]
        options += [f"model.llm_path={folders[llm]}", f"model.whisper_path={folders['whisper']}",
                    f"model.beats_path={folders['beats']}", "model.ckpt=''", "model.random_init=true"]
    if batch:
        options.append(f"run.batch_size_train={batch}")
    return load_config(str(path), options, required_sections=("model", "datasets"))


def model_shape(model) -> mp.SalmonnShapes:
    """memory_plan's shapes of a built SALMONN, read from its configs."""
    whisper = model.speech_encoder.config
    clip_seconds = whisper.max_source_positions * WHISPER_CONV_STRIDE * model.whisper_hop_seconds
    beats = dataclasses.asdict(model.beats.cfg) if model.beats is not None else None
    return mp.SalmonnShapes.from_configs(model.cfg, model.llama_model.config.to_dict(), whisper.to_dict(),
                                   clip_seconds, beats)


def plan_precision(model, device: torch.device, amp: torch.dtype | None) -> mp.Precision:
    return mp.Precision(model.cfg["torch_dtype"], autocast=amp is not None, device=device.type)


def speech_mode(model) -> str:
    return "per_turn_trimmed" if model.cfg["trim_speech_padding"] else "per_turn"


# ------------------------------------------------------------------------------------------------ data
def synthetic_dialogues(folder: Path, count: int, turn_seconds: float, seed: int = 0) -> Path:
    """An annotation of `count` dialogues of TURNS user turns of noise around `turn_seconds` each, with the text
    (task, prompt, answer, transcripts) of the demo corpus's 5-turn dialogues."""
    templates = [e for e in json.loads(TEMPLATES.read_text())["annotation"] if len(e["turns"]) == TURNS]
    rng = np.random.default_rng(seed)
    entries = []
    for n in range(count):
        entry = dict(templates[n % len(templates)], id=f"synthetic_{n:03d}")
        turns = []
        for t, turn in enumerate(entry["turns"]):
            seconds = turn_seconds * rng.uniform(0.875, 1.125)
            path = folder / f"d{n:03d}_t{t}.wav"
            sf.write(path, rng.normal(0, 0.1, round(seconds * 16000)).astype(np.float32), 16000, subtype="PCM_16")
            turns.append({**turn, "path": path.name, "duration": seconds})
        entries.append({**entry, "turns": turns})
    ann = folder / "dialogues.json"
    ann.write_text(json.dumps({"annotation": entries}))
    return ann


def training_batches(cfg, ann: Path, count: int, batch: int) -> list[dict[str, Any]]:
    dataset = build_dataset(str(ann), cfg.datasets, "train", cfg.model, seed=cfg.run.seed)
    return [collate([dataset[(i * batch + j) % len(dataset)] for j in range(batch)]) for i in range(count)]


class SequenceShape:
    """The LLM's input per forward (a hook on the LLaMA): padded length, positions, batch size."""

    def __init__(self, model):
        self.calls: list[tuple[int, int, int]] = []
        self.handle = model.llama_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        embeds, mask = kwargs["inputs_embeds"], kwargs.get("attention_mask")
        positions = embeds.shape[0] * embeds.shape[1] if mask is None else int(mask.sum())  # None: padding-free
        self.calls.append((embeds.shape[1], positions, embeds.shape[0]))


# ------------------------------------------------------------------------------------------------ measuring
def train_phase(cfg, model, batches: list[dict[str, Any]], checkpointing: bool, setting: Setting,
                flops_per_step: float | None) -> dict[str, Any]:
    """Timed training steps with or without gradient checkpointing, peak memory, and FLOPs (counted when not
    given: the model FLOPs of a step without checkpointing)."""
    cfg.run.gradient_checkpointing = checkpointing
    dist = init_distributed(cfg.run.device)
    runner = Runner(cfg, model, {}, dist)
    device = dist.device
    shapes = SequenceShape(model)
    warm_up = 1 + setting.steps
    try:
        # Warm-up, untimed: kernels chosen, AdamW state allocated, and every timed batch seen once, so that no row
        # pays for a first pass (model.cache_frozen_encoders encodes each clip once; the first row used to).
        for batch in batches[:warm_up]:
            runner.train_step([batch])
        peak = PeakMemory(device)
        seconds = samples = targets = 0.0
        with peak:
            for batch in batches[1:1 + setting.steps]:
                synchronize(device)
                start = time.perf_counter()
                result = runner.train_step([batch])
                synchronize(device)
                seconds += time.perf_counter() - start
                samples, targets = samples + result.samples, targets + result.tokens
        timed = shapes.calls[warm_up:warm_up + setting.steps]
        if flops_per_step is None:
            with FlopCounterMode(display=False) as counter:
                runner.train_step([batches[1]])
            flops_per_step = counter.get_total_flops()
        peak_flops_s, peak_source = peak_flops(device, runner.amp_dtype, None)
    finally:
        shapes.handle.remove()
        if checkpointing:  # the next user of the model (inference) gets it as built
            llama = model.llama_model.get_base_model() if model.cfg["lora"] else model.llama_model
            (getattr(llama, "activation_checkpointing_disable", None) or llama.gradient_checkpointing_disable)()
    padded = max(length for length, _, _ in timed)
    batch = timed[0][2]
    amp = runner.amp_dtype
    del runner
    release(device)
    # the plan for the lengths the LLM saw: nominal turns, the measured answers, the rest of the padded row as text
    shape, turns = model_shape(model), (TURN_SECONDS,) * TURNS
    lay = mp.layout(shape, mp.Dialogue(turns, speech_mode(model)))
    answer = round(targets / samples)
    dialogue = mp.Dialogue(turns, speech_mode(model), text_tokens=max(padded - lay.speech_tokens - answer, 0),
                           answer_tokens=answer)
    plan = mp.training_plan(shape, dialogue, batch, checkpointing, precision=plan_precision(model, device, amp))
    step_seconds = seconds / setting.steps
    return {
        "gradient_checkpointing": checkpointing, "batch": batch, "steps": setting.steps,
        "padded_tokens": padded, "speech_tokens": lay.speech_tokens, "answer_tokens": answer,
        "seconds_per_step": step_seconds, "samples_per_s": samples / seconds,
        "tokens_per_s": sum(positions for _, positions, _ in timed) / seconds, "target_tokens_per_s": targets / seconds,
        "flops_per_step": flops_per_step, "mfu": flops_per_step / step_seconds / peak_flops_s,
        "peak_flops_source": peak_source,
        "peak_memory_gib": peak.peak / mp.GIB, "memory_source": memory_source(device),
        "predicted_peak_gib": mp.gib(plan.allocated), "predicted_phase": plan.peak_phase,
    }


def inference_phase(cfg, model, device: torch.device, setting: Setting, folder: Path) -> list[dict[str, Any]]:
    """bench_inference's TTFT / TPOT / answers/s / peak memory per audio length, and the plan beside each peak."""
    model.eval()
    amp = autocast_dtype(cfg.run.precision, device, model.llm_dtype)
    fe = load_feature_extractor(cfg.model.whisper_path)
    settings = {"max_new_tokens": setting.new_tokens, "min_new_tokens": setting.new_tokens, "num_beams": 1,
                "do_sample": False}
    messages = question_messages("Describe the emotion of the speaker.", 1, "en", False)  # bench_inference's question
    text_tokens = len(model.text.prompt_ids(model.text.render(messages))[0])
    results = []
    for seconds in setting.audio_seconds:
        measured = bench_duration(model, fe, seconds, list(setting.batch_sizes), settings,
                                  setting.repeats, device, folder, amp)
        for batch_size, figures in measured["batches"].items():
            plan = mp.inference_plan(model_shape(model), mp.Dialogue((seconds,), speech_mode(model),
                                                                      text_tokens=text_tokens),
                                     batch_size, 1, setting.new_tokens, plan_precision(model, device, amp))
            figures["peak_memory_gib"] = figures.pop("peak_mem_mb") / 1024
            figures["predicted_peak_gib"] = mp.gib(plan.allocated)
        results.append({**measured, "new_tokens": setting.new_tokens, "memory_source": memory_source(device)})
        release(device)
    return results


def memory_source(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (sampled)"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_llm(llm: str, folders: dict[str, Path] | None, work: Path, setting: Setting, batch: int | None,
              device: torch.device) -> dict[str, Any]:
    """Build, train (GC off, on) and decode one model: its part of the report."""
    cfg = recipe_config(llm, folders, work, str(device), batch)
    seed_everything(cfg.run.seed)
    started = time.perf_counter()
    with device:  # weights made where they will live, in model.torch_dtype
        model = build_model(cfg)
    synchronize(device)
    build_seconds = time.perf_counter() - started
    data = work / f"data_{llm}"
    data.mkdir()
    batches = training_batches(cfg, synthetic_dialogues(data, 8, TURN_SECONDS), 2 + setting.steps,
                               cfg.run.batch_size_train)
    plain = train_phase(cfg, model, batches, False, setting, None)
    checkpointed = train_phase(cfg, model, batches, True, setting, plain["flops_per_step"])
    inference = inference_phase(cfg, model, device, setting, data)
    result = {"config": str(RECIPE[llm].relative_to(ROOT)) if folders else "configs/demo.yaml",
              "build_seconds": build_seconds, "parameters": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "weights_dtype": cfg.model.torch_dtype, "train": [plain, checkpointed], "inference": inference}
    del model, batches
    release(device)
    return result


# ------------------------------------------------------------------------------------------------ reporting
def markdown(report: dict[str, Any]) -> str:
    def ratio(measured: float, predicted: float) -> str:  # a CPU's RSS holds far more than the tensors
        return "n/a (RSS)" if report["small"] else f"{measured / predicted:.2f}"

    lines = [f"# GPU check: {report['device']['name']}", "",
             f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, peft "
             f"{report['versions']['peft']}; {report['seconds']:.0f} s in all. Peak memory: "
             f"{report['memory_source']}; predicted: memory_plan's allocated peak for the same shapes.", "",
             "## Training (Runner.train_step, HumDial-shaped dialogues: 5 turns of ~4 s)", "",
             "| LLM | GC | batch | tokens/dialogue | samples/s | tokens/s | MFU | peak GiB | predicted GiB | "
             "measured / predicted |", "|---|---|---|---|---|---|---|---|---|---|"]
    for llm, r in report["results"].items():
        for t in r["train"]:
            lines.append(f"| {llm} | {'on' if t['gradient_checkpointing'] else 'off'} | {t['batch']} | "
                         f"{t['padded_tokens']} | {t['samples_per_s']:.2f} | {t['tokens_per_s']:.0f} | "
                         f"{100 * t['mfu']:.1f}% | {t['peak_memory_gib']:.2f} | {t['predicted_peak_gib']:.2f} | "
                         f"{ratio(t['peak_memory_gib'], t['predicted_peak_gib'])} |")
    lines += ["", "## Inference (greedy, forced answer length; TTFT / TPOT at batch 1)", "",
              "| LLM | audio | TTFT ms | TPOT ms | batch | answers/s | peak GiB | predicted GiB | "
              "measured / predicted |", "|---|---|---|---|---|---|---|---|---|"]
    for llm, r in report["results"].items():
        for d in r["inference"]:
            for batch, b in d["batches"].items():
                lines.append(f"| {llm} | {d['audio_s']:g} s | {d['ttft_ms']:.1f} | {d['tpot_ms']:.2f} | {batch} | "
                             f"{b['answers_per_s']:.2f} | {b['peak_memory_gib']:.2f} | {b['predicted_peak_gib']:.2f} "
                             f"| {ratio(b['peak_memory_gib'], b['predicted_peak_gib'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the tiny demo model on CPU (seconds; what CI runs)")
    ap.add_argument("--llm", nargs="+", choices=(*RECIPE, "both"), default=["both"],
                    help="LLMs to check: 13b, 7b (Vicuna), qwen2.5-7b, qwen3-8b; both = 13b and 7b")
    ap.add_argument("--out", default=str(ROOT / "outputs/gpu_check"), help="folder for the JSON and markdown")
    ap.add_argument("--batch", type=int, default=None, help="dialogues per training step (default: the recipe's)")
    args = ap.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    setting = SMALL if args.small else FULL
    llms = ["tiny"] if args.small else list(dict.fromkeys(
        llm for name in args.llm for llm in (["13b", "7b"] if name == "both" else [name])))
    versions = check_packages()
    if args.small:
        device_info = {"name": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"}
        device = torch.device("cpu")
    else:
        batches = {llm: args.batch or load_config(str(RECIPE[llm])).run.batch_size_train for llm in llms}
        device_info = check_gpu(planned_need(llms, batches))
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(args.out)
    check_disk(next(p for p in (out, *out.parents) if p.exists()), Path(tempfile.gettempdir()))
    json_path, md_path = results_paths(out)
    setup_logging(None, 0)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        folders = None if args.small else write_config_folders(work / "models", tuple(llms))
        results = {llm: check_llm(llm, folders, work, setting, args.batch, device) for llm in llms}
    report = {"device": device_info, "versions": versions, "small": args.small,
              "seconds": time.perf_counter() - started, "memory_source": memory_source(device), "results": results}
    with open(json_path, "x") as f:  # "x": never over an existing file
        json.dump(report, f, indent=1)
    with open(md_path, "x") as f:
        f.write(markdown(report))
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
