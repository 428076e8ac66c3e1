"""LibriSpeech text normalisation: uppercase A-Z, apostrophe, single spaces."""

from __future__ import annotations

import re
import unicodedata

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'"

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})
_WORD_BREAKS = re.compile(r"[-\u2010-\u2015/_]+")  # hyphens, dashes and slashes separate words
_NOT_ALLOWED = re.compile(r"[^A-Z' ]+")
_SPACES = re.compile(r" +")


def _strip_quote_apostrophes(word: str) -> str:
    """Apostrophes used as quotation marks go; "DON'T", "JAMES'" and "'TIS"-style ones stay."""
    word = word.lstrip("'") if not word.startswith("'TIS") else word
    if word.endswith("'") and not word.endswith("S'"):
        word = word.rstrip("'")
    return word if word.strip("'") else ""


def normalize_text(text: str) -> str:
    """Normalise text the way LibriSpeech transcripts are: "Café-au-lait, isn't it?" -> "CAFE AU LAIT ISN'T IT".

    Accents are folded to ASCII letters; other characters (digits included) are removed, so callers
    that must not lose words should reject text with digits first (see `has_unspeakable`).
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.translate(_APOSTROPHES).upper()
    text = _WORD_BREAKS.sub(" ", text)
    text = _NOT_ALLOWED.sub(" ", text)
    words = (_strip_quote_apostrophes(w) for w in _SPACES.split(text.strip()))
    return " ".join(w for w in words if w)


def has_unspeakable(text: str) -> bool:
    """True when normalisation would silently drop spoken content (digits, symbols read aloud)."""
    return bool(re.search(r"[0-9@#$%&*+=<>|\\^~]", text))


def is_normalized(text: str) -> bool:
    return text == normalize_text(text) and bool(text)
