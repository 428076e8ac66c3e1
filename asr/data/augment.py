"""On-the-fly signal augmentation of training waveforms (1-D float32, 16 kHz, values in about [-1, 1]).

Every transform is a pure function of (wave, parameters), so it can be called with exact values; the
`Augmenter` draws the parameters from a `random.Random` and applies the enabled transforms in a fixed
order. What each does, and the torchaudio op behind it:

    speed      play faster/slower, pitch moving with it: asr.data.features.speed_perturb (AF.resample).
    pitch      shift the pitch, keep the duration: resample by the pitch ratio (speed_perturb), then
               stretch back to the input's length with time_stretch, a WSOLA (waveform-similarity
               overlap-add) written here. AF.pitch_shift is not used: it resamples at the exact ratio,
               whose sinc kernel is huge for most ratios (~13 s for a 5 s utterance on one core). Its
               stretch, AF.phase_vocoder, is not used either: stretching, it loses the phase coherence
               between the bins of a partial after silence (a 200 Hz tone burst shifted +5 semitones
               came out 10 dB quieter) and costs ~17 ms per 5 s; WSOLA keeps the level within ~0.3 dB
               at ~7 ms. The ratio is rounded to RESAMPLE_STEP (0.09 semitone near 0), which keeps the
               resampling kernel small.
    reverb     convolve with a synthetic room impulse response (room_impulse_response: a direct-path
               impulse at sample 0, a few sparse early reflections and exponentially decaying Gaussian
               noise whose decay reaches -60 dB at the target RT60, scaled to a direct-to-reverberant
               ratio) by AF.fftconvolve; the output keeps the input's length, aligned with the direct
               path, and its RMS.
    eq         a few peaking filters at random centre frequency / gain / Q: AF.equalizer_biquad.
    gain       a level change in dB: AF.gain.
    noise      white, pink (1/f) or brown (1/f^2) noise, shaped in the frequency domain (torch.fft),
               added at a target SNR by AF.add_noise.
    babble     the sum of several other utterances (each at equal RMS), added at a target SNR by
               AF.add_noise. The other utterances come from the `babble_source` given to the Augmenter.
    telephone  8 kHz round trip (AF.resample) with a 4th-order band-pass between TELEPHONE_LOW_HZ and
               TELEPHONE_HIGH_HZ (two AF.highpass_biquad and two AF.lowpass_biquad, run at 8 kHz).
    codec      mu-law companding at a quantisation depth in bits (AF.mu_law_encoding /
               AF.mu_law_decoding), optionally at 8 kHz (a G.711-like telephone line).
    vtlp       vocal-tract-length perturbation in the feature domain: the mel filterbank's frequency
               axis warped by a factor alpha with the piecewise-linear warp of Jaitly & Hinton (2013)
               (vtlp_fbanks, shaped as AF.melscale_fbanks; vtlp_log_mel computes warped log-mel
               features, equal to LogMel.log_mel at alpha == 1).

Use in a dataset (the rng is seeded per (seed, epoch, utterance index), so the same utterance of the same
epoch is augmented the same way on every run)::

    augmenter = Augmenter(AugmentConfig.from_dict(recipe["data"]["augment"]), babble_source=other_waves)
    rng = random.Random((seed * 1_000_003 + epoch) * 10_000_019 + index)
    wave, applied = augmenter.wave(wave, rng)
    alpha = augmenter.vtlp_factor(rng)
    feats = logmel(wave) if alpha is None else logmel.normalize(vtlp_log_mel(logmel, wave, alpha))

The noise and the impulse responses come from torch.Generators seeded from that rng, so the rng alone
fixes the output. Augmenter.wave limits the result to a peak of PEAK_LIMIT (rescaling, not clipping) and
falls back to the input if a result is not finite or is all zeros.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar, Union

import numpy as np
import torch
import torchaudio.functional as AF

from asr.data.audio import SAMPLE_RATE
from asr.data.features import LOG_FLOOR, FeatureConfig, LogMel, speed_perturb
from asr.errors import UserError, check_range

# --- constants -----------------------------------------------------------------------------------------

PEAK_LIMIT = 1.0  # full scale: Augmenter.wave rescales a result whose peak exceeds it
RESAMPLE_STEP = 0.005  # speed and pitch ratios are rounded to multiples of this: rates k x 80 Hz to 16 kHz,
#                        so AF.resample's kernel is at most 200 x ~430 taps (for ratios up to 2)
WSOLA_WINDOW_MS = 32.0  # ms: time_stretch's overlap-add segments (Hann, half-overlapping)
WSOLA_TOLERANCE_MS = 8.0  # ms: how far a segment may move from its nominal place to match the waveform
#                           (half the period of a 62.5 Hz voice)
RT60_DECAY_DB = 60.0  # dB: the decay that defines RT60
RIR_LENGTH_RT60 = 1.0  # impulse response length, in RT60s: the tail ends 60 dB below its start
RIR_REFLECTIONS = 6  # sparse early reflections per impulse response
RIR_REFLECTION_MS = (1.0, 20.0)  # ms after the direct path: where the early reflections fall
RIR_REFLECTION_GAIN = 1.0  # reflection amplitude, in multiples of the tail's amplitude envelope
NOISE_COLORS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # name -> exponent b of the power spectrum 1/f^b
NOISE_FLAT_BELOW_HZ = 20.0  # Hz: coloured noise is flat below this, so brown noise is not all DC rumble
TELEPHONE_RATE = 8000  # Hz: narrowband sample rate
TELEPHONE_LOW_HZ = 300.0  # Hz: default telephone band edges
TELEPHONE_HIGH_HZ = 3400.0  # Hz
VTLP_BOUNDARY_HZ = 4800.0  # Hz at 16 kHz (scaled with the sample rate): F_hi of the VTLP warp, where
#                            the linear part of the warp ends and the part that maps Nyquist to itself begins
FILTER_HEADROOM = 2.0  # torchaudio's biquads clamp to [-1, 1]: filter inputs are scaled to a peak of
#                        1 / (FILTER_HEADROOM x filter gain) and back, so nothing is clipped

# --- configuration -------------------------------------------------------------------------------------

# Field checks, per sub-config: ("p",) a probability; ("range", low, high, integer) a [lo, hi] pair within
# [low, high]; ("number", low, high) one number; ("choices", names) a non-empty subset of names.
_Check = tuple


@dataclass(frozen=True)
class _Transform:
    p: float = 0.0  # probability of applying the transform to an utterance (0 disables it)

    NAME: ClassVar[str] = ""
    CHECKS: ClassVar[dict[str, _Check]] = {}

    def __post_init__(self):
        prefix = f"data.augment.{self.NAME}"
        for f in fields(self):
            check = ("p",) if f.name == "p" else self.CHECKS[f.name]
            object.__setattr__(self, f.name, _checked(f"{prefix}.{f.name}", getattr(self, f.name), check))

    @classmethod
    def from_dict(cls, d) -> _Transform:
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise UserError(f"data.augment.{cls.NAME}: expected a mapping of fields, got {d!r}")
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise UserError(f"data.augment.{cls.NAME}: unknown field {key!r} (expected one of {', '.join(names)})")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def _number(name: str, value, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} {value!r}: expected a number")
    if integer:
        if value != value or value in (float("inf"), float("-inf")) or float(value) != int(value):
            raise UserError(f"{name} {value!r}: expected a whole number")
        return int(value)
    return float(value)


def _checked(name: str, value, check: _Check):
    """`value` in its canonical form (floats, tuples), or a UserError naming `name`."""
    kind = check[0]
    if kind == "p":
        value = _number(name, value)
        check_range(name, value, 0.0, 1.0)
        return value
    if kind == "number":
        value = _number(name, value)
        check_range(name, value, check[1], check[2])
        return value
    if kind == "range":
        low, high, integer = check[1:]
        pair = (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UserError(f"{name} {value!r}: expected [low, high] or one number")
        lo, hi = (_number(name, v, integer) for v in pair)
        check_range(f"{name} low", lo, low, high)
        check_range(f"{name} high", hi, low, high)
        if lo > hi:
            raise UserError(f"{name} {list(pair)!r}: low {lo} is above high {hi}")
        return (lo, hi)
    if kind == "choices":
        names = check[1]
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise UserError(f"{name} {value!r}: expected a non-empty list of {', '.join(names)}")
        for item in items:
            if item not in names:
                raise UserError(f"{name}: unknown {item!r} (expected one of {', '.join(names)})")
        if len(set(items)) != len(items):
            raise UserError(f"{name} {list(items)!r}: repeated entries")
        return tuple(items)
    raise AssertionError(kind)


@dataclass(frozen=True)
class SpeedConfig(_Transform):
    factor: tuple[float, float] = (0.9, 1.1)  # playback rate (1 = unchanged), uniform, rounded to RESAMPLE_STEP

    NAME: ClassVar[str] = "speed"
    CHECKS: ClassVar[dict[str, _Check]] = {"factor": ("range", 0.5, 2.0, False)}


@dataclass(frozen=True)
class PitchConfig(_Transform):
    semitones: tuple[float, float] = (-2.0, 2.0)  # semitones of pitch shift, uniform

    NAME: ClassVar[str] = "pitch"
    CHECKS: ClassVar[dict[str, _Check]] = {"semitones": ("range", -12.0, 12.0, False)}


@dataclass(frozen=True)
class ReverbConfig(_Transform):
    rt60_s: tuple[float, float] = (0.1, 0.9)  # seconds for the reverberant tail to decay by 60 dB, uniform
    drr_db: tuple[float, float] = (0.0, 10.0)  # dB, direct-path to reverberant energy ratio, uniform

    NAME: ClassVar[str] = "reverb"
    CHECKS: ClassVar[dict[str, _Check]] = {"rt60_s": ("range", 0.05, 3.0, False),
                                           "drr_db": ("range", -20.0, 40.0, False)}


@dataclass(frozen=True)
class EqConfig(_Transform):
    bands: tuple[int, int] = (1, 3)  # number of peaking filters, uniform integer
    freq_hz: tuple[float, float] = (100.0, 6000.0)  # Hz, centre frequency, log-uniform
    gain_db: tuple[float, float] = (-8.0, 8.0)  # dB at the centre frequency, uniform
    q: tuple[float, float] = (0.7, 3.0)  # quality factor (centre frequency / bandwidth), log-uniform

    NAME: ClassVar[str] = "eq"
    CHECKS: ClassVar[dict[str, _Check]] = {"bands": ("range", 1, 10, True),
                                           "freq_hz": ("range", 20.0, 0.45 * SAMPLE_RATE, False),
                                           "gain_db": ("range", -24.0, 24.0, False),
                                           "q": ("range", 0.1, 20.0, False)}


@dataclass(frozen=True)
class GainConfig(_Transform):
    gain_db: tuple[float, float] = (-6.0, 6.0)  # dB level change, uniform

    NAME: ClassVar[str] = "gain"
    CHECKS: ClassVar[dict[str, _Check]] = {"gain_db": ("range", -40.0, 40.0, False)}


@dataclass(frozen=True)
class NoiseConfig(_Transform):
    snr_db: tuple[float, float] = (0.0, 30.0)  # dB, speech-to-noise energy ratio, uniform
    colors: tuple[str, ...] = ("white", "pink", "brown")  # noise spectra to choose from, uniformly

    NAME: ClassVar[str] = "noise"
    CHECKS: ClassVar[dict[str, _Check]] = {"snr_db": ("range", -10.0, 60.0, False),
                                           "colors": ("choices", tuple(NOISE_COLORS))}


@dataclass(frozen=True)
class BabbleConfig(_Transform):
    snr_db: tuple[float, float] = (5.0, 30.0)  # dB, speech-to-babble energy ratio, uniform
    talkers: tuple[int, int] = (3, 7)  # other utterances summed, uniform integer

    NAME: ClassVar[str] = "babble"
    CHECKS: ClassVar[dict[str, _Check]] = {"snr_db": ("range", -10.0, 60.0, False),
                                           "talkers": ("range", 1, 20, True)}


@dataclass(frozen=True)
class TelephoneConfig(_Transform):
    low_hz: float = TELEPHONE_LOW_HZ  # Hz, lower band edge (-6 dB there: two 2nd-order high-pass stages)
    high_hz: float = TELEPHONE_HIGH_HZ  # Hz, upper band edge (-6 dB or so), below 4 kHz

    NAME: ClassVar[str] = "telephone"
    CHECKS: ClassVar[dict[str, _Check]] = {"low_hz": ("number", 20.0, 3900.0),
                                           "high_hz": ("number", 20.0, 3900.0)}

    def __post_init__(self):
        super().__post_init__()
        if self.low_hz >= self.high_hz:
            raise UserError(f"data.augment.telephone.low_hz {self.low_hz}: must be below high_hz {self.high_hz}")


@dataclass(frozen=True)
class CodecConfig(_Transform):
    bits: tuple[int, int] = (6, 8)  # mu-law quantisation depth in bits (2^bits levels), uniform integer
    narrowband_p: float = 0.5  # probability that the codec runs at 8 kHz (resampled down and back up)

    NAME: ClassVar[str] = "codec"
    CHECKS: ClassVar[dict[str, _Check]] = {"bits": ("range", 2, 16, True), "narrowband_p": ("p",)}


@dataclass(frozen=True)
class VtlpConfig(_Transform):
    alpha: tuple[float, float] = (0.9, 1.1)  # frequency warp factor (1 = none), uniform

    NAME: ClassVar[str] = "vtlp"
    CHECKS: ClassVar[dict[str, _Check]] = {"alpha": ("range", 0.7, 1.4, False)}


_TRANSFORMS = {cls.NAME: cls for cls in (SpeedConfig, PitchConfig, ReverbConfig, EqConfig, GainConfig, NoiseConfig,
                                          BabbleConfig, TelephoneConfig, CodecConfig, VtlpConfig)}


@dataclass(frozen=True)
class AugmentConfig:
    """One sub-config per transform, in the order Augmenter.wave applies them (vtlp is in the feature
    domain). Every probability defaults to 0: an empty config augments nothing."""

    speed: SpeedConfig = field(default_factory=SpeedConfig)
    pitch: PitchConfig = field(default_factory=PitchConfig)
    reverb: ReverbConfig = field(default_factory=ReverbConfig)
    eq: EqConfig = field(default_factory=EqConfig)
    gain: GainConfig = field(default_factory=GainConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    babble: BabbleConfig = field(default_factory=BabbleConfig)
    telephone: TelephoneConfig = field(default_factory=TelephoneConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    vtlp: VtlpConfig = field(default_factory=VtlpConfig)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> AugmentConfig:
        """From a recipe's nested mapping, e.g. {"noise": {"p": 0.5, "snr_db": [0, 30]}, "reverb": {"p": 0.3}}.
        Transforms and fields left out keep their defaults; a range may be given as one number."""
        if d is None:
            return cls()
        if isinstance(d, AugmentConfig):
            return d
        if not isinstance(d, Mapping):
            raise UserError(f"data.augment: expected a mapping of transforms, got {d!r}")
        for key in d:
            if key not in _TRANSFORMS:
                raise UserError(f"data.augment: unknown transform {key!r} (expected one of {', '.join(_TRANSFORMS)})")
        return cls(**{key: _TRANSFORMS[key].from_dict(value) for key, value in d.items()})

    def to_dict(self) -> dict:
        return {name: getattr(self, name).to_dict() for name in _TRANSFORMS}

    @property
    def enabled(self) -> bool:
        """Whether any transform (wave or feature domain) can apply."""
        return any(getattr(self, name).p > 0 for name in _TRANSFORMS)


# --- helpers -------------------------------------------------------------------------------------------

def _five_smooth(limit: int) -> list[int]:
    values = []
    p2 = 1
    while p2 <= limit:
        p3 = p2
        while p3 <= limit:
            p5 = p3
            while p5 <= limit:
                values.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(values)


_FAST_FFT_SIZES = _five_smooth(1 << 26)  # 2^a 3^b 5^c: sizes pocketfft transforms fastest


def fast_fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (an FFT of a prime size is several times slower)."""
    i = bisect.bisect_left(_FAST_FFT_SIZES, n)
    return _FAST_FFT_SIZES[i] if i < len(_FAST_FFT_SIZES) else 1 << (n - 1).bit_length()


def _fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-extend the end of `wave` to `length` samples."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))


def _rms(wave: torch.Tensor) -> float:
    return float(wave.double().pow(2).mean().sqrt()) if wave.numel() else 0.0


def _peak(wave: torch.Tensor) -> float:
    return float(wave.abs().max()) if wave.numel() else 0.0


def _unclamped(filter_fn: Callable[[torch.Tensor], torch.Tensor], wave: torch.Tensor, gain: float) -> torch.Tensor:
    """filter_fn(wave) for a linear filter built of torchaudio biquads (which clamp their output to
    [-1, 1]), computed on a scaled-down copy so that no sample reaches the clamp, then scaled back.
    `gain` bounds the filter's amplitude gain."""
    scale = _peak(wave) * gain * FILTER_HEADROOM
    if scale == 0.0:
        return filter_fn(wave)
    return filter_fn(wave / scale) * scale


def quantize_factor(factor: float) -> float:
    """`factor` rounded to a multiple of RESAMPLE_STEP, so that resampling by it uses a small kernel."""
    return round(factor / RESAMPLE_STEP) * RESAMPLE_STEP


# --- wave-domain transforms ----------------------------------------------------------------------------

def speed(wave: torch.Tensor, factor: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Play `factor` times faster (rounded to RESAMPLE_STEP): duration / factor, pitch x factor."""
    return speed_perturb(wave, quantize_factor(factor), sample_rate)


def time_stretch(wave: torch.Tensor, length: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """`wave` played in `length` samples at the same pitch, by WSOLA (Verhelst & Roelands 1993): output
    segment k (WSOLA_WINDOW_MS, Hann, hop half of it) starts at output sample (k - 1) hop and is read from
    the input near (k - 1) hop x len(wave) / length,
    moved by up to WSOLA_TOLERANCE_MS to where the input best matches (cross-correlation) the natural
    continuation of segment k - 1, so that overlapping segments add in phase. A wave (or result) shorter
    than one segment is linearly interpolated instead."""
    n = wave.shape[-1]
    win = 2 * int(round(WSOLA_WINDOW_MS * sample_rate / 2000))
    hop, tol = win // 2, int(round(WSOLA_TOLERANCE_MS * sample_rate / 1000))
    if length == n or n == 0:
        return _fit_length(wave, length)
    if n <= win or length <= win:  # too short to overlap-add: linear interpolation
        stretched = torch.nn.functional.interpolate(wave[None, None], size=length, mode="linear")  # (1, 1, length)
        return stretched[0, 0]
    rate = n / length  # input samples per output sample
    frames = -(-length // hop) + 1  # output segment k starts at output sample (k - 1) hop
    pad = tol + win + int(math.ceil(hop * rate))  # room for segment 0, which starts before the input
    padded = torch.nn.functional.pad(wave, (pad, pad + int(math.ceil(frames * hop * rate)) + win))
    x = padded.float().numpy()
    starts = [pad - int(round(hop * rate))]  # input position of each segment, in padded samples
    for k in range(1, frames):
        nominal = pad + int(round((k - 1) * hop * rate))
        follow = starts[-1] + hop  # where segment k - 1 would naturally continue
        corr = np.correlate(x[nominal - tol : nominal + tol + win], x[follow : follow + win], "valid")  # (2 tol + 1,)
        starts.append(nominal - tol + int(np.argmax(corr)))
    index = torch.tensor(starts)[:, None] + torch.arange(win)  # (frames, win) input sample of each segment sample
    segments = padded[index] * torch.hann_window(win, dtype=wave.dtype)  # (frames, win); Hann at hop win/2 sums to 1
    # overlap-add: output block k - 1 (hop samples, from segment k's start) is the first half of segment k
    # plus the second half of segment k - 1
    blocks = segments[1:, :hop] + segments[:-1, hop:]  # (frames - 1, hop)
    return blocks.reshape(-1)[:length]  # (frames - 1, hop) -> ((frames - 1) hop,) -> (length,)


def pitch_shift(wave: torch.Tensor, semitones: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Shift the pitch by `semitones` (the ratio 2^(semitones/12) rounded to RESAMPLE_STEP), keeping the
    length: speed_perturb by the ratio (pitch and speed change), then time_stretch back to the input's
    length."""
    factor = quantize_factor(2.0 ** (semitones / 12.0))
    if factor == 1.0 or wave.shape[-1] < 2:
        return wave
    return time_stretch(speed_perturb(wave, factor, sample_rate), wave.shape[-1], sample_rate)


def room_impulse_response(rt60_s: float, drr_db: float = 5.0, sample_rate: int = SAMPLE_RATE,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """A synthetic room impulse response, (RIR_LENGTH_RT60 x rt60_s x sample_rate,) float32.

    Sample 0 is the direct path (amplitude 1). After it, Gaussian noise under the amplitude envelope
    exp(-t ln(10^3) / rt60_s) (energy down 60 dB at t = rt60_s) plus RIR_REFLECTIONS sparse early
    reflections (random sign, RIR_REFLECTION_GAIN x the envelope, RIR_REFLECTION_MS after the direct
    path); the reverberant part is scaled so that direct / reverberant energy is `drr_db`."""
    length = max(2, int(math.ceil(RIR_LENGTH_RT60 * rt60_s * sample_rate)))
    t = torch.arange(length, dtype=torch.float64) / sample_rate  # seconds
    envelope = torch.exp(-t * (RT60_DECAY_DB / 20.0 * math.log(10.0)) / rt60_s)
    reverberant = torch.randn(length, generator=generator, dtype=torch.float64) * envelope
    first, last = (max(1, int(ms * sample_rate / 1000)) for ms in RIR_REFLECTION_MS)
    last = min(max(last, first + 1), length)
    if last > first:
        delays = torch.randint(first, last, (RIR_REFLECTIONS,), generator=generator)
        signs = torch.randint(0, 2, (RIR_REFLECTIONS,), generator=generator, dtype=torch.float64) * 2 - 1
        reverberant.index_add_(0, delays, signs * RIR_REFLECTION_GAIN * envelope[delays])
    reverberant[0] = 0.0
    energy = float(reverberant.pow(2).sum())
    if energy > 0:
        reverberant *= math.sqrt(10.0 ** (-drr_db / 10.0) / energy)
    reverberant[0] = 1.0  # the direct path
    return reverberant.float()


def reverberate(wave: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """`wave` convolved with `rir` (AF.fftconvolve), cut to the input's length (sample 0 of the RIR, the
    direct path, stays aligned) and scaled to the input's RMS."""
    length = wave.shape[-1]
    if length == 0:
        return wave
    # zero-extend the RIR so that the FFT size, len(wave) + len(rir) - 1, has only factors 2, 3 and 5
    rir = _fit_length(rir, fast_fft_size(length + rir.shape[-1] - 1) - length + 1)
    out = AF.fftconvolve(wave, rir.to(wave.dtype))[..., :length]
    rms_out = _rms(out)
    return out * (_rms(wave) / rms_out) if rms_out > 0 else out


def equalize(wave: torch.Tensor, bands: Sequence[tuple[float, float, float]],
             sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Peaking filters in series (AF.equalizer_biquad), each (centre Hz, gain dB, Q)."""
    if not bands:
        return wave
    boost = 10.0 ** (sum(max(g, 0.0) for _, g, _ in bands) / 20.0)

    def filters(x: torch.Tensor) -> torch.Tensor:
        for freq, gain_db, q in bands:
            x = AF.equalizer_biquad(x, sample_rate, freq, gain_db, q)
        return x

    return _unclamped(filters, wave, boost)


def gain(wave: torch.Tensor, gain_db: float) -> torch.Tensor:
    """`wave` x 10^(gain_db / 20) (AF.gain); not limited."""
    return AF.gain(wave, gain_db)


def colored_noise(length: int, color: str, sample_rate: int = SAMPLE_RATE,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(length,) float32 zero-mean noise whose power spectrum falls as 1/f^b (NOISE_COLORS: white 0,
    pink 1, brown 2), flat below NOISE_FLAT_BELOW_HZ: white Gaussian noise shaped in the frequency domain."""
    exponent = NOISE_COLORS[color]
    if exponent == 0.0:
        return torch.randn(length, generator=generator)
    n = fast_fft_size(max(length, 2))  # generated at a fast FFT size, then cut: still stationary noise
    spectrum = torch.fft.rfft(torch.randn(n, generator=generator))  # (n // 2 + 1,)
    freqs = torch.fft.rfftfreq(n, 1.0 / sample_rate).clamp(min=NOISE_FLAT_BELOW_HZ)
    spectrum = spectrum * freqs.pow(-exponent / 2.0)  # amplitude ~ f^(-b/2): power ~ f^-b
    spectrum[0] = 0.0  # no DC
    return torch.fft.irfft(spectrum, n=n)[:length].contiguous()


def babble_noise(talkers: Sequence[torch.Tensor], length: int, offsets: Sequence[int]) -> torch.Tensor:
    """(length,) sum of the talkers' waves, each scaled to RMS 1 and read circularly from its offset (a
    talker shorter than `length` repeats). Silent talkers are left out; all zeros if every one is."""
    out = torch.zeros(length)
    for wave, offset in zip(talkers, offsets):
        rms = _rms(wave)
        if wave.numel() == 0 or rms == 0.0:
            continue
        index = (offset + torch.arange(length)) % wave.shape[-1]
        out += wave.float()[index] / rms
    return out


def add_noise(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """wave + noise scaled so that energy(wave) / energy(added noise) is `snr_db` (AF.add_noise).
    `wave` unchanged if it or the noise is silent."""
    if _rms(wave) == 0.0 or _rms(noise) == 0.0:
        return wave
    return AF.add_noise(wave, noise.to(wave.dtype), torch.tensor(snr_db, dtype=wave.dtype))


def telephone(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, low_hz: float = TELEPHONE_LOW_HZ,
              high_hz: float = TELEPHONE_HIGH_HZ) -> torch.Tensor:
    """A telephone channel: down to TELEPHONE_RATE, band-pass low_hz..high_hz (two high-pass and two
    low-pass biquads: 24 dB/octave skirts), back up to `sample_rate`; same length as the input."""
    narrow = AF.resample(wave, sample_rate, TELEPHONE_RATE)

    def band(x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = AF.highpass_biquad(x, TELEPHONE_RATE, low_hz)
            x = AF.lowpass_biquad(x, TELEPHONE_RATE, high_hz)
        return x

    return _fit_length(AF.resample(_unclamped(band, narrow, 1.0), TELEPHONE_RATE, sample_rate), wave.shape[-1])


def mu_law(wave: torch.Tensor, bits: int) -> torch.Tensor:
    """mu-law encode and decode with 2^bits levels (mu = 2^bits - 1), the input clamped to [-1, 1]."""
    channels = 1 << bits
    return AF.mu_law_decoding(AF.mu_law_encoding(wave.clamp(-1.0, 1.0), channels), channels).to(wave.dtype)


def codec(wave: torch.Tensor, bits: int, narrowband: bool = False, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """mu_law at `bits`, at TELEPHONE_RATE if `narrowband` (resampled down and back up; same length)."""
    if not narrowband:
        return mu_law(wave, bits)
    narrow = mu_law(AF.resample(wave, sample_rate, TELEPHONE_RATE), bits)
    return _fit_length(AF.resample(narrow, TELEPHONE_RATE, sample_rate), wave.shape[-1])


# --- vocal-tract-length perturbation (feature domain) -------------------------------------------------

def vtlp_warp(freqs: torch.Tensor, alpha: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The piecewise-linear VTLP warp of Jaitly & Hinton (2013) applied to frequencies in Hz: f -> alpha f
    up to F_hi min(alpha, 1) / alpha, then the straight line that maps Nyquist to itself
    (F_hi = VTLP_BOUNDARY_HZ, scaled with the sample rate)."""
    if alpha == 1.0:
        return freqs
    nyquist = sample_rate / 2.0
    f_hi = VTLP_BOUNDARY_HZ * sample_rate / SAMPLE_RATE
    knee = f_hi * min(alpha, 1.0) / alpha
    upper = nyquist - (nyquist - f_hi * min(alpha, 1.0)) / (nyquist - knee) * (nyquist - freqs)
    return torch.where(freqs <= knee, freqs * alpha, upper)


def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)  # HTK mel scale, what LogMel's MelSpectrogram uses


def vtlp_fbanks(config: FeatureConfig, alpha: float) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) mel filterbank of `config` with its frequency axis warped by `alpha`: the
    weight of an FFT bin at frequency f is the HTK triangle's value at vtlp_warp(f), so energy at f lands
    in the channel of alpha f (alpha > 1 moves it up). At alpha == 1 it is LogMel's filterbank
    (AF.melscale_fbanks with f_min 0, f_max Nyquist, no normalisation)."""
    n_freqs = config.n_fft // 2 + 1
    freqs = vtlp_warp(torch.linspace(0, config.sample_rate // 2, n_freqs), alpha, config.sample_rate)  # (n_freqs,)
    mels = torch.linspace(_hz_to_mel(0.0), _hz_to_mel(float(config.sample_rate // 2)), config.n_mels + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # (n_mels + 2,) Hz: triangle i spans edges[i]..edges[i + 2]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    rising = (freqs[:, None] - lower) / (centre - lower)  # (n_freqs, n_mels)
    falling = (upper - freqs[:, None]) / (upper - centre)  # (n_freqs, n_mels)
    return torch.minimum(rising, falling).clamp(min=0.0)


@torch.no_grad()
def vtlp_log_mel(logmel: LogMel | FeatureConfig, wave: torch.Tensor, alpha: float) -> torch.Tensor:
    """(num_samples,) -> (T, n_mels) log-mel features (not normalised) through vtlp_fbanks(alpha): LogMel's
    own power spectrogram, frame count and log floor, so alpha == 1 gives LogMel.log_mel(wave). Normalise
    with logmel.normalize."""
    if not isinstance(logmel, LogMel):
        logmel = LogMel(logmel)
    config = logmel.config
    samples = wave.shape[-1]
    min_samples = config.n_fft // 2 + 1  # as LogMel.log_mel: short clips are zero-extended, frame count kept
    if samples < min_samples:
        wave = torch.nn.functional.pad(wave, (0, min_samples - samples))
    power = logmel.mel.spectrogram(wave)  # (n_freqs, T)
    fbanks = vtlp_fbanks(config, alpha).to(power.dtype)  # (n_freqs, n_mels)
    mel = torch.matmul(power.transpose(-1, -2), fbanks)  # (T, n_freqs) @ (n_freqs, n_mels) -> (T, n_mels)
    mel = mel.transpose(-1, -2)  # (n_mels, T), as LogMel's MelSpectrogram gives
    mel = mel[:, : config.num_frames(samples)]
    return torch.log(mel + LOG_FLOOR).transpose(0, 1)  # (n_mels, T) -> (T, n_mels)


# --- the augmenter -------------------------------------------------------------------------------------

BabbleSource = Union[Sequence[torch.Tensor], Callable[[random.Random], torch.Tensor]]
Applied = list[tuple[str, dict]]


def _uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    return rng.uniform(*bounds)


def _log_uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    return math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))


def _babble_offset(rng: random.Random, talker: int, length: int) -> int:
    """Where to start reading a talker of `talker` samples for `length`: anywhere it fits whole, or, for a
    short talker (which repeats), at any phase."""
    return rng.randrange(talker - length + 1) if talker >= length else rng.randrange(max(1, talker))


def _generator(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(63))


class Augmenter:
    """Applies an AugmentConfig's enabled transforms to training waveforms.

    `babble_source` supplies other training utterances for babble: a sequence of waves (drawn from with
    the rng) or a callable rng -> wave (e.g. loading a random training file). Needed when babble.p > 0.
    """

    ORDER = ("speed", "pitch", "reverb", "eq", "gain", "noise", "babble", "telephone", "codec")

    def __init__(self, config: AugmentConfig = AugmentConfig(), babble_source: BabbleSource | None = None,
                 sample_rate: int = SAMPLE_RATE):
        if config.babble.p > 0 and babble_source is None:
            raise UserError("data.augment.babble.p > 0 needs other utterances to mix (babble_source)")
        if config.eq.freq_hz[1] >= sample_rate / 2:
            raise UserError(f"data.augment.eq.freq_hz {config.eq.freq_hz[1]}: must be below Nyquist ({sample_rate / 2} Hz)")
        self.config = config
        self.babble_source = babble_source
        self.sample_rate = sample_rate

    def _other_wave(self, rng: random.Random) -> torch.Tensor:
        if callable(self.babble_source):
            return self.babble_source(rng)
        return self.babble_source[rng.randrange(len(self.babble_source))]

    def _step(self, name: str, wave: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, dict | None]:
        """The transform `name` with parameters drawn from rng: (new wave, parameters), or (wave, None)
        when it cannot apply (e.g. babble from silent talkers)."""
        c, sr = getattr(self.config, name), self.sample_rate
        if name == "speed":
            factor = quantize_factor(_uniform(rng, c.factor))
            return speed(wave, factor, sr), {"factor": factor}
        if name == "pitch":
            semitones = _uniform(rng, c.semitones)
            return pitch_shift(wave, semitones, sr), {"semitones": semitones}
        if name == "reverb":
            rt60, drr = _uniform(rng, c.rt60_s), _uniform(rng, c.drr_db)
            rir = room_impulse_response(rt60, drr, sr, _generator(rng))
            return reverberate(wave, rir), {"rt60_s": rt60, "drr_db": drr}
        if name == "eq":
            bands = [(_log_uniform(rng, c.freq_hz), _uniform(rng, c.gain_db), _log_uniform(rng, c.q))
                     for _ in range(rng.randint(*c.bands))]
            return equalize(wave, bands, sr), {"bands": bands}
        if name == "gain":
            gain_db = _uniform(rng, c.gain_db)
            return gain(wave, gain_db), {"gain_db": gain_db}
        if name == "noise":
            color, snr = rng.choice(c.colors), _uniform(rng, c.snr_db)
            noise = colored_noise(wave.shape[-1], color, sr, _generator(rng))
            return add_noise(wave, noise, snr), {"color": color, "snr_db": snr}
        if name == "babble":
            talkers = [self._other_wave(rng) for _ in range(rng.randint(*c.talkers))]
            offsets = [_babble_offset(rng, t.shape[-1], wave.shape[-1]) for t in talkers]
            noise, snr = babble_noise(talkers, wave.shape[-1], offsets), _uniform(rng, c.snr_db)
            if _rms(noise) == 0.0:
                return wave, None
            return add_noise(wave, noise, snr), {"talkers": len(talkers), "snr_db": snr}
        if name == "telephone":
            return telephone(wave, sr, c.low_hz, c.high_hz), {"low_hz": c.low_hz, "high_hz": c.high_hz}
        if name == "codec":
            bits, narrowband = rng.randint(*c.bits), rng.random() < c.narrowband_p
            return codec(wave, bits, narrowband, sr), {"bits": bits, "narrowband": narrowband}
        raise AssertionError(name)

    @torch.no_grad()
    def wave(self, wave: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, Applied]:
        """(num_samples,) -> (augmented wave, [(transform, parameters), ...] in the order applied).

        Each enabled transform applies with its probability, in ORDER. The result has a peak of at most
        PEAK_LIMIT (rescaled if above); a result that is not finite or is all zeros (from an input that
        was not) is replaced by the input, with ("reverted", {...}) appended. The same rng state gives
        the same output; with nothing applied the input itself is returned."""
        out, applied = wave, []
        for name in self.ORDER:
            p = getattr(self.config, name).p
            if p > 0 and rng.random() < p:
                out, params = self._step(name, out, rng)
                if params is not None:
                    applied.append((name, params))
        if not applied:
            return wave, applied
        if not bool(torch.isfinite(out).all()) or (_peak(out) == 0.0 and _peak(wave) > 0.0):
            return wave, applied + [("reverted", {"reason": "non-finite or silent result"})]
        peak = _peak(out)
        if peak > PEAK_LIMIT:
            out = (out / (peak / PEAK_LIMIT)).clamp(-PEAK_LIMIT, PEAK_LIMIT)  # x / x is exactly 1
            applied.append(("limit", {"peak": peak}))
        return out.float().contiguous(), applied

    def vtlp_factor(self, rng: random.Random) -> float | None:
        """A VTLP warp factor for this utterance (with probability vtlp.p), else None."""
        c = self.config.vtlp
        if c.p > 0 and rng.random() < c.p:
            return _uniform(rng, c.alpha)
        return None
