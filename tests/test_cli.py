"""The data commands of the `asr` CLI: bad input is one line on stderr and exit status 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from asr.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "asr.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_one_line_error(stderr: str, prog: str) -> str:
    """The error is the last line of stderr and the only one that is not a progress bar."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith(f"{prog}: error: ") and stderr.rstrip().endswith(lines[0])
    return lines[0]


def test_prepare_over_only_corrupt_audio_prints_one_line(tmp_path, write_corpus):
    base = write_corpus(tmp_path, "dev-clean", {"5-50-0000": (0.3, "ONE"), "5-50-0001": (0.3, "TWO")})
    bad = base / "5" / "50" / "5-50-0000.flac"
    bad.write_bytes(b"\x00garbage" * 64)
    (base / "5" / "50" / "5-50-0001.flac").write_bytes(b"")
    proc = _run_cli("data", "prepare", "librispeech", "--root", str(tmp_path), "--workers", "1")
    assert proc.returncode == 2
    line = _assert_one_line_error(proc.stderr, "asr data prepare librispeech")
    assert str(bad) in line and "cannot decode audio" in line and "no readable utterances (2 errors" in line


def test_download_from_unreachable_mirror_prints_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _run_cli("data", "prepare", "librispeech", "--root", str(tmp_path), "--download", "dev-clean",
                    "--mirror", f"http://127.0.0.1:{port}/")
    assert proc.returncode == 2
    line = _assert_one_line_error(proc.stderr, "asr data prepare librispeech")
    assert f"127.0.0.1:{port}/dev-clean.tar.gz: download failed" in line


def test_prepare_good_layout_reports_skipped_items(tmp_path, write_corpus, capsys):
    base = write_corpus(tmp_path, "dev-clean", {"5-50-0000": (0.3, "ONE TWO"), "5-50-0001": (0.4, "THREE"),
                                                "5-50-0002": (0.2, None)})
    assert main(["data", "prepare", "librispeech", "--root", str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "dev-clean: 2 utterances indexed, 1 skipped" in out
    assert f"skipped: {base / '5' / '50' / '5-50-0002.flac'}: no transcript line" in out
    assert (tmp_path / "manifests" / "dev-clean.jsonl").is_file()

    assert main(["data", "summary", "--root", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["split", "utts", "hours", "voices", "words", "distinct"]
    assert table[1].split() == ["dev-clean", "2", "0.00", "1", "3", "3"]


PREPARE = ["data", "prepare", "librispeech"]


@pytest.mark.parametrize("argv,message", [
    (["data", "summary", "missing.jsonl"], "missing.jsonl: manifest not found"),
    (["data", "summary"], "give manifest files or --root"),
    (["data", "synth", "--hours", "0", "--out", "{tmp}/synth"], "--hours 0.0: must be > 0.0"),
    (PREPARE + ["--root", "{tmp}"], "no LibriSpeech/<split> directories found"),
    (PREPARE + ["--root", "{tmp}", "--splits", "dev-other"], "split directory not found"),
    (PREPARE + ["--root", "{tmp}", "--download", "dev-cleen"], "unknown LibriSpeech split"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    command = argv[: 3 if argv[:3] == PREPARE else 2]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    line = _assert_one_line_error(capsys.readouterr().err, "asr " + " ".join(command))
    assert message in line


def test_unknown_command_and_help(capsys):
    assert main(["data", "frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "data prepare librispeech" in out and "data synth" in out and "data summary" in out
