"""SALMONN: Whisper + BEATs encoders -> window-level Q-Former -> projection -> any causal LLM with LoRA.

One file, config in, tensors out: the batch brings token ids (the data side tokenises, models/llm.ChatText) and
the positions where each `<SpeechHere>` slot's speech tokens go. Module names follow the original implementation
(bytedance/SALMONN) so that the released `salmonn_v1.pth` / `salmonn_7b_v0.pth` and checkpoints written by the
original training code load unchanged: the LLM keeps the original's name `llama_model` whatever its architecture,
and the only renamed part is the Q-Former, which is transformers' BLIP-2 Q-Former (the same BERT-style block:
query tokens only, cross-attention in every layer, query feed-forward) under the names models/checkpoint.py maps.

Deliberate differences from the original (each would otherwise change a clip's output silently):
- BEATs features of zero-padding are masked, so a clip's output does not depend on what it is batched with.
- No random `[PAD]` embedding row: sequences are padded with an existing id under the attention mask, and
  padding sits at the end (training) or the start (generation), never in the middle of a sequence.
- Several `<SpeechHere>` slots per prompt (one per dialogue turn); a turn longer than 30 s fills its slot with
  the tokens of several clips instead of being cut.
- The LLM is any Hugging Face causal LM (models/llm.py), loaded strictly like every other part.
- Checkpoints load strictly: a missing trained tensor or a shape mismatch is an error naming the key.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel, GenerationConfig, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from models import SAMPLE_RATE, model_settings, window_frames
from models.beats import BEATs
from models.checkpoint import (WHISPER_FOLDER, beats_missing, copy_checked, load_checkpoint, require_dir,
                               to_original_name)
from models.llm import IGNORE_INDEX, ChatText, base_llm, check_loading_info, load_llm

log = logging.getLogger(__name__)


class WhisperEncoderOnly(WhisperEncoder):
    """Whisper's encoder loaded from a whole Whisper folder: the decoder's tensors are left unread."""
    _keys_to_ignore_on_load_unexpected = [r"^(model\.)?decoder\.", r"^proj_out\."]


class SALMONN(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        cfg = model_settings(cfg)
        self.cfg = cfg
        if cfg["low_resource"]:
            raise ValueError("model.low_resource (8-bit LLM via bitsandbytes) is not supported; "
                             "set model.torch_dtype: bfloat16 (or float16) to halve memory instead")
        if not cfg["use_speech_Qformer"]:
            raise ValueError("model.use_speech_Qformer: false is not supported (the original raises too)")
        dtype = getattr(torch, cfg["torch_dtype"])  # float32 | bfloat16 | float16 (config.CHOICES)

        whisper_dir = require_dir(cfg["whisper_path"], *WHISPER_FOLDER)
        self.speech_encoder = self._load_whisper_encoder(whisper_dir, cfg["random_init"], dtype)
        d_whisper = self.speech_encoder.config.d_model
        self.ln_speech = nn.LayerNorm(d_whisper)
        self.whisper_hop_seconds = self._read_hop_seconds(whisper_dir)

        self.beats = self._load_beats(cfg["beats_path"], cfg["random_init"]) if cfg["beats_path"] else None
        d_beats = self.beats.cfg.encoder_embed_dim if self.beats is not None else 0
        if self.beats is not None:
            self.ln_audio = nn.LayerNorm(d_beats)

        qcfg = Blip2QFormerConfig(
            hidden_size=cfg["qformer_hidden_size"], num_hidden_layers=cfg["qformer_num_layers"],
            num_attention_heads=cfg["qformer_num_heads"], intermediate_size=cfg["qformer_intermediate_size"],
            encoder_hidden_size=d_whisper + d_beats, cross_attention_frequency=1, use_qformer_text_input=False,
            layer_norm_eps=1e-12, initializer_range=cfg["qformer_initializer_range"],
        )
        self.speech_Qformer = Blip2QFormerModel(qcfg)
        self.speech_query_tokens = nn.Parameter(
            torch.randn(1, cfg["num_speech_query_token"], qcfg.hidden_size) * qcfg.initializer_range)

        self.text = ChatText.from_config(cfg)  # the LLM's pad and stop ids, and answers back to text
        self.llama_model = load_llm(cfg["llm_path"], cfg, dtype)
        self.speech_llama_proj = nn.Linear(qcfg.hidden_size, self.llama_model.config.hidden_size)
        if cfg["speech_llama_proj_model"]:
            self._load_projection(cfg["speech_llama_proj_model"])

        self._set_trainable(cfg)
        if cfg["cache_frozen_encoders"] and not (cfg["freeze_whisper"] and (self.beats is None or cfg["freeze_beats"])):
            raise ValueError("model.cache_frozen_encoders: true needs frozen encoders (model.freeze_whisper and "
                             "model.freeze_beats: true): a trained encoder's outputs change every step")
        self.encoder_cache: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}  # clip -> (Whisper, BEATs)
        self.padding_free = False  # run.padding_free (the Runner sets it): forward packs the batch into one row

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "SALMONN":
        """Builds the model from the YAML `model:` section and loads `ckpt` if given."""
        cfg = dict(cfg)
        model = cls(cfg)
        if cfg.get("ckpt"):
            load_checkpoint(model, cfg["ckpt"])
        if cfg.get("lora_scaling") is not None:
            model.set_lora_scaling(cfg["lora_scaling"])
        return model

    @staticmethod
    def _load_whisper_encoder(path: Path, random_init: bool, dtype: torch.dtype) -> nn.Module:
        """Whisper's encoder only, in `dtype`: the decoder a Whisper folder also holds (0.9 B parameters in
        whisper-large-v2) is never built or read."""
        if random_init:
            return WhisperEncoderOnly._from_config(WhisperConfig.from_pretrained(path, local_files_only=True),
                                                   dtype=dtype)
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise FileNotFoundError(f"no weights in '{path}': download openai/whisper-large-v2 "
                                    "(model.safetensors or pytorch_model.bin) there")
        encoder, info = WhisperEncoderOnly.from_pretrained(
            path, local_files_only=True, dtype=dtype, output_loading_info=True,
            key_mapping={r"^(model\.)?encoder\.": ""})  # WhisperModel or WhisperForConditionalGeneration layout
        check_loading_info(info, "Whisper", path)
        return encoder

    @staticmethod
    def _read_hop_seconds(path: Path) -> float:
        """Seconds per spectrogram frame, from Whisper's feature-extractor config (which must take SAMPLE_RATE)."""
        fe = json.loads((path / "preprocessor_config.json").read_text())
        if fe["sampling_rate"] != SAMPLE_RATE:
            raise ValueError(f"{path / 'preprocessor_config.json'}: sampling_rate {fe['sampling_rate']}, but the "
                             f"model's audio is {SAMPLE_RATE} Hz")
        return fe["hop_length"] / fe["sampling_rate"]

    @staticmethod
    def _load_beats(path: str, random_init: bool) -> BEATs:
        p = Path(path)
        if p.suffix == ".json":
            if not random_init:
                raise ValueError(f"model.beats_path '{path}' is a config only; set model.random_init: true "
                                 "or point beats_path at BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")
            return BEATs(json.loads(p.read_text()))
        if not p.is_file():
            raise FileNotFoundError(beats_missing(path))
        return BEATs.from_checkpoint(p)

    def _load_projection(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        proj = {k.removeprefix("speech_llama_proj."): v for k, v in state.items() if k.startswith("speech_llama_proj.")}
        if set(proj) != {"weight", "bias"}:
            raise KeyError(f"{path}: expected speech_llama_proj.weight and .bias, found {sorted(proj)}")
        copy_checked(self.speech_llama_proj.weight, proj["weight"], "speech_llama_proj.weight", path)
        copy_checked(self.speech_llama_proj.bias, proj["bias"], "speech_llama_proj.bias", path)

    def _set_trainable(self, cfg: Mapping[str, Any]) -> None:
        """Only the Q-Former, projection, layer norms and LoRA train (unless the config unfreezes more)."""
        for p in self.speech_encoder.parameters():
            p.requires_grad = not cfg["freeze_whisper"]
        if self.beats is not None:
            for p in self.beats.parameters():
                p.requires_grad = not cfg["freeze_beats"]
        for p in [*self.speech_Qformer.parameters(), self.speech_query_tokens]:
            p.requires_grad = not cfg["freeze_speech_QFormer"]
        for p in self.speech_llama_proj.parameters():
            p.requires_grad = not cfg["freeze_speech_llama_proj"]

    def enable_gradient_checkpointing(self) -> None:
        """The LLM recomputes each decoder layer's activations in the backward pass instead of keeping them
        (`run.gradient_checkpointing`). Non-reentrant, so the frozen LLM needs no input that requires grad and
        LoRA still gets its gradients; without gradients (generation) nothing is recomputed and the KV cache is
        used."""
        llm = base_llm(self.llama_model)
        # recent transformers 5 releases renamed gradient_checkpointing_enable (now deprecated); earlier ones lack it
        enable = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
        enable({"use_reentrant": False})

    def train(self, mode: bool = True) -> "SALMONN":
        """Frozen encoders stay in eval mode (no dropout), as in the original. A merged LoRA cannot train."""
        if mode and self.cfg.get("lora_merged"):
            raise RuntimeError("this model's LoRA is merged into the LLM weights (model.merge_lora: true, "
                               "inference only): it cannot be trained; build it with model.merge_lora: false")
        super().train(mode)
        if self.cfg["freeze_whisper"]:
            self.speech_encoder.eval()
        if self.beats is not None and self.cfg["freeze_beats"]:
            self.beats.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.speech_query_tokens.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llama_model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ checkpoints (original key format)
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained tensors under the original implementation's names (what its tools and ours read)."""
        if self.cfg.get("lora_merged"):
            raise RuntimeError("this model's LoRA is merged into the LLM weights (model.merge_lora: true): its "
                               "trained LoRA tensors are gone; save or export with model.merge_lora: false")
        return {to_original_name(n): p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def set_lora_scaling(self, scale: float) -> None:
        """Inference-time LoRA scaling (alpha / r by default); the SALMONN authors lower it to bring back abilities
        the fine-tune suppressed."""
        if self.cfg.get("lora_merged"):
            raise ValueError("the LoRA is merged into the LLM weights (model.merge_lora: true) at the scaling it "
                             "had then: set lora_scaling before merging, or set model.merge_lora: false")
        if not self.cfg["lora"]:
            raise ValueError("lora_scaling is set but the model has no LoRA (model.lora: false)")
        for module in self.llama_model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                for adapter in module.scaling:
                    module.scaling[adapter] = float(scale)

    def merge_lora(self) -> None:
        """Folds the LoRA, at its current scaling, into the frozen LLM weights (`model.merge_lora`, inference
        only): generation then runs plain LLM layers without the adapter's extra matmuls. cfg records it
        (`lora: false`, `lora_merged: true`) so that the model is not scaled, trained or saved as if unmerged."""
        if not self.cfg["lora"]:
            raise ValueError("model.merge_lora: true, but the model has no LoRA to merge (model.lora: false, or "
                             "merged already)")
        self.llama_model = self.llama_model.merge_and_unload()
        self.cfg["lora"], self.cfg["lora_merged"] = False, True

    # ------------------------------------------------------------------ speech
    def window_size(self, num_frames: int, seconds: float) -> tuple[int, int]:
        """Window kernel and stride in encoder frames, derived from the encoder's frame rate."""
        return window_frames(num_frames / seconds, self.cfg["second_per_window"], self.cfg["second_stride"])

    def encode_speech(self, spectrogram: torch.Tensor, raw_wav: torch.Tensor | None = None,
                      audio_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips -> speech tokens in the LLM embedding space: (embeds [C, T, D_llm], atts [C, T])."""
        if self.beats is not None and raw_wav is None:
            raise ValueError("this model has BEATs: encode_speech needs raw_wav (and its padding mask)")
        encoders = self.cached_encoder_outputs if self.cfg["cache_frozen_encoders"] else self.encoder_outputs
        speech, audio, audio_pad = encoders(spectrogram, raw_wav, audio_padding_mask)
        speech = self.ln_speech(speech.float())
        if self.beats is not None:
            audio = self.ln_audio(audio.float()).masked_fill(audio_pad.unsqueeze(-1), 0.0)
            # As in the original, BEATs patches are paired with Whisper frames by index, zero-padded to Tw.
            audio = F.pad(audio, (0, 0, 0, max(0, speech.shape[1] - audio.shape[1])))[:, : speech.shape[1]]
            speech = torch.cat([speech, audio], dim=-1)  # [C, Tw, Dw + Db]

        C, T, D = speech.shape
        seconds = spectrogram.shape[-1] * self.whisper_hop_seconds
        if self.cfg["window_level_Qformer"]:
            kernel, stride = self.window_size(T, seconds)
            windows = speech.unfold(1, kernel, stride)  # [C, L, D, kernel]
            L = windows.shape[1]
            windows = windows.permute(0, 1, 3, 2).reshape(C * L, kernel, D)
        else:
            L, windows = 1, speech
        Q = self.speech_query_tokens.shape[1]
        keep = torch.ones(C, L, dtype=torch.bool, device=speech.device)
        if self.cfg["trim_speech_padding"] and audio_padding_mask is not None and self.cfg["window_level_Qformer"]:
            windows_kept = self.num_windows((~audio_padding_mask).sum(-1), T / seconds, stride, L)  # [C]
            keep = torch.arange(L, device=speech.device) < windows_kept[:, None]  # [C, L]
        # The Q-Former runs on the kept windows only; dropped ones (Whisper's zero-padding) get zeros, masked out.
        kept = windows[keep.reshape(-1)]
        query = self.speech_query_tokens.expand(kept.shape[0], -1, -1)
        out = self.speech_Qformer(query_embeds=query, encoder_hidden_states=kept).last_hidden_state
        projected = self.speech_llama_proj(out)  # [kept, Q, D_llm]
        embeds = projected.new_zeros(C * L, Q, projected.shape[-1])
        embeds[keep.reshape(-1)] = projected
        embeds = embeds.reshape(C, L * Q, -1)  # [C, T_speech, D_llm]
        atts = keep.long().repeat_interleave(Q, dim=1)
        return embeds, atts

    def encoder_outputs(self, spectrogram: torch.Tensor, raw_wav: torch.Tensor | None,
                        audio_padding_mask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Whisper frames [C, Tw, Dw]; BEATs patches [C, P, Db] and their padding mask [C, P] (None, None
        without BEATs)."""
        enc_dtype = next(self.speech_encoder.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg["freeze_whisper"]):
            speech = self.speech_encoder(spectrogram.to(enc_dtype)).last_hidden_state
        if self.beats is None:
            return speech, None, None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg["freeze_beats"]):
            audio, audio_pad = self.beats(raw_wav, audio_padding_mask)
        return speech, audio, audio_pad

    def cached_encoder_outputs(self, spectrogram: torch.Tensor, raw_wav: torch.Tensor | None,
                               audio_padding_mask: torch.Tensor | None
                               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`encoder_outputs`, remembered per clip (`model.cache_frozen_encoders`): frozen encoders give a clip the
        same features every time, so a clip seen again (next epoch, or its turn in another sample) skips them.
        A new clip is encoded alone, its samples unpadded: its features never depend on what it was batched with,
        so a resumed run, whose cache starts empty, computes exactly the features the uninterrupted run cached.
        Keyed by the clip's content, kept in host memory: at full size ~3.8 MB (Whisper) + ~2.3 MB (BEATs) per
        30 s clip in 16-bit, so meant for data sets that fit in RAM."""
        keys = self._clip_keys(spectrogram, raw_wav, audio_padding_mask)
        for key, c in {k: c for c, k in enumerate(keys) if k not in self.encoder_cache}.items():
            n = None if audio_padding_mask is None else int((~audio_padding_mask[c]).sum())
            speech, audio, audio_pad = self.encoder_outputs(
                spectrogram[c:c + 1], None if raw_wav is None else raw_wav[c:c + 1, :n],
                None if audio_padding_mask is None else audio_padding_mask[c:c + 1, :n])
            patches = None if audio is None else audio[0][~audio_pad[0]].cpu()  # [P_clip, Db]: padding dropped
            self.encoder_cache[key] = (speech[0].cpu(), patches)
        cached = [self.encoder_cache[k] for k in keys]
        speech = torch.stack([s for s, _ in cached]).to(self.device)
        if self.beats is None:
            return speech, None, None
        audio = nn.utils.rnn.pad_sequence([a for _, a in cached], batch_first=True).to(self.device)
        lengths = torch.tensor([len(a) for _, a in cached], device=self.device)
        return speech, audio, torch.arange(audio.shape[1], device=self.device) >= lengths[:, None]

    @staticmethod
    def _clip_keys(spectrogram: torch.Tensor, raw_wav: torch.Tensor | None,
                   audio_padding_mask: torch.Tensor | None) -> list[bytes]:
        """A digest of each clip's content: its unpadded samples (padding is at the end), or its spectrogram when
        the batch carries no samples."""
        if raw_wav is None:
            contents = list(spectrogram.detach().cpu())
        else:
            wavs = raw_wav.detach().cpu()
            lengths = ([wavs.shape[1]] * len(wavs) if audio_padding_mask is None
                       else (~audio_padding_mask).sum(dim=1).tolist())  # one device sync for the batch
            contents = [wav[:n] for wav, n in zip(wavs, lengths)]
        return [hashlib.blake2b(c.contiguous().view(torch.uint8).numpy(), digest_size=16).digest() for c in contents]

    @staticmethod
    def num_windows(num_samples: torch.Tensor, frames_per_second: float, stride: int, max_windows: int
                    ) -> torch.Tensor:
        """Windows that hold a clip's audio (the last one partly): ceil(frames / stride), at most all windows.
        Used by `trim_speech_padding` to drop the tokens of Whisper's 30 s zero-padding."""
        frames = torch.ceil(num_samples.double() * frames_per_second / SAMPLE_RATE)
        return torch.clamp(torch.ceil(frames / stride), 1, max_windows).long()

    # ------------------------------------------------------------------ sequences
    def _slots_for(self, batch: Mapping[str, Any], num_clips: int) -> list[list[list[Any]]]:
        slots = batch.get("speech_slots")
        return slots if slots is not None else [[[c]] for c in range(num_clips)]

    def _slot_tokens(self, speech: torch.Tensor, atts: torch.Tensor, slot: list[Any],
                     windows_kept: list[int]) -> torch.Tensor:
        """One slot's speech tokens [T, D], part after part: a clip row (int) gives all its kept tokens, a span
        (row, first window, number of windows) of a packed clip exactly those windows' tokens."""
        Q = self.speech_query_tokens.shape[1]
        pieces = []
        for part in slot:
            if not isinstance(part, (tuple, list)):
                pieces.append(speech[part][atts[part].bool()])
                continue
            row, first, count = part
            if not self.cfg["window_level_Qformer"] or first < 0 or count < 1 or first + count > windows_kept[row]:
                raise ValueError(f"speech_slots span (row {row}, first window {first}, {count} windows) is not "
                                 f"within the {windows_kept[row]} windows of that clip's audio (spans need "
                                 "model.window_level_Qformer: true)")
            pieces.append(speech[row, first * Q:(first + count) * Q])
        return torch.cat(pieces)

    def _sequence(self, ids: torch.Tensor, labels: torch.Tensor, positions: list[int],
                  slot_embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's text tokens with each slot's speech tokens spliced in before the id at its position:
        (embeds [L, D], labels [L]); speech tokens are never targets."""
        if len(positions) != len(slot_embeds):
            raise ValueError(f"the batch gives {len(positions)} slot positions but {len(slot_embeds)} speech slots")
        text = self.llama_model.get_input_embeddings()(ids)  # [T, D]
        parts, part_labels, start = [], [], 0
        for position, speech in zip(positions, slot_embeds):
            parts += [text[start:position], speech.to(text.dtype)]
            part_labels += [labels[start:position], labels.new_full((speech.shape[0],), IGNORE_INDEX)]
            start = position
        return torch.cat([*parts, text[start:]]), torch.cat([*part_labels, labels[start:]])

    def _sequences(self, batch: Mapping[str, Any], with_targets: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encodes the clips and splices them into each sample's token ids (`input_ids` [B, T] with `labels`,
        `attention_mask` and `prompt_lengths` [B], from dataset_v1.collate): per sample (embeds [L_b, D],
        labels [L_b]); without targets only the prompt."""
        if batch.get("input_ids") is None:
            raise ValueError("the batch has no 'input_ids': prompts are tokenised by the data side "
                             "(dataset_v1.collate, models.llm.ChatText)")
        speech, atts = self.encode_speech(batch["spectrogram"].to(self.device),
                                          _to(batch.get("raw_wav"), self.device),
                                          _to(batch.get("padding_mask"), self.device))
        ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        lengths = (batch["attention_mask"].sum(-1) if with_targets else batch["prompt_lengths"]).tolist()
        slots = self._slots_for(batch, speech.shape[0])
        if len(slots) != len(ids):
            raise ValueError(f"batch has {len(ids)} token rows but {len(slots)} speech_slots entries")
        windows_kept = (atts.sum(-1) // self.speech_query_tokens.shape[1]).tolist()  # [C]: a prefix of each clip
        seqs = []
        for b, n in enumerate(lengths):
            slot_embeds = [self._slot_tokens(speech, atts, slot, windows_kept) for slot in slots[b]]
            seqs.append(self._sequence(ids[b, :n], labels[b, :n], batch["slot_positions"][b], slot_embeds))
        return seqs

    def _padded(self, seqs: list[tuple[torch.Tensor, torch.Tensor]],
                left_pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequences padded to the longest: embeds [B, L, D], attention mask [B, L], labels [B, L]."""
        max_len = max(e.shape[0] for e, _ in seqs)
        pad_embed = self.llama_model.get_input_embeddings()(
            torch.tensor([self.text.pad_id], device=self.device))[0]
        embeds, masks, labels = [], [], []
        for e, lab in seqs:
            n = max_len - e.shape[0]
            pad = pad_embed.expand(n, -1)
            order = (lambda a, b: [b, a]) if left_pad else (lambda a, b: [a, b])
            embeds.append(torch.cat(order(e, pad)))
            masks.append(torch.cat(order(torch.ones(e.shape[0], dtype=torch.long, device=self.device),
                                         torch.zeros(n, dtype=torch.long, device=self.device))))
            labels.append(torch.cat(order(lab, torch.full((n,), IGNORE_INDEX, dtype=torch.long,
                                                          device=self.device))))
        return torch.stack(embeds), torch.stack(masks), torch.stack(labels)

    def _batch_sequences(self, batch: Mapping[str, Any], with_targets: bool,
                         left_pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's sequences, padded: embeds [B, L, D], attention mask [B, L], labels [B, L]."""
        return self._padded(self._sequences(batch, with_targets), left_pad)

    def _packed_row(self, seqs: list[tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`run.padding_free`: the sequences end to end in one row, no padding: embeds [1, sum L, D], position ids
        [1, sum L] restarting at 0 for each sequence, labels [1, sum L]. Given position ids and no attention mask,
        transformers reads the restarts as sequence boundaries (masking_utils.find_packed_sequence_indices: a
        block-diagonal causal mask for sdpa/eager; flash-attention runs varlen from them)."""
        embeds = torch.cat([e for e, _ in seqs])[None]
        positions = torch.cat([torch.arange(e.shape[0], device=self.device) for e, _ in seqs])[None]
        return embeds, positions, torch.cat([lab for _, lab in seqs])[None]

    # ------------------------------------------------------------------ training
    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Next-token loss on the targets. `loss` is this batch's mean; `loss_sum`/`num_tokens` let a runner
        normalise over accumulation steps and ranks. With `padding_free` the batch is one packed row (same loss:
        each sequence starts with a prompt token, whose label is ignored, so no target is predicted across a
        boundary)."""
        seqs = self._sequences(batch, with_targets=True)
        if self.padding_free:
            embeds, positions, labels = self._packed_row(seqs)
            logits = self.llama_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits
        else:
            embeds, mask, labels = self._padded(seqs, left_pad=False)
            logits = self.llama_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # no KV cache
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        valid = labels != IGNORE_INDEX
        num_tokens = valid.sum()
        correct = ((logits.argmax(-1) == labels) & valid).sum()
        return {"loss": loss_sum / num_tokens.clamp(min=1), "loss_sum": loss_sum, "num_tokens": num_tokens,
                "correct": correct, "logits": logits}

    # ------------------------------------------------------------------ inference
    def generation_config(self, generate_cfg: Mapping[str, Any]) -> GenerationConfig:
        """The `generate:` settings, stopping at the answer's end token (and eos) of this LLM."""
        gen = GenerationConfig(**dict(generate_cfg))
        gen.eos_token_id, gen.pad_token_id = self.text.stop_ids, self.text.pad_id
        gen.bos_token_id = self.text.bos_ids[0] if self.text.bos_ids else None
        return gen

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Any], generate_cfg: Mapping[str, Any],
                 streamer: Any = None) -> list[str]:
        """Answers as clean text. Prompts are left-padded; each sample stops at its own end token."""
        embeds, mask, _ = self._batch_sequences(batch, with_targets=False, left_pad=True)
        out = self.llama_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                        generation_config=self.generation_config(generate_cfg), streamer=streamer)
        return [self.text.answer(ids.tolist()) for ids in out]


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return x.to(device) if x is not None else None
