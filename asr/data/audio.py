"""Audio I/O: WAV, FLAC, Ogg (Vorbis, Opus) and MP3 through soundfile, returned as mono float32 at 16 kHz."""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from asr.errors import AudioError, printable
from asr.fileio import atomic_write

SAMPLE_RATE = 16000  # Hz, what every model in this project consumes
SUPPORTED_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")
# A header outside this range is corrupt or not speech: 1 Hz "audio" would otherwise be resampled
# into minutes of garbage, gigabytes of memory for a few bytes of file.
MIN_SAMPLE_RATE = 4000  # Hz
MAX_SAMPLE_RATE = 384000  # Hz
# The longest recording decoded in one piece: 57.6 M samples (230 MB as float32) per hour at
# 16 kHz. A header claiming more is refused before any memory is allocated for it.
MAX_SECONDS = 2 * 3600
READ_BLOCK = 1 << 20  # frames decoded at a time, so a multichannel file is never held whole
# torchaudio's sinc resampler builds a kernel of about (orig/g) x (new/g) taps (g = gcd of the
# rates): 44101 -> 16000 Hz takes 12 GB and half a minute. Above this many taps the ratio is
# approximated by the closest fraction that fits, which changes the speed by under 0.05 %.
MAX_RESAMPLE_TAPS = 1 << 20
_DECLARED_DATA_CHUNK = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_CHUNK_SIZES = {0, 0x7FFFFFFF, 0xFFFFFFFF}  # placeholders of writers that could not seek back
# How the containers libsndfile reads begin. Anything else is refused before libsndfile sees it:
# it would guess a format from the extension and fail with a misleading message
# ("possibly a pipe?" for a text file named .mp3) after mpg123 printed notes to stderr.
_SIGNATURES = (b"RIFF", b"RIFX", b"RF64", b"BW64", b"riff", b"fLaC", b"OggS", b"ID3", b"FORM", b".snd",
               b"caff", b"NIST_1A")


def audio_info(path: str | os.PathLike) -> tuple[int, int]:
    """(frames, sample rate) from the header alone; AudioError if it is not a readable audio file."""
    with _open(path) as f:
        return f.frames, f.samplerate


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode a whole file to a (num_samples,) float32 tensor, mono, resampled to `sample_rate`.

    Raises AudioError naming the path and the reason for an empty, truncated, corrupt or
    non-audio file, an implausible sample rate, or a recording longer than MAX_SECONDS.
    """
    name = printable_path(path)
    with _open(path) as f:
        declared = f.frames  # bounded by _open
        source_rate = f.samplerate
        header_log = f.extra_info
        mono = np.empty(declared, dtype=np.float32)
        decoded = 0
        try:
            while decoded < declared:
                block = f.read(min(READ_BLOCK, declared - decoded), dtype="float32", always_2d=True)  # (frames, channels)
                if block.shape[0] == 0:
                    break
                if not np.isfinite(block).all():
                    raise AudioError(name, "contains NaN or infinite samples")
                mono[decoded : decoded + block.shape[0]] = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
                decoded += block.shape[0]
        except AudioError:
            raise
        except Exception as err:
            raise AudioError(name, f"cannot decode audio ({_short(err)})") from None
    if decoded == 0:
        raise AudioError(name, "contains no audio samples")
    # libsndfile reports the header's frame count; fewer decoded frames means the file was cut short.
    if decoded < declared:
        raise AudioError(name, f"truncated: header declares {declared} frames, only {decoded} decode")
    # For WAV, libsndfile quietly shrinks the frame count to what the file holds; its header log
    # keeps the chunk size the header declared ("data : 64000 (should be 31978)").
    chunk = _DECLARED_DATA_CHUNK.search(header_log)
    if chunk and int(chunk[1]) not in _STREAMING_CHUNK_SIZES and int(chunk[2]) < int(chunk[1]):
        raise AudioError(name, f"truncated: header declares a {chunk[1]}-byte data chunk, the file holds {chunk[2]}")
    wave = torch.from_numpy(mono)
    if source_rate != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, *_resample_ratio(source_rate, sample_rate))
    return wave.contiguous()


def printable_path(path: str | os.PathLike) -> str:
    """The path as it can be printed in a message (see asr.errors.printable)."""
    return printable(os.fspath(path))


def init_decode_worker() -> None:
    """Initializer for pools of processes that decode audio: one torch thread per process.

    A forked child deadlocks in the first OpenMP parallel region when its parent had already used
    OpenMP (libgomp is not fork-safe), e.g. a resample in the parent before the pool started; with
    one thread no parallel region starts, and the pool provides the parallelism anyway.
    """
    torch.set_num_threads(1)


def save_flac(path: str | os.PathLike, wave: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit FLAC atomically (asr.fileio), so an interrupted write leaves no partial file."""
    data = wave.numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    atomic_write(path, lambda f: sf.write(f, np.clip(data, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16"))


def _open(path: str | os.PathLike) -> sf.SoundFile:
    """Open for reading after checking that the file is a plausible recording, from its header alone."""
    name = printable_path(path)
    path = Path(path)
    if not path.exists():
        raise AudioError(name, "no such file")
    if not path.is_file():
        raise AudioError(name, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(name, "empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    if not _looks_like_audio(head):
        raise AudioError(name, "cannot decode audio: not a readable audio file (its contents are not WAV, FLAC, Ogg or MP3)")
    try:
        # bytes, not str: soundfile encodes a str path strictly as UTF-8, which fails for names that are not
        f = sf.SoundFile(os.fsencode(path))
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        raise AudioError(name, f"cannot decode audio ({_short(err)})") from None
    try:
        if not MIN_SAMPLE_RATE <= f.samplerate <= MAX_SAMPLE_RATE:
            raise AudioError(name, f"implausible sample rate {f.samplerate} Hz in its header "
                                   f"(expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)")
        if f.frames > MAX_SECONDS * f.samplerate:
            raise AudioError(name, f"header declares {f.frames} frames ({f.frames / f.samplerate / 3600:.1f} h at "
                                   f"{f.samplerate} Hz), more than the {MAX_SECONDS / 3600:g} h this reader decodes")
    except AudioError:
        f.close()
        raise
    return f


def _looks_like_audio(head: bytes) -> bool:
    mpeg_frame_sync = len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0  # MP3 without an ID3 tag
    return head.startswith(_SIGNATURES) or mpeg_frame_sync


def _resample_ratio(source_rate: int, target_rate: int) -> tuple[int, int]:
    """(orig, new) frequencies for torchaudio's resampler: the exact ratio, unless its kernel would be huge."""
    g = math.gcd(source_rate, target_rate)
    if (source_rate // g) * (target_rate // g) <= MAX_RESAMPLE_TAPS:
        return source_rate, target_rate
    # p/q ~ source/target with p*q ~ q^2 * source/target <= MAX_RESAMPLE_TAPS
    ratio = Fraction(source_rate, target_rate).limit_denominator(max(1, math.isqrt(MAX_RESAMPLE_TAPS * target_rate // source_rate)))
    return ratio.numerator, ratio.denominator


def _short(err: Exception) -> str:
    if isinstance(err, sf.LibsndfileError):
        # libsndfile says "File does not exist or is not a regular file (possibly a pipe?)" when the
        # decoder it picked gives up on a regular file (checked above); say that instead.
        if "possibly a pipe" in err.error_string:
            return "its header looks like audio but the decoder rejects it"
        return err.error_string.rstrip(".")  # without soundfile's "Error opening <path>: "; callers name the path
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
