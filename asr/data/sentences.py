"""Natural English sentences from an offline source: Debian's fortune databases.

Each fortune is split into sentences; attributions, verse fragments, code, ASCII art and anything
with digits or symbols that TTS would read aloud are dropped, so that the normalised transcript is
exactly what the voice says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from asr.data.text import has_unspeakable, normalize_text

FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortune", "/usr/share/fortunes")
# Databases that are not running English prose.
EXCLUDED_DATABASES = {"art", "ascii-art", "translate-me", "perl", "zippy", "knghtbrd", "paradoxum"}
MIN_WORDS = 4
MAX_WORDS = 24

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_INITIAL = re.compile(r"\b[A-Z]\.\s*$|\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|etc|Prof|Gen|Col|Lt|Sgt|Capt|Rev|Mt|No)\.$")
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:!?'\"()-]")


@dataclass(frozen=True)
class Sentence:
    text: str  # LibriSpeech-normalised, what the transcript says
    spoken: str  # what is passed to the TTS engine (original casing and punctuation)
    source: str  # e.g. "fortunes/wisdom"
    entry: str = ""  # the fortune it comes from, e.g. "wisdom:41"; sentences of one entry stay in one split

    @property
    def group(self) -> str:
        return self.entry or self.text


def find_fortune_dir() -> Path | None:
    for d in FORTUNE_DIRS:
        if Path(d).is_dir() and any(Path(d).glob("*.dat")):
            return Path(d)
    return None


def _entries(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for entry in text.split("\n%\n"):
        lines = [ln for ln in entry.splitlines() if not re.match(r"^\s*--", ln)]
        if any(re.match(r"^\s{2,}\S", ln) for ln in lines):  # indented lines: verse, dialogue, code, art
            continue
        yield " ".join(ln.strip() for ln in lines if ln.strip())


def _usable(raw: str) -> bool:
    if has_unspeakable(raw) or "_" in raw or "..." in raw or "--" in raw:
        return False
    if not raw or raw[-1] not in ".!?" or _INITIAL.search(raw):
        return False
    prose = len(_PROSE_CHARS.findall(raw))
    return prose == len(raw) and raw[0].isupper()


def load_sentences(fortune_dir: Path | None = None) -> list[Sentence]:
    """Every usable sentence, deduplicated by normalised text, in a stable order."""
    fortune_dir = fortune_dir or find_fortune_dir()
    if fortune_dir is None:
        from asr.errors import UserError

        raise UserError(
            f"no fortune databases found in {', '.join(FORTUNE_DIRS)}: install Debian's "
            "'fortune-mod' and 'fortunes' packages (make demo does this when run as root)"
        )
    seen: set[str] = set()
    sentences: list[Sentence] = []
    for db in sorted(p for p in fortune_dir.iterdir() if p.is_file() and not p.suffix and p.with_suffix(".dat").exists()):
        if db.name in EXCLUDED_DATABASES:
            continue
        for entry_no, entry in enumerate(_entries(db)):
            for raw in _SENTENCE_END.split(entry):
                raw = raw.strip().strip("\"'()[] ")
                if not _usable(raw):
                    continue
                text = normalize_text(raw)
                n_words = text.count(" ") + 1
                if not (MIN_WORDS <= n_words <= MAX_WORDS) or text in seen:
                    continue
                seen.add(text)
                sentences.append(Sentence(text=text, spoken=raw, source=f"fortunes/{db.name}", entry=f"{db.name}:{entry_no}"))
    return sentences
