"""The LLM seam: any Hugging Face causal-LM folder as SALMONN's LLM, and the text rules that come with it.

Two halves, both built from the `model:` section and the LLM folder alone:

- `ChatText`, the data side's half (dataset_v1 tokenises with it; the model only reads its pad and stop ids):
  how a conversation is rendered (the folder's own chat template when it has one, else `prompt_template`, the
  original's `USER: {}\\nASSISTANT:`), whether a BOS is added, which token ends an answer (the template's
  end-of-turn token such as `<|im_end|>` / `<|eot_id|>`, or eos) for the targets and for generation's stop.
- `load_llm`, the model's half: the weights through `AutoModelForCausalLM`, loaded strictly (a missing,
  mis-shaped or unexpected tensor is an error naming it), frozen, with LoRA on checked module names; and
  `decoder_layer_classes`, the block class FSDP shards by (the model's own `_no_split_modules`).

A folder without a chat template but with a sentencepiece `tokenizer.model` (Vicuna, the released checkpoints'
LLM) is tokenised exactly as the original SALMONN did (models/tokenizer.py), so parity holds.
"""
from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models import MODEL_DEFAULTS, SPEECH_SLOT
from models.tokenizer import SalmonnTokenizer

IGNORE_INDEX = -100
_END_PROBE = "\x00salmonn-answer-end\x00"  # a reply no real text contains: the template writes its turn end after it


class LLMFolderError(FileNotFoundError):
    """An LLM folder that is missing or incomplete: the message says what to download where."""


def llm_folder(path: str | Path) -> Path:
    """A local Hugging Face causal-LM folder (config.json + a tokenizer), or an error saying what to download."""
    p = Path(path) if path else None
    if p is None or not p.is_dir() or not (p / "config.json").is_file():
        raise LLMFolderError(f"model.llm_path: expected a local Hugging Face causal-LM folder at '{path}' with "
                             "config.json, its weights and its tokenizer. Download the LLM (e.g. vicuna-13b-v1.1, "
                             f"vicuna-7b-v1.5, Qwen2.5-7B-Instruct) to '{path}', or point model.llm_path at it.")
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise LLMFolderError(f"model.llm_path '{path}' has no tokenizer (tokenizer.json, tokenizer.model or "
                             "vocab.json): copy the tokenizer files of the LLM into it")
    return p


def folder_chat_template(path: Path) -> str | None:
    """The chat template a folder ships (tokenizer_config.json, chat_template.jinja or chat_template.json)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (path / name).is_file():
            template = json.loads((path / name).read_text(encoding="utf-8")).get("chat_template")
            if template:
                return template if isinstance(template, str) else None
    return None


class ChatText:
    """Conversation -> token ids for one LLM folder: prompt ids with the positions of the speech slots, target
    ids ending with the answer's end token, and answers back to text."""

    def __init__(self, path: str | Path, *, chat_template: str = MODEL_DEFAULTS["chat_template"],
                 prompt_template: str = MODEL_DEFAULTS["prompt_template"], system_prompt: str = "",
                 enable_thinking: bool = False, end_sym: str = "", max_txt_len: int = MODEL_DEFAULTS["max_txt_len"]):
        path = llm_folder(path)
        self.uses_chat_template = chat_template == "auto" and folder_chat_template(path) is not None
        self.prompt_template, self.system_prompt, self.enable_thinking = prompt_template, system_prompt, enable_thinking
        self.max_txt_len = max_txt_len
        self.legacy = not self.uses_chat_template and (path / "tokenizer.model").is_file()
        if self.legacy:  # the released checkpoints' ids: transformers 4.28's slow LLaMA tokenizer, legacy mode
            self.tokenizer: Any = SalmonnTokenizer(path / "tokenizer.model")
            self.bos_ids = [self.tokenizer.bos_id]
            self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.eos_id = self.tokenizer.eos_token_id
            # a chat template writes its own BOS (Llama-3) or none (Qwen); a plain prompt gets the tokenizer's own
            self.bos_ids = [] if self.uses_chat_template else self._special_prefix()
            self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.eos_id, 0) if i is not None)
        self.end_ids = self._end_ids(end_sym)
        self.stop_ids = list(dict.fromkeys(self.end_ids + ([self.eos_id] if self.eos_id is not None else [])))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ChatText":
        """From the `model:` section (defaults filled)."""
        return cached_chat_text(cfg["llm_path"], cfg["chat_template"], cfg["prompt_template"], cfg["system_prompt"],
                                bool(cfg["enable_thinking"]), cfg["end_sym"], int(cfg["max_txt_len"]))

    # ------------------------------------------------------------------ rules read from the folder
    def _special_prefix(self) -> list[int]:
        """The ids the tokenizer puts before plain text (its BOS, if it adds one)."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return full[: full.index(plain[0])] if plain and plain[0] in full else []

    def _end_ids(self, end_sym: str) -> list[int]:
        """The token every target ends with and generation stops at: `end_sym` when set (one token), else the
        chat template's end-of-turn token, else eos."""
        if end_sym:
            ids = self.encode(end_sym)
            if len(ids) != 1:
                raise ValueError(f"model.end_sym {end_sym!r} is {len(ids)} tokens of this LLM's tokenizer; it must "
                                 "be one token (generation stops at it). Set model.end_sym: '' for the LLM's own "
                                 "end of turn")
            return ids
        if self.uses_chat_template:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": _END_PROBE}], tokenize=False,
                enable_thinking=self.enable_thinking)
            after = self.encode(rendered[rendered.rindex(_END_PROBE) + len(_END_PROBE):])
            special = set(self.tokenizer.all_special_ids) | {
                i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
            ends = [i for i in after if i in special]
            if ends:
                return ends[:1]
        if self.eos_id is None:
            raise ValueError("the LLM's tokenizer has no eos token and its chat template no end-of-turn token: set "
                             "model.end_sym to the token that ends an answer")
        return [self.eos_id]

    # ------------------------------------------------------------------ conversations
    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation (system/user/assistant messages), ready for the answer. With a plain
        `prompt_template` a conversation is one user message (a system prompt goes before it)."""
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=self.enable_thinking)
        roles = [m["role"] for m in messages]
        if roles not in (["user"], ["system", "user"]):
            raise ValueError(f"model.prompt_template wraps one user message, got the roles {roles}: use an LLM "
                             "folder with a chat template for multi-message conversations")
        head, tail = self.prompt_template.split("{}") if self.prompt_template.count("{}") == 1 else (None, None)
        if head is None:
            raise ValueError(f"model.prompt_template must contain exactly one {{}}, got {self.prompt_template!r}")
        system = f"{messages[0]['content']} " if roles[0] == "system" else ""
        return system + head + messages[-1]["content"] + tail

    def encode(self, text: str) -> list[int]:
        """Ids of a text piece, no BOS; special-token strings in it (`</s>`, `<|im_start|>`) map to their ids."""
        if self.legacy:
            return self.tokenizer.encode(text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, rendered: str) -> tuple[list[int], list[int]]:
        """(ids, slot positions): BOS + the text pieces between `<SpeechHere>` slots, each encoded on its own (as
        the original did); a slot's speech tokens go in before the id at its position."""
        ids, positions = list(self.bos_ids), []
        pieces = rendered.split(SPEECH_SLOT)
        for i, piece in enumerate(pieces):
            ids += self.encode(piece) if piece else []
            if i < len(pieces) - 1:
                positions.append(len(ids))
        return ids, positions

    def target_ids(self, answer: str) -> tuple[list[int], bool]:
        """(ids of the answer + its end token, whether it was cut at max_txt_len keeping the end token)."""
        ids = self.encode(answer) + self.end_ids
        if len(ids) <= self.max_txt_len:
            return ids, False
        return ids[: self.max_txt_len - len(self.end_ids)] + self.end_ids, True

    def answer(self, ids: list[int]) -> str:
        """Generated ids -> the answer's text: up to the first stop id, special tokens dropped, a thinking block
        (model.enable_thinking) left out."""
        stops = [ids.index(s) for s in self.stop_ids if s in ids]
        text = self.tokenizer.decode(ids[: min(stops)] if stops else ids, skip_special_tokens=True)
        if self.enable_thinking and "</think>" in text:
            text = text.split("</think>", 1)[1]
        return text.strip()


@lru_cache(maxsize=8)
def cached_chat_text(path: str, chat_template: str, prompt_template: str, system_prompt: str, enable_thinking: bool,
                     end_sym: str, max_txt_len: int) -> ChatText:
    """One ChatText per setting: the dataset's splits, the model and the CLI share it."""
    return ChatText(path, chat_template=chat_template, prompt_template=prompt_template, system_prompt=system_prompt,
                    enable_thinking=enable_thinking, end_sym=end_sym, max_txt_len=max_txt_len)


# ---------------------------------------------------------------------------------------------- the weights
def load_llm(path: str | Path, cfg: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
    """The causal LM of the folder in `dtype`, frozen, with LoRA when `cfg["lora"]`. Loading is strict: every
    tensor of the folder must be used and every weight of the model found, with its shape."""
    path = llm_folder(path)
    if cfg["random_init"]:  # built in dtype: a 7B LLM built in fp32 and then cast would need 27 GB
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True), dtype=dtype)
    else:
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise LLMFolderError(f"no weights in model.llm_path '{path}': download the LLM's weights "
                                 "(*.safetensors or pytorch_model*.bin) there")
        llm, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                         output_loading_info=True)
        check_loading_info(info, "the LLM", path)
    for p in llm.parameters():
        p.requires_grad = False
    return add_lora(llm, cfg, path) if cfg["lora"] else llm


def check_loading_info(info: Mapping[str, Any], what: str, path: str | Path) -> None:
    """transformers' loading report as an error naming the tensors that do not fit."""
    problems = {kind: sorted(map(str, info.get(kind, []))) for kind in ("missing_keys", "unexpected_keys",
                                                                       "mismatched_keys")}
    if any(problems.values()):
        said = "; ".join(f"{kind.replace('_', ' ')} ({len(keys)}): {keys[:10]}"
                         for kind, keys in problems.items() if keys)
        raise ValueError(f"{what} at '{path}' does not match its config.json: {said}. Is the folder complete and "
                         "its config.json the one the weights were saved with?")


def add_lora(llm: nn.Module, cfg: Mapping[str, Any], path: Path) -> nn.Module:
    """peft LoRA on `lora_target_modules`, each checked to name modules of this LLM."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(cfg["lora_target_modules"])
    leaves = {name.rsplit(".", 1)[-1] for name, module in llm.named_modules() if isinstance(module, nn.Linear)}
    unknown = [t for t in targets if t not in leaves]
    if unknown:
        raise ValueError(f"model.lora_target_modules {unknown} name no linear layer of the LLM at '{path}'; its "
                         f"linear layers are: {', '.join(sorted(leaves))}")
    lora_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=cfg["lora_rank"],
                          lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"], target_modules=targets)
    with warnings.catch_warnings():  # peft (<= 0.21) reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(llm, lora_cfg)


def base_llm(llm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def decoder_layer_classes(llm: nn.Module) -> tuple[type, ...]:
    """The LLM's decoder-layer classes (its `_no_split_modules`): FSDP's shard units."""
    names = set(getattr(base_llm(llm), "_no_split_modules", None) or [])
    classes = tuple({type(m) for m in llm.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(f"{type(base_llm(llm)).__name__} names no decoder-layer class (_no_split_modules): FSDP "
                         "cannot find its shard units")
    return classes
