"""Manifests: what we write reads back; every bad line is one `file:line: reason`, through the CLI too."""

import json

import pytest

from asr.cli import main
from asr.data.manifest import Utterance, read_manifest, write_manifest
from asr.data.text import normalize_text
from asr.errors import UserError

GOOD = {"id": "1-2-0000", "path": "/data/1-2-0000.flac", "duration": 1.5, "text": "HELLO WORLD", "speaker": "1"}


def _line(**changes) -> str:
    fields = {**GOOD, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}, ensure_ascii=False)


def _write(tmp_path, *lines: str | bytes) -> str:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return str(path)


def test_write_then_read_round_trip(tmp_path):
    utterances = [Utterance("1-2-0000", "/a.flac", 1.25, "HELLO WORLD", "1"),
                  Utterance("1-2-0001", "/b.flac", 0.5, "DON'T STOP JAMES' 'TIS", "1")]
    write_manifest(tmp_path / "m.jsonl", utterances)
    assert read_manifest(tmp_path / "m.jsonl") == utterances


# (line(s) of a manifest, the reason its error must give, the line it must name)
BAD = {
    "latin-1": ([_line(id="1-2-0001").encode(), _line(text="CAFÉ").encode("latin-1")], "not UTF-8 text (byte 0xc9", 2),
    "not json": ([_line(), '{"id": "1-2-0001", "path": '], "not valid JSON", 2),
    "not an object": (["[1, 2, 3]"], "expected a JSON object with fields id, path, duration, text, speaker, got a list", 1),
    "missing field": ([_line(speaker=...)], "missing field speaker", 1),
    "missing fields": ([_line(path=..., duration=...)], "missing fields path, duration", 1),
    "id is a list": ([_line(id=["1-2-0000"])], "field 'id' must be a non-empty string, got [\"1-2-0000\"]", 1),
    "path is a number": ([_line(path=7)], "field 'path' must be a non-empty string, got 7", 1),
    "empty path": ([_line(path="")], "field 'path' must be a non-empty string", 1),
    "duration is text": ([_line(duration="1.5")], "field 'duration' must be a positive number of seconds, got \"1.5\"", 1),
    "negative duration": ([_line(duration=-1)], "positive number of seconds, got -1", 1),
    "duration is true": ([_line(duration=True)], "positive number of seconds, got true", 1),
    "text is null": ([_line(text=None)], "field 'text' must be a non-empty string, got null", 1),
    "duplicate id": ([_line(), _line(path="/data/other.flac")], "duplicate id '1-2-0000' (first on line 1)", 2),
    "digits": ([_line(text="ROOM 101")], "text of 1-2-0000 has digits or symbols that normalisation would drop", 1),
    "nothing speakable": ([_line(text="?!")], "text of 1-2-0000 is empty after normalisation", 1),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_line_is_one_error_naming_file_and_line(tmp_path, kind):
    lines, reason, line_no = BAD[kind]
    path = _write(tmp_path, *lines)
    with pytest.raises(UserError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line_no}: ") and reason in message and "\n" not in message


@pytest.mark.parametrize("kind", ["latin-1", "not json", "missing field", "duplicate id"])
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, kind):
    lines, reason, line_no = BAD[kind]
    path = _write(tmp_path, *lines)
    assert main(["data", "summary", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asr data summary: error: {path}:{line_no}: ") and reason in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_empty_manifest(tmp_path):
    path = _write(tmp_path, "", "   ")
    with pytest.raises(UserError, match=f"^{path}: manifest is empty"):
        read_manifest(path)


def test_missing_manifest_and_directory(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="not a manifest file"):
        read_manifest(tmp_path)


def test_text_is_normalised_like_librispeech_transcripts(tmp_path):
    texts = ["Café au lait, naïve Zürich!", "don’t STOP", "HELLO  WORLD", "THE CAT'S HAT", "'TIS JAMES' 'QUOTED'"]
    path = _write(tmp_path, *(_line(id=f"1-2-{k:04d}", text=t) for k, t in enumerate(texts)))
    assert [u.text for u in read_manifest(path)] == [normalize_text(t) for t in texts]
    assert [u.text for u in read_manifest(path)][:2] == ["CAFE AU LAIT NAIVE ZURICH", "DON'T STOP"]


def test_numeric_ids_and_speakers_are_read_as_strings_and_a_bom_is_ignored(tmp_path):
    path = _write(tmp_path, b"\xef\xbb\xbf" + _line(id=1089, speaker=1089).encode())
    assert read_manifest(path) == [Utterance("1089", GOOD["path"], 1.5, "HELLO WORLD", "1089")]


def test_missing_audio_is_not_an_error_at_read_time(tmp_path):
    """Decided: audio is checked when it is loaded, where a missing file is reported and skipped."""
    path = _write(tmp_path, _line(path=str(tmp_path / "absent.flac")))
    assert read_manifest(path)[0].path == str(tmp_path / "absent.flac")


# --- asr data summary --root: says which of the root, manifests/ and the manifests is missing

def test_summary_of_a_root_that_does_not_exist(tmp_path, capsys):
    root = tmp_path / "nonexistent"
    assert main(["data", "summary", "--root", str(root)]) == 2
    assert capsys.readouterr().err == f"asr data summary: error: --root {root}: no such directory\n"


def test_summary_of_a_root_without_manifests(tmp_path, capsys):
    assert main(["data", "summary", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asr data summary: error: --root {tmp_path}: has no manifests/ directory") and err.count("\n") == 1
    (tmp_path / "manifests").mkdir()
    assert main(["data", "summary", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"asr data summary: error: --root {tmp_path}: {tmp_path / 'manifests'} "
                                       "holds no *.jsonl manifests\n")
    (tmp_path / "a-file").write_text("x")
    assert main(["data", "summary", "--root", str(tmp_path / "a-file")]) == 2
    assert "a-file: not a directory" in capsys.readouterr().err


def test_summary_of_a_root(tmp_path, capsys):
    write_manifest(tmp_path / "manifests" / "dev.jsonl", [Utterance("1-2-0000", "/a.flac", 1800.0, "HELLO WORLD", "1"),
                                                          Utterance("3-4-0000", "/b.flac", 1800.0, "HELLO", "3")])
    assert main(["data", "summary", "--root", str(tmp_path)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.split() == ["dev", "2", "1.00", "2", "3", "2"]
