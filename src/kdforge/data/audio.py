"""Audio front end in torch: STFT power spectrogram, mel filterbank, log-mel, and a deterministic
spectrogram augmentation.

``log_mel(waves, sample_rate)`` turns a batch of waveforms (B x L float) into log-mel
spectrograms B x n_mels x frames:

* STFT with ``torch.stft``: a periodic Hann window of ``n_fft`` samples, hop ``hop_length``,
  frames centred (the signal is zero-padded by ``n_fft // 2`` at both ends), power ``|X|^2``;
* a mel filterbank of triangular filters on the Slaney mel scale (linear below 1 kHz, 3 mels per
  200 Hz; logarithmic above, 27 mels per factor 6.4), each filter scaled to unit area
  (``2 / (f_high - f_low)``): Malcolm Slaney's Auditory Toolbox (1998) convention, which is also
  librosa's default (``htk=False, norm="slaney"``);
* decibels ``10 log10(max(S, amin))``, floored at ``top_db`` below each spectrogram's maximum.

With the same settings the values match ``librosa.feature.melspectrogram`` followed by
``librosa.power_to_db(S, ref=1.0)`` (tested on real recordings). torchaudio is not needed.

``SpectrogramAugmentation`` standardises spectrograms (N x 1 x mels x frames, float) and, for
training, shifts each one in time by up to ``time_shift`` frames (the vacated frames take the
spectrogram's floor) and masks ``time_mask`` frames and ``freq_mask`` mel bins at random
positions (SpecAugment, Park et al., Interspeech 2019), all keyed by (seed, epoch, sample index)
like the image augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdforge.core.errors import ConfigError
from kdforge.data.hashing import random_below, sample_keys

_SLANEY_LINEAR_STEP = 200.0 / 3.0  # Hz per mel below 1 kHz
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_LINEAR_STEP  # 15 mels
_SLANEY_LOG_STEP = math.log(6.4) / 27.0  # log-Hz per mel above 1 kHz

_SHIFT_STREAM = 10
_TIME_WIDTH_STREAM = 11
_TIME_START_STREAM = 12
_FREQ_WIDTH_STREAM = 13
_FREQ_START_STREAM = 14


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = hz.double()
    linear = hz / _SLANEY_LINEAR_STEP
    logarithmic = _SLANEY_BREAK_MEL + torch.log(hz.clamp_min(1e-12) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return torch.where(hz >= _SLANEY_BREAK_HZ, logarithmic, linear)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """The inverse of ``hz_to_mel``."""
    mel = mel.double()
    linear = mel * _SLANEY_LINEAR_STEP
    logarithmic = _SLANEY_BREAK_HZ * torch.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
    return torch.where(mel >= _SLANEY_BREAK_MEL, logarithmic, linear)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int = 40, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """n_mels x (n_fft // 2 + 1) triangular filters, unit area each (float32)."""
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ConfigError(f"mel filterbank: need 0 <= fmin < fmax <= sample_rate / 2, got {fmin}, {fmax}")
    bins = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    edges_mel = torch.linspace(float(hz_to_mel(torch.tensor(fmin))), float(hz_to_mel(torch.tensor(fmax))), n_mels + 2)
    edges = mel_to_hz(edges_mel)
    widths = edges[1:] - edges[:-1]
    rising = (bins[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / widths[1:, None]
    triangles = torch.minimum(rising, falling).clamp_min(0.0)
    area = 2.0 / (edges[2:] - edges[:-2])
    return (triangles * area[:, None]).to(torch.float32)


def power_spectrogram(waves: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """|STFT|^2 of B x L waveforms: B x (n_fft // 2 + 1) x frames (centred frames, zero padding)."""
    window = torch.hann_window(n_fft, periodic=True, dtype=waves.dtype, device=waves.device)
    spectrum = torch.stft(
        waves,
        n_fft,
        hop_length=hop_length,
        win_length=n_fft,
        window=window,
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    return spectrum.real.square() + spectrum.imag.square()


def power_to_db(power: torch.Tensor, amin: float = 1e-10, top_db: float | None = 80.0) -> torch.Tensor:
    """``10 log10(max(S, amin))``, floored at ``top_db`` below each item's maximum."""
    decibels = 10.0 * torch.log10(power.clamp_min(amin))
    if top_db is not None:
        peak = decibels.flatten(1).max(dim=1).values.view(-1, *([1] * (decibels.dim() - 1)))
        decibels = torch.maximum(decibels, peak - top_db)
    return decibels


def log_mel(
    waves: torch.Tensor,
    sample_rate: int,
    *,
    n_fft: int = 256,
    hop_length: int = 128,
    n_mels: int = 40,
    top_db: float | None = 80.0,
) -> torch.Tensor:
    """Log-mel spectrograms (dB) of B x L waveforms: B x n_mels x frames, float32."""
    if waves.dim() != 2:
        raise ConfigError(f"log_mel: expected waveforms B x L, got shape {tuple(waves.shape)}")
    power = power_spectrogram(waves.to(torch.float64), n_fft, hop_length)
    filters = mel_filterbank(sample_rate, n_fft, n_mels).to(torch.float64)
    return power_to_db(filters @ power, top_db=top_db).to(torch.float32)


def fix_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """A 1-D waveform centred in ``length`` samples: zero-padded both sides, or its middle kept."""
    if wave.shape[0] >= length:
        start = (wave.shape[0] - length) // 2
        return wave[start : start + length]
    before = (length - wave.shape[0]) // 2
    return torch.nn.functional.pad(wave, (before, length - wave.shape[0] - before))


@dataclass(frozen=True, kw_only=True)
class SpectrogramAugmentation:
    """``(x - mean) / std`` of float spectrograms B x 1 x mels x frames; for training, a random time
    shift (``time_shift`` frames at most, the vacated frames filled with the spectrogram's floor)
    and SpecAugment masks (up to ``time_mask`` frames and ``freq_mask`` mel bins set to the mean)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    time_shift: int = 0
    time_mask: int = 0
    freq_mask: int = 0

    def __post_init__(self) -> None:
        if min(self.time_shift, self.time_mask, self.freq_mask) < 0:
            raise ConfigError("spectrogram augmentation: time_shift, time_mask and freq_mask must be >= 0")
        if min(self.std) <= 0:
            raise ConfigError(f"std values must be positive, got {self.std}")

    @property
    def is_random(self) -> bool:
        return bool(self.time_shift or self.time_mask or self.freq_mask)

    def __call__(
        self, images: torch.Tensor, index: torch.Tensor, seed: int, epoch: int, train: bool = True
    ) -> torch.Tensor:
        if images.dim() != 4:
            raise ConfigError(f"spectrograms must be B x 1 x mels x frames, got {tuple(images.shape)}")
        values = images.to(torch.float32)
        if train and self.is_random:
            keys = sample_keys(index.to(values.device), seed, epoch)
            values = self._shift(values, keys)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=values.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=values.device).view(1, -1, 1, 1)
        values = (values - mean) / std
        if train and self.is_random:
            values = self._mask(values, keys)
        return values

    def _shift(self, values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if not self.time_shift:
            return values
        frames = values.shape[-1]
        shift = random_below(keys, _SHIFT_STREAM, 2 * self.time_shift + 1) - self.time_shift
        source = torch.arange(frames, device=values.device)[None, :] - shift[:, None]  # B x T
        inside = (source >= 0) & (source < frames)
        gathered = values.gather(3, source.clamp(0, frames - 1)[:, None, None, :].expand_as(values))
        floor = values.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
        return torch.where(inside[:, None, None, :], gathered, floor)

    def _mask(self, values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        mels, frames = values.shape[-2:]
        keep = torch.ones(values.shape[0], 1, mels, frames, dtype=torch.bool, device=values.device)
        for limit, size, width_stream, start_stream, axis in (
            (self.time_mask, frames, _TIME_WIDTH_STREAM, _TIME_START_STREAM, 3),
            (self.freq_mask, mels, _FREQ_WIDTH_STREAM, _FREQ_START_STREAM, 2),
        ):
            if not limit:
                continue
            width = random_below(keys, width_stream, min(limit, size) + 1)
            start = random_below(keys, start_stream, size) % (size - width + 1)
            positions = torch.arange(size, device=values.device)[None, :]
            masked = (positions >= start[:, None]) & (positions < (start + width)[:, None])  # B x size
            shape = (-1, 1, 1, size) if axis == 3 else (-1, 1, size, 1)
            keep = keep & ~masked.view(shape)
        return values * keep
