"""Audio I/O: every supported format decodes to mono float32 at 16 kHz; every broken file is an AudioError."""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.data.audio import SAMPLE_RATE, audio_info, load_audio, save_flac
from asr.errors import AudioError, UserError

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", "MPEG_LAYER_III")}
LOSSLESS = {"wav", "flac"}
TONE_HZ = 440.0
SECONDS = 0.5


def _needs_format(ext):
    name = FORMATS[ext][0]
    if name not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {name}")


def _peak_hz(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> float:
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(wave.numel(), dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * sample_rate / wave.numel()


@pytest.mark.parametrize("ext", list(FORMATS))
@pytest.mark.parametrize("rate,channels", [(8000, 1), (22050, 1), (44100, 2), (16000, 2)])
def test_round_trip_to_mono_float32_16k(tmp_path, tone, ext, rate, channels):
    _needs_format(ext)
    mono = tone(SECONDS, rate, TONE_HZ, amplitude=0.5)
    # Stereo: the tone on the left, silence on the right, so a mean downmix halves the amplitude.
    data = np.stack([mono, np.zeros_like(mono)], axis=1) if channels == 2 else mono
    path = tmp_path / f"tone_{rate}_{channels}.{ext}"
    fmt, subtype = FORMATS[ext]
    sf.write(path, data, rate, format=fmt, subtype=subtype)

    wave = load_audio(path)

    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert wave.abs().max() <= 1.0
    expected_samples = SECONDS * SAMPLE_RATE
    slack = 0.002 if ext in LOSSLESS else 0.15  # lossy codecs pad/trim whole frames
    assert abs(wave.numel() - expected_samples) <= slack * expected_samples + 1
    assert _peak_hz(wave) == pytest.approx(TONE_HZ, abs=4.0)
    if ext in LOSSLESS:
        expected_peak = 0.5 / channels
        assert float(wave[200:-200].abs().max()) == pytest.approx(expected_peak, abs=0.01)
    assert audio_info(path)[1] == rate


def test_resample_to_other_rate(tmp_path, tone):
    path = tmp_path / "a.wav"
    sf.write(path, tone(1.0, 16000), 16000)
    assert load_audio(path, sample_rate=8000).numel() == 8000


def test_save_flac_writes_16bit_16k_atomically(tmp_path, tone):
    path = tmp_path / "sub" / "out.flac"
    save_flac(path, torch.from_numpy(tone(0.25, SAMPLE_RATE).astype(np.float32) * 4))  # clipped, not wrapped
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.format, info.subtype) == (SAMPLE_RATE, 1, "FLAC", "PCM_16")
    assert not list(path.parent.glob("*.part"))
    wave = load_audio(path)
    assert wave.numel() == SAMPLE_RATE // 4 and float(wave.abs().max()) <= 1.0 and float(wave.max()) > 0.99


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_files(tmp_path, tone):
    """name -> (path, words the reason must contain)"""
    wave = tone(1.0, SAMPLE_RATE)
    sf.write(tmp_path / "cut.flac", wave, SAMPLE_RATE, format="FLAC")
    sf.write(tmp_path / "cut.wav", wave, SAMPLE_RATE, format="WAV")
    (tmp_path / "empty.flac").write_bytes(b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "random.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    (tmp_path / "folder.flac").mkdir()
    return {
        "truncated flac": (_cut_in_half(tmp_path / "cut.flac"), ""),
        "truncated wav": (_cut_in_half(tmp_path / "cut.wav"), "truncated"),
        "empty flac": (tmp_path / "empty.flac", "empty"),
        "empty wav": (tmp_path / "empty.wav", "empty"),
        "random bytes": (tmp_path / "random.flac", ""),
        "text file": (tmp_path / "notes.wav", ""),
        "directory": (tmp_path / "folder.flac", "not a regular file"),
        "missing": (tmp_path / "missing.flac", "no such file"),
    }


BAD_KINDS = ["truncated flac", "truncated wav", "empty flac", "empty wav", "random bytes", "text file", "directory", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_broken_file_raises_audio_error_naming_path_and_reason(tmp_path, tone, kind):
    path, reason_words = _bad_files(tmp_path, tone)[kind]
    with pytest.raises(AudioError) as caught:
        load_audio(path)
    err = caught.value
    assert isinstance(err, UserError)
    assert err.path == str(path)
    assert str(path) in str(err)
    assert err.reason and reason_words in err.reason
    assert "\n" not in str(err)


@pytest.mark.parametrize("kind", ["empty flac", "random bytes", "text file", "directory", "missing"])
def test_audio_info_rejects_broken_files(tmp_path, tone, kind):
    path, _ = _bad_files(tmp_path, tone)[kind]
    with pytest.raises(AudioError, match=str(path)):
        audio_info(path)


def test_wav_with_streaming_placeholder_size_still_reads(tmp_path, tone):
    """A writer that cannot seek back leaves 0xFFFFFFFF as the data size; that is not truncation."""
    path = tmp_path / "stream.wav"
    sf.write(path, tone(0.5, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    data_at = raw.index(b"data") + 4
    raw[data_at : data_at + 4] = (0xFFFFFFFF).to_bytes(4, "little")
    raw[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    assert load_audio(path).numel() == SAMPLE_RATE // 2


def test_non_finite_samples_are_rejected(tmp_path):
    path = tmp_path / "nan.wav"
    data = np.zeros(1600, dtype=np.float32)
    data[10] = np.nan
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(path)


def test_load_audio_leaves_file_untouched(tmp_path, tone):
    path = tmp_path / "a.flac"
    sf.write(path, tone(0.2, SAMPLE_RATE), SAMPLE_RATE)
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    load_audio(path)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
