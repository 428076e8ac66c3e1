"""Signal augmentation: each transform measured on known signals (SNR, spectral slope, RT60, band edges,
quantisation error, gain, pitch, duration, VTLP's filterbank), the recipe config, and the Augmenter's
determinism and limits."""

from __future__ import annotations

import math
import random

import pytest
import torch

from asr.data.augment import (
    NOISE_COLORS, AugmentConfig, Augmenter, add_noise, babble_noise, codec, colored_noise, equalize,
    fast_fft_size, gain, mu_law, pitch_shift, quantize_factor, reverberate, room_impulse_response, speed,
    telephone, time_stretch, vtlp_fbanks, vtlp_log_mel, vtlp_warp,
)
from asr.data.features import FeatureConfig, LogMel
from asr.errors import UserError

SR = 16000
ALL_WAVE_TRANSFORMS = ("speed", "pitch", "reverb", "eq", "gain", "noise", "babble", "telephone", "codec")


# --- measuring helpers ---------------------------------------------------------------------------------

def _tone(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def _speechlike(seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A harmonic signal with a syllable-rate envelope plus a little noise, peak 0.5."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    harmonics = sum(torch.sin(2 * math.pi * 150 * k * t + k) / k for k in range(1, 12))
    x = harmonics * (0.6 + 0.4 * torch.sin(2 * math.pi * 4 * t))
    x = x + 0.05 * torch.randn(t.shape[0], generator=g)
    return 0.5 * x / x.abs().max()


def _db(ratio: float) -> float:
    return 10.0 * math.log10(ratio)


def _energy(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum())


def _snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    return _db(_energy(clean) / _energy(noisy.double() - clean.double()))


def _level_db(out: torch.Tensor, ref: torch.Tensor, trim: int = 3000) -> float:
    """Energy of `out` relative to `ref` in dB, both without `trim` samples at each end (filter transients)."""
    return _db(_energy(out[trim:-trim]) / _energy(ref[trim:-trim]))


def _peak_frequency(x: torch.Tensor, trim: int = 2000) -> float:
    """Frequency (Hz, 0.25 Hz resolution) of the largest peak of the Hann-windowed spectrum."""
    x = x[trim:-trim].double()
    spectrum = torch.fft.rfft(x * torch.hann_window(x.shape[0], dtype=torch.float64), n=4 * SR).abs()
    return float(spectrum.argmax()) * SR / (4 * SR)


def _welch_power(x: torch.Tensor, n_fft: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(freqs, mean power) over Hann-windowed half-overlapping frames."""
    spec = torch.stft(x.double(), n_fft, n_fft // 2, window=torch.hann_window(n_fft, dtype=torch.float64),
                      center=False, return_complex=True)  # (n_fft // 2 + 1, frames)
    return torch.fft.rfftfreq(n_fft, 1.0 / SR).double(), spec.abs().pow(2).mean(dim=1)


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of y against x."""
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def _rt60_schroeder(rir: torch.Tensor) -> float:
    """RT60 by Schroeder backward integration: the energy decay curve's slope fitted between -5 and
    -25 dB (T20), extrapolated to 60 dB."""
    energy = rir.double().pow(2)
    edc = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # energy remaining after each sample
    edc_db = 10 * torch.log10(edc / edc[0])
    fit = ((edc_db <= -5) & (edc_db >= -25)).nonzero().squeeze(1)
    assert fit.numel() > 10, "the decay curve does not span -5..-25 dB"
    return -60.0 / _slope(fit.double() / SR, edc_db[fit])


def _time_centroid(x: torch.Tensor) -> float:
    """Energy-weighted mean time, in samples."""
    e = x.double().pow(2)
    return float((torch.arange(x.shape[0], dtype=torch.float64) * e).sum() / e.sum())


def _burst(freq: float = 200.0, seconds: float = 1.0, start: float = 0.25, stop: float = 0.6) -> torch.Tensor:
    """A tone burst between `start` and `stop` seconds, with 10 ms ramps, in silence."""
    x = _tone(freq, seconds)
    t = torch.arange(x.shape[0]) / SR
    ramp = ((t - start) / 0.01).clamp(0, 1) * ((stop - t) / 0.01).clamp(0, 1)
    return x * ramp


# --- noise ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("color", list(NOISE_COLORS))
@pytest.mark.parametrize("snr_db", [0.0, 12.5, 30.0])
def test_colored_noise_is_added_at_the_target_snr(color, snr_db):
    clean = _speechlike()
    noise = colored_noise(clean.shape[0], color, SR, torch.Generator().manual_seed(1))
    assert noise.shape == clean.shape and torch.isfinite(noise).all()
    noisy = add_noise(clean, noise, snr_db)
    assert abs(_snr_db(clean, noisy) - snr_db) < 0.1


@pytest.mark.parametrize("color,expected", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_noise_spectral_slope(color, expected):
    noise = colored_noise(2 * SR + 7, color, SR, torch.Generator().manual_seed(2))  # an awkward length on purpose
    assert noise.shape == (2 * SR + 7,)
    assert abs(float(noise.mean())) < 0.05 * float(noise.std())  # zero mean: no DC
    freqs, power = _welch_power(noise)
    band = (freqs >= 50) & (freqs <= 7000)
    slope = _slope(torch.log10(freqs[band]), torch.log10(power[band]))
    assert abs(slope - expected) < 0.3, f"{color}: log-power slope {slope:.2f}, expected {expected}"


def test_noise_differs_per_seed_and_repeats_per_seed():
    a = colored_noise(SR, "pink", SR, torch.Generator().manual_seed(3))
    b = colored_noise(SR, "pink", SR, torch.Generator().manual_seed(3))
    c = colored_noise(SR, "pink", SR, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("snr_db", [5.0, 20.0])
def test_babble_is_added_at_the_target_snr(snr_db):
    clean = _speechlike(1.0, seed=0)
    # talkers longer and shorter than the utterance (a short one repeats), one of them silent
    talkers = [_speechlike(s, seed=k + 1) * (k + 1) for k, s in enumerate((1.5, 0.4, 2.0, 1.0))] + [torch.zeros(SR)]
    mix = babble_noise(talkers, clean.shape[0], offsets=[100, 0, 8000, 0, 0])
    assert mix.shape == clean.shape and float(mix.abs().max()) > 0
    noisy = add_noise(clean, mix, snr_db)
    assert abs(_snr_db(clean, noisy) - snr_db) < 0.1


def test_babble_weights_every_talker_equally_and_reads_from_the_offset():
    loud, quiet = _speechlike(1.0, seed=1), 0.01 * _speechlike(1.0, seed=2)
    one = babble_noise([loud], SR, [0])
    assert abs(float(one.pow(2).mean().sqrt()) - 1.0) < 1e-4  # scaled to RMS 1, whatever its level
    pair = babble_noise([loud, quiet], SR, [0, 0])
    assert torch.allclose(pair - one, babble_noise([quiet], SR, [0]), atol=1e-5)  # the quiet talker counts as much
    shifted = babble_noise([loud], SR // 2, [1000])
    assert torch.allclose(shifted, one[1000:1000 + SR // 2], atol=1e-6)
    short = babble_noise([loud[:4000]], 10000, [0])  # a short talker repeats
    assert torch.allclose(short[4000:8000], short[:4000])
    assert torch.equal(babble_noise([torch.zeros(SR)], SR, [0]), torch.zeros(SR))


def test_add_noise_to_silence_leaves_it_silent():
    silence = torch.zeros(SR)
    assert torch.equal(add_noise(silence, torch.randn(SR), 10.0), silence)


# --- reverberation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rt60", [0.1, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("drr_db", [0.0, 8.0])
def test_rir_rt60_measured_by_schroeder_integration(rt60, drr_db):
    for seed in range(3):
        rir = room_impulse_response(rt60, drr_db, SR, torch.Generator().manual_seed(seed))
        assert rir.shape == (math.ceil(rt60 * SR),) and rir.dtype == torch.float32
        measured = _rt60_schroeder(rir)
        assert abs(measured / rt60 - 1) < 0.13, f"target {rt60} s, measured {measured:.3f} s"
        assert float(rir[0]) == 1.0 and int(rir.abs().argmax()) == 0  # the direct path leads
        assert abs(_db(1.0 / _energy(rir[1:])) - drr_db) < 0.01  # direct / reverberant energy


def test_reverb_keeps_length_alignment_and_rms():
    rir = room_impulse_response(0.5, 3.0, SR, torch.Generator().manual_seed(0))
    for position in (0, 3000):
        impulse = torch.zeros(SR + 123)
        impulse[position] = 0.5
        out = reverberate(impulse, rir)
        assert out.shape == impulse.shape
        assert abs(int(out.abs().argmax()) - position) <= 2
    clean = _speechlike()
    wet = reverberate(clean, rir)
    assert wet.shape == clean.shape
    assert abs(float(wet.pow(2).mean()) / float(clean.pow(2).mean()) - 1) < 1e-3
    assert _snr_db(clean, wet) < 10  # it did smear the signal
    # the tail is there: energy after a burst ends grows with RT60
    burst = _burst(stop=0.5)
    short = reverberate(burst, room_impulse_response(0.2, 0.0, SR, torch.Generator().manual_seed(1)))
    long = reverberate(burst, room_impulse_response(0.8, 0.0, SR, torch.Generator().manual_seed(1)))
    assert _energy(long[int(0.6 * SR):]) > 5 * _energy(short[int(0.6 * SR):])


def test_fast_fft_size():
    for n in (1, 7, 94399, 160001):
        m = fast_fft_size(n)
        assert m >= n
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        assert k == 1
        assert all(fast_fft_size(j) == m for j in range(n, m + 1))  # none smaller in between
    assert fast_fft_size(94399) < 1.05 * 94399


# --- telephone and codec -------------------------------------------------------------------------------

def test_telephone_band_edges():
    for freq, check in ((1000.0, lambda db: db >= -3), (2000.0, lambda db: db >= -3),
                        (100.0, lambda db: db <= -20), (6000.0, lambda db: db <= -20)):
        tone = _tone(freq, 1.0)
        out = telephone(tone, SR)
        assert out.shape == tone.shape
        db = _level_db(out, tone)
        assert check(db), f"{freq} Hz: {db:.1f} dB"
    odd = _speechlike(0.77)
    assert telephone(odd, SR).shape == odd.shape


def test_telephone_does_not_clip_a_full_scale_signal():
    loud = _tone(1000.0, 1.0, amplitude=1.0)
    out = telephone(loud, SR)
    assert float(out.abs().max()) > 0.95  # unclipped, not scaled down
    assert abs(_level_db(out, loud)) < 0.5


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_mu_law_round_trip_error_is_bounded_and_nonzero(bits):
    x = torch.linspace(-1, 1, 200001)  # finer than the smallest code step, so every code is hit
    mu = (1 << bits) - 1
    y = mu_law(x, bits)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.unique(y).numel() == 1 << bits  # exactly 2^bits output levels
    err = (y - x).abs()
    # half a code step in the companded domain (1 / mu), through the slope of the expander at |x|
    half_step = math.log1p(mu) * (1 + mu * x.abs()) / mu / mu
    ratio = err / half_step
    assert float(ratio.max()) <= math.exp(math.log1p(mu) / mu)  # the slope grows by at most this within a step
    assert 0.4 < float(ratio.mean()) < 0.6  # rounding: uniform in [0, half a step], not finer and not coarser
    assert float(y.abs().max()) <= 1.0


def test_mu_law_distortion_grows_at_low_depth_and_low_level():
    loud = _speechlike(1.0)  # peak 0.5
    quiet = 0.003 * loud / 0.5
    snr = {(bits, name): _snr_db(x, mu_law(x, bits))
           for bits in (4, 6, 8) for name, x in (("loud", loud), ("quiet", quiet))}
    for name in ("loud", "quiet"):
        assert snr[(8, name)] - snr[(6, name)] > 9  # about 6 dB per bit
        assert snr[(6, name)] - snr[(4, name)] > 6
    for bits in (4, 6, 8):
        assert snr[(bits, "quiet")] < snr[(bits, "loud")] - 3  # the quiet signal suffers more


def test_narrowband_codec_band_limits_and_keeps_length():
    x = _tone(1000.0) + _tone(6000.0)
    wide, narrow = codec(x, 8, narrowband=False), codec(x, 8, narrowband=True)
    assert wide.shape == narrow.shape == x.shape
    hf = _tone(6000.0)
    assert _level_db(codec(hf, 8, narrowband=True), hf) < -20
    assert _level_db(codec(hf, 8, narrowband=False), hf) > -1
    assert _snr_db(_tone(1000.0), codec(_tone(1000.0), 8, narrowband=True)) > 20


# --- gain and EQ ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gain_db", [-12.0, -3.0, 4.5])
def test_gain_scales_rms_by_the_db_value(gain_db):
    x = _speechlike()
    ratio_db = 20 * math.log10(float(gain(x, gain_db).pow(2).mean().sqrt()) / float(x.pow(2).mean().sqrt()))
    assert abs(ratio_db - gain_db) < 1e-3


@pytest.mark.parametrize("gain_db", [6.0, -9.0])
def test_peaking_eq_changes_the_tone_at_its_centre_only(gain_db):
    at_centre, far = _tone(1000.0), _tone(6000.0)
    band = [(1000.0, gain_db, 1.0)]
    assert abs(_level_db(equalize(at_centre, band, SR), at_centre) - gain_db) < 0.3
    assert abs(_level_db(equalize(far, band, SR), far)) < 1.0


def test_peaking_eq_bandwidth_follows_q():
    off_centre = _tone(1500.0)
    wide = _level_db(equalize(off_centre, [(1000.0, 6.0, 1.0)], SR), off_centre)
    narrow = _level_db(equalize(off_centre, [(1000.0, 6.0, 4.0)], SR), off_centre)
    assert 2.5 < wide < 4.5 and narrow < 1.0  # Q 1: an octave-and-a-half wide; Q 4: a third of an octave


def test_eq_does_not_clip_a_boosted_loud_tone():
    loud = _tone(1000.0, amplitude=0.9)
    out = equalize(loud, [(1000.0, 10.0, 2.0), (3000.0, 4.0, 1.0)], SR)
    assert float(out.abs().max()) > 1.5  # ~0.9 x 10^(10/20): torchaudio's [-1, 1] clamp was kept out of the way
    assert equalize(loud, [], SR) is loud


# --- pitch and speed -----------------------------------------------------------------------------------

@pytest.mark.parametrize("semitones", [2.0, -3.0, 7.0, -7.0])
def test_pitch_shift_moves_the_frequency_and_keeps_the_duration(semitones):
    tone = _tone(200.0)
    out = pitch_shift(tone, semitones, SR)
    assert out.shape == tone.shape and torch.isfinite(out).all()
    expected = 200.0 * 2 ** (semitones / 12)
    assert abs(_peak_frequency(out) / expected - 1) < 0.02
    # closer still to the ratio actually used (2^(semitones/12) rounded to RESAMPLE_STEP)
    assert abs(_peak_frequency(out) / (200.0 * quantize_factor(2 ** (semitones / 12))) - 1) < 0.003
    burst = _burst(200.0)  # where its energy lies in time does not move
    shifted = pitch_shift(burst, semitones, SR)
    assert abs(_time_centroid(shifted) - _time_centroid(burst)) < 0.01 * burst.shape[0]
    assert abs(_level_db(shifted, burst, trim=1)) < 0.5  # nor its level (a phase vocoder loses up to 10 dB here)


def test_pitch_shift_of_zero_is_the_input_and_a_tiny_clip_keeps_its_length():
    tone = _tone(200.0)
    assert pitch_shift(tone, 0.0, SR) is tone
    tiny = pitch_shift(tone[:300], 2.0, SR)
    assert tiny.shape == (300,) and torch.isfinite(tiny).all()


@pytest.mark.parametrize("stretch", [0.8, 1.25])
def test_time_stretch_changes_duration_not_pitch_or_level(stretch):
    burst = _burst(250.0, seconds=1.0, start=0.3, stop=0.6)
    length = int(round(burst.shape[0] * stretch))
    out = time_stretch(burst, length, SR)
    assert out.shape == (length,)
    assert abs(_time_centroid(out) / stretch - _time_centroid(burst)) < 0.01 * burst.shape[0]
    assert abs(_level_db(out, burst, trim=1) - 10 * math.log10(stretch)) < 0.5  # same loudness for longer or shorter
    assert abs(_peak_frequency(out, trim=1) / 250.0 - 1) < 0.003
    steady = time_stretch(_tone(250.0), length, SR)[500:-500]  # overlap-add in phase: no dips in the envelope
    frames = steady[: steady.shape[0] // 160 * 160].reshape(-1, 160).pow(2).mean(1).sqrt()  # (frames,) 10 ms RMS
    assert float(frames.min()) > 0.9 * float(frames.max())


@pytest.mark.parametrize("factor", [0.9, 1.1, 1.037])
def test_speed_scales_duration_by_one_over_factor(factor):
    burst = _burst(300.0)
    out = speed(burst, factor, SR)
    used = quantize_factor(factor)
    assert abs(used - factor) <= 0.0025
    assert abs(out.shape[0] - burst.shape[0] / used) <= 2
    assert abs(_time_centroid(out) - _time_centroid(burst) / used) < 0.005 * burst.shape[0]
    assert abs(_peak_frequency(speed(_tone(300.0), factor, SR)) / (300.0 * used) - 1) < 0.01  # pitch moves with it


# --- VTLP ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [FeatureConfig(), FeatureConfig(n_mels=40, n_fft=400)])
def test_vtlp_at_alpha_one_is_logmel(config):
    logmel = LogMel(config)
    assert torch.allclose(vtlp_fbanks(config, 1.0), logmel.mel.mel_scale.fb, atol=1e-6, rtol=0)
    for samples in (SR, 12345, 100):
        wave = _speechlike(samples / SR)
        expected = logmel.log_mel(wave)
        for warped in (vtlp_log_mel(logmel, wave, 1.0), vtlp_log_mel(config, wave, 1.0)):
            assert warped.shape == expected.shape
            assert float((warped - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("alpha", [0.8, 0.9, 1.1, 1.25])
def test_vtlp_filterbank_shape_and_weights(alpha):
    config = FeatureConfig()
    fb = vtlp_fbanks(config, alpha)
    assert fb.shape == (config.n_fft // 2 + 1, config.n_mels)
    assert bool((fb >= 0).all()) and bool((fb <= 1).all())
    assert not torch.allclose(fb, vtlp_fbanks(config, 1.0))
    assert int((fb.sum(0) > 0).sum()) >= config.n_mels - 3  # channels keep some bins


def test_vtlp_warp_is_continuous_monotonic_and_keeps_nyquist():
    freqs = torch.linspace(0, SR / 2, 4001, dtype=torch.float64)
    for alpha in (0.8, 0.9, 1.1, 1.2):
        warped = vtlp_warp(freqs, alpha, SR)
        assert float(warped[0]) == 0.0 and abs(float(warped[-1]) - SR / 2) < 1e-6
        steps = warped[1:] - warped[:-1]
        assert bool((steps > 0).all()) and float(steps.max()) < 1.5 * float(freqs[1] - freqs[0])  # no jump
        assert abs(float(vtlp_warp(torch.tensor([1000.0], dtype=torch.float64), alpha, SR)) - 1000 * alpha) < 1e-9


def test_vtlp_moves_a_tones_mel_energy_with_alpha():
    logmel = LogMel()
    tone = _tone(1000.0)
    channels = torch.arange(80, dtype=torch.float64)

    def centroid(alpha: float) -> float:
        energy = vtlp_log_mel(logmel, tone, alpha).double().exp().mean(0)  # (n_mels,) mean mel power
        return float((channels * energy).sum() / energy.sum())

    assert centroid(0.9) < centroid(1.0) - 1 and centroid(1.1) > centroid(1.0) + 1
    for alpha in (0.9, 1.1):  # the warped 1 kHz tone lights the channel a 1000 alpha Hz tone lights unwarped
        warped_peak = int(vtlp_log_mel(logmel, tone, alpha).mean(0).argmax())
        assert abs(warped_peak - int(logmel.log_mel(_tone(1000.0 * alpha)).mean(0).argmax())) <= 1


# --- config --------------------------------------------------------------------------------------------

def test_default_config_disables_everything():
    config = AugmentConfig()
    assert not config.enabled
    assert all(sub["p"] == 0.0 for sub in config.to_dict().values())
    assert AugmentConfig.from_dict(None) == AugmentConfig.from_dict({}) == config
    assert set(config.to_dict()) == set(ALL_WAVE_TRANSFORMS) | {"vtlp"}


def test_config_from_recipe_dict_and_round_trip():
    recipe = {"noise": {"p": 0.5, "snr_db": [0, 30], "colors": ["pink", "brown"]}, "reverb": {"p": 0.3},
              "codec": {"p": 1, "bits": [8, 8.0], "narrowband_p": 0}, "gain": {"p": 0.2, "gain_db": 3},
              "telephone": None, "vtlp": {"p": 0.4, "alpha": [0.95, 1.05]}}
    config = AugmentConfig.from_dict(recipe)
    assert config.enabled
    assert config.noise.p == 0.5 and config.noise.snr_db == (0.0, 30.0) and config.noise.colors == ("pink", "brown")
    assert config.reverb.p == 0.3 and config.reverb.rt60_s == (0.1, 0.9)  # the default range
    assert config.codec.bits == (8, 8) and isinstance(config.codec.bits[0], int)
    assert config.gain.gain_db == (3.0, 3.0)  # one number is a fixed value
    assert config.telephone.p == 0.0 and config.eq.p == 0.0
    d = config.to_dict()
    assert d["noise"]["snr_db"] == [0.0, 30.0] and d["noise"]["colors"] == ["pink", "brown"]
    assert AugmentConfig.from_dict(d) == config
    assert AugmentConfig.from_dict(AugmentConfig().to_dict()) == AugmentConfig()


@pytest.mark.parametrize("recipe,names", [
    ({"nosie": {"p": 0.5}}, ["nosie", "augment"]),
    ({"noise": {"p": 0.5, "snr": [0, 30]}}, ["augment.noise", "snr"]),
    ({"noise": {"p": 1.5}}, ["augment.noise.p", "1.5"]),
    ({"reverb": {"p": -0.1}}, ["augment.reverb.p"]),
    ({"reverb": {"p": 0.3, "rt60_s": [0.9, 0.1]}}, ["augment.reverb.rt60_s", "0.9"]),
    ({"noise": {"p": 0.5, "snr_db": [0, 30, 40]}}, ["augment.noise.snr_db"]),
    ({"noise": {"p": 0.5, "snr_db": "loud"}}, ["augment.noise.snr_db", "loud"]),
    ({"noise": {"p": "often"}}, ["augment.noise.p", "often"]),
    ({"noise": {"p": True}}, ["augment.noise.p"]),
    ({"noise": {"p": float("nan")}}, ["augment.noise.p"]),
    ({"noise": {"colors": ["white", "purple"]}}, ["augment.noise.colors", "purple"]),
    ({"noise": {"colors": []}}, ["augment.noise.colors"]),
    ({"codec": {"bits": [6.5, 8]}}, ["augment.codec.bits", "6.5"]),
    ({"codec": {"bits": [1, 8]}}, ["augment.codec.bits"]),
    ({"speed": {"factor": [0.1, 1.1]}}, ["augment.speed.factor"]),
    ({"eq": {"freq_hz": [100, 9000]}}, ["augment.eq.freq_hz"]),
    ({"telephone": {"low_hz": 3000, "high_hz": 2000}}, ["augment.telephone.low_hz", "high_hz"]),
    ({"vtlp": [0.9, 1.1]}, ["augment.vtlp"]),
    ({"babble": {"talkers": [0, 3]}}, ["augment.babble.talkers"]),
])
def test_config_errors_name_the_key(recipe, names):
    with pytest.raises(UserError) as err:
        AugmentConfig.from_dict(recipe)
    for name in names:
        assert name in str(err.value), str(err.value)


def test_config_must_be_a_mapping():
    with pytest.raises(UserError, match="augment"):
        AugmentConfig.from_dict(["noise"])


# --- the augmenter -------------------------------------------------------------------------------------

def _everything(p: float = 1.0) -> AugmentConfig:
    return AugmentConfig.from_dict({name: {"p": p} for name in (*ALL_WAVE_TRANSFORMS, "vtlp")})


def _others() -> list[torch.Tensor]:
    return [_speechlike(s, seed=10 + k) for k, s in enumerate((0.5, 1.2, 2.0, 0.8))]


def test_augmenter_same_seed_same_output_other_seed_differs():
    augmenter = Augmenter(_everything(), babble_source=_others())
    wave = _speechlike(1.0)
    a, applied_a = augmenter.wave(wave, random.Random(7))
    b, applied_b = augmenter.wave(wave, random.Random(7))
    c, _ = augmenter.wave(wave, random.Random(8))
    assert torch.equal(a, b) and applied_a == applied_b
    assert a.shape != c.shape or not torch.equal(a, c)
    names = [name for name, _ in applied_a if name in ALL_WAVE_TRANSFORMS]
    assert names == list(ALL_WAVE_TRANSFORMS)  # every transform at p = 1, in the documented order
    assert augmenter.vtlp_factor(random.Random(3)) == augmenter.vtlp_factor(random.Random(3))


def test_augmenter_with_nothing_enabled_returns_the_input():
    wave = _speechlike(1.0)
    for config in (AugmentConfig(), _everything(0.0)):
        augmenter = Augmenter(config)
        for seed in range(5):
            out, applied = augmenter.wave(wave, random.Random(seed))
            assert out is wave and applied == []
            assert augmenter.vtlp_factor(random.Random(seed)) is None


def test_augmenter_probabilities_are_honoured():
    augmenter = Augmenter(AugmentConfig.from_dict({"gain": {"p": 0.3}, "vtlp": {"p": 0.6, "alpha": [0.9, 1.1]}}))
    wave = _speechlike(0.2)
    gains = sum(bool(augmenter.wave(wave, random.Random(seed))[1]) for seed in range(400))
    factors = [augmenter.vtlp_factor(random.Random(seed)) for seed in range(400)]
    drawn = [f for f in factors if f is not None]
    assert 0.22 < gains / 400 < 0.38 and 0.52 < len(drawn) / 400 < 0.68
    assert all(0.9 <= f <= 1.1 for f in drawn) and max(drawn) - min(drawn) > 0.15


def test_augmenter_output_is_finite_and_within_full_scale():
    config = AugmentConfig.from_dict({name: {"p": 0.7} for name in ALL_WAVE_TRANSFORMS} | {
        "gain": {"p": 1.0, "gain_db": [6, 12]}, "eq": {"p": 0.7, "gain_db": [6, 12]}})
    augmenter = Augmenter(config, babble_source=lambda rng: _others()[rng.randrange(4)])
    loud = _speechlike(1.0) * 2.0  # peak 1.0
    limited = 0
    for seed in range(12):
        out, applied = augmenter.wave(loud, random.Random(seed))
        assert torch.isfinite(out).all() and out.dtype == torch.float32
        assert float(out.abs().max()) <= 1.0 and float(out.abs().max()) > 0.1
        limited += any(name == "limit" for name, _ in applied)
    assert limited >= 1  # some outputs of the mix went over full scale and were brought back
    # gain alone at +6..12 dB on a full-scale signal: every output is limited, to a peak of exactly 1
    only_gain = Augmenter(AugmentConfig.from_dict({"gain": {"p": 1.0, "gain_db": [6, 12]}}))
    for seed in range(12):
        out, applied = only_gain.wave(loud, random.Random(seed))
        assert [name for name, _ in applied] == ["gain", "limit"]
        assert float(out.abs().max()) == pytest.approx(1.0, abs=1e-6)


def test_augmenter_keeps_silence_finite():
    augmenter = Augmenter(_everything(), babble_source=_others())
    out, _ = augmenter.wave(torch.zeros(SR), random.Random(0))
    assert torch.isfinite(out).all() and float(out.abs().max()) <= 1.0


@pytest.mark.parametrize("broken", [lambda w, g: w * float("nan"), lambda w, g: w * 0.0])
def test_augmenter_falls_back_to_the_input_when_a_result_is_unusable(monkeypatch, broken):
    import asr.data.augment as augment

    monkeypatch.setattr(augment, "gain", broken)  # a transform that returns NaN, or silence
    wave = _speechlike(0.5)
    out, applied = Augmenter(AugmentConfig.from_dict({"gain": {"p": 1.0}})).wave(wave, random.Random(0))
    assert torch.equal(out, wave)
    assert [name for name, _ in applied] == ["gain", "reverted"]


def test_augmenter_needs_a_babble_source():
    with pytest.raises(UserError, match="babble"):
        Augmenter(AugmentConfig.from_dict({"babble": {"p": 0.5}}))
