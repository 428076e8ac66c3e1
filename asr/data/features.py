"""Log-mel features, per-utterance or global normalisation, SpecAugment and speed perturbation.

Per-utterance normalisation (the default) needs the whole utterance; a stream cannot have it. Global
normalisation uses each channel's mean and standard deviation over the training set
(global_statistics), saved in the feature config and so in the checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch import nn

from asr.data.audio import SAMPLE_RATE

LOG_FLOOR = 1e-6  # added to mel power before the log, so silence stays finite
NORMALIZATIONS = ("utterance", "global")
STD_FLOOR = 1e-5  # added to the standard deviation before dividing
GLOBAL_STATISTICS_UTTERANCES = 1000  # training utterances (evenly spread) the global statistics are computed on


@dataclass(frozen=True)
class FeatureConfig:
    n_mels: int = 80  # mel filterbank channels
    win_ms: float = 25.0  # analysis window
    hop_ms: float = 10.0  # frame shift: 100 frames per second
    n_fft: int = 512  # FFT size (>= window length in samples)
    sample_rate: int = SAMPLE_RATE
    normalization: str = "utterance"  # one of NORMALIZATIONS
    mean: tuple[float, ...] | None = None  # per channel, over the training set ("global" only)
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        from asr.errors import UserError

        if self.normalization not in NORMALIZATIONS:
            raise UserError(f"feature normalization {self.normalization!r}: expected one of {NORMALIZATIONS}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))  # a checkpoint may hold a list
                if len(getattr(self, name)) != self.n_mels:
                    raise UserError(f"feature {name}: {len(value)} values for {self.n_mels} mel channels")
        if self.normalization == "global" and (self.mean is None or self.std is None):
            raise UserError("global feature normalization needs the training set's mean and std")

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
    """(num_samples,) waveform -> (T, n_mels) log-mel features, each channel normalised to mean 0 / std 1
    per utterance, or with the training set's statistics (config.normalization "global")."""

    def __init__(self, config: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.config = config
        self.mel = AT.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, win_length=config.win_length,
            hop_length=config.hop_length, n_mels=config.n_mels, power=2.0,
        )

    @torch.no_grad()
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(num_samples,) -> (T, n_mels) log-mel, not normalised."""
        samples = wave.shape[-1]
        min_samples = self.config.n_fft // 2 + 1  # centred frames reflect-pad n_fft/2 samples each side
        if samples < min_samples:  # a clip shorter than that (~16 ms) is zero-extended, frame count kept
            wave = nn.functional.pad(wave, (0, min_samples - samples))
        mel = self.mel(wave)[:, : self.config.num_frames(samples)]  # (n_mels, T)
        return torch.log(mel + LOG_FLOOR).transpose(0, 1)  # (n_mels, T) -> (T, n_mels)

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        """(T, n_mels) log-mel -> normalised as the config says."""
        if self.config.normalization == "global":
            mean = torch.tensor(self.config.mean, dtype=feats.dtype)
            std = torch.tensor(self.config.std, dtype=feats.dtype)
        else:
            mean = feats.mean(dim=0, keepdim=True)
            std = feats.std(dim=0, keepdim=True) if feats.shape[0] > 1 else torch.ones_like(mean)
        return ((feats - mean) / (std + STD_FLOOR)).contiguous()

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.log_mel(wave))


def global_statistics(paths: Sequence[str], config: FeatureConfig,
                      max_utterances: int = GLOBAL_STATISTICS_UTTERANCES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the log-mel frames of (at most max_utterances, evenly
    spread, of) `paths`: a training split's audio. Unreadable files are left out."""
    from asr.data.audio import load_audio
    from asr.errors import AudioError, UserError

    paths = list(paths)
    if len(paths) > max_utterances:
        paths = [paths[i * len(paths) // max_utterances] for i in range(max_utterances)]
    logmel = LogMel(config)
    total = torch.zeros(config.n_mels, dtype=torch.float64)
    squares = torch.zeros(config.n_mels, dtype=torch.float64)
    frames = 0
    for path in paths:
        try:
            feats = logmel.log_mel(load_audio(path, config.sample_rate)).double()  # (T, n_mels)
        except AudioError:
            continue
        total += feats.sum(0)
        squares += feats.pow(2).sum(0)
        frames += feats.shape[0]
    if frames < 2:
        raise UserError("global feature statistics: no training audio could be read")
    mean = total / frames
    std = (squares / frames - mean.pow(2)).clamp(min=0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


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
