"""Peak GPU memory of SALMONN training and inference, predicted item by item from the model's shapes.

    python -m scripts.memory_plan --llm 13b --batch 2                 # the 13B recipe, per GPU, GC off and on
    python -m scripts.memory_plan --table                             # the table of docs/memory.md

Pure arithmetic (no torch at import): shapes in, bytes out. docs/memory.md gives every formula with its
assumptions and how each was checked; tests/test_memory_plan.py checks the parameter counts against the model
built on the meta device and the activation counts against what autograd keeps in a small LLaMA / Q-Former.

Where the bytes go in a training step (bf16 frozen weights, fp32 trained tensors, bf16 autocast on a GPU):
- static: frozen weights (Whisper encoder and LLM in model.torch_dtype, BEATs in fp32: models/salmonn.py does
  not cast it), trained tensors fp32 + their gradients fp32 + AdamW's two fp32 states, autocast's bf16 copies
  of the trained matrices (cached for the forward), DDP's gradient buckets;
- forward, no gradients: Whisper and BEATs run frozen; one layer's working set for all C clips at a time;
- kept for the backward: the trained speech side (layer norms on the encoder outputs, Q-Former over windows
  of Whisper frames + BEATs patches), the LLM's decoder layers (or only their inputs with gradient
  checkpointing), the logits in fp32;
- the peak is the largest of the phases (encoders, backward start, a layer's backward, optimizer step); what
  the GPU shows is that plus the caching allocator's slack and the CUDA context (constants below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

GIB = 2**30
SAMPLE_RATE = 16_000
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Outside the tensors: what nvidia-smi shows beyond torch.cuda.max_memory_allocated.
CUDA_CONTEXT_GIB = 0.6  # CUDA context, kernels, cuBLAS/cuDNN workspaces: ~0.5-0.7 GiB with torch 2.x on A100/H100
NCCL_GIB = 0.5  # NCCL's communication buffers, on each GPU of a multi-GPU run
ALLOCATOR_SLACK = 0.05  # memory reserved beyond allocated by the caching allocator (block rounding, fragments)
FIT_MARGIN = 0.10  # a plan "fits" a GPU when it needs at most 90 % of its memory

# Memory of each GPU as nvidia-smi reports it (MiB / 1024).
GPU_GIB = {"A100-40": 40.0, "A100-80": 80.0, "H100-80": 79.6, "4 x A40-46": 45.0}

# A dialogue's text, in LLaMA tokens, besides its speech (the HumDial prompts of prompts/*.json measured with the
# Vicuna tokenizer: the instruction, template and answer cue ~40, "Turn n:" and separators ~12 per turn; a target
# answer ~40).
TEXT_TOKENS_FIXED = 40
TEXT_TOKENS_PER_TURN = 12
ANSWER_TOKENS = 40
CONCAT_GAP_SECONDS = 0.5  # datasets.concat_gap_s
MODES = ("per_turn", "per_turn_trimmed", "packed", "concat")
TABLE_LLMS = ("7b", "13b", "qwen2.5-7b", "qwen3-8b")  # tools/real_size.LLMS


# ---------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Llm:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding (not in Vicuna)
    qkv_bias: bool = False  # q/k/v projections with biases (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head of q and k (Qwen3)
    head_size: int = 0  # 0: hidden // heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Llm":
        """From a LLaMA, Qwen2 or Qwen3 config.json."""
        return cls(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                   cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
                   qk_norm=cfg.get("model_type") == "qwen3", head_size=cfg.get("head_dim") or 0)


@dataclass(frozen=True)
class Whisper:
    width: int
    layers: int
    heads: int
    ffn: int
    frames: int  # encoder frames per clip (max_source_positions): 1500 for 30 s
    mel_bins: int
    clip_seconds: float  # the encoder's window (preprocessor chunk_length)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], clip_seconds: float) -> "Whisper":
        return cls(cfg["d_model"], cfg["encoder_layers"], cfg["encoder_attention_heads"], cfg["encoder_ffn_dim"],
                   cfg["max_source_positions"], cfg["num_mel_bins"], clip_seconds)


@dataclass(frozen=True)
class Beats:
    width: int
    layers: int
    heads: int
    ffn: int
    embed_dim: int
    patch: int
    conv_pos: int
    conv_pos_groups: int
    num_buckets: int
    conv_bias: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Beats":
        """From a BEATs cfg dict (models.beats.BEATsConfig fields)."""
        return cls(cfg["encoder_embed_dim"], cfg["encoder_layers"], cfg["encoder_attention_heads"],
                   cfg["encoder_ffn_embed_dim"], cfg["embed_dim"], cfg["input_patch_size"], cfg["conv_pos"],
                   cfg["conv_pos_groups"], cfg["num_buckets"], bool(cfg["conv_bias"]))


@dataclass(frozen=True)
class Qformer:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    queries: int  # model.num_speech_query_token: query tokens (= LLM speech tokens) per window


@dataclass(frozen=True)
class Lora:
    rank: int
    targets: tuple[str, ...]
    dropout: float


@dataclass(frozen=True)
class SalmonnShapes:
    llm: Llm
    whisper: Whisper
    beats: Beats | None
    qformer: Qformer
    lora: Lora | None
    window_seconds: float  # model.second_per_window
    stride_seconds: float  # model.second_stride
    weights_dtype: str = "bfloat16"  # model.torch_dtype: the frozen Whisper and LLM
    beats_dtype: str = "float32"  # BEATs is not cast to model.torch_dtype

    @property
    def window(self) -> tuple[int, int]:
        """Q-Former window kernel and stride in Whisper frames (models.window_frames)."""
        fps = self.whisper.frames / self.whisper.clip_seconds
        return round(fps * self.window_seconds), round(fps * self.stride_seconds)

    @property
    def windows_per_clip(self) -> int:
        kernel, stride = self.window
        return (self.whisper.frames - kernel) // stride + 1

    @classmethod
    def from_configs(cls, model_cfg: Mapping[str, Any], llama_cfg: Mapping[str, Any],
                     whisper_cfg: Mapping[str, Any], clip_seconds: float,
                     beats_cfg: Mapping[str, Any] | None) -> "SalmonnShapes":
        """From the YAML `model:` section (defaults filled) and the three encoders' configs."""
        lora = (Lora(model_cfg["lora_rank"], tuple(model_cfg["lora_target_modules"]), model_cfg["lora_dropout"])
                if model_cfg["lora"] else None)
        qformer = Qformer(model_cfg["qformer_hidden_size"], model_cfg["qformer_num_layers"],
                          model_cfg["qformer_num_heads"], model_cfg["qformer_intermediate_size"],
                          model_cfg["num_speech_query_token"])
        return cls(Llm.from_config(llama_cfg), Whisper.from_config(whisper_cfg, clip_seconds),
                   Beats.from_config(beats_cfg) if beats_cfg is not None else None, qformer, lora,
                   model_cfg["second_per_window"], model_cfg["second_stride"], model_cfg["torch_dtype"])


def released_shape(llm: str) -> SalmonnShapes:
    """SALMONN-13B (salmonn_v1.pth) or -7B (salmonn_7b_v0.pth) as released, or the same SALMONN on a Qwen LLM
    (qwen2.5-7b, qwen3-8b): tools/real_size.py's configs and models.MODEL_DEFAULTS (Q-Former 768 wide, 2 layers;
    LoRA rank 8 on q_proj, v_proj), bf16 frozen weights."""
    from models import MODEL_DEFAULTS
    from tools.real_size import BEATS_CPT2, LLMS, WHISPER_FEATURES, WHISPER_LARGE_V2  # (imports torch)

    if llm not in LLMS:
        raise ValueError(f"unknown LLM {llm!r}: one of {', '.join(LLMS)}")
    return SalmonnShapes.from_configs({**MODEL_DEFAULTS, "torch_dtype": "bfloat16"}, LLMS[llm], WHISPER_LARGE_V2,
                                WHISPER_FEATURES["chunk_length"], BEATS_CPT2)


# ---------------------------------------------------------------------------------------------- parameters
def llm_parameters(llm: Llm) -> int:
    """The LLM without LoRA: embeddings, decoder layers (q, k, v, o, with Qwen2's q/k/v biases and Qwen3's q/k
    norms; gate, up, down; 2 RMSNorms), final norm, lm_head."""
    attention = llm.hidden * (2 * llm.q_width + 2 * llm.kv_width)
    attention += (llm.q_width + 2 * llm.kv_width) * llm.qkv_bias + 2 * llm.head_dim * llm.qk_norm
    layer = attention + 3 * llm.hidden * llm.intermediate + 2 * llm.hidden
    head = 0 if llm.tied else llm.vocab * llm.hidden
    return llm.vocab * llm.hidden + llm.layers * layer + llm.hidden + head


def llm_layer_parameters(llm: Llm) -> int:
    return (llm_parameters(llm) - llm.hidden - llm.vocab * llm.hidden * (1 if llm.tied else 2)) // llm.layers


def lora_in_out(llm: Llm, target: str) -> tuple[int, int]:
    """(in, out) features of a LoRA target module."""
    h, i, q, kv = llm.hidden, llm.intermediate, llm.q_width, llm.kv_width
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h)}
    if target not in shapes:
        raise ValueError(f"LoRA target {target!r} is not a projection of a LLaMA/Qwen layer ({', '.join(shapes)})")
    return shapes[target]


def lora_parameters(llm: Llm, lora: Lora | None) -> int:
    """A [r, in] and B [out, r] per target module and layer."""
    if lora is None:
        return 0
    return llm.layers * sum(lora.rank * sum(lora_in_out(llm, t)) for t in lora.targets)


def whisper_parameters(w: Whisper) -> int:
    """Whisper's encoder: two convolutions, positions, layers (k_proj has no bias), final LayerNorm."""
    d = w.width
    convs = w.mel_bins * d * 3 + d + d * d * 3 + d
    layer = 4 * d * d + 3 * d + 2 * d * w.ffn + w.ffn + d + 4 * d
    return convs + w.frames * d + w.layers * layer + 2 * d


def beats_parameters(b: Beats) -> int:
    """BEATs: patch embedding, LayerNorm, projection, weight-normed positional convolution, layers (gated relative
    attention), one relative position table shared by all layers, final LayerNorm."""
    e, d = b.embed_dim, b.width
    front = e * b.patch * b.patch + (e if b.conv_bias else 0) + 2 * e + (e * d + d if e != d else 0)
    pos_conv = d * (d // b.conv_pos_groups) * b.conv_pos + b.conv_pos + d
    layer = 4 * (d * d + d) + (d // b.heads) * 8 + 8 + b.heads + 4 * d + 2 * d * b.ffn + b.ffn + d
    return front + pos_conv + b.layers * layer + b.num_buckets * b.heads + 2 * d


def qformer_parameters(q: Qformer, encoder_width: int) -> int:
    """transformers' Blip2QFormerModel (query tokens only): LayerNorm, then per layer self-attention,
    cross-attention over the encoder features, and the query feed-forward, each with its LayerNorm."""
    h = q.hidden
    attention = 4 * (h * h + h) + 2 * h
    cross = 2 * (h * h + h) + 2 * (encoder_width * h + h) + 2 * h
    ffn = 2 * h * q.intermediate + q.intermediate + h + 2 * h
    return 2 * h + q.layers * (attention + cross + ffn)


def encoder_width(s: SalmonnShapes) -> int:
    return s.whisper.width + (s.beats.width if s.beats else 0)


def trained_parameters(s: SalmonnShapes) -> dict[str, int]:
    """What trains in the released recipe: Q-Former + query tokens, the two layer norms on the encoder outputs,
    the projection to the LLM and the LoRA."""
    return {
        "qformer": qformer_parameters(s.qformer, encoder_width(s)) + s.qformer.queries * s.qformer.hidden,
        "layer_norms": 2 * encoder_width(s),
        "projection": s.qformer.hidden * s.llm.hidden + s.llm.hidden,
        "lora": lora_parameters(s.llm, s.lora),
    }


def frozen_parameters(s: SalmonnShapes) -> dict[str, int]:
    return {"whisper": whisper_parameters(s.whisper), "beats": beats_parameters(s.beats) if s.beats else 0,
            "llm": llm_parameters(s.llm)}


def frozen_weight_bytes(s: SalmonnShapes) -> int:
    frozen = frozen_parameters(s)
    weights = DTYPE_BYTES[s.weights_dtype]
    return weights * (frozen["whisper"] + frozen["llm"]) + DTYPE_BYTES[s.beats_dtype] * frozen["beats"]


# ---------------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """How a step computes. The GPU recipe: bf16 frozen weights, torch.autocast bf16, dropout masks as bool.
    On CPU `run.precision: auto` runs without autocast, and ATen's CPU dropout keeps its mask in the input's
    dtype (its fused CUDA kernel keeps a bool)."""
    weights: str = "bfloat16"
    autocast: bool = True
    device: str = "cuda"

    @property
    def act(self) -> int:
        """Bytes of an LLM / Whisper activation (the residual stream, projections, MLP)."""
        return 2 if self.autocast or DTYPE_BYTES[self.weights] == 2 else 4

    @property
    def trained_act(self) -> int:
        """Bytes of a trained module's matmul input/output (fp32 weights: autocast makes them bf16)."""
        return 2 if self.autocast else 4

    @property
    def lora_input_shared(self) -> bool:
        """Without autocast and with fp32 weights, peft's cast of a LoRA input to fp32 is a no-op: the targets of
        one input (q, k, v; gate, up) keep one tensor between them."""
        return not self.autocast and DTYPE_BYTES[self.weights] == 4

    def dropout_mask(self, input_bytes: int) -> int:
        return 1 if self.device == "cuda" else input_bytes


GPU_BF16 = Precision("bfloat16", autocast=True, device="cuda")
CPU_BF16 = Precision("bfloat16", autocast=False, device="cpu")  # a CPU run of the bf16 recipe (precision auto)
CPU_FP32 = Precision("float32", autocast=False, device="cpu")  # the tiny demo


# ---------------------------------------------------------------------------------------------- sequences
@dataclass(frozen=True)
class Dialogue:
    """A training or test sample: its user turns' durations and how they become clips (`mode`):
    per_turn: each turn its own 30 s Whisper clip(s), 88 speech tokens per clip (Whisper's padding included);
    per_turn_trimmed: the same clips, only the tokens of windows holding audio (model.trim_speech_padding);
    packed: the turns end to end in shared clips on window boundaries (datasets.turn_mode: packed): the trimmed
    token count in ceil(windows / 88) clips; concat: the original fine-tune, all turns in one clip, 88 tokens."""
    turn_seconds: tuple[float, ...]
    mode: str = "per_turn"
    text_tokens: int | None = None  # prompt text besides speech; None: 40 + 12 per turn (40 in concat)
    answer_tokens: int = ANSWER_TOKENS  # the training target

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.turn_seconds or min(self.turn_seconds) <= 0:
            raise ValueError(f"a dialogue needs turns of positive duration, got {self.turn_seconds}")

    @classmethod
    def uniform(cls, turns: int, seconds: float, mode: str = "per_turn", **kwargs: Any) -> "Dialogue":
        return cls((float(seconds),) * turns, mode, **kwargs)

    @property
    def text(self) -> int:
        if self.text_tokens is not None:
            return self.text_tokens
        return TEXT_TOKENS_FIXED + (0 if self.mode == "concat" else TEXT_TOKENS_PER_TURN * len(self.turn_seconds))


@dataclass(frozen=True)
class Layout:
    """One sample as the model sees it."""
    speech_tokens: int
    prompt_tokens: int  # speech + prompt text: what generation starts from
    clips: int  # Whisper passes (each 30 s, padded)
    qformer_windows: int  # windows the Q-Former runs on
    beats_seconds: float  # BEATs' input length per clip (clips are padded to the batch's longest)


def kept_windows(s: SalmonnShapes, seconds: float) -> int:
    """Windows holding a clip's audio (SALMONN.num_windows): ceil(frames / stride), 1 to windows_per_clip."""
    fps = s.whisper.frames / s.whisper.clip_seconds
    frames = math.ceil(round(seconds * SAMPLE_RATE) * fps / SAMPLE_RATE)
    return min(max(math.ceil(frames / s.window[1]), 1), s.windows_per_clip)


def turn_clips(s: SalmonnShapes, seconds: float) -> list[float]:
    """Durations of the clips a turn is split into (dataset_v1.split_clips: 30 s each, the last >= 1 s)."""
    full, rest = divmod(seconds, s.whisper.clip_seconds)
    return [s.whisper.clip_seconds] * int(full) + ([max(rest, 1.0)] if rest > 1e-9 or not full else [])


def layout(s: SalmonnShapes, d: Dialogue) -> Layout:
    q, per_clip = s.qformer.queries, s.windows_per_clip
    if d.mode in ("per_turn", "per_turn_trimmed"):
        clips = [c for t in d.turn_seconds for c in turn_clips(s, t)]
        run = len(clips) * per_clip if d.mode == "per_turn" else sum(kept_windows(s, c) for c in clips)
        return Layout(run * q, run * q + d.text, len(clips), run, max(clips))
    if d.mode == "packed":  # each turn padded to whole windows (17 frames x 20 ms = 0.34 s), clips of 88 windows
        window_samples = round(s.window[0] * s.whisper.clip_seconds / s.whisper.frames * SAMPLE_RATE)
        used = sum(math.ceil(round(t * SAMPLE_RATE) / window_samples) for t in d.turn_seconds)
        clips = math.ceil(used / per_clip)
        return Layout(used * q, used * q + d.text, clips, clips * per_clip,
                      min(used, per_clip) * window_samples / SAMPLE_RATE)
    joined = sum(d.turn_seconds) + CONCAT_GAP_SECONDS * (len(d.turn_seconds) - 1)  # concat: cut at 30 s
    return Layout(per_clip * q, per_clip * q + d.text, 1, per_clip, min(joined, s.whisper.clip_seconds))


def beats_patches(b: Beats, seconds: float) -> int:
    """BEATs patches of a clip: 25 ms / 10 ms fbank frames, 16 x 16 patches over 128 mel bins (time-major)."""
    frames = 1 + (round(seconds * SAMPLE_RATE) - 400) // 160
    return (frames // b.patch) * (128 // b.patch)


# ---------------------------------------------------------------------------------------------- activations
def llm_layer_bytes_per_token(llm: Llm, lora: Lora | None, p: Precision) -> int:
    """Bytes autograd keeps per token in one LLaMA/Qwen decoder layer (sdpa attention, no checkpointing), with a the
    activation bytes (2 in bf16):
      2 RMSNorms: the fp32 copy of the input (4h) and rsqrt (4)             8h + 8
      attention: SDPA keeps q, k, v and its output (a(2q + 2kv)), and the per-head logsumexp in fp32 (4 heads);
                 RoPE and the frozen projections keep nothing (their weights are not trained); Qwen3's q/k
                 norms keep their fp32 input and rsqrt per head (4(q + kv) + 4(heads + kv_heads))
      MLP: gate output (SiLU's input), SiLU output, up output                3a i
      LoRA per target (in features n, rank r): its input (cast to bf16 by autocast, else the fp32 copy peft
      makes) a_l n, the dropout mask, A's output a_l r (`lora_bytes_per_token`).
    For Vicuna-13B in the GPU recipe: 8h + 8 + 8h + 160 + 6i + 2 x (3h + 2r) = 195,784 B (191 KiB)."""
    h, a = llm.hidden, p.act
    norms = 2 * (4 * h + 4)
    attention = a * (2 * llm.q_width + 2 * llm.kv_width) + 4 * llm.heads
    attention += (4 * (llm.q_width + llm.kv_width) + 4 * (llm.heads + llm.kv_heads)) * llm.qk_norm
    mlp = 3 * a * llm.intermediate
    return norms + attention + mlp + lora_bytes_per_token(llm, lora, p)


LORA_INPUT = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention output",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp product"}


def lora_bytes_per_token(llm: Llm, lora: Lora | None, p: Precision) -> int:
    """LoRA's own intermediates per token and layer: peft casts x to the adapter's fp32, then dropout, A, B."""
    if lora is None:
        return 0
    a = p.trained_act
    total = 0
    inputs = {"attention output"}  # o_proj's input is the storage SDPA keeps as its output (fused kernels return
                                   # [B, T, heads, dh] memory: the transpose-reshape copies nothing)
    for target in lora.targets:
        n = lora_in_out(llm, target)[0]
        total += a * lora.rank  # A's output, B's input
        if lora.dropout > 0:
            total += n * (p.dropout_mask(4) + a)  # mask of the fp32 dropout input; A's input (bf16 under autocast)
        elif p.lora_input_shared:
            total += 0 if LORA_INPUT[target] in inputs else 4 * n
            inputs.add(LORA_INPUT[target])
        else:
            total += a * n  # A's input: autocast's bf16 copy, or peft's fp32 copy of the bf16 input
    return total


def llm_saved_bytes(llm: Llm, lora: Lora | None, p: Precision, tokens: int, batch: int = 1,
                    checkpointing: bool = False) -> int:
    """What the decoder stack keeps for the backward of `batch` sequences of `tokens` tokens: every layer's saved
    tensors, or with gradient checkpointing (non-reentrant) only each layer's input (a h per token); plus, once,
    RoPE's cos and sin (2 x head_dim per token) and the final RMSNorm's fp32 input."""
    per_token = llm.layers * (p.act * llm.hidden if checkpointing else llm_layer_bytes_per_token(llm, lora, p))
    shared = 2 * llm.head_dim * p.act + 4 * llm.hidden + 4
    return batch * tokens * (per_token + shared)


def attention_mask_bytes(llm: Llm, p: Precision, tokens: int, batch: int, layers: int) -> int:
    """A padded batch (batch > 1) on a GPU: SDPA runs its memory-efficient kernel, which keeps an additive copy
    of the boolean mask [batch, 1, L, L] per layer."""
    if batch == 1 or p.device != "cuda":
        return 0
    return layers * batch * tokens * tokens * p.act


def llm_backward_bytes_per_token(llm: Llm, p: Precision) -> int:
    """Gradients in flight while one decoder layer runs its backward (MLP: of down's input, the SiLU output, up
    and gate outputs; of the residual stream and norm inputs): an estimate, a(3i + 3h) + 4h."""
    return p.act * (3 * llm.intermediate + 3 * llm.hidden) + 4 * llm.hidden


def logits_bytes(llm: Llm, tokens: int, copies: int) -> int:
    """[tokens, vocab] in fp32: SALMONN.forward keeps its fp32 logits (returned, alive until the step ends);
    cross-entropy keeps its log-softmax; the backward adds their two gradients: 4 copies at the backward's start."""
    return 4 * copies * tokens * llm.vocab


def speech_saved_bytes(s: SalmonnShapes, p: Precision, clips: int, windows: int, patches: int) -> int:
    """What autograd keeps of the trained speech side for `clips` clips, `windows` Q-Former windows in all and
    `patches` BEATs patches per clip (counted with saved_tensors_hooks on SALMONN.encode_speech). H is the
    Q-Former width, I its feed-forward width, D = Dw + Db the encoder channels, a its matmul bytes (2 under
    autocast), one query per window (model.num_speech_query_token: 1):
      per Whisper frame: ln_speech's fp32 input, 4 Dw + 8; per BEATs patch: ln_audio's fp32 input, 4 Db + 9;
      per window frame (17 a window), per layer: the cross-attention's key/value inputs (under autocast a bf16
        copy for each, 2 x 2D; else one fp32 tensor, 4D, for all layers), and what attention keeps of the
        frame (`_qformer_attention`);
      per query, per layer: the 3 layer norms' fp32 inputs 3 x 4H, the linear layers' inputs 7 x aH (5 without
        autocast: q, k, v share one), 3 dropout masks of H, the feed-forward's 2 x aI, norm statistics 24,
        and attention (`_qformer_attention`); once: 4H + aH + 8;
      the window mask: 1 byte per window of every clip."""
    q, a = s.qformer, p.trained_act
    dw, d, h = s.whisper.width, encoder_width(s), q.hidden
    attention_frame, attention_query = _qformer_attention(q, p)
    inputs = q.layers * 2 * 2 * d if p.autocast else 4 * d
    per_frame = inputs + q.layers * attention_frame
    per_query_layer = (3 * 4 * h + (7 if p.autocast else 5) * a * h + 3 * p.dropout_mask(a) * h
                       + 2 * a * q.intermediate + 6 * 4 + attention_query)
    per_query = q.layers * per_query_layer + 4 * h + a * h + 8
    whisper = clips * s.whisper.frames * (4 * dw + 8)
    beats = clips * patches * (4 * s.beats.width + 9) if s.beats else 0
    frames, queries = windows * s.window[0], windows * q.queries
    return whisper + beats + frames * per_frame + queries * per_query + clips * s.windows_per_clip


def _qformer_attention(q: Qformer, p: Precision) -> tuple[int, int]:
    """Bytes attention keeps per window frame and per query, per layer. The Q-Former trains with attention
    dropout, which SDPA runs on a GPU with flash attention (keeping q, k, v, output in bf16 and a logsumexp per
    head; assumed, not measured here), on a CPU with its math kernel in fp32 (measured: self-attention q, k, v
    and cross-attention q upcast, keys and values, scores, probabilities, the dropout mask per head)."""
    h = q.hidden
    if p.device == "cuda":
        return 2 * p.trained_act * h, (4 + 2) * p.trained_act * h + 2 * 4 * q.heads
    return 2 * 4 * h + 3 * q.heads * 4 * q.queries, 4 * 4 * h + 3 * q.heads * 4


def whisper_working_bytes(w: Whisper, p: Precision, clips: int) -> int:
    """Whisper under no_grad, all clips at once: its output so far (a d per frame) plus one layer's largest
    working set: the front end (two convolutions over 2F mel frames, 4F a d) or a layer (attention: x, norm,
    q, k, v, output, projection 8a d; feed-forward: x, norm, fc1, GELU, fc2 a(3d + 2f)) per frame."""
    per_frame = p.act * (w.width + max(4 * w.width, 8 * w.width, 3 * w.width + 2 * w.ffn))
    return clips * w.frames * per_frame


def beats_working_bytes(b: Beats | None, p: Precision, clips: int, patches: int) -> int:
    """BEATs under no_grad (fp32 weights): the shared relative position bias [heads, P, P] fp32 (and its int64
    buckets), per clip the gated bias in fp32, masked, and cast for SDPA (8 + a bytes per element), one layer's
    activations (8D + a(4D + 2F) per patch), its fp32 output (4D per patch)."""
    if b is None:
        return 0
    a = p.trained_act
    shared = patches * patches * (4 * b.heads + 8)
    per_clip = (b.heads * patches * patches * (8 + a)
                + patches * (8 * b.width + a * (4 * b.width + 2 * b.ffn) + 4 * b.width))
    return shared + clips * per_clip


# ---------------------------------------------------------------------------------------------- plans
@dataclass
class Plan:
    """Items (bytes) and the phases of a step, each the items alive in it; the peak is the largest phase."""
    title: str
    items: dict[str, int]
    phases: dict[str, tuple[str, ...]]
    outside_allocator: dict[str, int] = field(default_factory=dict)  # CUDA context, NCCL (not in allocated)
    facts: dict[str, Any] = field(default_factory=dict)
    gpu: bool = True  # False: a CPU step (no allocator slack, no CUDA context)

    def phase_bytes(self, phase: str) -> int:
        return sum(self.items[name] for name in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def allocated(self) -> int:
        """Peak of the tensors: what torch.cuda.max_memory_allocated measures."""
        return self.phase_bytes(self.peak_phase)

    @property
    def device(self) -> int:
        """What the GPU needs: allocated, the allocator's slack, and what lies outside the allocator."""
        slack = ALLOCATOR_SLACK if self.gpu else 0.0
        return round(self.allocated * (1 + slack)) + sum(self.outside_allocator.values())

    def fits(self, gpu_gib: float) -> bool:
        return self.device <= (1 - FIT_MARGIN) * gpu_gib * GIB

    def format(self) -> str:
        lines = [self.title, "  " + ", ".join(f"{k} {v}" for k, v in self.facts.items())]
        lines += [f"  {name:<66} {gib(size):>7.2f} GiB" for name, size in self.items.items()]
        for phase in self.phases:
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"  phase: {phase:<59} {gib(self.phase_bytes(phase)):>7.2f} GiB{mark}")
        if self.gpu:
            extra = ", ".join(f"{k} {gib(v):.2f}" for k, v in self.outside_allocator.items())
            lines.append(f"  per GPU: {gib(self.allocated):.2f} GiB allocated (torch.cuda.max_memory_allocated) "
                         f"+ {ALLOCATOR_SLACK:.0%} allocator slack + {extra} GiB = {gib(self.device):.2f} GiB")
        return "\n".join(lines)


def gib(n: float) -> float:
    return n / GIB


FROZEN = "frozen weights (Whisper, LLM bf16; BEATs fp32)"
TRAINED, GRADIENTS, ADAMW = "trained tensors fp32", "gradients fp32", "AdamW exp_avg + exp_avg_sq fp32"
AUTOCAST_COPIES = "autocast's bf16 copies of the trained weights"


def _static_training(s: SalmonnShapes, p: Precision, checkpointing: bool, gpus: int, strategy: str) -> dict[str, int]:
    """Weights and optimizer state on each GPU."""
    trained = sum(trained_parameters(s).values())
    frozen = frozen_weight_bytes(s)
    if strategy == "fsdp":  # FSDP2 with bf16 parameters (runner._wrap_fsdp): each decoder layer a unit, then the root
        layer = llm_layer_parameters(s.llm) + lora_parameters(s.llm, s.lora) // s.llm.layers
        root = (sum(frozen_parameters(s).values()) - s.llm.layers * llm_layer_parameters(s.llm)
                + trained - lora_parameters(s.llm, s.lora))
        return {
            f"frozen weights / {gpus} (FSDP shards)": frozen // gpus,
            f"trained tensors + grads + AdamW (16 B each) / {gpus}": 16 * trained // gpus,
            "root unit unsharded, bf16 (encoders, Q-Former, embeddings, lm_head)": 2 * root,
            "2 decoder layers unsharded, bf16 (computing + prefetched)": 2 * 2 * layer,
        }
    items = {FROZEN: frozen, TRAINED: 4 * trained, GRADIENTS: 4 * trained, ADAMW: 8 * trained}
    if p.autocast:  # autocast caches a bf16 copy of each trained matrix; not those inside checkpointed layers
        items[AUTOCAST_COPIES] = 2 * (trained - (lora_parameters(s.llm, s.lora) if checkpointing else 0))
    if gpus > 1:
        items["DDP gradient buckets fp32"] = 4 * trained
    return items


# names of the items that phases share
WHISPER_WORK, BEATS_WORK = "Whisper working set (no grad, one layer)", "BEATs working set (no grad, one layer)"
SPEECH_KEPT = "speech side kept for backward (layer norms, Q-Former)"
MASKS = "attention masks (padded batch)"
LOGITS_BACKWARD = "logits fp32 + cross-entropy at the backward's start (4 copies)"
LOGITS_HELD = "fp32 logits held by the forward's output"
LAYER_BACKWARD = "one decoder layer's backward (+ its recomputed activations)"
ADAMW_STEP = "AdamW step temporaries (foreach)"


def llm_kept_name(checkpointing: bool) -> str:
    return f"LLM {'decoder-layer inputs (checkpointing)' if checkpointing else 'decoder layers'} kept for backward"


def training_plan(s: SalmonnShapes, d: Dialogue, batch: int = 1, checkpointing: bool = False, gpus: int = 1,
                  strategy: str = "ddp", precision: Precision = GPU_BF16, title: str = "") -> Plan:
    """Peak memory of one training micro-batch of `batch` dialogues like `d` on each GPU (DDP: every GPU holds
    everything for its own batch; FSDP: weights and optimizer state sharded over `gpus`)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    if strategy == "fsdp" and gpus < 2:
        raise ValueError("FSDP shards over several GPUs: give gpus >= 2")
    p, llm = precision, s.llm
    lay = layout(s, d)
    tokens = lay.prompt_tokens + d.answer_tokens  # [batch, tokens] through the LLM
    clips, windows = batch * lay.clips, batch * lay.qformer_windows
    patches = beats_patches(s.beats, lay.beats_seconds) if s.beats else 0
    llm_kept = llm_kept_name(checkpointing)
    recompute = llm_layer_bytes_per_token(llm, s.lora, p) if checkpointing else 0
    trained = sum(trained_parameters(s).values())
    static = _static_training(s, p, checkpointing, gpus, strategy)
    items = {
        **static,
        WHISPER_WORK: whisper_working_bytes(s.whisper, p, clips),
        BEATS_WORK: beats_working_bytes(s.beats, p, clips, patches),
        SPEECH_KEPT: speech_saved_bytes(s, p, clips, windows, patches),
        llm_kept: llm_saved_bytes(llm, s.lora, p, tokens, batch, checkpointing),
        MASKS: attention_mask_bytes(llm, p, tokens, batch, 1 if checkpointing else llm.layers),
        LOGITS_BACKWARD: logits_bytes(llm, batch * tokens, 4),
        LAYER_BACKWARD: batch * tokens * (llm_backward_bytes_per_token(llm, p) + recompute),
        LOGITS_HELD: logits_bytes(llm, batch * tokens, 1),
        ADAMW_STEP: 8 * trained // (gpus if strategy == "fsdp" else 1),
    }
    kept = (*static, SPEECH_KEPT, llm_kept, MASKS)
    phases = {
        "encoders (forward, no grad)": (*static, WHISPER_WORK, BEATS_WORK),
        "backward start (logits' gradients)": (*kept, LOGITS_BACKWARD),
        "backward of the last decoder layer": (*kept, LAYER_BACKWARD, LOGITS_HELD),
        "optimizer step": (*static, ADAMW_STEP, LOGITS_HELD),
    }
    outside = {}
    if p.device == "cuda":
        outside["CUDA context"] = round(CUDA_CONTEXT_GIB * GIB)
        if gpus > 1:
            outside["NCCL"] = round(NCCL_GIB * GIB)
    facts = {"tokens/dialogue": tokens, "speech tokens": lay.speech_tokens, "clips/dialogue": lay.clips,
             "batch": batch, "GC": "on" if checkpointing else "off",
             "on": f"{strategy} x {gpus}" if gpus > 1 else ("1 GPU" if p.device == "cuda" else "CPU")}
    return Plan(title or f"training, {d.mode}, {len(d.turn_seconds)} turns", items, phases, outside, facts,
                gpu=p.device == "cuda")


def inference_plan(s: SalmonnShapes, d: Dialogue, batch: int = 1, beams: int = 4, answer_tokens: int = 200,
                   precision: Precision = GPU_BF16, title: str = "") -> Plan:
    """Peak memory of generating `answer_tokens` for `batch` samples like `d` with `beams` beams on one GPU."""
    p, llm = precision, s.llm
    lay = layout(s, d)
    prompt, rows = lay.prompt_tokens, batch * beams  # generate() expands the prompts to beams before prefill
    clips = batch * lay.clips
    patches = beats_patches(s.beats, lay.beats_seconds) if s.beats else 0
    trained = sum(trained_parameters(s).values())
    kv_per_token = 2 * llm.layers * llm.kv_width * p.act  # K and V of every layer
    static = {FROZEN: frozen_weight_bytes(s), TRAINED: 4 * trained}
    if p.autocast:  # the trained tensors keep requires_grad: autocast caches their bf16 copies under no_grad too
        static[AUTOCAST_COPIES] = 2 * trained
    prefill_kv = "KV cache after the prompt"
    prefill_work = "prefill: one layer's working set (x, norm, gate, up, SiLU, product)"
    prefill_mask, kv = "prefill: attention mask (left padding)", "KV cache, prompt + answer"
    kv_copy, logits = "KV growth / beam reorder: one layer copied", "next-token logits fp32 (4 copies)"
    items = {
        **static,
        WHISPER_WORK: whisper_working_bytes(s.whisper, p, clips),
        BEATS_WORK: beats_working_bytes(s.beats, p, clips, patches),
        prefill_kv: rows * prompt * kv_per_token,
        prefill_work: rows * prompt * p.act * (2 * llm.hidden + 4 * llm.intermediate),
        prefill_mask: rows * prompt * prompt * (1 + p.act) if batch > 1 else 0,
        kv: rows * (prompt + answer_tokens) * kv_per_token,
        kv_copy: 2 * rows * (prompt + answer_tokens) * llm.kv_width * p.act,
        logits: logits_bytes(llm, rows, 4),
    }
    phases = {
        "encoders": (*static, WHISPER_WORK, BEATS_WORK),
        "prefill": (*static, prefill_kv, prefill_work, prefill_mask, logits),
        "last generated token": (*static, kv, kv_copy, logits),
    }
    outside = {"CUDA context": round(CUDA_CONTEXT_GIB * GIB)} if p.device == "cuda" else {}
    facts = {"prompt tokens": prompt, "answer tokens": answer_tokens, "batch": batch, "beams": beams}
    return Plan(title or f"inference, {d.mode}, {len(d.turn_seconds)} turns", items, phases, outside, facts,
                gpu=p.device == "cuda")


def predict_cpu_step(llm: str = "7b", turn_seconds: Sequence[float] = (4.0,) * 5, mode: str = "per_turn",
                     batch: int = 1, checkpointing: bool = False, text_tokens: int | None = None,
                     answer_tokens: int = ANSWER_TOKENS, shape: SalmonnShapes | None = None) -> Plan:
    """A training step of the bf16 recipe on CPU (`run.precision: auto`: no autocast; CPU dropout masks), to set
    beside a measured resident-set growth: no CUDA context, no allocator slack, and of the items only the
    weights, the trained state (tensors, gradients, AdamW) and what the step keeps for its backward (speech
    side, LLM, logits). A step run after the model is built adds all but the first two items."""
    s = shape or released_shape(llm)
    d = Dialogue(tuple(float(t) for t in turn_seconds), mode, text_tokens, answer_tokens)
    full = training_plan(s, d, batch, checkpointing, precision=CPU_BF16, title=f"CPU training step, {llm}")
    names = (FROZEN, TRAINED, GRADIENTS, ADAMW, SPEECH_KEPT, llm_kept_name(checkpointing), LOGITS_BACKWARD)
    items = {name: full.items[name] for name in names}
    return Plan(full.title, items, {"training step": names}, {}, full.facts, gpu=False)


# ---------------------------------------------------------------------------------------------- the table
def table_rows(turns: int = 5, seconds: float = 4.0) -> list[dict[str, Any]]:
    """The configurations of docs/memory.md's table and their plans."""
    rows = []
    for llm in TABLE_LLMS:
        s = released_shape(llm)
        for mode in ("per_turn", "packed"):
            d = Dialogue.uniform(turns, seconds, mode)
            for batch in (1, 2, 4):
                for checkpointing in (False, True):
                    for strategy, gpus in (("ddp", 1), ("fsdp", 4)):
                        plan = training_plan(s, d, batch, checkpointing, gpus, strategy)
                        rows.append({"llm": llm, "task": "train", "mode": mode, "batch": batch,
                                     "gc": checkpointing, "strategy": strategy, "gpus": gpus, "plan": plan})
        d = Dialogue.uniform(turns, seconds, "per_turn")
        for batch in (1, 8):
            rows.append({"llm": llm, "task": "infer", "mode": "per_turn", "batch": batch, "beams": 4,
                         "answer": 200, "plan": inference_plan(s, d, batch, 4, 200)})
    return rows


def table_markdown(turns: int = 5, seconds: float = 4.0) -> str:
    gpus = list(GPU_GIB)
    head = ["LLM", "what", "audio", "batch/GPU", "GC", "GPUs", "allocated GiB", "per GPU GiB", *gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(turns, seconds):
        plan = r["plan"]
        if r["task"] == "train":
            what, gc = "train", "on" if r["gc"] else "off"
            where = "1 (DDP: any N)" if r["strategy"] == "ddp" else f"FSDP x {r['gpus']}"
        else:
            what, gc, where = f"infer, {r['beams']} beams, {r['answer']} tokens", "-", "1"
        marks = ["yes" if plan.fits(GPU_GIB[g]) else "no" for g in gpus]
        lines.append(f"| {r['llm']} | {what} | {r['mode']} | {r['batch']} | {gc} | {where} | "
                     f"{gib(plan.allocated):.1f} | {gib(plan.device):.1f} | " + " | ".join(marks) + " |")
    return "\n".join(lines)
