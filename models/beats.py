"""BEATs audio encoder (Chen et al., 2022), ported for SALMONN's frozen use.

Loads Microsoft's fine-tuned checkpoint format (`{'cfg', 'model', 'label_dict'}`, e.g.
`BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt`) under the original parameter names, and returns the same
features as the original `extract_features(wav, padding_mask, feature_only=True)`, with one deliberate change:
the padding mask is mapped to patches exactly, per row, so a clip's features do not depend on what it is batched
with (the original maps it approximately; see tests/parity/README.md, behaviour 4).

Inference only. BEATs is frozen in SALMONN, so the training-only parts of the original are not implemented:
dropout, layerdrop and GradMultiply (layer-wise gradient decay, which only rescales gradients) are identities
here, and the output is the same in train() and eval() mode. The predictor head is not built either: SALMONN uses
the encoder features, so `predictor.*` checkpoint weights are skipped by name.
"""

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import SAMPLE_RATE
from models.fbank import fbank, num_frames

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
NUM_MEL_BINS = 128
FRAME_LENGTH_SAMPLES = 400  # 25 ms at 16 kHz
FRAME_SHIFT_SAMPLES = 160  # 10 ms at 16 kHz
# Checkpoint weights that this port deliberately does not use (the AudioSet classification head).
IGNORED_CHECKPOINT_PREFIXES = ("predictor.",)


@dataclasses.dataclass
class BEATsConfig:
    """The checkpoint's `cfg` dict. Defaults are those of BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.

    Fields read only by the training-only parts (dropouts, layerdrop, gradient decay) and by the predictor head are
    kept so that every checkpoint cfg loads, but they do not change the features.
    """

    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05
    dropout_input: float = 0.0
    layer_norm_first: bool = False
    conv_bias: bool = False
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    deep_norm: bool = True
    input_patch_size: int = 16
    layer_wise_gradient_decay_ratio: float = 0.6
    embed_dim: int = 512
    finetuned_model: bool = True
    predictor_dropout: float = 0.0
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: dict) -> "BEATsConfig":
        """Build from a checkpoint/JSON cfg; unknown keys are an error (a typo would otherwise go unnoticed)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown BEATs cfg keys: {unknown}")
        return cls(**cfg)

    def check_supported(self) -> None:
        """Refuse structural flags this port does not implement, instead of silently computing something else."""
        required = {
            "layer_norm_first": False,
            "relative_position_embedding": True,
            "gru_rel_pos": True,
            "activation_fn": "gelu",
        }
        for name, value in required.items():
            if getattr(self, name) != value:
                raise NotImplementedError(f"BEATs cfg {name}={getattr(self, name)!r} is not supported (need {value!r})")
        if NUM_MEL_BINS % self.input_patch_size:
            raise NotImplementedError(f"input_patch_size {self.input_patch_size} must divide {NUM_MEL_BINS} mel bins")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> Tensor:
    """T5-style bidirectional buckets of `key - query` offsets, `[length, length]` int64, as in the original.

    Half the buckets per direction; the first half of those are exact offsets, the rest log-spaced up to
    `max_distance`. Computed in float32 like the original so that bucket boundaries agree.
    """
    positions = torch.arange(length)
    offset = positions[None, :] - positions[:, None]  # [query, key]
    half = num_buckets // 2
    direction = (offset > 0).long() * half
    distance = offset.abs()
    max_exact = half // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return direction + torch.where(distance < max_exact, distance, far)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is `weight_v` rescaled to norm `weight_g` along the kernel axis (dim=2).

    Same parameters, names and maths as the deprecated `nn.utils.weight_norm(conv, dim=2)` of the original, so the
    checkpoint's `weight_g`/`weight_v` load directly.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))

    def reset_parameters(self) -> None:
        """The original's init: N(0, sqrt(4 / (kernel * channels))), bias 0, g = |v| so the weight starts as v."""
        kernel_size, channels = self.weight_v.shape[2], self.weight_v.shape[0]
        nn.init.normal_(self.weight_v, std=math.sqrt(4 / (kernel_size * channels)))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, T]
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drops the extra last step an even-sized kernel with padding k // 2 produces, so the length is unchanged."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, T + remove]
        return x[..., : x.shape[-1] - self.remove]


class GatedRelativeSelfAttention(nn.Module):
    """Multi-head self-attention plus a relative position bias that each query rescales by a learned gate (GRU-style).

    The bias table (`relative_attention_bias`) is owned by layer 0 and aliased by every other layer, as in the
    original; the encoder looks the bias up once and passes it to all layers. The original's fp16 tricks (dividing q
    by 32 and subtracting the row max) leave the softmax unchanged and are left to `scaled_dot_product_attention`.
    """

    def __init__(self, dim: int, num_heads: int, num_buckets: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)
        self.grep_linear = nn.Linear(self.head_dim, 8)
        self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def _split_heads(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, D/H]
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def gated_position_bias(self, q: Tensor, position_bias: Tensor) -> Tensor:
        """Scale the shared bias `[H, T, T]` per query by `a * (b * grep_a - 1) + 2`, gates a, b from the query."""
        batch, heads, length, _ = q.shape
        gates = self.grep_linear(q).view(batch, heads, length, 2, 4).sum(-1).sigmoid()  # [B, H, T, 2]
        gate_a, gate_b = gates.chunk(2, dim=-1)  # [B, H, T, 1] each
        return (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * position_bias  # [B, H, T, T]

    def forward(self, x: Tensor, position_bias: Tensor, key_padding_mask: Tensor) -> Tensor:
        # x: [B, T, D]; position_bias: [H, T, T]; key_padding_mask: [B, T], True = padding
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        bias = self.gated_position_bias(q, position_bias)
        # A row with no real patch at all keeps its keys, so that its (padding) output stays finite.
        mask_keys = key_padding_mask & ~key_padding_mask.all(dim=1, keepdim=True)
        bias = bias.masked_fill(mask_keys[:, None, None, :], float("-inf")).to(q.dtype)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, H, T, D/H]
        batch, _, length, _ = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer; with deep norm the residual branch is scaled by (2 * num_layers) ** 0.25."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = GatedRelativeSelfAttention(dim, cfg.encoder_attention_heads, cfg.num_buckets)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: Tensor, position_bias: Tensor, padding_mask: Tensor) -> Tensor:  # x: [B, T, D]
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, position_bias, padding_mask))
        return self.final_layer_norm(x * self.residual_scale + self.fc2(F.gelu(self.fc1(x))))


class TransformerEncoder(nn.Module):
    """Convolutional positional embedding, LayerNorm, then the layers sharing one relative position bias."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos), nn.GELU()
        )
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        for layer in self.layers[1:]:  # one table, registered under every layer's name as in the checkpoint
            layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """Shared relative position bias `[H, T, T]` from layer 0's table."""
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance).to(device)
        return self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:  # x: [B, T, D], padding_mask: [B, T]
        x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.layer_norm(x)
        position_bias = self.position_bias(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, position_bias, padding_mask)
        return x


class BEATs(nn.Module):
    """BEATs encoder: wave `[B, N]` at 16 kHz -> patch features `[B, P, D]` and their padding mask `[B, P]`.

    Patches are 16 x 16 tiles of the 128-bin fbank, time-major: patch j is time block j // 8, mel band j % 8.
    """

    def __init__(self, cfg: BEATsConfig | dict):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, BEATsConfig) else BEATsConfig.from_dict(cfg)
        self.cfg.check_supported()
        self.patch_size = self.cfg.input_patch_size
        embed_dim, encoder_dim = self.cfg.embed_dim, self.cfg.encoder_embed_dim
        self.patch_embedding = nn.Conv2d(
            1, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=self.cfg.conv_bias
        )
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.post_extract_proj = nn.Linear(embed_dim, encoder_dim) if embed_dim != encoder_dim else nn.Identity()
        self.encoder = TransformerEncoder(self.cfg)
        self._init_encoder_weights()

    def _init_encoder_weights(self) -> None:
        """The original's random init: BERT-style N(0, 0.02) linears/embeddings, then deep-norm Xavier gains."""
        for module in self.encoder.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        self.encoder.pos_conv[0].reset_parameters()
        if self.cfg.deep_norm:
            beta = math.pow(8 * self.cfg.encoder_layers, -0.25)
            for layer in self.encoder.layers:
                attn = layer.self_attn
                for linear, gain in ((attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, beta),
                                     (attn.out_proj, beta), (layer.fc1, beta), (layer.fc2, beta)):
                    nn.init.xavier_normal_(linear.weight, gain=gain)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "BEATs":
        """Build from an official BEATs checkpoint; every weight must be present with the right shape."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(checkpoint["cfg"])
        model.load_checkpoint_state_dict(checkpoint["model"], source=str(path))
        return model

    def load_checkpoint_state_dict(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        """Strict load under the original names, skipping only `IGNORED_CHECKPOINT_PREFIXES`.

        Raises naming the key on a missing, unexpected or wrongly shaped weight, and when the per-layer aliases
        of the shared relative position table disagree.
        """
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"BEATs weights in {source} do not match the model: missing {missing}, unexpected {unexpected}"
            )
        for key, tensor in expected.items():
            if state_dict[key].shape != tensor.shape:
                raise ValueError(
                    f"BEATs weight {key} in {source} has shape {tuple(state_dict[key].shape)}, "
                    f"the model expects {tuple(tensor.shape)}"
                )
        self._check_shared_table_aliases(state_dict, source)
        self.load_state_dict(state_dict, strict=True)

    def _check_shared_table_aliases(self, state_dict: dict[str, Tensor], source: str) -> None:
        """All `layers.{i}.self_attn.relative_attention_bias.weight` keys name one tensor; refuse differing copies."""
        name = "encoder.layers.{}.self_attn.relative_attention_bias.weight"
        table = state_dict[name.format(0)]
        for i in range(1, self.cfg.encoder_layers):
            if not torch.equal(state_dict[name.format(i)], table):
                raise ValueError(f"BEATs weight {name.format(i)} in {source} differs from {name.format(0)} (shared)")

    def patch_padding_mask(self, padding_mask: Tensor, num_patches: int) -> Tensor:
        """Exact patch mask `[B, P]` from a right-padded sample mask `[B, N]`: True for patches the row lacks alone.

        A row with n real samples has its own 1 + (n - 400) // 160 fbank frames and whole 16-frame time blocks of
        them; every patch of a later time block is padding. Those computed from real frames only are exactly the
        patches the clip gets when run unpadded.
        """
        real_samples = (~padding_mask).sum(dim=1)  # [B]
        frames = torch.where(
            real_samples >= FRAME_LENGTH_SAMPLES,
            1 + (real_samples - FRAME_LENGTH_SAMPLES) // FRAME_SHIFT_SAMPLES,
            torch.zeros_like(real_samples),
        )
        time_blocks = frames // self.patch_size  # [B]
        mel_bands = NUM_MEL_BINS // self.patch_size
        patch_time_block = torch.arange(num_patches, device=padding_mask.device) // mel_bands  # [P]
        return patch_time_block[None, :] >= time_blocks[:, None]

    def normalized_fbank(self, wav: Tensor) -> Tensor:
        """BEATs' input: Kaldi fbank of the int16-scaled wave, standardised with the original's (2 x std)."""
        wav = wav.to(torch.promote_types(wav.dtype, torch.float32))  # float64 stays float64, like the original
        features = fbank(wav * 2**15, num_mel_bins=NUM_MEL_BINS, sample_frequency=SAMPLE_RATE)  # [B, F, 128]
        return (features - FBANK_MEAN) / (2 * FBANK_STD)

    def forward(self, wav: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Features `[B, P, D]` of `wav [B, N]` (16 kHz, right-padded; `padding_mask [B, N]`, True = padding).

        Returns also the patch padding mask `[B, P]` (True = padding). Padded patches are zeroed before the
        positional convolution and never attended to, so a row's real patches equal those of the row run alone.
        """
        if num_frames(wav.shape[1], FRAME_LENGTH_SAMPLES, FRAME_SHIFT_SAMPLES) < self.patch_size:
            raise ValueError(f"BEATs needs at least {self.patch_size} fbank frames, got {wav.shape[1]} samples")
        features = self.normalized_fbank(wav).to(self.patch_embedding.weight.dtype)
        patches = self.patch_embedding(features.unsqueeze(1))  # [B, E, F // 16, 8]
        patches = patches.flatten(2).transpose(1, 2)  # [B, P, E], time-major
        patches = self.post_extract_proj(self.layer_norm(patches))  # [B, P, D]
        if padding_mask is None:
            patch_mask = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
        else:
            patch_mask = self.patch_padding_mask(padding_mask, patches.shape[1])
        return self.encoder(patches, patch_mask), patch_mask


def random_beats_checkpoint(cfg: dict, seed: int) -> dict:
    """A BEATs checkpoint as Microsoft's fine-tuned files hold it: the full cfg, the encoder weights under the
    original names (weight-norm `weight_g`/`weight_v`, the relative-position table shared by every layer) plus
    the AudioSet head SALMONN skips, and the head's label names (random weights: the tiny default and the
    real-shape benchmark artifacts)."""
    torch.manual_seed(seed)
    beats = BEATs(cfg)
    cfg = dataclasses.asdict(beats.cfg)
    head = torch.nn.Linear(cfg["encoder_embed_dim"], cfg["predictor_class"])
    state = {**beats.state_dict(), **{f"predictor.{k}": v for k, v in head.state_dict().items()}}
    labels = {i: f"/m/tiny{i:03d}" for i in range(cfg["predictor_class"])}
    return {"cfg": cfg, "model": state, "label_dict": labels}
