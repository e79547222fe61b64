"""Writes the tiny embedded default in assets/tiny, in the formats of the real models, so that the demo loads
through the same code (`from_pretrained`, `BEATs.from_checkpoint`) as whisper-large-v2, BEATs and Vicuna:

- whisper/, whisper_5s/: Hugging Face WhisperModel folders (config.json, model.safetensors, preprocessor_config.json);
  whisper_5s is the same model with a 5 s window (its position table cut to 250 frames);
- beats.pt: a BEATs checkpoint in Microsoft's fine-tuned layout, `{'cfg', 'model', 'label_dict'}`;
- llama/: a Hugging Face LLaMA folder (config.json, model.safetensors, tokenizer.model) whose sentencepiece
  tokenizer is trained on the repo's own text: the Vicuna stand-in (no chat template);
- qwen/: a Hugging Face Qwen3 folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
  chat_template.jinja) with a byte-level BPE trained by `tokenizers` on the same zh + en text, the ChatML special
  tokens and a ChatML chat template with Qwen3's thinking switch (written here).

The weights are a seeded random init, built as SALMONN builds them under `model.random_init: true`, in fp32.
The tiny models keep the shapes the code depends on: 80 mel bins and 1500 Whisper frames per 30 s.
Run: python -m scripts.make_tiny_assets   (running it twice writes byte-identical files; the outputs are committed)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM,
                          WhisperConfig, WhisperFeatureExtractor, WhisperModel)

from models import SAMPLE_RATE
from models.beats import random_beats_checkpoint
from utils import jsonl_values

ROOT = Path(__file__).resolve().parents[1]
WHISPER_FRAMES_PER_SECOND = 50  # encoder frames: 1500 per 30 s
BEATS_CFG = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                 embed_dim=32, conv_pos=16, conv_pos_groups=4, encoder_layerdrop=0.0)


def tokenizer_corpus() -> list[str]:
    """English + Chinese text: a general sentence list, the prompts as they were when the tiny LLMs were made
    (assets/tiny/tokenizer_prompts.json: fixed, so that a new prompt does not change the tiny tokenizers' ids and
    with them every checkpoint trained on them) and the demo corpus."""
    lines = (ROOT / "assets/tiny/tokenizer_corpus.txt").read_text(encoding="utf-8").splitlines()
    lines += json.loads((ROOT / "assets/tiny/tokenizer_prompts.json").read_text(encoding="utf-8"))
    for jsonl in sorted((ROOT / "data/demo").glob("*.jsonl")):
        for dialogue in jsonl_values(jsonl):
            for turn in dialogue["turns"]:
                lines += [turn.get("text", ""), turn.get("response_text", turn.get("response_txt", ""))]
    return [line for line in lines if line.strip()]


def tokenizer_model(vocab_size: int) -> bytes:
    """A BPE sentencepiece model of the corpus, trained in memory (so that no file path is recorded in it)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added, not special: a thinking answer decodes with them
# ChatML, the format Qwen's instruct models are trained on, with Qwen3's switch: enable_thinking=false writes an
# empty think block after the assistant cue (the model then answers directly).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of the corpus (any text encodes: Chinese, English, bytes), with ChatML's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(tokenizer_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CHATML_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHATML_TEMPLATE, model_max_length=2048)
    tokenizer.add_tokens(THINK_TOKENS)
    return tokenizer


def qwen_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1)  # as the tiny LLaMA: a real LLM's logit scale


def whisper_config() -> WhisperConfig:
    return WhisperConfig(
        d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=64, max_target_positions=16, num_mel_bins=80,
        max_source_positions=30 * WHISPER_FRAMES_PER_SECOND, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=3,
        # with the usual 0.02 the conv features of a random 64-wide encoder are ~20x smaller than its
        # sinusoidal position embeddings and the output barely depends on the audio; 0.1 keeps it audible
        init_std=0.1)


def whisper_feature_extractor(seconds: int) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=seconds,
                                   n_fft=400)


def llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        # logits of a random 128-wide model with the usual 0.02 init stay within about +-2.6, too flat to
        # ever be confident; 0.1 gives the logit scale of a real 4096-5120-wide LLaMA
        initializer_range=0.1)


def random_whisper(seed: int) -> WhisperModel:
    """The whole tiny Whisper (encoder and a 1-layer decoder, as a real folder holds both), randomly initialised."""
    torch.manual_seed(seed)
    return WhisperModel(whisper_config())


def with_window(whisper: WhisperModel, seconds: int) -> WhisperModel:
    """The same Whisper with a shorter input window: its sinusoidal position table cut to the window's frames
    (clips are cut to the feature extractor's window and every frame count follows from the frame rate)."""
    config = WhisperConfig.from_dict(whisper.config.to_dict())
    config.max_source_positions = seconds * WHISPER_FRAMES_PER_SECOND
    short = WhisperModel(config)
    state = whisper.state_dict()
    key = "encoder.embed_positions.weight"
    state[key] = state[key][: config.max_source_positions].clone()
    short.load_state_dict(state, strict=True)
    return short


def random_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size))


def build_assets(out: Path, vocab_size: int, seed: int) -> None:
    """Writes every tiny asset into `out` (which must be empty or new). Seeds: Whisper `seed`, BEATs `seed + 1`,
    LLaMA `seed + 2`, Qwen `seed + 3`."""
    whisper = random_whisper(seed)
    for folder, seconds, model in (("whisper", 30, whisper), ("whisper_5s", 5, with_window(whisper, 5))):
        model.save_pretrained(out / folder)
        whisper_feature_extractor(seconds).save_pretrained(out / folder)
    torch.save(random_beats_checkpoint(BEATS_CFG, seed + 1), out / "beats.pt")
    llama = out / "llama"
    llama.mkdir(parents=True, exist_ok=True)
    (llama / "tokenizer.model").write_bytes(tokenizer_model(vocab_size))
    vocab = spm.SentencePieceProcessor(model_file=str(llama / "tokenizer.model")).get_piece_size()
    random_llama(vocab, seed + 2).save_pretrained(llama)
    tokenizer = qwen_tokenizer(vocab_size=2000)
    tokenizer.save_pretrained(out / "qwen")
    torch.manual_seed(seed + 3)
    Qwen3ForCausalLM(qwen_config(tokenizer)).save_pretrained(out / "qwen")


def publish(staging: Path, out: Path) -> list[Path]:
    """Moves every file of `staging` to the same place under `out`, each replaced atomically."""
    moved = []
    for source in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = out / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        moved.append(target)
    return moved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "assets/tiny"))
    ap.add_argument("--vocab-size", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=out) as staging:
        build_assets(Path(staging), args.vocab_size, args.seed)
        written = publish(Path(staging), out)
    for path in written:
        print(f"{path.stat().st_size:>10,}  {path}")
    print(f"wrote {len(written)} files, {sum(p.stat().st_size for p in written):,} bytes, to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
