"""Audio I/O: WAV, FLAC, OGG and MP3 through soundfile, returned as mono float32 at 16 kHz."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from asr.errors import AudioError

SAMPLE_RATE = 16000  # Hz, what every model in this project consumes
SUPPORTED_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
_DECLARED_DATA_CHUNK = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_CHUNK_SIZES = {0, 0x7FFFFFFF, 0xFFFFFFFF}  # placeholders of writers that could not seek back


def audio_info(path: str | os.PathLike) -> tuple[int, int]:
    """(frames, sample rate) from the header alone; AudioError if it is not a readable audio file."""
    path = Path(path)
    _check_file(path)
    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        raise AudioError(path, f"not a readable audio file ({_short(err)})") from None
    return info.frames, info.samplerate


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode a whole file to a (num_samples,) float32 tensor, mono, resampled to `sample_rate`.

    Raises AudioError naming the path and the reason for an empty, truncated, corrupt or
    non-audio file.
    """
    path = Path(path)
    _check_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            declared = f.frames
            source_rate = f.samplerate
            header_log = f.extra_info
            data = f.read(dtype="float32", always_2d=True)  # (frames, channels)
    except Exception as err:
        raise AudioError(path, f"cannot decode audio ({_short(err)})") from None
    if data.shape[0] == 0:
        raise AudioError(path, "contains no audio samples")
    # libsndfile reports the header's frame count; fewer decoded frames means the file was cut short.
    if 0 < declared < (1 << 62) and data.shape[0] < declared:
        raise AudioError(path, f"truncated: header declares {declared} frames, only {data.shape[0]} decode")
    # For WAV, libsndfile quietly shrinks the frame count to what the file holds; its header log
    # keeps the chunk size the header declared ("data : 64000 (should be 31978)").
    chunk = _DECLARED_DATA_CHUNK.search(header_log)
    if chunk and int(chunk[1]) not in _STREAMING_CHUNK_SIZES and int(chunk[2]) < int(chunk[1]):
        raise AudioError(path, f"truncated: header declares a {chunk[1]}-byte data chunk, the file holds {chunk[2]}")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or infinite samples")
    wave = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    if source_rate != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, source_rate, sample_rate)
    return wave.contiguous()


def init_decode_worker() -> None:
    """Initializer for pools of processes that decode audio: one torch thread per process.

    A forked child deadlocks in the first OpenMP parallel region when its parent had already used
    OpenMP (libgomp is not fork-safe), e.g. a resample in the parent before the pool started; with
    one thread no parallel region starts, and the pool provides the parallelism anyway.
    """
    torch.set_num_threads(1)


def save_flac(path: str | os.PathLike, wave: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write 16-bit FLAC atomically (temp file + rename), so an interrupted write leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = wave.numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    tmp = path.with_name(path.name + ".part")
    sf.write(str(tmp), np.clip(data, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioError(path, "no such file")
    if not path.is_file():
        raise AudioError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
