"""The shapes of the real models SALMONN is built from, as config files: whisper-large-v2, BEATs iter3+ AS2M cpt2,
Vicuna-7B v1.5 and Vicuna-13B v1.1 (the released checkpoints' LLMs), and the newer LLMs users switch to:
Qwen2.5-7B-Instruct and Qwen3-8B (their published config.json values). One home for these numbers: the
meta-device checks (tests/test_real_size.py), the random-weight artifacts of the real size
(scripts/make_real_shape_assets.py), the memory plan and the GPU check all read them from here.

`write_config_folders` writes folders that `model.random_init: true` builds from (configs only, no weights). A real
LLaMA tokenizer cannot be had offline: theirs is a 32,000-piece byte-fallback BPE trained on pseudo-words, so that
every id a random-weight LLaMA generates decodes. A Qwen folder gets the tiny Qwen's byte-level tokenizer and
ChatML template (assets/tiny/qwen: 2,002 ids, all within Qwen's vocabulary).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import random
from pathlib import Path

import shutil

import sentencepiece as spm

from models.beats import BEATsConfig


# openai/whisper-large-v2's config.json (the keys that set shapes; the rest keep transformers' defaults)
WHISPER_LARGE_V2 = dict(model_type="whisper", d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                        encoder_ffn_dim=5120, decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120,
                        num_mel_bins=80, max_source_positions=1500, max_target_positions=448, vocab_size=51865,
                        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258)
# its preprocessor_config.json: 80 log-mel bins, 10 ms hop, 30 s window
WHISPER_FEATURES = dict(feature_extractor_type="WhisperFeatureExtractor", feature_size=80, sampling_rate=16000,
                        hop_length=160, chunk_length=30, n_fft=400, n_samples=480000, nb_max_frames=3000,
                        padding_side="right", padding_value=0.0, return_attention_mask=False)
# BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2: models/beats.py's defaults are this checkpoint's cfg
BEATS_CPT2 = dataclasses.asdict(BEATsConfig())
# LLaMA config.json of the two Vicuna releases SALMONN uses (13B: salmonn_v1.pth; 7B: salmonn_7b_v0.pth)
VICUNA = {
    "7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
    "13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=2048,
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
}
VICUNA_FOLDER = {"7b": "vicuna-7b-v1.5", "13b": "vicuna-13b-v1.1"}
# config.json of the Qwen instruct LLMs (Qwen2: q/k/v biases; Qwen3: q/k RMSNorms, no biases; both grouped-query)
QWEN = {
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645,
                       tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
                     bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False),
}
QWEN_FOLDER = {"qwen2.5-7b": "Qwen2.5-7B-Instruct", "qwen3-8b": "Qwen3-8B"}
LLMS = {**VICUNA, **QWEN}  # every real LLM by its short name: 7b, 13b, qwen2.5-7b, qwen3-8b
LLM_FOLDER = {**VICUNA_FOLDER, **QWEN_FOLDER}
TINY_QWEN = Path(__file__).resolve().parents[1] / "assets/tiny/qwen"
QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
RELEASED_CHECKPOINT = {"7b": "salmonn_7b_v0.pth", "13b": "salmonn_v1.pth"}
WHISPER_FOLDER = "whisper-large-v2"
BEATS_FILE = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2"  # + .pt (weights) or .json (config only)


@functools.lru_cache(maxsize=1)
def tokenizer_model(vocab_size: int = 32000, seed: int = 0) -> bytes:
    """A sentencepiece BPE model with LLaMA's vocabulary size and special ids (unk 0, bos 1, eos 2, byte fallback),
    trained in ~2 s on seeded pseudo-words (any text still encodes, through the byte pieces)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(60000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    return model.getvalue()


def write_config_folders(root: Path, sizes: tuple[str, ...] = ("7b", "13b")) -> dict[str, Path]:
    """Config-only folders of the real models under `root`: {"whisper": folder, "beats": .json, "7b": folder, ...}."""
    root.mkdir(parents=True, exist_ok=True)
    whisper = root / WHISPER_FOLDER
    whisper.mkdir(exist_ok=True)
    (whisper / "config.json").write_text(json.dumps(WHISPER_LARGE_V2, indent=2))
    (whisper / "preprocessor_config.json").write_text(json.dumps(WHISPER_FEATURES, indent=2))
    beats = root / f"{BEATS_FILE}.json"
    beats.write_text(json.dumps(BEATS_CPT2, indent=2))
    folders = {"whisper": whisper, "beats": beats}
    for size in sizes:
        llm = root / LLM_FOLDER[size]
        llm.mkdir(exist_ok=True)
        (llm / "config.json").write_text(json.dumps(LLMS[size], indent=2))
        if size in QWEN:
            for name in QWEN_TOKENIZER_FILES:
                shutil.copy(TINY_QWEN / name, llm / name)
        else:
            (llm / "tokenizer.model").write_bytes(tokenizer_model(VICUNA[size]["vocab_size"]))
        folders[size] = llm
    return folders


def released_model_config(folders: dict[str, Path], size: str) -> dict:
    """The `model:` section of the released setting at this size (models.MODEL_DEFAULTS: Q-Former 768/2/12/3072,
    LoRA 8 on q_proj, v_proj), built from `folders` with random weights in bf16 (for a Qwen LLM: the same
    connector and LoRA, aligned to nothing yet)."""
    return dict(llm_path=str(folders[size]), whisper_path=str(folders["whisper"]),
                beats_path=str(folders["beats"]), random_init=True, torch_dtype="bfloat16")
