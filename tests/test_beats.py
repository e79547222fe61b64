"""models/beats.py against the original BEATs outputs in tests/parity (tiny checkpoint, fp32)."""

from collections.abc import Callable
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from models.beats import BEATs

PARITY = Path("tests/parity")
CLIP0_PATCHES = 248  # clip0 alone: 508 fbank frames -> 31 time blocks x 8 mel bands


@pytest.fixture(scope="module")
def model() -> BEATs:
    return BEATs.from_checkpoint(PARITY / "beats.pt").eval()


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(PARITY / "outputs.safetensors")


@pytest.fixture(scope="module")
def batched(model: BEATs) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = load_file(PARITY / "inputs.safetensors")
    raw_wav = inputs["raw_wav_pcm16"].double() / 32768
    with torch.no_grad():
        return model(raw_wav, inputs["padding_mask"])


def run_alone(model: BEATs, wav_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    wave, rate = sf.read(PARITY / wav_name, dtype="float64")
    assert rate == 16000
    with torch.no_grad():
        return model(torch.from_numpy(wave)[None])


@pytest.mark.parametrize("clip, wav_name", [(0, "clip0_5.1s.wav"), (1, "clip1_21.7s.wav")])
def test_single_clip_matches_original(model: BEATs, expected: dict, clip: int, wav_name: str) -> None:
    features, mask = run_alone(model, wav_name)
    torch.testing.assert_close(features, expected[f"beats.single.clip{clip}.features"], atol=1e-4, rtol=1e-4)
    assert not mask.any()


def test_unpadded_row_of_batch_matches_original(batched: tuple, expected: dict) -> None:
    features, mask = batched
    torch.testing.assert_close(features[1], expected["beats.features"][1], atol=1e-4, rtol=1e-4)
    assert not mask[1].any()


def test_padded_row_equals_the_clip_alone(model: BEATs, batched: tuple, expected: dict) -> None:
    features, mask = batched
    assert mask.shape == (2, 1080)
    assert not mask[0, :CLIP0_PATCHES].any() and mask[0, CLIP0_PATCHES:].all()
    torch.testing.assert_close(features[0, :CLIP0_PATCHES], expected["beats.single.clip0.features"][0],
                               atol=1e-4, rtol=1e-4)
    assert torch.isfinite(features).all()


def test_encoder_with_original_patch_mask_reproduces_original_batch(model: BEATs, expected: dict) -> None:
    """Masking semantics (zeroing before pos_conv, key masking) are the original's: fed the original's
    approximate patch mask, the encoder reproduces its batched clip0 row as well."""
    inputs = load_file(PARITY / "inputs.safetensors")
    wav = inputs["raw_wav_pcm16"].double() / 32768
    with torch.no_grad():
        patches = model.patch_embedding(model.normalized_fbank(wav).float().unsqueeze(1)).flatten(2).transpose(1, 2)
        features = model.encoder(model.post_extract_proj(model.layer_norm(patches)), expected["beats.padding_mask"])
    torch.testing.assert_close(features, expected["beats.features"], atol=1e-4, rtol=1e-4)


def write_checkpoint(tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the parity checkpoint with its state dict edited in place by `edit`."""
    checkpoint = torch.load(PARITY / "beats.pt", map_location="cpu", weights_only=True)
    edit(checkpoint["model"])
    path = tmp_path / "edited.pt"
    torch.save(checkpoint, path)
    return path


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, lambda sd: sd.pop("encoder.layers.1.fc2.bias"))
    with pytest.raises(KeyError, match=r"missing \['encoder.layers.1.fc2.bias'\]"):
        BEATs.from_checkpoint(path)


def test_misnamed_key_is_named(tmp_path: Path) -> None:
    def rename(sd: dict) -> None:
        sd["encoder.layer_norm.gamma"] = sd.pop("encoder.layer_norm.weight")

    path = write_checkpoint(tmp_path, rename)
    expected = r"missing \['encoder.layer_norm.weight'\], unexpected \['encoder.layer_norm.gamma'\]"
    with pytest.raises(KeyError, match=expected):
        BEATs.from_checkpoint(path)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, lambda sd: sd.update({"post_extract_proj.bias": torch.zeros(47)}))
    with pytest.raises(ValueError, match=r"post_extract_proj.bias .* shape \(47,\).* \(48,\)"):
        BEATs.from_checkpoint(path)


def test_disagreeing_shared_table_alias_is_named(tmp_path: Path) -> None:
    key = "encoder.layers.2.self_attn.relative_attention_bias.weight"
    path = write_checkpoint(tmp_path, lambda sd: sd.update({key: sd[key] + 1}))
    with pytest.raises(ValueError, match=key):
        BEATs.from_checkpoint(path)


def test_random_init_from_small_cfg() -> None:
    torch.manual_seed(0)
    cfg = {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 4,
           "conv_pos": 8, "conv_pos_groups": 4, "embed_dim": 16}
    model = BEATs(cfg).eval()
    wav = 0.1 * torch.randn(2, 16000)
    padding_mask = torch.zeros(2, 16000, dtype=torch.bool)
    padding_mask[1, 6000:] = True
    with torch.no_grad():
        features, mask = model(wav, padding_mask)
    assert features.shape == (2, 48, 32) and mask.shape == (2, 48)  # 98 frames -> 6 time blocks x 8 bands
    assert torch.isfinite(features).all()
    assert mask.sum(dim=1).tolist() == [0, 48 - 16]  # 6000 samples -> 36 frames -> 2 time blocks


def test_unknown_cfg_key_is_named() -> None:
    with pytest.raises(ValueError, match="encoder_layerz"):
        BEATs({"encoder_layerz": 2})
