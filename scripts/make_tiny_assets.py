"""Writes the tiny embedded default in assets/tiny: configs of a tiny Whisper, LLaMA and BEATs (random init, built
from these configs) and a small sentencepiece tokenizer trained on the repo's own text.

The tiny models keep the shapes the code depends on: 80 mel bins and 1500 Whisper frames per 30 s.
Run: python -m scripts.make_tiny_assets   (deterministic; the outputs are committed)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import sentencepiece as spm
from transformers import LlamaConfig, WhisperConfig, WhisperFeatureExtractor

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_corpus() -> list[str]:
    """English + Chinese text: the prompts, the demo corpus and a general sentence list."""
    lines: list[str] = []
    general = ROOT / "assets/tiny/tokenizer_corpus.txt"
    lines += general.read_text(encoding="utf-8").splitlines()
    for prompt_file in sorted((ROOT / "prompts").glob("*.json")):
        for prompts in json.loads(prompt_file.read_text(encoding="utf-8")).values():
            lines += prompts if isinstance(prompts, list) else [prompts]
    for jsonl in sorted((ROOT / "data/demo").glob("*.jsonl")):
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            for turn in json.loads(line)["turns"]:
                lines += [turn.get("text", ""), turn.get("response_text", turn.get("response_txt", ""))]
    return [line for line in lines if line.strip()]


def train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    corpus = out_dir / "_corpus.txt"
    corpus.write_text("\n".join(tokenizer_corpus()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "assets/tiny"))
    ap.add_argument("--vocab-size", type=int, default=1200)
    args = ap.parse_args()
    out = Path(args.out)

    whisper = out / "whisper"
    whisper.mkdir(parents=True, exist_ok=True)
    WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
                  decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=64, max_target_positions=16,
                  num_mel_bins=80, max_source_positions=1500, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, decoder_start_token_id=3,
                  # with the usual 0.02 the conv features of a random 64-wide encoder are ~20x smaller than its
                  # sinusoidal position embeddings and the output barely depends on the audio; 0.1 keeps it audible
                  init_std=0.1).save_pretrained(whisper)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30,
                            n_fft=400).save_pretrained(whisper)
    # The same tiny Whisper with a 5 s window (250 frames at 50 frames/s) for fast CPU experiments on short turns:
    # clips are cut to the feature extractor's window and every frame count follows from the frame rate.
    whisper_5s = out / "whisper_5s"
    config = WhisperConfig.from_pretrained(whisper)
    config.max_source_positions = 250
    config.save_pretrained(whisper_5s)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=5,
                            n_fft=400).save_pretrained(whisper_5s)

    llama = out / "llama"
    llama.mkdir(parents=True, exist_ok=True)
    train_tokenizer(llama, args.vocab_size)
    vocab = spm.SentencePieceProcessor(model_file=str(llama / "tokenizer.model")).get_piece_size()
    LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                # logits of a random 128-wide model with the usual 0.02 init stay within about +-2.6, too flat to
                # ever be confident; 0.1 gives the logit scale of a real 4096-5120-wide LLaMA
                initializer_range=0.1).save_pretrained(llama)

    beats = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                 embed_dim=32, conv_pos=16, conv_pos_groups=4, encoder_layerdrop=0.0)
    (out / "beats.json").write_text(json.dumps(beats, indent=2) + "\n")
    print(f"wrote {out}: whisper/, llama/ (vocab {vocab}), beats.json")


if __name__ == "__main__":
    main()
