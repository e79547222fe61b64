"""Checkpoint formats, read and written: the trained tensors under the released checkpoints' names (the original's
`.pth`, `{"model": state_dict, "config": ...}`), strict loading with errors that say what differs, the model files
a config names, and the adapter folder the ecosystem reads (peft's LoRA adapter, which loads onto the plain LLM
with `PeftModel.from_pretrained`, and beside it the speech connector in safetensors):

    out_dir/
      adapter_config.json, adapter_model.safetensors, README.md    written by peft's save_pretrained, unchanged
      connector.safetensors    the other trained tensors (Q-Former, speech_query_tokens, speech_llama_proj, ln_speech,
                               ln_audio) under the released checkpoints' names; its metadata holds the model keys
                               that set shapes (`model_config`, JSON) and where the weights came from (`source`)

`model.ckpt` takes either: a `.pth` file or an adapter folder (load_checkpoint). models/salmonn.py builds the
model and calls this module; this module never imports the model.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models import model_settings
from models.llm import llm_folder

log = logging.getLogger(__name__)

# Q-Former parameter-name prefixes: (ours, the original's), most specific first; `{n}` is a layer number and
# `{attn}` attention or crossattention. Every other name is the same in both. Both directions use this table.
_QFORMER_NAMES = [
    ("speech_Qformer.layernorm.", "speech_Qformer.bert.embeddings.LayerNorm."),
    ("speech_Qformer.encoder.layer.{n}.{attn}.attention.", "speech_Qformer.bert.encoder.layer.{n}.{attn}.self."),
    ("speech_Qformer.encoder.", "speech_Qformer.bert.encoder."),
]


# Tensors the original's checkpoints carry but that are not trained state: recomputed or shared, never loaded.
_LEFTOVER_KEYS = [
    re.compile(r"^speech_Qformer\.bert\.embeddings\.position_ids$"),
    re.compile(r"\.rotary_emb\.inv_freq$"),  # fp16-rounded in the released files: RoPE is recomputed in fp32
    re.compile(r"^beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight$"),  # alias of layer 0's
]


def _prefix_pattern(prefix: str) -> re.Pattern[str]:
    """A `_QFORMER_NAMES` prefix as a regex with named groups for its `{n}` and `{attn}` fields."""
    pattern = re.escape(prefix).replace(r"\{n\}", r"(?P<n>\d+)")
    pattern = pattern.replace(r"\{attn\}", r"(?P<attn>attention|crossattention)")
    return re.compile("^" + pattern)


def _rename(name: str, to_original: bool) -> str:
    """A parameter name in the other naming: the first matching `_QFORMER_NAMES` prefix is swapped."""
    for ours, original in _QFORMER_NAMES:
        source, target = (ours, original) if to_original else (original, ours)
        match = _prefix_pattern(source).match(name)
        if match:
            return target.format(**match.groupdict()) + name[match.end():]
    return name


def to_original_name(name: str) -> str:
    """Our parameter name -> the name the released checkpoints use."""
    return _rename(name, to_original=True)


def from_original_name(name: str) -> str:
    """A released checkpoint's name -> our parameter name."""
    return _rename(name, to_original=False)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this model: unreadable, or not matching its config. The message
    names the file and the keys, and what differs."""


class CheckpointKeyError(CheckpointError, KeyError):
    """Tensors missing from a checkpoint, or tensors that match nothing in the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict, loaded safely (`weights_only=True`); a missing, empty, truncated or foreign file
    is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_checkpoint_missing(path))
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes): not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unpickling fails with many exception types; re-raised naming the file
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({size} bytes; truncated, or not written by "
                              f"torch.save?): {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint (a dict of tensors, or "
                              "{'model': ...})")
    return ckpt


# Model keys that decide which tensors a checkpoint holds, and their shapes.
SHAPE_KEYS = ("llm_path", "whisper_path", "beats_path", "lora", "lora_rank", "lora_target_modules",
               "num_speech_query_token", "window_level_Qformer", "qformer_hidden_size", "qformer_num_layers",
               "qformer_num_heads", "qformer_intermediate_size", "freeze_whisper", "freeze_beats",
               "freeze_speech_QFormer", "freeze_speech_llama_proj")


def _stored_model_config(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `model:` section a checkpoint stores (ours and the runner's store the whole config), or {}."""
    stored = ckpt.get("config", {})
    return stored.get("model", stored) if isinstance(stored, Mapping) else {}


def _config_differences(ckpt: Mapping[str, Any], cfg: Mapping[str, Any]) -> str:
    """What the checkpoint's stored model config (when it has one) says differently from this model's."""
    stored = _stored_model_config(ckpt)
    if not stored:
        return (" (the checkpoint stores no config: was it trained with another lora_rank, lora_target_modules, "
                "Q-Former size, BEATs or LLM size?)")
    stored = {**stored, "llm_path": stored.get("llm_path") or stored.get("llama_path")}  # older checkpoints
    differ = [f"model.{k}={stored[k]!r} (this config: {cfg.get(k)!r})" for k in SHAPE_KEYS
              if stored.get(k) is not None and _plain(stored[k]) != _plain(cfg.get(k))]
    if not differ:
        return " (its stored config agrees on every key that sets shapes)"
    return "; the checkpoint was trained with " + ", ".join(differ)


def _plain(value: Any) -> Any:
    """Lists and tuples (and OmegaConf lists) compare as lists."""
    return list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig" else value


WHISPER_FOLDER = ("whisper-large-v2 (Hugging Face format)", ("config.json", "preprocessor_config.json"))


def _checkpoint_missing(path: str | Path) -> str:
    return (f"checkpoint not found: '{path}' (download salmonn_v1.pth / salmonn_7b_v0.pth there, run the training "
            "stage that writes it, or fix model.ckpt)")


def beats_missing(path: str | Path) -> str:
    return f"BEATs checkpoint not found at '{path}': download BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt there"


def check_model_files(cfg: Mapping[str, Any]) -> None:
    """The folders and files the `model:` section names exist, or FileNotFoundError saying what to download where:
    a script checks this before it reads any data or weights, so a job on a machine without them stops at once."""
    cfg = model_settings(cfg)
    require_dir(cfg["whisper_path"], *WHISPER_FOLDER)
    llm_folder(cfg["llm_path"])
    if cfg["beats_path"] and not Path(cfg["beats_path"]).is_file():
        raise FileNotFoundError(beats_missing(cfg["beats_path"]))
    if cfg["ckpt"] and not Path(cfg["ckpt"]).exists():
        raise FileNotFoundError(_checkpoint_missing(cfg["ckpt"]))


def require_dir(path: str, what: str, files: tuple[str, ...]) -> Path:
    """A local model folder, or an error that says what to download where."""
    p = Path(path)
    missing = [f for f in files if not (p / f).exists()]
    if not path or not p.is_dir() or missing:
        raise FileNotFoundError(
            f"{what}: expected a local folder at '{path}' containing {', '.join(files)}"
            + (f" (missing: {', '.join(missing)})" if p.is_dir() else "")
            + f". Download {what} to '{path}' (or point the config at where it is)."
        )
    return p


# ------------------------------------------------------------------ loading (strict)
def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                              fresh_lora: bool = False) -> None:
    """Strict load: every trained tensor must be present with its shape (the LoRA's excepted with `fresh_lora`:
    they keep their init); leftovers are listed, then ignored."""
    params = dict(model.named_parameters())
    ignored, unexpected = [], []
    for key, value in state.items():
        name = from_original_name(key)
        if name in params:
            copy_checked(params[name], value, key, source)
        elif any(p.search(key) for p in _LEFTOVER_KEYS):
            ignored.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointKeyError(f"{source}: {len(unexpected)} keys match no tensor of this model, e.g. "
                                 f"{unexpected[:5]}")
    missing = [to_original_name(n) for n, p in params.items() if p.requires_grad
               and to_original_name(n) not in state and not (fresh_lora and ".lora_" in n)]
    if missing:
        raise CheckpointKeyError(f"{source}: {len(missing)} trained tensors are missing, e.g. {missing[:5]}")
    if ignored:
        log.info("%s: ignored %d leftover tensors that are recomputed or shared (%s, ...)",
                 source, len(ignored), ignored[0])


def copy_checked(param: torch.Tensor, value: torch.Tensor, key: str, source: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise CheckpointError(f"{source}: '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                              f"{tuple(param.shape)} in the model")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def load_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Loads a checkpoint written by the original code or by ours: `{"model": state_dict, ...}`, or a folder
    written by export_adapter (peft's LoRA adapter + connector.safetensors)."""
    if Path(path).is_dir():
        return load_adapter(model, path)
    ckpt = read_checkpoint(path)
    load_checkpoint_dict(model, ckpt, source=str(path))
    return ckpt


def load_checkpoint_dict(model: nn.Module, ckpt: Mapping[str, Any], source: str) -> None:
    """The trained tensors of a loaded checkpoint (strict); a mismatch names the keys and, from the config the
    checkpoint stores, the model settings that differ. A checkpoint whose stored config says it was trained
    without LoRA (stage 1: connector only) starts a model with LoRA (stage 2) with the LoRA at its init."""
    state = ckpt["model"] if "model" in ckpt else ckpt
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{source}: its 'model' entry is not a mapping of tensor names to tensors")
    fresh_lora = model.cfg["lora"] and _stored_model_config(ckpt).get("lora") is False and not any(
        ".lora_" in key for key in state)
    if fresh_lora:
        log.info("%s was trained without LoRA (stage 1): its connector is loaded, the LoRA starts at its init",
                 source)
    try:
        load_trainable_state_dict(model, state, source=source, fresh_lora=fresh_lora)
    except CheckpointError as e:
        raise type(e)(f"{e}{_config_differences(ckpt, model.cfg)}") from None
    log.info("loaded %d tensors from %s", len(state), source)


# ------------------------------------------------------------------ adapter folders
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


def lora_names(model: nn.Module) -> dict[str, str]:
    """peft's key of each LoRA tensor (as in adapter_model.safetensors) -> its name in trainable_state_dict. The
    keys are peft's own (get_peft_model_state_dict), matched to our parameters by the storage they share."""
    from peft import get_peft_model_state_dict

    ours = {p.data_ptr(): to_original_name(LLM_PREFIX + n) for n, p in model.llama_model.named_parameters()
            if p.requires_grad}
    return {key: ours[t.data_ptr()] for key, t in get_peft_model_state_dict(model.llama_model).items()}


def shape_config(model: nn.Module) -> dict[str, Any]:
    """The model keys that decide which tensors the model trains, and their shapes (lists as lists)."""
    return json.loads(json.dumps({k: model.cfg[k] for k in SHAPE_KEYS}, default=list))


def export_adapter(model: nn.Module, out_dir: str | Path, source: str) -> Path:
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


def check_lora_config(model: nn.Module, folder: Path) -> None:
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


def load_adapter(model: nn.Module, folder: str | Path) -> dict:
    """Loads a folder written by export_adapter into a SALMONN built from the same config, strictly (every trained
    tensor present with its shape, none left over; load_checkpoint_dict). Returns it as a checkpoint:
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
    load_checkpoint_dict(model, ckpt, source=str(folder))
    return ckpt
