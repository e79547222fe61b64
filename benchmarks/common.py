"""What the benchmarks share: device sync, the token clock, peak memory, the CPU's name and peak FLOP/s, and the
timed decode of one clip length (bench_inference and gpu_check). Benchmarks import this module, never each other."""
from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from dataset_v1 import make_batch
from models import SAMPLE_RATE
from utils import autocast

PROMPT = "Describe the emotion of the speaker."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TokenClock:
    """A generate() streamer that only notes when each new token arrives (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on GPU, sampled process RSS on CPU (bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def noise_batch(feature_extractor, seconds: float, text, batch_size: int, folder: Path) -> dict[str, Any]:
    """`batch_size` samples of `seconds` of noise with the same prompt, built as the CLI builds its batch."""
    path = folder / f"noise_{seconds:g}s.wav"
    rng = np.random.default_rng(0)
    sf.write(path, rng.normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE)
    one = make_batch([str(path)], PROMPT, feature_extractor, text)
    if len(one["speech_slots"][0][0]) != 1:
        raise ValueError(f"use --durations of at most the encoder's window ({feature_extractor.chunk_length} s "
                         "here): one clip per sample keeps the batch simple")
    repeat = {k: v.repeat(batch_size, *[1] * (v.dim() - 1)) for k, v in one.items() if torch.is_tensor(v)}
    lists = {k: v * batch_size for k, v in one.items() if isinstance(v, list) and k != "speech_slots"}
    return {**repeat, **lists, "speech_slots": [[[b]] for b in range(batch_size)]}


def fastest_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def first_token_and_per_token(model, batch: dict[str, Any], settings: dict[str, Any], repeats: int,
                              device: torch.device, amp: torch.dtype | None) -> tuple[list[float], list[float]]:
    """TTFT and TPOT (seconds) of each timed batch-size-1 greedy generation of a fixed length (after a warm-up)."""
    ttfts, tpots = [], []
    for attempt in range(repeats + 1):  # the first is a warm-up
        clock = TokenClock(device)
        synchronize(device)
        start = time.perf_counter()
        with autocast(amp, device):
            model.generate(batch, settings, streamer=clock)
        if len(clock.times) != settings["max_new_tokens"]:
            raise RuntimeError(f"expected {settings['max_new_tokens']} tokens, timed {len(clock.times)}")
        if attempt:
            ttfts.append(clock.times[0] - start)
            tpots.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
    return ttfts, tpots


def bench_duration(model, feature_extractor, seconds: float, batch_sizes: list[int],
                   settings: dict[str, Any], repeats: int, device: torch.device, folder: Path,
                   amp: torch.dtype | None) -> dict[str, Any]:
    single = {k: v.to(device) if torch.is_tensor(v) else v
              for k, v in noise_batch(feature_extractor, seconds, model.text, 1, folder).items()}

    def encode() -> None:
        with torch.no_grad(), autocast(amp, device):
            model.encode_speech(single["spectrogram"], single["raw_wav"], single["padding_mask"])

    ttfts, tpots = first_token_and_per_token(model, single, settings, repeats, device, amp)
    result: dict[str, Any] = {"audio_s": seconds, "encode_ms": 1e3 * fastest_seconds(encode, device, repeats),
                              "ttft_ms": 1e3 * min(ttfts), "tpot_ms": 1e3 * min(tpots),
                              "ttft_mean_ms": 1e3 * float(np.mean(ttfts)), "tpot_mean_ms": 1e3 * float(np.mean(tpots)),
                              "batches": {}}
    for batch_size in batch_sizes:
        batch = {k: v.to(device) if torch.is_tensor(v) else v
                 for k, v in noise_batch(feature_extractor, seconds, model.text, batch_size, folder).items()}

        def generate() -> None:
            with autocast(amp, device):
                model.generate(batch, settings)

        elapsed = fastest_seconds(generate, device, repeats)
        with PeakMemory(device) as memory:  # an untimed run: the CPU sampler thread would slow the timed ones
            generate()
        result["batches"][batch_size] = {"answers_per_s": batch_size / elapsed, "peak_mem_mb": memory.peak / 2**20}
    return result


# Dense (no sparsity) tensor-core peaks in TFLOP/s for bf16/fp16, from the vendors' datasheets.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                   "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0}


def peak_flops(device: torch.device, dtype: torch.dtype | None, given_tflops: float | None) -> tuple[float, str]:
    """Peak FLOP/s for MFU and where the figure comes from."""
    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                scale = 1.0 if dtype in (torch.bfloat16, torch.float16) else 0.5  # tf32 tensor cores: half
                return tflops * scale * 1e12, f"datasheet {key} {'bf16/fp16' if scale == 1 else 'tf32'} dense"
        raise SystemExit(f"unknown GPU '{name}': pass --peak-tflops")
    return measured_matmul_flops(), f"measured fp32 matmul, {torch.get_num_threads()} threads"


def measured_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def cpu_name() -> str:
    """The processor's model name and core count, for the figures' record."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"{names[0]} ({len(names)} cores)" if names else "CPU"


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"
