"""A trained SALMONN as a folder the ecosystem reads: peft's LoRA adapter, which loads onto the plain LLM with
`PeftModel.from_pretrained`, and beside it the speech connector in safetensors. `model.ckpt: <folder>` loads it
back (SALMONN.load_checkpoint).

    out_dir/
      adapter_config.json, adapter_model.safetensors, README.md    written by peft's save_pretrained, unchanged
      connector.safetensors    the other trained tensors (Q-Former, speech_query_tokens, speech_llama_proj, ln_speech,
                               ln_audio) under the released checkpoints' names; its metadata holds the model keys
                               that set shapes (`model_config`, JSON) and where the weights came from (`source`)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.salmonn import _SHAPE_KEYS, SALMONN, CheckpointError, to_original_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONNECTOR = "connector.safetensors"
FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONNECTOR)
LLM_PREFIX = "llama_model."
# adapter_config.json fields that change what the adapter computes: they must equal the model's LoRA config.
LORA_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern",
               "alpha_pattern")


def check_new_folder(out_dir: str | Path) -> None:
    """An export never overwrites: out_dir must not exist yet, or be an empty folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"'{out_dir}' already exists and is not empty: choose another folder or remove it")


def lora_names(model: SALMONN) -> dict[str, str]:
    """peft's key of each LoRA tensor (as in adapter_model.safetensors) -> its name in trainable_state_dict. The
    keys are peft's own (get_peft_model_state_dict), matched to our parameters by the storage they share."""
    from peft import get_peft_model_state_dict

    ours = {p.data_ptr(): to_original_name(LLM_PREFIX + n) for n, p in model.llama_model.named_parameters()
            if p.requires_grad}
    return {key: ours[t.data_ptr()] for key, t in get_peft_model_state_dict(model.llama_model).items()}


def shape_config(model: SALMONN) -> dict[str, Any]:
    """The model keys that decide which tensors the model trains, and their shapes (lists as lists)."""
    return json.loads(json.dumps({k: model.cfg[k] for k in _SHAPE_KEYS}, default=list))


def export_adapter(model: SALMONN, out_dir: str | Path, source: str) -> Path:
    """Writes the model's trained tensors to out_dir (new, or an empty folder) as peft's adapter folder plus
    connector.safetensors; `source` says where the weights came from (e.g. the checkpoint). Everything is written
    into a temporary folder beside out_dir and renamed into place at the end, so an interrupted export leaves no
    half-written adapter."""
    out_dir = Path(out_dir)
    check_new_folder(out_dir)
    state = model.trainable_state_dict()  # refuses a model whose LoRA is merged
    if not model.cfg["lora"]:
        raise ValueError("model.lora is false: there is no LoRA adapter for peft to read (keep the .pth checkpoint)")
    lora = lora_names(model)
    connector = {k: v.contiguous() for k, v in state.items() if not k.startswith(LLM_PREFIX)}
    outside_adapter = sorted(set(state) - set(connector) - set(lora.values()))
    if outside_adapter:
        raise ValueError(f"LLM tensors that train outside the LoRA adapter cannot be exported: {outside_adapter[:5]}")

    model.llama_model.peft_config["default"].base_model_name_or_path = model.cfg["llm_path"]  # local, no hub id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.{os.getpid()}.partial"
    partial.mkdir()
    try:
        model.llama_model.save_pretrained(partial)
        save_file(connector, partial / CONNECTOR, metadata={
            "format": "pt", "source": source, "model_config": json.dumps(shape_config(model))})
        partial.rename(out_dir)  # replaces an empty out_dir; fails on one filled meanwhile
    except BaseException:
        shutil.rmtree(partial)
        raise
    return out_dir


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; an unreadable one is an error naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {e}") from None


def check_lora_config(model: SALMONN, folder: Path) -> None:
    """adapter_config.json must describe this model's LoRA: rank, alpha and target modules change the output
    without always changing a shape."""
    from peft import LoraConfig

    path = folder / ADAPTER_CONFIG
    try:
        saved = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError) as e:  # malformed JSON, fields of another peft type or version
        raise CheckpointError(f"'{path}' is not a LoRA config peft can read: {e}") from None
    ours = model.llama_model.peft_config["default"]
    differ = [f"{k}={getattr(saved, k)!r} (this model: {getattr(ours, k)!r})" for k in LORA_FIELDS
              if getattr(saved, k) != getattr(ours, k)]
    if differ:
        raise CheckpointError(f"'{path}' describes another LoRA: " + ", ".join(differ))


def load_adapter(model: SALMONN, folder: str | Path) -> dict:
    """Loads a folder written by export_adapter into a SALMONN built from the same config, strictly (every trained
    tensor present with its shape, none left over; SALMONN.load_checkpoint_dict). Returns it as a checkpoint:
    {"model": tensors under the original names, "config": {"model": the keys that set shapes}}."""
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"'{folder}' is not an adapter folder (python -m scripts.export_adapter writes "
                                f"one): {', '.join(missing)} missing")
    if not model.cfg["lora"]:
        raise CheckpointError(f"'{folder}' holds a LoRA adapter, but this model has no LoRA (model.lora: false, or "
                              "merged already)")
    check_lora_config(model, folder)
    adapter, _ = read_safetensors(folder / ADAPTER_WEIGHTS)
    connector, metadata = read_safetensors(folder / CONNECTOR)
    try:
        stored = json.loads(metadata.get("model_config", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{folder / CONNECTOR}': its model_config metadata is not JSON: {e}") from None
    names = lora_names(model)  # an adapter key peft would not write for this model stays as it is: unexpected
    state = {**connector, **{names.get(k, k): v for k, v in adapter.items()}}
    ckpt = {"model": state, "config": {"model": stored}}
    model.load_checkpoint_dict(ckpt, source=str(folder))
    return ckpt
