"""Log-mel features, SpecAugment, speed perturbation."""

import random

import pytest
import torch

from asr.data.features import FeatureConfig, LogMel, SpecAugment, random_speed, speed_perturb

SR = 16000


def _noise_tone(samples: int, freq: float = 440.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SR
    return 0.3 * torch.sin(2 * torch.pi * freq * t) + 0.05 * torch.randn(samples, generator=g)


def test_config_rates():
    cfg = FeatureConfig()
    assert (cfg.hop_length, cfg.win_length, cfg.frames_per_second) == (160, 400, 100.0)
    assert cfg.to_dict()["n_mels"] == 80
    assert FeatureConfig(n_mels=40).to_dict()["n_mels"] == 40


@pytest.mark.parametrize("samples", [16000, 16001, 12345, 400, 159])
@pytest.mark.parametrize("n_mels", [80, 40])
def test_logmel_shape_matches_num_frames(samples, n_mels):
    cfg = FeatureConfig(n_mels=n_mels)
    feats = LogMel(cfg)(_noise_tone(samples))
    assert feats.shape == (cfg.num_frames(samples), n_mels)
    assert feats.dtype == torch.float32 and feats.is_contiguous()
    assert torch.isfinite(feats).all()


def test_logmel_is_normalised_per_utterance():
    logmel = LogMel()
    for scale in (1.0, 0.01):  # the level of the recording does not matter after normalisation
        feats = logmel(scale * _noise_tone(2 * SR))
        assert feats.mean(dim=0).abs().max() < 1e-4
        assert (feats.std(dim=0) - 1).abs().max() < 1e-3
    # Gain is a constant offset in the log domain, so normalisation removes it (up to the log floor).
    quiet, loud = logmel(0.1 * _noise_tone(SR)), logmel(_noise_tone(SR))
    assert (quiet - loud).abs().median() < 0.01


def test_logmel_of_silence_and_single_frame_is_finite():
    logmel = LogMel()
    assert torch.isfinite(logmel(torch.zeros(SR))).all()
    one = logmel(torch.zeros(100))
    assert one.shape == (1, 80) and torch.isfinite(one).all()


def test_logmel_tone_lights_its_mel_band():
    feats_low, feats_high = LogMel()(_noise_tone(SR, 300.0)), LogMel()(_noise_tone(SR, 3000.0))
    assert feats_low.mean(0).argmax() < feats_high.mean(0).argmax()


def test_specaugment_masks_whole_bands_and_keeps_shape():
    torch.manual_seed(0)
    feats = torch.randn(300, 80) + 5.0  # no zeros before masking
    original = feats.clone()
    out = SpecAugment()(feats)
    assert out.shape == feats.shape and out.dtype == feats.dtype
    assert torch.equal(feats, original), "input is not modified in place"
    zero = out == 0
    assert zero.any(), "something is masked"
    masked_rows = zero.all(dim=1)  # time frames masked across every channel
    masked_cols = zero.all(dim=0)  # channels masked across every frame
    # every zero lies in a whole masked frame or a whole masked channel; everything else is untouched
    assert torch.equal(zero, masked_rows[:, None] | masked_cols[None, :])
    assert torch.equal(out[~zero], feats[~zero])
    assert masked_rows.sum() <= 2 * 30  # two time masks of at most 10% of 300 frames
    assert masked_cols.sum() <= 2 * 15


def test_specaugment_masks_something_over_seeds():
    masked = 0
    for seed in range(10):
        torch.manual_seed(seed)
        masked += int((SpecAugment()(torch.ones(200, 80)) == 0).any())
    assert masked >= 9


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_changes_length_and_pitch_by_the_factor(factor):
    wave = _noise_tone(SR, 500.0)
    out = speed_perturb(wave, factor)
    assert abs(out.numel() - SR / factor) <= 1
    spectrum = torch.fft.rfft(out * torch.hann_window(out.numel())).abs()
    assert float(spectrum.argmax()) * SR / out.numel() == pytest.approx(500.0 * factor, abs=5.0)


def test_speed_perturb_identity_and_random_speed():
    wave = _noise_tone(1000)
    assert speed_perturb(wave, 1.0) is wave
    picks = [random_speed(random.Random(s)) for s in range(50)]
    assert set(picks) == {0.9, 1.0, 1.1}
    assert [random_speed(random.Random(s)) for s in range(50)] == picks
