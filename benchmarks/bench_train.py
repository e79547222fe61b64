"""Training speed of one config: samples/s, tokens/s, peak memory and model FLOPs utilisation (MFU).

    python -m benchmarks.bench_train                                        # tiny demo model, CPU, fp32
    python -m benchmarks.bench_train --cfg-path configs/config.yaml --options run.device=cuda \\
        run.batch_size_train=2 --steps 10                                   # real model, GPU (bf16 autocast)
    python -m benchmarks.bench_train --peak-tflops 989                      # set the peak (H100 SXM, bf16 dense)

What is measured: full optimizer steps of the recipe (`Runner.train_step`: forward, backward, gradient
normalisation, clipping, AdamW) on batches collated before timing (data loading has its own benchmark,
bench_data.py), after --warmup untimed steps; the device is synchronised around each step.

- samples/s: dialogues (or clips, original format) per second; run.accum_grad_iters micro-batches make a step.
- tokens/s: LLM sequence positions per second (speech tokens + prompt + target, padding excluded), and target
  tokens per second (the tokens the loss is on).
- peak memory: CUDA max_memory_allocated on GPU; the peak resident set size of the process on CPU.
- FLOPs per step: counted, not estimated: torch.utils.flop_counter.FlopCounterMode runs one step and adds up
  every matmul, convolution and attention in forward and backward (2 FLOPs per multiply-add). Frozen modules
  cost forward only when nothing below them needs a gradient (Whisper, BEATs) and forward + input gradient
  (~2x forward) when they sit between trained parts (LLaMA under LoRA); trained weights add their weight gradient
  (the classic 6 N T of full training becomes ~4 N T for the LoRA-adapted LLM). Printed: the step total, its
  backward part, the forward split per module (the counter cannot split backward by module reliably: it books
  it all under the LLM), and the LLM's textbook figures 2 N T / 4 N T / 6 N T for comparison.
- MFU = counted FLOPs per step / seconds per step / peak FLOP/s. Peak: --peak-tflops; else the dense bf16/fp16
  peak of a known GPU (table below); on CPU the measured rate of a large fp32 matmul on the same threads (so CPU
  MFU says how close the step gets to this machine's best GEMM, not to a datasheet figure).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import peak_flops, peak_memory_bytes, synchronize
from config import add_config_arguments, load_config
from runner import Runner, build_datasets, build_model
from utils import init_distributed, seed_everything, setup_logging

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "the config(s) to time; default: configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device, in TFLOP/s")
    args = parser.parse_args(argv)
    args.cfg_path = args.cfg_path or [str(ROOT / "configs/demo.yaml")]
    return args



class LlmPositions:
    """Counts the LLM's non-padding sequence positions per step (a forward hook on the LLaMA)."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        model.llama_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        self.count += int(kwargs["attention_mask"].sum())


def module_flops(counter: FlopCounterMode) -> dict[str, int]:
    """Counted FLOPs per top-level submodule of SALMONN (reliable for a forward pass)."""
    totals: dict[str, int] = defaultdict(int)
    for name, by_op in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) == 2:  # "SALMONN.<child>"
            totals[parts[1]] += sum(by_op.values())
    return dict(totals)


def llm_textbook_flops(model: torch.nn.Module, positions: int) -> dict[str, float]:
    """2 N T forward, 4 N T with input gradients, 6 N T with weight gradients, N = the LLM's non-embedding
    parameters (attention's T^2 term left out)."""
    llm = model.llama_model
    n = sum(p.numel() for name, p in llm.named_parameters() if "embed_tokens" not in name)
    return {"N (LLM non-embedding params)": n, "2NT": 2 * n * positions, "4NT": 4 * n * positions,
            "6NT": 6 * n * positions}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg = load_config(args.cfg_path, [*args.options, f"run.output_dir={output_dir}"],
                      required_sections=("model", "datasets"))
    dist_info = init_distributed(cfg.run.device)
    setup_logging(None, dist_info.rank)
    seed_everything(cfg.run.seed)
    model = build_model(cfg)
    datasets = build_datasets(cfg, ["train"])
    runner = Runner(cfg, model, datasets, dist_info)
    device = dist_info.device
    positions = LlmPositions(model)

    accum, batch_size = cfg.run.accum_grad_iters, cfg.run.batch_size_train
    loader = runner._train_loader(0, 0)
    needed = (args.warmup + args.steps + 1) * accum
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == needed:
            break
    if len(batches) < needed:
        batches = (batches * needed)[:needed]  # a small corpus: reuse its batches

    def step(i: int):
        synchronize(device)
        start = time.perf_counter()
        result = runner.train_step(batches[i * accum:(i + 1) * accum])
        synchronize(device)
        return result, time.perf_counter() - start

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    positions.count = 0
    seconds = samples = tokens = 0.0
    for i in range(args.warmup, args.warmup + args.steps):
        result, took = step(i)
        seconds, samples, tokens = seconds + took, samples + result.samples, tokens + result.tokens
    llm_positions = positions.count * dist_info.world_size  # one rank's count, times ranks (same shapes)
    memory, memory_source = peak_memory_bytes(device)

    # One more step under the FLOP counter (it slows the step down, so it is not timed), then the same
    # micro-batches forward only, for the split by module.
    counted = batches[(args.warmup + args.steps) * accum:]
    positions.count = 0
    # PyTorch's math attention: the counter has no formula for the fused CPU kernel and would count it as 0
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        runner.train_step(counted)
    flops_step = counter.get_total_flops()
    counted_positions = positions.count
    with FlopCounterMode(display=False) as forward_counter, runner._autocast(), sdpa_kernel(SDPBackend.MATH):
        for batch in counted:  # (with grad: the counter's module tracker fails under no_grad)
            model(batch)
    flops_forward = forward_counter.get_total_flops()
    by_module = module_flops(forward_counter)

    step_seconds = seconds / args.steps
    peak, peak_source = peak_flops(device, runner.amp_dtype, args.peak_tflops)
    mfu = flops_step / step_seconds / peak
    if not dist_info.is_main:
        return 0
    print(f"config {args.cfg_path}: device {device}, precision {runner.amp_dtype or 'fp32'}, "
          f"{dist_info.world_size} process(es), batch {batch_size} x accum {accum}, torch threads "
          f"{torch.get_num_threads()}, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"seconds/step      {step_seconds:.3f}")
    print(f"samples/s         {samples / seconds:.2f}")
    print(f"tokens/s          {llm_positions / seconds:.0f} LLM positions, {tokens / seconds:.0f} target tokens")
    print(f"peak memory       {memory / 2**20:.0f} MiB ({memory_source})")
    print(f"FLOPs/step        {flops_step:.4g} counted on this rank: forward {flops_forward:.4g}, backward "
          f"{flops_step - flops_forward:.4g}")
    print("  forward by module:")
    for name, value in sorted(by_module.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<20} {value:.4g} ({100 * value / max(flops_forward, 1):.1f}% of forward)")
    textbook = llm_textbook_flops(model, counted_positions)
    print("  LLM textbook, T = {} positions: N = {:.4g}, 2NT = {:.4g}, 4NT = {:.4g}, 6NT = {:.4g}".format(
        counted_positions, *textbook.values()))
    print(f"achieved          {flops_step / step_seconds / 1e9:.2f} GFLOP/s")
    print(f"peak              {peak / 1e9:.1f} GFLOP/s ({peak_source})")
    print(f"MFU               {100 * mfu:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
