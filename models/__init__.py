"""The SALMONN model (salmonn.py) and its parts. The facts of the model's input and the `model:` section's
defaults live here, light to import (the standard library only): config.py checks YAMLs against them."""
from collections.abc import Mapping
from typing import Any

SAMPLE_RATE = 16_000  # Hz: what Whisper's feature extractor and BEATs take; every clip is resampled to it
SPEECH_SLOT = "<SpeechHere>"  # where a prompt takes the speech tokens of one slot (one dialogue turn)
WHISPER_CONV_STRIDE = 2  # Whisper's encoder halves the spectrogram frames (its second convolution's stride):
                         # hop_length 160 x 2 = 320 samples per encoder frame


def window_frames(frames_per_second: float, second_per_window: float, second_stride: float) -> tuple[int, int]:
    """Q-Former window kernel and stride in encoder frames: the one rule the model's windows and the packed
    dataset's turn layout share (model.second_per_window, model.second_stride)."""
    return round(frames_per_second * second_per_window), round(frames_per_second * second_stride)


# The model section (models/salmonn.py reads it). Keys keep the original implementation's meaning; the paths are
# local folders/files only (nothing is fetched from a hub).
MODEL_DEFAULTS: dict[str, Any] = dict(
    llm_path="",  # any Hugging Face causal-LM folder: Vicuna (the released checkpoints), Qwen2.5/3, Llama-3, ...
    llama_path="",  # the original's name for llm_path, still read (give one of the two)
    whisper_path="", beats_path="",  # whisper-large-v2 folder, BEATs .pt
    ckpt="",  # salmonn_v1.pth / salmonn_7b_v0.pth or a checkpoint of ours: the trained tensors
    random_init=False,  # build every component from its config with random weights (tiny default only)
    freeze_whisper=True, freeze_beats=True, freeze_speech_QFormer=False, freeze_speech_llama_proj=False,
    use_speech_Qformer=True, window_level_Qformer=True,
    num_speech_query_token=1, second_per_window=0.333333, second_stride=0.333333,
    qformer_hidden_size=768, qformer_num_layers=2, qformer_num_heads=12, qformer_intermediate_size=3072,
    qformer_initializer_range=0.02,  # init scale of a Q-Former trained from scratch
    speech_llama_proj_model="",  # a checkpoint to take only the projection from
    lora=True, lora_rank=8, lora_alpha=32, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"],
    lora_scaling=None,  # LoRA scaling at inference; None = lora_alpha / lora_rank
    merge_lora=False,  # inference only: merge the LoRA into the frozen LLaMA weights (peft merge_and_unload)
                      # for speed; applied after ckpt and lora_scaling. train.py refuses it
    trim_speech_padding=False,  # drop the speech tokens of Whisper's 30 s zero-padding
    cache_frozen_encoders=False,  # run frozen Whisper/BEATs once per clip (outputs kept in host memory)
    multi_prompt=True,  # training: a random prompt of the task per sample (seeded by seed, epoch, index);
                        # false: always the task's first prompt. Evaluation always uses the first.
    prompt_path="", test_prompt_path="",  # task -> prompts (training / evaluation)
    chat_template="auto",  # auto: the LLM folder's own chat template when it has one (real turns, its end-of-turn
                           # token), else prompt_template | prompt_template: always prompt_template
    prompt_template="USER: {}\nASSISTANT:",  # the original's wrap of one user message (LLMs without a chat template)
    system_prompt="",  # a system message before the conversation ('' = the template's own default, if any)
    enable_thinking=False,  # Qwen3-style thinking block: off = the template's empty think block
    max_txt_len=128,  # target tokens, end token included (longer targets are cut with a warning)
    end_sym="",  # the token that ends an answer; '' = the LLM's own (chat template's end of turn, else eos)
    low_resource=False,  # the original's 8-bit LLaMA: refused (use torch_dtype)
    torch_dtype="float32",  # dtype of the frozen Whisper, BEATs and LLaMA weights; trained tensors stay fp32
)


def model_settings(given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `model:` section SALMONN takes: MODEL_DEFAULTS under the keys given, with `llm_path` read from
    `llama_path` when only that is given (the code reads llm_path alone). ValueError for an unknown key or
    two different LLM folders."""
    given = {} if given is None else dict(given)
    unknown = sorted(set(given) - set(MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model key(s): {', '.join(unknown)}")
    filled = {**MODEL_DEFAULTS, **given}
    llm, llama = filled["llm_path"] or "", filled["llama_path"] or ""
    if llm and llama and llm != llama:
        raise ValueError(f"model.llm_path ({llm!r}) and model.llama_path, its original name ({llama!r}), name "
                         "different folders: give one of them")
    return {**filled, "llm_path": llm or llama, "llama_path": ""}
