"""LibriSpeech text normalisation."""

import json

import pytest

from asr.data.manifest import Utterance, read_manifest, write_manifest
from asr.data.text import ALPHABET, has_unspeakable, is_normalized, normalize_text
from asr.errors import UserError

CASES = {
    # accents fold to ASCII letters
    "Café-au-lait, isn't it?": "CAFE AU LAIT ISN'T IT",
    "naïve façade in Zürich, São Paulo": "NAIVE FACADE IN ZURICH SAO PAULO",
    "ÉLAN Ñandú": "ELAN NANDU",
    "Straße": "STRASSE",
    # curly and other apostrophes become the ASCII one
    "don\u2019t": "DON'T",
    "it`s": "IT'S",
    "\u2018quoted\u2019 words": "QUOTED WORDS",
    # hyphens, dashes and slashes separate words
    "self-made well\u2014known up\u2013to\u2010date and/or": "SELF MADE WELL KNOWN UP TO DATE AND OR",
    "wait -- what": "WAIT WHAT",
    # quotation marks go
    '"Hello," she said.': "HELLO SHE SAID",
    "\u201cSmart quotes\u201d \u00abguillemets\u00bb": "SMART QUOTES GUILLEMETS",
    "'single quoted phrase'": "SINGLE QUOTED PHRASE",
    # possessives and elisions stay
    "the dog's bone": "THE DOG'S BONE",
    "James' book and the boys' toys": "JAMES' BOOK AND THE BOYS' TOYS",
    "'Tis the season": "'TIS THE SEASON",
    # spaces: collapsed, trimmed; tabs and newlines are spaces
    "  a \t b\n\n c  ": "A B C",
    "word,word;word": "WORD WORD WORD",
    # digits and symbols are removed (callers check has_unspeakable first)
    "room 101!": "ROOM",
    "": "",
    "!!! ... ???": "",
    "日本語": "",
}


@pytest.mark.parametrize("raw,expected", list(CASES.items()))
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("raw", list(CASES))
def test_normalize_is_idempotent_and_in_alphabet(raw):
    once = normalize_text(raw)
    assert normalize_text(once) == once
    assert set(once) <= set(ALPHABET + " ")
    assert "  " not in once and once == once.strip()


def test_is_normalized():
    assert is_normalized("HELLO WORLD")
    assert is_normalized("DON'T")
    assert not is_normalized("Hello world")
    assert not is_normalized("HELLO  WORLD")
    assert not is_normalized("")


@pytest.mark.parametrize("raw,unspeakable", [
    ("In 1984 they met", True), ("50% off", True), ("a+b", True), ("me@home", True),
    ("Plain words, only.", False), ("Don't-stop: now!", False),
])
def test_has_unspeakable(raw, unspeakable):
    assert has_unspeakable(raw) is unspeakable


def test_manifest_stores_non_ascii_as_text_and_reads_it_normalised(tmp_path):
    utts = [
        Utterance("1-2-0000", str(tmp_path / "a.flac"), 1.25, "CAFÉ ÜBER", "1"),
        Utterance("1-2-0001", str(tmp_path / "b.flac"), 0.5, "HELLO", "1"),
    ]
    path = tmp_path / "m" / "x.jsonl"
    write_manifest(path, utts)
    assert "CAFÉ ÜBER" in path.read_text(encoding="utf-8")  # stored as text, not \\u escapes
    # read back LibriSpeech-normalised, as a transcript would be
    assert [u.text for u in read_manifest(path)] == ["CAFE UBER", "HELLO"]
    assert [u.id for u in read_manifest(path)] == [u.id for u in utts]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it


def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_manifest(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "path": "p", "duration": 1.0, "text": "A", "speaker": "1"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        read_manifest(bad)
    missing_field = tmp_path / "field.jsonl"
    missing_field.write_text(json.dumps({"id": "x", "path": "p"}) + "\n")
    with pytest.raises(UserError, match=r"field\.jsonl:1"):
        read_manifest(missing_field)
