"""The LLaMA tokenizer, exactly as the original SALMONN used it.

The released weights were trained on ids from transformers 4.28's slow `LlamaTokenizer` in its legacy mode:
special tokens written in the text (`</s>`) become their ids, and every other text piece is encoded on its own
by sentencepiece, which prepends its dummy-prefix space. So the piece after `<SpeechHere>` starts with `▁<`.
Modern fast/non-legacy tokenizers give different ids, hence this thin wrapper around sentencepiece itself.
"""
from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm


class SalmonnTokenizer:
    """sentencepiece + special-token splitting; `decode` is duck-type compatible with HF text streamers."""

    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_file}")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError(f"{model_file}: sentencepiece model has no bos/eos pieces")
        # The original added a '[PAD]' row with random, never-saved weights. We pad with an existing id under the
        # attention mask instead, so logits never depend on an unsaved row.
        self.pad_id = self.unk_id if self.unk_id >= 0 else self.eos_id
        self.special = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in self.special) + ")")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without bos; special-token strings in the text map to their ids."""
        ids: list[int] = []
        for part in self._split_re.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True, **_: object) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special.values()]
        return self.sp.decode(ids)
