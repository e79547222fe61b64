"""Data-loading throughput (dialogues/s) of the demo corpus, with and without DataLoader workers, next to how
fast the tiny model consumes dialogues in training (forward + backward). Loading keeps up when its rate is
above the model's.

    python -m benchmarks.bench_data [--config configs/demo.yaml] [--ann data/demo/ann/train.json]
                                    [--batch-size 4] [--workers 0 2] [--model-steps 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dataset_v1 import build_dataset, collate, load_audio, log_mel, per_turn_clips

ROOT = Path(__file__).resolve().parent.parent


def loading_rate(dataset, batch_size: int, workers: int) -> float:
    """Dialogues per second over one pass of the annotation (batches collated as in training)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate)
    start = time.perf_counter()
    count = sum(len(batch["id"]) for batch in loader)
    return count / (time.perf_counter() - start)


def stage_seconds(dataset, limit: int) -> tuple[float, float]:
    """Mean seconds per dialogue spent reading + resampling audio, and computing log-mel."""
    read = mel = 0.0
    entries = dataset.annotation[:limit]
    for entry in entries:
        start = time.perf_counter()
        clips, _ = per_turn_clips([load_audio(turn["path"]) for turn in entry["turns"]], dataset.max_clip_samples)
        middle = time.perf_counter()
        log_mel(clips, dataset.feature_extractor)
        read, mel = read + middle - start, mel + time.perf_counter() - middle
    return read / len(entries), mel / len(entries)


def training_rate(cfg, batches: list[dict], steps: int) -> float:
    """Dialogues per second of the tiny model's training forward + backward (after one warm-up step)."""
    from models.salmonn import SALMONN
    model = SALMONN.from_config(cfg.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(batch: dict) -> None:
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()

    step(batches[0])
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    seconds = time.perf_counter() - start
    return sum(len(batches[i % len(batches)]["id"]) for i in range(steps)) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--ann", default=str(ROOT / "data" / "demo" / "ann" / "train.json"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--model-steps", type=int, default=3, help="0 skips the model")
    args = parser.parse_args()

    cfg = OmegaConf.load(args.config)
    dataset = build_dataset(args.ann, cfg.get("datasets", {}), "train", cfg.model, seed=0)
    turns = sum(len(e["turns"]) for e in dataset.annotation)
    print(f"corpus: {len(dataset)} dialogues, {turns} turns ({args.ann}); torch threads {torch.get_num_threads()}")
    read, mel = stage_seconds(dataset, limit=8)
    print(f"per dialogue: read+resample {1000 * read:.1f} ms, log-mel {1000 * mel:.1f} ms")
    for workers in args.workers:
        rate = loading_rate(dataset, args.batch_size, workers)
        print(f"loading, batch {args.batch_size}, {workers} workers: {rate:.1f} dialogues/s")
    if args.model_steps:
        batches = [collate([dataset[i] for i in range(start, start + args.batch_size)])
                   for start in range(0, args.batch_size * 2, args.batch_size)]
        rate = training_rate(cfg, batches, args.model_steps)
        print(f"tiny model training (forward+backward+AdamW), batch {args.batch_size}: {rate:.2f} dialogues/s")


if __name__ == "__main__":
    main()
