"""Writes random-weight artifacts of the real shapes in the real on-disk formats, so that the full-size loading path
(`from_pretrained`, `BEATs.from_checkpoint`, the released checkpoint's key names) can be run without downloads:

    python -m scripts.make_real_shape_assets --out /data/real7b --llm 7b      # ~22 GB on disk, ~3 min on 2 cores
    python -m scripts.make_real_shape_assets --out DIR --llm 13b --configs-only  # configs for model.random_init

- whisper-large-v2/: config.json, preprocessor_config.json and model.safetensors (fp32, 1.54 B parameters, the
  WhisperForConditionalGeneration key layout of the released folder: `model.encoder.*`, `model.decoder.*`);
- BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt: `{'cfg', 'model', 'label_dict'}` with the cpt2 cfg (12 layers,
  768 wide, relative position bias, deep norm, weight-normed positional conv) and the AudioSet head;
- vicuna-7b-v1.5/ (or vicuna-13b-v1.1/): config.json, tokenizer.model (the tiny one: ids fit in 32,000) and fp16
  sharded safetensors with model.safetensors.index.json, as the released folders hold them;
- salmonn_7b_v0.pth (or salmonn_v1.pth): the released checkpoint's layout: `model` (the trained tensors under the
  original names, fp32), `optimizer` (AdamW's exp_avg / exp_avg_sq per tensor: why the 13B file is 400 MB for
  34 M trained parameters), `config`, `scaler`, `epoch`.

Matrices are N(0, 0.02), norm weights 1, biases 0. `--configs-only` writes the configs (and the BEATs cfg as
.json) without weights: what `model.random_init: true` builds from (benchmarks/gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from models.beats import random_beats_checkpoint
from tools.real_size import (BEATS_CPT2, BEATS_FILE, RELEASED_CHECKPOINT, released_model_config,
                              write_config_folders)
from models.salmonn import SALMONN

SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A plausible weight: norms 1, biases 0, everything else N(0, 0.02)."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name.lower() and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def meta_shapes(model_class: type, config: object) -> dict[str, torch.Size]:
    """Every tensor a saved model of `model_class` holds (tied copies excluded), built on the meta device."""
    with torch.device("meta"):
        model = model_class(config)
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()  # Whisper: proj_out
    return {name: t.shape for name, t in model.state_dict().items() if name not in tied}


def write_safetensors(shapes: dict[str, torch.Size], folder: Path, dtype: torch.dtype, seed: int,
                      shard_bytes: int) -> int:
    """Random tensors of `shapes` as `model.safetensors`, or shards + `model.safetensors.index.json` when they
    exceed `shard_bytes`; built one shard at a time. Returns the bytes written."""
    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map, total = {}, 0
    for file, keys in zip(names, shards):
        tensors = {k: random_tensor(k, shapes[k], dtype, generator) for k in keys}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= {k: file for k in keys}
        print(f"  {folder / file}: {len(keys)} tensors", flush=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def released_checkpoint(folders: dict[str, Path], size: str, seed: int) -> dict:
    """A checkpoint with the released file's key set and shapes (from the model built on the meta device, whose
    key set tests/test_real_size.py checks against the original code's), random values, and AdamW state."""
    model_cfg = released_model_config(folders, size)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SALMONN(model_cfg).trainable_state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    model = {k: random_tensor(k, shape, torch.float32, generator) for k, shape in shapes.items()}
    state = {i: {"step": torch.tensor(30000.0), "exp_avg": torch.randn(t.shape, generator=generator) * 1e-4,
                 "exp_avg_sq": torch.rand(t.shape, generator=generator) * 1e-8} for i, t in enumerate(model.values())}
    groups = [{"lr": 3e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False,
               "params": list(range(len(model)))}]
    stored = {k: v for k, v in model_cfg.items() if k != "random_init"} | {"lora_rank": 8, "lora_alpha": 32}
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}, "config": {"model": stored},
            "scaler": None, "epoch": 0}


def write_assets(out: Path, size: str, seed: int, configs_only: bool) -> None:
    folders = write_config_folders(out, (size,))
    print(f"configs in {out}", flush=True)
    if configs_only:
        return
    started = time.time()
    whisper = WhisperConfig.from_pretrained(folders["whisper"])
    written = write_safetensors(meta_shapes(WhisperForConditionalGeneration, whisper), folders["whisper"],
                                torch.float32, seed, shard_bytes=2**40)  # one file, as released
    print(f"whisper-large-v2: {written / 1e9:.2f} GB ({time.time() - started:.0f} s)", flush=True)
    beats = out / f"{BEATS_FILE}.pt"
    torch.save(random_beats_checkpoint(BEATS_CPT2, seed + 1), beats)
    print(f"{beats}: {beats.stat().st_size / 1e6:.0f} MB", flush=True)
    llama = LlamaConfig.from_pretrained(folders[size])
    written = write_safetensors(meta_shapes(LlamaForCausalLM, llama), folders[size], torch.float16, seed + 2,
                                SHARD_BYTES)
    print(f"{folders[size].name}: {written / 1e9:.2f} GB ({time.time() - started:.0f} s)", flush=True)
    checkpoint = out / RELEASED_CHECKPOINT[size]
    torch.save(released_checkpoint(folders, size, seed + 3), checkpoint)
    print(f"{checkpoint}: {checkpoint.stat().st_size / 1e6:.0f} MB ({time.time() - started:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write (created; must not hold these files yet)")
    ap.add_argument("--llm", choices=sorted(RELEASED_CHECKPOINT), default="7b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs-only", action="store_true", help="configs without weights (for random_init)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    existing = out / RELEASED_CHECKPOINT[args.llm]
    if existing.exists():
        print(f"error: {existing} exists: {out} already holds these artifacts (choose another --out)",
              file=sys.stderr)
        return 2
    write_assets(out, args.llm, args.seed, args.configs_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
