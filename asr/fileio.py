"""Atomic file writes: a temporary file beside the target, then a rename, so a reader or a crash
never sees half a file. Every file the project writes whole goes through `atomic_write` (text,
bytes, FLAC audio, checkpoints); only a download's resumable .part file grows in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = False,
                 remove_stale: bool = False) -> Path:
    """Call write(f) on a temporary file beside `path`, then rename it over `path`.

    fsync: flush to the disk before the rename (checkpoints: the rename must never expose a file
    whose bytes are still only in the page cache). remove_stale: first delete temporary files of
    this target left by writers that were killed mid-write (for a target one process writes).
    On any failure the temporary file is removed and `path` is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if remove_stale:
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            if stale != tmp:
                stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
