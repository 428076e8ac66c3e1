"""Audio I/O: every supported format decodes to mono float32 at 16 kHz; every broken file is an AudioError."""

import os
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.data.audio import MAX_SECONDS, SAMPLE_RATE, audio_info, load_audio, save_flac
from asr.errors import AudioError, UserError

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "opus": ("OGG", "OPUS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}
OPUS_RATES = {8000, 12000, 16000, 24000, 48000}  # the only rates the Opus codec encodes
LOSSLESS = {"wav", "flac"}
TONE_HZ = 440.0
SECONDS = 0.5


def _needs_format(ext):
    name, subtype = FORMATS[ext]
    if name not in sf.available_formats() or subtype not in sf.available_subtypes(name):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {name}/{subtype}")


def _peak_hz(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> float:
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(wave.numel(), dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * sample_rate / wave.numel()


@pytest.mark.parametrize("ext", list(FORMATS))
@pytest.mark.parametrize("rate,channels", [(8000, 1), (22050, 1), (44100, 2), (16000, 2), (48000, 2)])
def test_round_trip_to_mono_float32_16k(tmp_path, tone, ext, rate, channels):
    _needs_format(ext)
    if ext == "opus" and rate not in OPUS_RATES:
        pytest.skip(f"Opus cannot encode {rate} Hz")
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
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    wave = load_audio(path)
    assert wave.numel() == SAMPLE_RATE // 4 and float(wave.abs().max()) <= 1.0 and float(wave.max()) > 0.99


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _flac_claiming_frames(path, tone, frames):
    """A valid FLAC whose STREAMINFO then claims `frames` samples (a 36-bit field)."""
    sf.write(path, tone(0.1, SAMPLE_RATE), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    assert raw[:4] == b"fLaC" and raw[4] & 0x7F == 0  # STREAMINFO is the first metadata block
    # bytes 18..25: sample rate (20 bits), channels - 1 (3), bits - 1 (5), total samples (36)
    packed = int.from_bytes(raw[18:26], "big") & ~((1 << 36) - 1) | frames
    raw[18:26] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    return path


def _bad_files(tmp_path, tone, wav_with_rate):
    """name -> (path, words the reason must contain)"""
    wave = tone(1.0, SAMPLE_RATE)
    sf.write(tmp_path / "cut.flac", wave, SAMPLE_RATE, format="FLAC")
    sf.write(tmp_path / "cut.wav", wave, SAMPLE_RATE, format="WAV")
    (tmp_path / "empty.flac").write_bytes(b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "random.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    (tmp_path / "folder.flac").mkdir()
    (tmp_path / "notes.mp3").write_text("this is a text file, not audio\n" * 20)
    sf.write(tmp_path / "zero.wav", np.zeros(0), SAMPLE_RATE, subtype="PCM_16")
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        data = np.zeros(1600, dtype=np.float32)
        data[10] = value
        sf.write(tmp_path / name, data, SAMPLE_RATE, subtype="FLOAT")
    return {
        "truncated flac": (_cut_in_half(tmp_path / "cut.flac"), ""),
        "truncated wav": (_cut_in_half(tmp_path / "cut.wav"), "truncated"),
        "empty flac": (tmp_path / "empty.flac", "empty"),
        "empty wav": (tmp_path / "empty.wav", "empty"),
        "random bytes": (tmp_path / "random.flac", ""),
        "text file": (tmp_path / "notes.wav", ""),
        "directory": (tmp_path / "folder.flac", "not a regular file"),
        "missing": (tmp_path / "missing.flac", "no such file"),
        "text named mp3": (tmp_path / "notes.mp3", "not a readable audio file (its contents are not WAV, FLAC, Ogg or MP3)"),
        "zero samples": (tmp_path / "zero.wav", "no audio samples"),
        "nan samples": (tmp_path / "nan.wav", "NaN or infinite"),
        "inf samples": (tmp_path / "inf.wav", "NaN or infinite"),
        "1 Hz header": (wav_with_rate(tmp_path / "one_hz.wav", 1), "implausible sample rate 1 Hz"),
        "1 MHz header": (wav_with_rate(tmp_path / "one_mhz.wav", 1_000_000), "implausible sample rate 1000000 Hz"),
        "absurd frame count": (_flac_claiming_frames(tmp_path / "long.flac", tone, (1 << 36) - 1),
                               f"header declares {(1 << 36) - 1} frames"),
    }


BAD_KINDS = ["truncated flac", "truncated wav", "empty flac", "empty wav", "random bytes", "text file", "directory",
             "missing", "text named mp3", "zero samples", "nan samples", "inf samples", "1 Hz header", "1 MHz header",
             "absurd frame count"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_broken_file_raises_audio_error_naming_path_and_reason(tmp_path, tone, wav_with_rate, kind):
    path, reason_words = _bad_files(tmp_path, tone, wav_with_rate)[kind]
    with pytest.raises(AudioError) as caught:
        load_audio(path)
    err = caught.value
    assert isinstance(err, UserError)
    assert err.path == str(path)
    assert str(path) in str(err)
    assert err.reason and reason_words in err.reason
    assert "\n" not in str(err)


@pytest.mark.parametrize("kind", ["empty flac", "random bytes", "text file", "directory", "missing", "text named mp3",
                                  "1 Hz header", "absurd frame count"])
def test_audio_info_rejects_broken_files(tmp_path, tone, wav_with_rate, kind):
    path, _ = _bad_files(tmp_path, tone, wav_with_rate)[kind]
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


def test_text_named_mp3_prints_nothing_from_the_decoder(tmp_path, capfd):
    """libsndfile hands such a file to mpg123 by its extension, which writes notes to stderr."""
    path = tmp_path / "notes.mp3"
    path.write_text("this is a text file, not audio\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path)
    assert capfd.readouterr().err == ""


def test_implausible_rate_is_refused_before_decoding(tmp_path, wav_with_rate):
    # 66 frames at 1 Hz would be 66 s of audio, resampled to 1 M samples of garbage.
    path = wav_with_rate(tmp_path / "one_hz.wav", 1)
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match=r"implausible sample rate 1 Hz .*expected 4000-384000 Hz"):
            load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_non_utf8_file_name_reads_and_is_named_printably(tmp_path, tone):
    name = os.fsdecode(b"caf\xff.wav")  # a byte that is not UTF-8, kept by Python as a surrogate
    good = tmp_path / name
    sf.write(os.fsencode(good), tone(0.1, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    assert load_audio(good).numel() == SAMPLE_RATE // 10
    assert audio_info(good) == (SAMPLE_RATE // 10, SAMPLE_RATE)

    empty = tmp_path / "sub" / name
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with pytest.raises(AudioError) as caught:
        load_audio(empty)
    message = str(caught.value)
    assert message == f"{tmp_path}/sub/caf\\xff.wav: empty file (0 bytes)"
    message.encode("utf-8")  # printable: no lone surrogate left in it


def _sparse_pcm16_wav(path, seconds, rate, channels):
    """A PCM_16 WAV of silence made by extending the file, so writing it costs no time or disk."""
    data_bytes = seconds * rate * channels * 2
    header = (b"RIFF" + (36 + data_bytes).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (1).to_bytes(2, "little") + channels.to_bytes(2, "little") + rate.to_bytes(4, "little")
              + (rate * channels * 2).to_bytes(4, "little") + (channels * 2).to_bytes(2, "little")
              + (16).to_bytes(2, "little") + b"data" + data_bytes.to_bytes(4, "little"))
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data_bytes)
    return path


def test_an_hour_of_stereo_silence_loads_in_bounded_memory(tmp_path):
    path = _sparse_pcm16_wav(tmp_path / "hour.wav", 3600, SAMPLE_RATE, channels=2)
    tracemalloc.start()  # numpy's buffers are traced; decoding the whole stereo file at once would be 3x this
    try:
        wave = load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert wave.numel() == 57_600_000 and wave.dtype == torch.float32
    assert float(wave.abs().max()) == 0.0
    assert peak < 1.2 * wave.numel() * 4
    assert MAX_SECONDS >= 3600


def test_odd_sample_rate_resamples_quickly(tmp_path, tone):
    """44101 Hz is coprime with 16 kHz: the exact polyphase kernel would take 12 GB and half a minute."""
    rate = 44101
    path = tmp_path / "odd.wav"
    sf.write(path, tone(0.5, rate, TONE_HZ, amplitude=0.5), rate, subtype="PCM_16")
    start = time.perf_counter()
    wave = load_audio(path)
    assert time.perf_counter() - start < 5.0
    assert abs(wave.numel() - SECONDS * SAMPLE_RATE) <= 2
    assert _peak_hz(wave) == pytest.approx(TONE_HZ, abs=4.0)
    assert float(wave[200:-200].abs().max()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("rate", [4001, 16001, 44101, 383999])
def test_approximated_resampling_ratio_is_close_and_small(rate):
    """The independent check: the ratio used is within 0.05 % of the true one and its kernel is bounded."""
    from asr.data.audio import MAX_RESAMPLE_TAPS, _resample_ratio

    orig, new = _resample_ratio(rate, SAMPLE_RATE)
    assert abs(orig / new - rate / SAMPLE_RATE) <= 5e-4 * rate / SAMPLE_RATE
    assert orig * new <= 1.01 * MAX_RESAMPLE_TAPS
    assert _resample_ratio(44100, SAMPLE_RATE) == (44100, SAMPLE_RATE)  # common rates stay exact


def test_load_audio_leaves_file_untouched(tmp_path, tone):
    path = tmp_path / "a.flac"
    sf.write(path, tone(0.2, SAMPLE_RATE), SAMPLE_RATE)
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    load_audio(path)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
