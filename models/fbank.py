"""Batched Kaldi-compatible log-mel filterbank in pure torch.

BEATs was trained on `torchaudio.compliance.kaldi.fbank` features. torchaudio cannot be installed here, and its
`fbank` takes one waveform at a time, so this module re-implements the same computation for a whole batch
`[B, N]` at once, on the input's device and in the input's dtype. Only the options BEATs uses are supported, with
torchaudio's defaults for everything else: dither 0, pre-emphasis 0.97, DC offset removed per frame, povey window,
FFT size rounded up to a power of two, snip_edges, power spectrum, mel bins from 20 Hz to Nyquist, no energy term,
natural log of max(mel energy, float32 eps).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
POVEY_EXPONENT = 0.85
# torchaudio floors the mel energies at float32 eps whatever the input dtype.
LOG_FLOOR = torch.finfo(torch.float32).eps


def num_frames(num_samples: int, window_size: int, window_shift: int) -> int:
    """Frames Kaldi produces with snip_edges=True: only whole windows, none if the signal is shorter than one."""
    if num_samples < window_size:
        return 0
    return 1 + (num_samples - window_size) // window_shift


def _mel(freq: Tensor | float) -> Tensor | float:
    """Kaldi's mel scale (natural log, 1127 factor)."""
    if isinstance(freq, Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def mel_filterbank(num_mel_bins: int, fft_size: int, sample_frequency: float) -> Tensor:
    """Triangular mel filters `[num_mel_bins, fft_size // 2 + 1]`, float32, built exactly as torchaudio builds them.

    Computed in float32 like torchaudio's `get_mel_banks`, so the weights match bit for bit. A filter narrower than
    one FFT bin (e.g. bin 3 of 128 at 16 kHz) is all zeros; its log energy is then log(eps). The Nyquist bin gets
    weight 0, as in Kaldi.
    """
    mel_low, mel_high = _mel(LOW_FREQ_HZ), _mel(sample_frequency / 2)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)
    bin_index = torch.arange(num_mel_bins).unsqueeze(1)  # [M, 1]
    left = mel_low + bin_index * mel_delta
    center = mel_low + (bin_index + 1.0) * mel_delta
    right = mel_low + (bin_index + 2.0) * mel_delta
    fft_bin_width = sample_frequency / fft_size
    fft_mel = _mel(fft_bin_width * torch.arange(fft_size // 2, dtype=torch.float32)).unsqueeze(0)  # [1, fft/2]
    up_slope = (fft_mel - left) / (center - left)
    down_slope = (right - fft_mel) / (right - center)
    filters = torch.clamp(torch.minimum(up_slope, down_slope), min=0.0)  # [M, fft/2]
    return F.pad(filters, (0, 1))  # [M, fft/2 + 1]


def povey_window(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Kaldi's povey window: a symmetric Hann window raised to 0.85 (reaches zero at both edges)."""
    return torch.hann_window(size, periodic=False, device=device, dtype=dtype).pow(POVEY_EXPONENT)


def _frames(waveform: Tensor, window_size: int, window_shift: int) -> Tensor:
    """Pre-processed frames `[B, F, window_size]`: DC offset removed, pre-emphasised, windowed."""
    frames = waveform.unfold(-1, window_size, window_shift)  # [B, F, W], a view
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi repeats the first sample
    frames = frames - PREEMPHASIS * previous
    return frames * povey_window(window_size, waveform.device, waveform.dtype)


def fbank(
    waveform: Tensor,
    num_mel_bins: int = 128,
    sample_frequency: float = 16000.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
) -> Tensor:
    """Log-mel filterbank of each row of `waveform [B, N]` -> `[B, frames, num_mel_bins]`, Kaldi/torchaudio style.

    `frame_length` and `frame_shift` are in milliseconds. The input is not rescaled: Kaldi expects int16-range
    samples, so BEATs passes `wav * 2**15`. Each frame depends only on its own samples, so a row's frames equal
    those of the same row computed alone, whatever the batch is padded to. Autocast is disabled inside: power
    spectra of int16-range audio overflow float16.
    """
    if waveform.dim() != 2:
        raise ValueError(f"fbank expects a [batch, samples] waveform, got shape {tuple(waveform.shape)}")
    window_size = int(sample_frequency * frame_length * 0.001)
    window_shift = int(sample_frequency * frame_shift * 0.001)
    fft_size = 1 << (window_size - 1).bit_length()  # next power of two
    batch, num_samples = waveform.shape
    if num_frames(num_samples, window_size, window_shift) == 0:
        return waveform.new_zeros(batch, 0, num_mel_bins)

    with torch.autocast(device_type=waveform.device.type, enabled=False):
        frames = _frames(waveform, window_size, window_shift)  # [B, F, W]
        frames = F.pad(frames, (0, fft_size - window_size))  # [B, F, fft]
        power = torch.fft.rfft(frames).abs().pow(2.0)  # [B, F, fft/2 + 1]
        filters = mel_filterbank(num_mel_bins, fft_size, sample_frequency).to(waveform.device, waveform.dtype)
        mel_energies = power @ filters.T  # [B, F, M]
        return mel_energies.clamp(min=LOG_FLOOR).log()
