"""Inference speed and memory of SALMONN: time to first token, time per output token, peak memory and batched
throughput, for 10 s and 30 s of audio (clipped, with a note, to the model's window: 5 s for the tiny demo model).

    python -m benchmarks.bench_inference                                   # tiny demo model, CPU
    python -m benchmarks.bench_inference --cfg-path configs/config.yaml --device cuda --new-tokens 64

What is timed (wall clock, the fastest of --repeats runs after one warm-up: interference from other processes
only ever adds time, so the fastest run is the best estimate of the cost, as Python's timeit advises; the device
is synchronised before and after every timed phase, so GPU work queued asynchronously is counted where it
belongs):
- encode: Whisper + BEATs + Q-Former + projection for one clip (`encode_speech`).
- TTFT: from calling generate to the first new token: encoders, prompt assembly, prefill, first sampling step.
  Nota's efficiency script (audiolm-evaluator) reports the mean of its runs after a warm-up, and TTFT + TPOT as
  the "inference time": the mean is printed that way too, beside the fastest.
- TPOT: (time of the last token - time of the first) / (tokens - 1), over a whole generation of --new-tokens
  tokens (end-of-answer is suppressed so every run generates exactly that many).
- answers/s: batch size / time of one generate call over the batch (same forced length).
- peak memory: CUDA `max_memory_allocated` on GPU; on CPU the peak resident set size of the process, sampled
  every 5 ms during one extra, untimed run of the batch.
Log-mel extraction and audio loading happen before timing (benchmarks/bench_data.py covers them). Audio is
random noise: speed does not depend on the content, and Whisper pads every clip to 30 s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import bench_duration
from dataset_v1 import load_feature_extractor
from inference import (add_model_arguments, generation_settings, inference_dtype, load_inference_config, load_model,
                       without_unused_sampling)
from utils import resolve_device


def window_durations(durations: list[float], window: float) -> list[float]:
    """The durations, each at most the encoder's window (one clip per sample), in order without repeats; a note
    says which were clipped."""
    if any(d > window for d in durations):
        given = " ".join(f"{d:g}" for d in durations)
        print(f"note: --durations {given}: this model's encoder window is {window:g} s; longer durations are clipped "
              "to it", file=sys.stderr)
    return list(dict.fromkeys(min(d, window) for d in durations))


def nota_summary(results: list[dict[str, Any]], device: torch.device) -> str:
    """The figures as Nota's efficiency script prints them: means after warm-up at batch 1, inference time = TTFT
    + TPOT, and the peak memory of the batch-1 run when it was measured."""
    lines = []
    for r in results:
        memory = r["batches"].get(1, {}).get("peak_mem_mb")
        lines.append(f"{r['audio_s']:g} s, batch 1, mean of the timed runs: TTFT {r['ttft_mean_ms'] / 1e3:.4f} s, "
                     f"TPOT {r['tpot_mean_ms'] / 1e3:.4f} s, inference time (TTFT + TPOT) "
                     f"{(r['ttft_mean_ms'] + r['tpot_mean_ms']) / 1e3:.4f} s"
                     + (f", peak memory {memory / 1024:.4f} GB ({'allocated' if device.type == 'cuda' else 'RSS'})"
                        if memory is not None else ""))
    return "\n".join(lines)


def format_table(results: list[dict[str, Any]], device: torch.device) -> str:
    memory = "peak GPU alloc" if device.type == "cuda" else "peak RSS"
    lines = [f"{'audio':>6} {'encode':>9} {'TTFT':>9} {'TPOT':>9} {'batch':>6} {'answers/s':>10} "
             f"{memory + ' (MB)':>20}"]
    for r in results:
        for i, (batch_size, b) in enumerate(r["batches"].items()):
            head = (f"{r['audio_s']:>5g}s {r['encode_ms']:>7.1f}ms {r['ttft_ms']:>7.1f}ms {r['tpot_ms']:>7.2f}ms"
                    if i == 0 else " " * 39)
            lines.append(f"{head} {batch_size:>6} {b['answers_per_s']:>10.2f} {b['peak_mem_mb']:>20.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--durations", type=float, nargs="+", default=[10.0, 30.0],
                        help="audio seconds; longer than the encoder's window (30 s; 5 s for the demo model) is "
                             "clipped to it")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer (forced)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per figure (the fastest is kept), after a warm-up")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = load_inference_config(args.cfg_path, args.options)
    model = load_model(cfg, device, args.lora_scaling)
    feature_extractor = load_feature_extractor(cfg.get("datasets", {}).get("whisper_path") or cfg.model.whisper_path)
    # Greedy and exactly --new-tokens tokens: comparable runs, whatever the weights say.
    settings = without_unused_sampling({**generation_settings(cfg.generate, args), "num_beams": 1,
                                        "do_sample": False, "max_new_tokens": args.new_tokens,
                                        "min_new_tokens": args.new_tokens})
    settings.pop("min_length", None)  # min_new_tokens decides
    durations = window_durations(args.durations, feature_extractor.chunk_length)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_duration(model, feature_extractor, seconds, args.batch_sizes,
                                  settings, args.repeats, device, Path(tmp), inference_dtype(cfg, model))
                   for seconds in durations]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"SALMONN inference, {name}, LLM {cfg.model.llm_path} ({cfg.model.torch_dtype}), "
          f"{args.new_tokens} new tokens, fastest of {args.repeats} runs")
    print(format_table(results, device))
    print(nota_summary(results, device))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "settings": settings, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
