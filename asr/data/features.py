"""Log-mel features, per-utterance normalisation, SpecAugment and speed perturbation."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch import nn

from asr.data.audio import SAMPLE_RATE

LOG_FLOOR = 1e-6  # added to mel power before the log, so silence stays finite


@dataclass(frozen=True)
class FeatureConfig:
    n_mels: int = 80  # mel filterbank channels
    win_ms: float = 25.0  # analysis window
    hop_ms: float = 10.0  # frame shift: 100 frames per second
    n_fft: int = 512  # FFT size (>= window length in samples)
    sample_rate: int = SAMPLE_RATE

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1  # centred frames, as torchaudio computes them

    def to_dict(self) -> dict:
        return asdict(self)


class LogMel(nn.Module):
    """(num_samples,) waveform -> (T, n_mels) log-mel features, each channel mean 0 / std 1 per utterance."""

    def __init__(self, config: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.config = config
        self.mel = AT.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, win_length=config.win_length,
            hop_length=config.hop_length, n_mels=config.n_mels, power=2.0,
        )

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        samples = wave.shape[-1]
        min_samples = self.config.n_fft // 2 + 1  # centred frames reflect-pad n_fft/2 samples each side
        if samples < min_samples:  # a clip shorter than that (~16 ms) is zero-extended, frame count kept
            wave = nn.functional.pad(wave, (0, min_samples - samples))
        mel = self.mel(wave)[:, : self.config.num_frames(samples)]  # (n_mels, T)
        feats = torch.log(mel + LOG_FLOOR).transpose(0, 1)  # (n_mels, T) -> (T, n_mels)
        mean = feats.mean(dim=0, keepdim=True)
        std = feats.std(dim=0, keepdim=True) if feats.shape[0] > 1 else torch.ones_like(mean)
        return ((feats - mean) / (std + 1e-5)).contiguous()


class SpecAugment(nn.Module):
    """Frequency and time masking (torchaudio's transforms) on (T, F) features; masked values are 0 (the mean)."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 15, time_masks: int = 2, time_width: int = 40,
                 max_time_fraction: float = 0.1):
        super().__init__()
        self.freq = nn.ModuleList(AT.FrequencyMasking(freq_width) for _ in range(freq_masks))
        self.time = nn.ModuleList(AT.TimeMasking(time_width, p=max_time_fraction) for _ in range(time_masks))

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        spec = feats.transpose(0, 1).unsqueeze(0)  # (1, F, T): torchaudio's layout
        for mask in [*self.freq, *self.time]:
            spec = mask(spec, mask_value=0.0)
        return spec.squeeze(0).transpose(0, 1).contiguous()


def speed_perturb(wave: torch.Tensor, factor: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Play `wave` `factor` times faster (pitch moves with it, as in Kaldi's speed perturbation)."""
    if factor == 1.0:
        return wave
    return AF.resample(wave, int(round(sample_rate * factor)), sample_rate)


def random_speed(rng: random.Random, factors=(0.9, 1.0, 1.1)) -> float:
    return rng.choice(factors)
