"""Manifests: one JSON object per line with id, path, duration (s), text and speaker."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from asr.errors import UserError
from asr.fileio import atomic_write_text


@dataclass(frozen=True)
class Utterance:
    id: str  # LibriSpeech id, "<speaker>-<chapter>-<utterance>"
    path: str  # audio file, absolute
    duration: float  # seconds
    text: str  # LibriSpeech-normalised transcript
    speaker: str


def write_manifest(path: str | os.PathLike, utterances: list[Utterance]) -> None:
    """Write atomically: a reader never sees a half-written manifest."""
    atomic_write_text(path, "".join(json.dumps(asdict(u), ensure_ascii=False) + "\n" for u in utterances))


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")
    utterances = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
                utterances.append(
                    Utterance(
                        id=str(fields["id"]),
                        path=str(fields["path"]),
                        duration=float(fields["duration"]),
                        text=str(fields["text"]),
                        speaker=str(fields["speaker"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{path}:{line_no}: not a manifest line ({err})") from None
    if not utterances:
        raise UserError(f"{path}: manifest is empty")
    return utterances


def total_hours(utterances: list[Utterance]) -> float:
    return sum(u.duration for u in utterances) / 3600.0
