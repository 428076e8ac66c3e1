"""Manifests: one JSON object per line with id, path, duration (s), text and speaker.

read_manifest checks every line and stops at the first bad one with `file:line: reason`. It does
not open the audio files: a missing or unreadable one is reported and skipped when it is loaded
(by evaluation and training), like a broken file while indexing LibriSpeech.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from asr.data.text import has_unspeakable, normalize_text
from asr.errors import UserError
from asr.fileio import atomic_write_text

FIELDS = ("id", "path", "duration", "text", "speaker")
# Text that normalize_text leaves as it is (A-Z words, apostrophes only inside them, single spaces):
# what every manifest we write holds. Matching it first skips normalising 280k lines one by one.
_PLAINLY_NORMALIZED = re.compile(r"[A-Z]+(?:'[A-Z]+)*(?: [A-Z]+(?:'[A-Z]+)*)*")


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
    """Every utterance of a manifest, its text LibriSpeech-normalised; UserError `file:line: reason`
    for the first line that is not UTF-8, not JSON, misses a field, has a field of the wrong type,
    repeats an id, or has text that normalisation would change the words of."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: manifest not found")
    if not path.is_file():
        raise UserError(f"{path}: not a manifest file (it is a directory or a device)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read manifest ({err.strerror or err})") from None
    utterances = []
    first_line_of: dict[str, int] = {}
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        try:
            # utf-8-sig: a byte-order mark, as some editors write, is not part of the first line's JSON
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                            "manifests are UTF-8 JSON lines") from None
        if not line.strip():
            continue
        try:
            utt = _utterance(line)
        except ValueError as err:
            raise UserError(f"{path}:{line_no}: {err}") from None
        if utt.id in first_line_of:
            raise UserError(f"{path}:{line_no}: duplicate id {utt.id!r} (first on line {first_line_of[utt.id]})")
        first_line_of[utt.id] = line_no
        utterances.append(utt)
    if not utterances:
        raise UserError(f"{path}: manifest is empty (no utterance lines)")
    return utterances


def _utterance(line: str) -> Utterance:
    """One manifest line; ValueError saying what is wrong with it."""
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"expected a JSON object with fields {', '.join(FIELDS)}, got a {type(fields).__name__}")
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")

    def text_field(name: str, allow_int: bool = False) -> str:
        value = fields[name]
        # ids and speakers are often numbers ("speaker": 1089); anything else would be str()-ed into nonsense
        if allow_int and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field {name!r} must be a non-empty string, got {json.dumps(value, ensure_ascii=False)}")
        return value

    utt_id, audio, speaker = text_field("id", True), text_field("path"), text_field("speaker", True)
    duration = fields["duration"]
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"field 'duration' must be a positive number of seconds, got {json.dumps(duration)}")
    text = text_field("text")
    if _PLAINLY_NORMALIZED.fullmatch(text):
        return Utterance(utt_id, audio, float(duration), text, speaker)
    # The same normalisation LibriSpeech transcripts get when indexed (accents folded, case and
    # punctuation removed), except that dropping digits or symbols would change the words scored.
    if has_unspeakable(text):
        raise ValueError(f"text of {utt_id} has digits or symbols that normalisation would drop ({text!r}); "
                         "write them as words")
    normalized = normalize_text(text)
    if not normalized:
        raise ValueError(f"text of {utt_id} is empty after normalisation ({text!r})")
    return Utterance(utt_id, audio, float(duration), normalized, speaker)


def total_hours(utterances: list[Utterance]) -> float:
    return sum(u.duration for u in utterances) / 3600.0
