"""models/fbank.py against kaldi-native-fbank (independent, 80 bins) and the original's BEATs fbank (128 bins)."""

import math

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.fbank import fbank

PARITY = "tests/parity"


def tones_and_noise(num_samples: int, seed: int) -> np.ndarray:
    """Tones plus noise at int16 scale, like real speech-band audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    wave = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * (300 + 2000 * t) * t)
    return (wave + 0.02 * rng.standard_normal(num_samples)) * 32768


def kaldi_reference(wave: np.ndarray, num_mel_bins: int) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = num_mel_bins
    extractor = knf.OnlineFbank(opts)
    extractor.accept_waveform(16000, wave.astype(np.float32).tolist())
    extractor.input_finished()
    return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])


@pytest.mark.parametrize("num_samples", [400, 559, 560, 16000, 33333])
def test_matches_kaldi_native_fbank_at_80_bins(num_samples: int) -> None:
    wave = tones_and_noise(num_samples, seed=num_samples)
    ours = fbank(torch.from_numpy(wave)[None], num_mel_bins=80)[0].numpy()
    reference = kaldi_reference(wave, 80)
    assert ours.shape == reference.shape == (1 + (num_samples - 400) // 160, 80)
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)  # the reference computes in float32


def test_matches_original_beats_fbank() -> None:
    raw_wav = load_file(f"{PARITY}/inputs.safetensors")["raw_wav_pcm16"].double() / 32768
    expected = load_file(f"{PARITY}/outputs.safetensors")["beats.fbank"]
    ours = fbank(raw_wav * 2**15)
    assert ours.dtype == torch.float64
    normalised = ((ours - 15.41663) / (2 * 6.55582)).float()
    torch.testing.assert_close(normalised, expected, atol=1e-4, rtol=0)
    assert torch.all(ours[..., 3] == math.log(torch.finfo(torch.float32).eps))  # the empty 128-bin filter


def test_rows_are_independent_of_batch_padding() -> None:
    short, long = torch.from_numpy(tones_and_noise(5000, 1)), torch.from_numpy(tones_and_noise(9000, 2))
    batch = torch.stack([torch.cat([short, torch.zeros(4000, dtype=short.dtype)]), long]).float()
    batched, alone = fbank(batch), fbank(short.float()[None])
    assert batched.dtype == torch.float32 and batched.shape == (2, 54, 128)
    torch.testing.assert_close(batched[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-6)


def test_shorter_than_one_frame_gives_no_frames() -> None:
    assert fbank(torch.zeros(3, 399)).shape == (3, 0, 128)
