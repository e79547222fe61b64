"""FLOPs and time per training dialogue of the three turn modes, at full size and on the tiny model (issue #15).

    python -m benchmarks.bench_turn_modes                        # Vicuna-13B, batches of 8 demo dialogues
    python -m benchmarks.bench_turn_modes --llm 7b --batch 4 --out runs/bench_turn_modes
    python -m benchmarks.bench_turn_modes --llm qwen2.5-7b       # the same modes on Qwen2.5-7B
    python -m benchmarks.bench_turn_modes --quick                # 2 dialogues: a smoke run

The modes (config overrides of configs/demo.yaml):
  (a) datasets.turn_mode: concat,   model.trim_speech_padding: false   the original fine-tune: turns joined, cut at
                                                                        30 s, 88 speech tokens per dialogue
  (b) datasets.turn_mode: per_turn, model.trim_speech_padding: false   today's default: a 30 s Whisper pass and
                                                                        88 speech tokens per turn
  (c) datasets.turn_mode: packed,   model.trim_speech_padding: true,   turns end to end in shared 30 s clips, the
      run.padding_free: true                                            windows of real audio only, one LLM row

How the figures are made:
- Shapes come from the real code path: the demo corpus (data/demo/ann/train.json) through each mode's dataset and
  collate, in batches of --batch dialogues (a seeded shuffle, the same batches in every mode), and the tiny model
  (configs/demo.yaml with whisper_path assets/tiny/whisper: a 30 s window of 1500 frames like whisper-large-v2;
  encoders not cached) training on them, hooks noting per batch what Whisper ([C, 80, 3000]), BEATs (wave
  [C, N]), the Q-Former (kept windows [K, 17, D]) and the LLM's decoder stack ([rows, L], padding included, or the
  packed row) were given. Clips, windows, speech tokens and BEATs patches depend on the audio only, so they are
  the real model's; the prompt and target tokens are counted with the tiny tokenizer (the real-size folders of
  tools/real_size.py use it too).
- FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention: 2 per
  multiply-add; norms, softmax and the loss are not counted), part by part at those shapes, on the meta device,
  with the real-size parts (tools/real_size.py, built as tests/test_real_size.py builds them):
  Whisper and BEATs forward only (frozen, nothing below them trains); Q-Former + projection forward and backward
  with weight gradients and input gradients (the layer norms before it train); the LoRA LLM forward and backward
  (input gradients through the frozen weights, LoRA weight gradients; no frozen weight gradients). The whole
  model does not run on meta, so: BEATs' fbank enters torch.autocast, which refuses the meta device, and runs on
  CPU zeros of the wave's shape (its mel matmul counted), the rest of BEATs on meta; transformers builds the LLM's
  mask by reading mask values, so the LLM gets a 4-D all-true mask, which it passes to attention as is (attention
  FLOPs do not depend on which scores are masked).
- While counting, attention runs on PyTorch's math path (sdpa_kernel(SDPBackend.MATH)): the counter has no
  formula for the fused CPU kernel and would count CPU attention as 0. It counts the whole [L, L] score matrix,
  the causal half included, as attention kernels compute it. (c)'s packed row runs sdpa (the default attention)
  under a block-diagonal mask over the whole row: that is what is counted; "(c) varlen" is the same step with
  flash-attention's varlen path, each sample attending to itself only (counted attention x sum L_b^2 / (sum L_b)^2).
- Cross-check: on the tiny model (CPU tensors), one real training step (Runner.train_step) per mode counted
  whole, against the per-part composition above at the tiny shapes on a meta copy of the tiny model.
- Wall time: the tiny model on CPU, whole optimizer steps (Runner.train_step) on batches collated beforehand (data
  loading excluded: benchmarks/bench_data.py), the modes interleaved (a, b, c, a, b, c, ...) after the counted
  step, which doubles as each mode's warm-up; each batch's fastest of --rounds passes (interference only ever adds
  time), summed over the batches and divided by their dialogues.
- Inference: greedy, batch 1, the first 5-turn dialogue of the corpus with the evaluation prompt: time to first
  token on the tiny model (benchmarks.common.TokenClock; modes interleaved, fastest of --repeats after a warm-up
  round), and the FLOPs of the prefill at full size (encoders, Q-Former and the LLM forward over the prompt, logits
  of the last position only, as generate computes them), cross-checked like training against a counted generate
  of one token on the tiny model.
Results go to --out as turn_modes_<llm>_<time>.json and .md (an existing file is never overwritten).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import TokenClock, cpu_name
from config import load_config
from dataset_v1 import SalmonnDataset, build_dataset, collate
from models.beats import BEATs
from models.llm import base_llm
from models.salmonn import SALMONN
from runner import Runner, build_datasets, build_model
from tools.real_size import LLM_FOLDER, LLMS, released_model_config, write_config_folders
from utils import init_distributed, seed_everything

ROOT = Path(__file__).resolve().parent.parent
MODES = {  # name: (what it is, overrides of configs/demo.yaml)
    "a": ("concat, untrimmed (original fine-tune)",
          ["datasets.turn_mode=concat", "model.trim_speech_padding=false", "run.padding_free=false"]),
    "b": ("per_turn, untrimmed (today's default)",
          ["datasets.turn_mode=per_turn", "model.trim_speech_padding=false", "run.padding_free=false"]),
    "c": ("packed + trim_speech_padding + padding_free",
          ["datasets.turn_mode=packed", "model.trim_speech_padding=true", "run.padding_free=true"]),
}
TINY_OPTIONS = ["model.whisper_path=assets/tiny/whisper", "model.cache_frozen_encoders=false", "run.num_workers=0"]
PARTS = ("whisper", "beats", "qformer", "llm")
GOAL = 2.5  # issue #15: (c) at least 2.5x fewer FLOPs per dialogue than (b), and fewer than (a)
DIALOGUE_TURNS = 5  # the inference dialogue
ONE_TOKEN = {"max_new_tokens": 1, "min_new_tokens": 1, "num_beams": 1, "do_sample": False}  # greedy


# ---------------------------------------------------------------------------------------------- shapes
@dataclass
class Shapes:
    """What one forward gave each part of the model."""
    ids: list = field(default_factory=list)  # the batch's dialogues
    whisper: tuple = ()  # spectrogram [C, 80, frames]
    beats: tuple = ()  # wave [C, N]
    qformer: tuple = ()  # the kept windows [K, kernel] (of encoder states [K, kernel, D])
    llm: tuple = ()  # decoder-stack input [rows, L], padding included
    lengths: list = field(default_factory=list)  # each sample's positions (no padding)
    speech_tokens: int = 0


def decoder_stack(model: SALMONN) -> torch.nn.Module:
    return base_llm(model.llama_model).get_decoder()


def sample_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the sequences of a packed row, from its position ids restarting at 0: [1, sum L] -> [L_b]."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return [end - start for start, end in zip(starts, starts[1:])]


class ShapeRecorder:
    """Hooks on a model's parts noting the shapes of their first call since the last `take` (for a generation,
    the LLM's first call is the prefill), and the speech tokens its prompts get."""

    def __init__(self, model: SALMONN):
        self.shapes = Shapes()
        model.speech_encoder.register_forward_pre_hook(lambda module, args: self.note("whisper", args[0].shape))
        if model.beats is not None:
            model.beats.register_forward_pre_hook(lambda module, args: self.note("beats", args[0].shape))
        model.speech_Qformer.register_forward_pre_hook(
            lambda module, args, kwargs: self.note("qformer", kwargs["encoder_hidden_states"].shape[:2]),
            with_kwargs=True)
        decoder_stack(model).register_forward_pre_hook(self.llm_input, with_kwargs=True)
        slot_tokens = model._slot_tokens

        def counted_slot_tokens(*args: Any) -> torch.Tensor:  # an instance attribute: forward calls it for each slot
            tokens = slot_tokens(*args)
            self.shapes.speech_tokens += tokens.shape[0]
            return tokens

        model._slot_tokens = counted_slot_tokens

    def note(self, part: str, shape: torch.Size) -> None:
        if not getattr(self.shapes, part):
            setattr(self.shapes, part, tuple(shape))

    def llm_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.shapes.llm:
            return
        embeds, mask = kwargs["inputs_embeds"], kwargs.get("attention_mask")
        self.shapes.llm = tuple(embeds.shape[:2])
        self.shapes.lengths = mask.sum(-1).tolist() if mask is not None else sample_lengths(kwargs["position_ids"])

    def take(self, batch: dict | None) -> Shapes:
        """The shapes noted since the last call, for `batch` (None: discarded ones)."""
        shapes, self.shapes = self.shapes, Shapes()
        shapes.ids = list(batch["id"]) if batch is not None else []
        return shapes


# ---------------------------------------------------------------------------------------------- FLOPs
def counted_flops(run) -> dict[str, int]:
    """FLOPs of run() by aten op, attention on the math path (seen as bmm; the fused CPU kernel is not counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@contextmanager
def frozen_no_grad(model: torch.nn.Module):
    """no_grad, the model's trained parameters marked frozen meanwhile: FlopCounterMode's module tracker fails on
    a view of a trained parameter made under no_grad (it requires grad but has no grad_fn), as the Q-Former's
    expanded query is."""
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for p in trained:
            p.requires_grad_(True)


class PartFlops:
    """FLOPs of each part of a SALMONN whose tensors are on the meta device, at given input shapes (train: the
    training step's forward and backward; else forward only). Counted once per shape."""

    def __init__(self, model: SALMONN):
        if not all(p.is_meta for p in model.parameters()):
            raise ValueError("PartFlops counts on the meta device: pass a model built there (or a meta copy)")
        self.model = model
        self.memo: dict[tuple, dict[str, int]] = {}
        beats = model.beats
        if beats is not None:  # its fbank enters torch.autocast, which refuses meta: run it on CPU zeros
            beats.normalized_fbank = lambda wav: BEATs.normalized_fbank(
                beats, torch.zeros(wav.shape, dtype=wav.dtype)).to(wav.device)

    def part(self, name: str, shape: tuple, train: bool) -> dict[str, int]:
        key = (name, shape, train and name in ("qformer", "llm"))  # the frozen encoders never need a backward
        if key not in self.memo:
            self.memo[key] = counted_flops(lambda: getattr(self, f"run_{name}")(shape, key[2]))
        return self.memo[key]

    def run_whisper(self, shape: tuple, train: bool) -> None:
        encoder = self.model.speech_encoder
        with torch.no_grad():
            encoder(torch.empty(shape, dtype=next(encoder.parameters()).dtype, device="meta"))

    def run_beats(self, shape: tuple, train: bool) -> None:
        with torch.no_grad():
            self.model.beats(torch.empty(shape, device="meta"), torch.zeros(shape, dtype=torch.bool, device="meta"))

    def run_qformer(self, shape: tuple, train: bool) -> None:
        m = self.model
        states = torch.empty(*shape, m.speech_Qformer.config.encoder_hidden_size, device="meta",
                             requires_grad=train)  # [K, kernel, D], fp32 as encode_speech gives them
        with nullcontext() if train else frozen_no_grad(m):
            query = m.speech_query_tokens.expand(shape[0], -1, -1)
            windows = m.speech_Qformer(query_embeds=query, encoder_hidden_states=states).last_hidden_state
            out = m.speech_llama_proj(windows)  # [K, Q, D_llm]
            if train:
                out.sum().backward()

    def run_llm(self, shape: tuple, train: bool) -> None:
        rows, length = shape
        m = self.model
        hidden = m.llama_model.get_input_embeddings().weight.shape[1]
        embeds = torch.empty(rows, length, hidden, dtype=m.llm_dtype, device="meta", requires_grad=train)
        mask = torch.ones(rows, 1, length, length, dtype=torch.bool, device="meta")  # 4-D: used as it is
        with nullcontext() if train else frozen_no_grad(m):
            logits = m.llama_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                   logits_to_keep=0 if train else 1).logits
            if train:
                logits.float().sum().backward()

    def batch(self, shapes: Shapes, train: bool) -> dict[str, int]:
        """Per part, and the LLM's attention (its bmm), for one forward (+ backward when train)."""
        by_part = {name: self.part(name, getattr(shapes, name), train) if getattr(shapes, name) else {}
                   for name in PARTS}
        flops = {name: sum(ops.values()) for name, ops in by_part.items()}
        flops["llm_attention"] = by_part["llm"].get("aten.bmm", 0)
        return flops


def per_dialogue(batches: list[Shapes], parts: PartFlops, train: bool) -> dict[str, float]:
    """Mean FLOPs per dialogue over the batches, per part and total; "varlen": packed rows with each sample's
    attention over itself only (flash-attention's varlen path), padded batches as they are."""
    totals = dict.fromkeys([*PARTS, "llm_attention", "llm_varlen"], 0.0)
    for shapes in batches:
        flops = parts.batch(shapes, train)
        rows, length = shapes.llm
        own = sum(n * n for n in shapes.lengths) / length**2 if rows == 1 else 1.0  # of the row's [L, L] scores
        for key, value in flops.items():
            totals[key] += value
        totals["llm_varlen"] += flops["llm"] - flops["llm_attention"] * (1 - own)
    dialogues = sum(len(s.ids) for s in batches)
    result = {key: value / dialogues for key, value in totals.items()}
    result["total"] = sum(result[name] for name in PARTS)
    result["total_varlen"] = result["total"] - result["llm"] + result["llm_varlen"]
    return result


def shape_summary(batches: list[Shapes]) -> dict[str, float]:
    """Per dialogue: Whisper passes, Q-Former windows, speech tokens, LLM positions computed and real."""
    dialogues = sum(len(s.ids) for s in batches)
    computed = sum(s.llm[0] * s.llm[1] for s in batches)
    real = sum(sum(s.lengths) for s in batches)
    return {"dialogues": dialogues, "whisper_passes": sum(s.whisper[0] for s in batches) / dialogues,
            "qformer_windows": sum(s.qformer[0] for s in batches) / dialogues,
            "speech_tokens": sum(s.speech_tokens for s in batches) / dialogues,
            "llm_positions": computed / dialogues, "llm_real_positions": real / dialogues,
            "padding_share": 1 - real / computed}


def full_size_model(size: str) -> SALMONN:
    """The released setting at real size (Whisper large-v2, BEATs cpt2, the LLM), its tensors on meta."""
    folders = write_config_folders(Path(tempfile.mkdtemp(prefix="bench_turn_modes_")), (size,))
    with torch.device("meta"):
        return SALMONN(released_model_config(folders, size))


# ---------------------------------------------------------------------------------------------- the tiny model
@dataclass
class Mode:
    """One turn mode on the tiny model: its config, model (hooked), meta copy, runner and batches."""
    name: str
    label: str
    cfg: Any
    model: SALMONN
    tiny_parts: PartFlops
    runner: Runner
    recorder: ShapeRecorder
    batches: list[dict]
    shapes: list[Shapes] = field(default_factory=list)  # of each batch's training step
    step_seconds: list[float] = field(default_factory=list)  # each batch's fastest step, wall clock
    step_cpu_seconds: list[float] = field(default_factory=list)  # and the fewest CPU seconds of the process


def training_batches(dataset: SalmonnDataset, batch_size: int, dialogues: int, seed: int) -> list[dict]:
    """The first `dialogues` of a seeded shuffle of the corpus, collated in batches (the same in every mode)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:dialogues].tolist()
    return [collate([dataset[i] for i in order[start:start + batch_size]])
            for start in range(0, len(order), batch_size)]


def build_mode(name: str, batch_size: int, dialogues: int, dist_info, output_dir: str) -> Mode:
    label, overrides = MODES[name]
    cfg = load_config(str(ROOT / "configs/demo.yaml"),
                      [*TINY_OPTIONS, *overrides, f"run.batch_size_train={batch_size}", f"run.output_dir={output_dir}"])
    seed_everything(cfg.run.seed)
    model = build_model(cfg)
    tiny_parts = PartFlops(copy.deepcopy(model).to("meta"))  # copied before the hooks go on
    datasets = build_datasets(cfg, ["train"])
    runner = Runner(cfg, model, datasets, dist_info)
    batches = training_batches(datasets["train"], batch_size, dialogues, cfg.run.seed)
    return Mode(name, label, cfg, model, tiny_parts, runner, ShapeRecorder(model), batches)


def whole_step_flops(mode: Mode, batch: dict) -> tuple[int, Shapes]:
    """One real training step of the tiny model, counted whole, and the shapes its parts saw."""
    mode.recorder.take(None)
    total = sum(counted_flops(lambda: mode.runner.train_step([batch])).values())
    return total, mode.recorder.take(batch)


def cross_check(mode: Mode, batch: dict) -> dict[str, float]:
    """The whole-step count of the tiny model against the per-part composition at its shapes."""
    whole, shapes = whole_step_flops(mode, batch)
    composed = sum(mode.tiny_parts.batch(shapes, train=True)[name] for name in PARTS)
    return {"whole_step": whole, "composed": composed, "ratio": composed / whole}


def timed_steps(modes: list[Mode], rounds: int) -> None:
    """Every batch `rounds` times per mode, the modes interleaved; keeps each batch's fastest step (interference
    only ever adds time) and the shapes of its first."""
    for round_ in range(rounds):
        for i in range(len(modes[0].batches)):
            for mode in modes:
                mode.recorder.take(None)
                start, start_cpu = time.perf_counter(), time.process_time()
                mode.runner.train_step([mode.batches[i]])
                took, took_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                shapes = mode.recorder.take(mode.batches[i])
                if round_ == 0:
                    mode.shapes.append(shapes)
                    mode.step_seconds.append(took)
                    mode.step_cpu_seconds.append(took_cpu)
                mode.step_seconds[i] = min(mode.step_seconds[i], took)
                mode.step_cpu_seconds[i] = min(mode.step_cpu_seconds[i], took_cpu)


def inference_batch(mode: Mode) -> dict:
    """The first dialogue of DIALOGUE_TURNS turns in the corpus, with the evaluation prompt, as a batch of one."""
    dataset = build_dataset(mode.cfg.datasets.train_ann_path, mode.cfg.datasets, "valid", mode.cfg.model)
    index = next((i for i, entry in enumerate(dataset.annotation) if len(entry.get("turns", [])) == DIALOGUE_TURNS),
                 None)
    if index is None:
        raise ValueError(f"{mode.cfg.datasets.train_ann_path}: no dialogue of {DIALOGUE_TURNS} turns")
    return collate([dataset[index]])


def prefill(mode: Mode, batch: dict, full: PartFlops) -> dict[str, float]:
    """The prefill of a generation: its FLOPs at full size, and on the tiny model counted whole (a generate of one
    token) vs composed at its shapes."""
    mode.model.eval()
    mode.recorder.take(None)
    with frozen_no_grad(mode.model):
        whole = sum(counted_flops(lambda: mode.model.generate(batch, ONE_TOKEN)).values())
    shapes = mode.recorder.take(batch)
    composed = sum(mode.tiny_parts.batch(shapes, train=False)[name] for name in PARTS)
    flops = full.batch(shapes, train=False)
    return {"whisper_passes": shapes.whisper[0], "speech_tokens": shapes.speech_tokens,
            "prompt_positions": shapes.llm[1], **{f"prefill_{k}": v for k, v in flops.items()},
            "prefill_total": sum(flops[name] for name in PARTS), "tiny_whole": whole, "tiny_composed": composed,
            "tiny_ratio": composed / whole}


def first_token_seconds(modes: list[Mode], batches: list[dict], repeats: int) -> dict[str, float]:
    """Fastest time to the first token per mode over `repeats` rounds, the modes interleaved, after a warm-up
    round (interference only ever adds time)."""
    times: dict[str, list[float]] = {mode.name: [] for mode in modes}
    for _ in range(repeats + 1):
        for mode, batch in zip(modes, batches):
            clock = TokenClock(torch.device("cpu"))
            start = time.perf_counter()
            mode.model.generate(batch, ONE_TOKEN, streamer=clock)
            times[mode.name].append(clock.times[0] - start)
    return {name: min(t[1:]) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- report
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tflop(x: float) -> str:
    return f"{x / 1e12:.2f}"


def report(results: dict[str, Any]) -> str:
    modes, llm = results["modes"], results["llm"]
    c = modes["c"]
    sections = [f"# Turn modes (issue #15): {results['date']}, {results['machine']}\n\n"
                f"Shapes: {results['dialogues']} dialogues of {results['corpus']} in batches of {results['batch']}, "
                "the tiny model's training steps (prompt and target tokens from the tiny tokenizer). "
                f"FLOPs: FlopCounterMode, at full size (Whisper large-v2, BEATs cpt2, Vicuna-{llm.upper()} + LoRA), "
                "per training dialogue (forward + backward as trained), TFLOP."]
    rows = []
    for name, m in modes.items():
        s, f = m["shapes"], m["flops"]
        rows.append([f"({name}) {m['label']}", f"{s['whisper_passes']:.2f}", f"{s['qformer_windows']:.1f}",
                     f"{s['speech_tokens']:.1f}", f"{s['llm_positions']:.0f}", f"{100 * s['padding_share']:.1f} %",
                     *[tflop(f[p]) for p in PARTS], tflop(f["total"]), f"{f['total'] / c['flops']['total']:.2f}x"])
    rows.append(["(c) varlen: flash-attention, each sample attends to itself", "", "", "", "", "", "", "", "",
                 tflop(c["flops"]["llm_varlen"]), tflop(c["flops"]["total_varlen"]), ""])
    sections.append("Per dialogue: Whisper passes, Q-Former windows, speech tokens, LLM positions computed (padding "
                    "included) and their padding share; FLOPs by part.\n\n" + table(
                        ["mode", "Whisper passes", "Q-Former windows", "speech tokens", "LLM positions", "padding",
                         "Whisper", "BEATs", "Q-Former+proj", "LLM", "total", "vs (c)"], rows))
    sections.append("LLM input per batch, rows x length: " + "; ".join(
        f"({n}) " + ", ".join(f"{rows}x{length}" for rows, length in (b["llm"] for b in m["batches"]))
        for n, m in modes.items()))
    goal = results["goal"]
    sections.append(f"Goal (c) >= {GOAL}x fewer FLOPs than (b) and fewer than (a): (b)/(c) = {goal['b_over_c']:.2f}x, "
                    f"(a)/(c) = {goal['a_over_c']:.2f}x: **{'holds' if goal['holds'] else 'does not hold'}**. "
                    "LLM attention share of (c)'s LLM FLOPs: "
                    f"{100 * c['flops']['llm_attention'] / c['flops']['llm']:.1f} %.")
    sections.append("Cross-check on the tiny model, one training step of the first batch (GFLOP): the whole step "
                    "counted vs the per-part composition at its shapes\n\n" + table(
                        ["mode", "whole step", "composed", "composed / whole"],
                        [[f"({n})", f"{m['cross_check']['whole_step'] / 1e9:.4f}",
                          f"{m['cross_check']['composed'] / 1e9:.4f}", f"{m['cross_check']['ratio']:.6f}"]
                         for n, m in modes.items()]) + "\n\nThe composition runs the same modules at the same shapes; "
                    "what else a step does (embedding lookups, concatenation, norms, softmax, the loss, AdamW) has no "
                    "matmul, convolution or attention, all that FlopCounterMode counts. Attention is counted on "
                    "PyTorch's math path in both (the counter has no formula for the fused CPU kernel).")
    sections.append(f"CPU wall time of the tiny model, {results['threads']} threads: optimizer steps over the batches, "
                    f"interleaved a, b, c, ..., each batch's fastest of {results['rounds']}\n\n" + table(
                        ["mode", "steps", "s/step", "ms/dialogue", "vs (c)", "CPU ms/dialogue (process)", "vs (c)"],
                        [[f"({n})", str(m["wall"]["steps"]), f"{m['wall']['s_per_step']:.3f}",
                          f"{m['wall']['ms_per_dialogue']:.1f}",
                          f"{m['wall']['ms_per_dialogue'] / c['wall']['ms_per_dialogue']:.2f}x",
                          f"{m['wall']['cpu_ms_per_dialogue']:.1f}",
                          f"{m['wall']['cpu_ms_per_dialogue'] / c['wall']['cpu_ms_per_dialogue']:.2f}x"]
                         for n, m in modes.items()]) + f"\n\nLoad average of the machine (1 min) at the start "
                    f"{results['load_average'][0]:.1f}, at the end {results['load_average'][1]:.1f} (above "
                    f"{results['threads']}, other work competed for the cores: the times are then upper bounds).")
    sections.append(f"Inference, a {DIALOGUE_TURNS}-turn dialogue, greedy, batch 1: TTFT on the tiny model (fastest of "
                    f"{results['repeats']}), prefill FLOPs at full size (forward only, TFLOP); tiny check = the "
                    "composed / the counted prefill of the tiny model\n\n" + table(
                        ["mode", "TTFT ms (tiny)", "Whisper passes", "speech tokens", "prompt positions", "Whisper",
                         "BEATs", "Q-Former+proj", "LLM", "prefill total", "vs (c)", "tiny check"],
                        [[f"({n})", f"{m['inference']['ttft_ms']:.1f}", str(m["inference"]["whisper_passes"]),
                          str(m["inference"]["speech_tokens"]), str(m["inference"]["prompt_positions"]),
                          *[tflop(m["inference"][f"prefill_{p}"]) for p in PARTS],
                          tflop(m["inference"]["prefill_total"]),
                          f"{m['inference']['prefill_total'] / c['inference']['prefill_total']:.2f}x",
                          f"{m['inference']['tiny_ratio']:.6f}"] for n, m in modes.items()]))
    return "\n\n".join(sections) + "\n"


def write_new(folder: Path, stem: str, results: dict[str, Any], text: str) -> list[Path]:
    """The results as <stem>.json and <stem>.md in `folder`; refuses to replace a file."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    taken = [str(p) for p in paths if p.exists()]
    if taken:
        raise SystemExit(f"error: {', '.join(taken)} already exist(s): not overwritten; choose another --out")
    for path, content in zip(paths, (json.dumps(results, indent=1), text)):
        with open(path, "x", encoding="utf-8") as f:
            f.write(content)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", choices=list(LLMS), default="13b",
                        help="the LLM of the full-size figures: Vicuna 7b/13b, qwen2.5-7b, qwen3-8b")
    parser.add_argument("--batch", type=int, default=8, help="dialogues per training batch")
    parser.add_argument("--dialogues", type=int, default=0, help="dialogues of the corpus to use (0 = all)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed passes over the batches per mode (each batch's fastest step is kept)")
    parser.add_argument("--repeats", type=int, default=3, help="TTFT runs per mode (the fastest is kept)")
    parser.add_argument("--quick", action="store_true", help="2 dialogues, one TTFT run: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "runs/bench_turn_modes"), help="folder for the JSON and markdown")
    args = parser.parse_args(argv)
    if args.quick:
        args.dialogues, args.rounds, args.repeats, args.batch = 2, 1, 1, min(args.batch, 2)
    if min(args.batch, args.rounds, args.repeats) < 1 or args.dialogues < 0:
        parser.error("--batch, --rounds and --repeats must be >= 1, --dialogues >= 0")
    return args


def wall_time(mode: Mode) -> dict[str, float]:
    dialogues = sum(len(s.ids) for s in mode.shapes)
    return {"steps": len(mode.step_seconds), "s_per_step": sum(mode.step_seconds) / len(mode.step_seconds),
            "ms_per_dialogue": 1e3 * sum(mode.step_seconds) / dialogues,
            "cpu_ms_per_dialogue": 1e3 * sum(mode.step_cpu_seconds) / dialogues}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    phases: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        phases[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    dist_info = init_distributed("cpu")
    output_dir = tempfile.mkdtemp(prefix="bench_turn_modes_")
    modes = [build_mode(name, args.batch, args.dialogues or 10**9, dist_info, output_dir) for name in MODES]
    full = PartFlops(full_size_model(args.llm))
    phase("build models, load batches")
    checks = {mode.name: cross_check(mode, mode.batches[0]) for mode in modes}  # also each mode's warm-up
    phase("cross-check (tiny, counted steps)")
    timed_steps(modes, args.rounds)
    phase("timed steps")
    flops = {mode.name: per_dialogue(mode.shapes, full, train=True) for mode in modes}
    phase("full-size training FLOPs")
    dialogue = [inference_batch(mode) for mode in modes]
    prefills = {mode.name: prefill(mode, batch, full) for mode, batch in zip(modes, dialogue)}
    ttft = first_token_seconds(modes, dialogue, args.repeats)
    phase("inference")
    results: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "llm": args.llm,
        "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads", "threads": torch.get_num_threads(),
        "corpus": modes[0].cfg.datasets.train_ann_path, "batch": args.batch, "rounds": args.rounds,
        "repeats": args.repeats, "dialogues": sum(len(s.ids) for s in modes[0].shapes),
        "full_size": LLM_FOLDER[args.llm], "modes": {}}
    for mode in modes:
        results["modes"][mode.name] = {
            "label": mode.label, "overrides": MODES[mode.name][1], "shapes": shape_summary(mode.shapes),
            "batches": [asdict(s) for s in mode.shapes], "flops": flops[mode.name],
            "cross_check": checks[mode.name], "wall": wall_time(mode),
            "inference": {"ttft_ms": 1e3 * ttft[mode.name], **prefills[mode.name]}}
    total = {name: m["flops"]["total"] for name, m in results["modes"].items()}
    b_over_c, a_over_c = total["b"] / total["c"], total["a"] / total["c"]
    results["goal"] = {"b_over_c": b_over_c, "a_over_c": a_over_c, "holds": b_over_c >= GOAL and a_over_c > 1}
    results["phase_seconds"] = phases
    results["load_average"] = [load_at_start, os.getloadavg()[0]]
    text = report(results)
    print(text)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for path in write_new(Path(args.out), f"turn_modes_{args.llm}_{stamp}", results, text):
        print(f"wrote {path}")
    print("seconds: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
