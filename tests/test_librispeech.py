"""LibriSpeech reader (published layout, broken items reported/skipped/counted) and downloader
(resume, checksum) against a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from asr.cli import main
from asr.data.librispeech import (
    READ_TIMEOUT, SPLITS, download_split, index_split, load_split, manifest_path, prepare_split, split_dir,
)
from asr.data.manifest import read_manifest, write_manifest
from asr.errors import UserError

SPLIT = "dev-clean"

GOOD = {  # id -> (seconds, transcript as written, transcript as indexed)
    "11-100-0000": (0.50, "HELLO WORLD", "HELLO WORLD"),
    "11-100-0001": (0.80, "Café au lait, naïve Zürich", "CAFE AU LAIT NAIVE ZURICH"),
    "11-101-0000": (1.00, "DON'T STOP", "DON'T STOP"),
    "22-200-0000": (0.60, "THE CAT'S HAT", "THE CAT'S HAT"),
    "22-200-0001": (0.35, "A  B   C", "A B C"),
}


@pytest.fixture
def layout(tmp_path, write_corpus):
    """Two speakers, three chapters, five good utterances and one of each kind of broken item."""
    root = tmp_path / "corpus"
    items = {utt_id: (seconds, text) for utt_id, (seconds, text, _) in GOOD.items()}
    items.update({
        "11-100-0002": (0.5, "CORRUPT AUDIO"),
        "11-101-0001": (0.5, "EMPTY AUDIO"),
        "11-101-0002": (0.5, None),  # audio, no transcript line
        "22-200-0003": (0.5, "TRUNCATED AUDIO"),
        "22-200-0005": (None, "NO AUDIO FOR THIS LINE"),
    })
    base = write_corpus(root, SPLIT, items)
    (base / "11/100/11-100-0002.flac").write_bytes(np.random.default_rng(1).bytes(3000))
    (base / "11/101/11-101-0001.flac").write_bytes(b"")
    truncated = base / "22/200/22-200-0003.flac"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    broken = {  # id -> a word its error line must contain
        "11-100-0002": "decode", "11-101-0001": "empty", "11-101-0002": "no transcript",
        "22-200-0003": "", "22-200-0005": "no audio",
    }
    return root, broken


def test_index_reports_skips_and_counts_every_broken_item(layout):
    root, broken = layout
    index = index_split(root, SPLIT, workers=2, progress=False)

    by_id = {u.id: u for u in index.utterances}
    assert set(by_id) == set(GOOD), "every good utterance indexed, nothing else"
    for utt_id, (seconds, _, text) in GOOD.items():
        u = by_id[utt_id]
        assert u.text == text
        assert u.speaker == utt_id.split("-")[0]
        assert u.duration == pytest.approx(seconds, abs=1e-3)
        assert Path(u.path).is_absolute() and Path(u.path).name == f"{utt_id}.flac" and Path(u.path).is_file()
    assert [u.id for u in index.utterances] == sorted(GOOD)

    assert len(index.errors) == len(broken)
    for utt_id, word in broken.items():
        lines = [e for e in index.errors if utt_id in e]
        assert len(lines) == 1, (utt_id, index.errors)
        assert word in lines[0]


def test_prepare_writes_manifest_and_errors_file(layout):
    root, broken = layout
    index = prepare_split(root, SPLIT, workers=2, progress=False)
    manifest = manifest_path(root, SPLIT)
    assert manifest == root / "manifests" / f"{SPLIT}.jsonl"
    assert read_manifest(manifest) == index.utterances
    errors = manifest.with_suffix(".errors.txt").read_text(encoding="utf-8").splitlines()
    assert errors == index.errors and len(errors) == len(broken)


def test_load_split_builds_then_reuses_the_cached_manifest(layout):
    root, _ = layout
    assert not manifest_path(root, SPLIT).exists()
    first = load_split(root, SPLIT)
    assert {u.id for u in first} == set(GOOD)
    stamp = manifest_path(root, SPLIT).stat().st_mtime_ns
    assert load_split(root, SPLIT) == first
    assert manifest_path(root, SPLIT).stat().st_mtime_ns == stamp


def test_all_broken_split_is_a_user_error_that_says_why(tmp_path, write_corpus):
    base = write_corpus(tmp_path, SPLIT, {"1-2-0000": (0.3, "ONE"), "1-2-0001": (0.3, "TWO")})
    for f in base.rglob("*.flac"):
        f.write_bytes(b"garbage" * 50)
    with pytest.raises(UserError, match=r"no readable utterances \(2 errors; first: .*1-2-0000\.flac: cannot decode audio: not a readable audio file"):
        prepare_split(tmp_path, SPLIT, workers=1, progress=False)
    assert len(manifest_path(tmp_path, SPLIT).with_suffix(".errors.txt").read_text().splitlines()) == 2


def test_reindexing_to_nothing_removes_the_stale_manifest(tmp_path, write_corpus):
    base = write_corpus(tmp_path, SPLIT, {"1-2-0000": (0.3, "ONE"), "1-2-0001": (0.3, "TWO")})
    assert len(load_split(tmp_path, SPLIT)) == 2
    for f in base.rglob("*.flac"):
        f.write_bytes(b"garbage" * 50)
    with pytest.raises(UserError, match="no readable utterances"):
        prepare_split(tmp_path, SPLIT, workers=1, progress=False)
    assert not manifest_path(tmp_path, SPLIT).exists()
    with pytest.raises(UserError, match="no readable utterances"):  # not the old, stale list
        load_split(tmp_path, SPLIT)


@pytest.mark.parametrize("content", [b"my own notes, not a manifest\n", b"", b'{"audio_filepath": "/a.wav", "duration": 1}\n'])
def test_prepare_never_overwrites_a_file_it_did_not_write(tmp_path, write_corpus, content):
    write_corpus(tmp_path, SPLIT, {"1-2-0000": (0.3, "ONE")})
    manifest = manifest_path(tmp_path, SPLIT)
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(content)
    with pytest.raises(UserError) as caught:
        prepare_split(tmp_path, SPLIT, workers=1, progress=False)
    assert str(caught.value) == (f"{manifest}: a file that `asr data prepare` did not write is in the way of the "
                                 "split's manifest; it is left untouched: move it elsewhere (or delete it), then run again")
    assert manifest.read_bytes() == content


def test_prepare_never_removes_a_foreign_manifest_of_a_broken_split(tmp_path, write_corpus):
    base = write_corpus(tmp_path, SPLIT, {"1-2-0000": (0.3, "ONE")})
    for f in base.rglob("*.flac"):
        f.write_bytes(b"garbage" * 50)
    manifest = manifest_path(tmp_path, SPLIT)
    manifest.parent.mkdir(parents=True)
    manifest.write_text("precious\n")
    with pytest.raises(UserError, match="did not write"):
        prepare_split(tmp_path, SPLIT, workers=1, progress=False)
    assert manifest.read_text() == "precious\n"


def test_prepare_never_overwrites_a_foreign_errors_file_or_a_directory(tmp_path, write_corpus):
    write_corpus(tmp_path, SPLIT, {"1-2-0000": (0.3, "ONE")})
    errors = manifest_path(tmp_path, SPLIT).with_suffix(".errors.txt")
    errors.parent.mkdir(parents=True)
    errors.write_text("someone's list\n")
    with pytest.raises(UserError, match=r"errors\.txt: a file that `asr data prepare` did not write is in the way of the split's list of skipped items"):
        prepare_split(tmp_path, SPLIT, workers=1, progress=False)
    assert errors.read_text() == "someone's list\n"
    errors.unlink()
    manifest_path(tmp_path, SPLIT).mkdir()
    with pytest.raises(UserError, match=r"\.jsonl: a directory is in the way"):
        prepare_split(tmp_path, SPLIT, workers=1, progress=False)


def test_prepare_replaces_its_own_files(tmp_path, write_corpus, monkeypatch):
    """What prepare wrote (or a manifest in its format) is replaced, whatever the spelling of the root."""
    base = write_corpus(tmp_path, SPLIT, {"1-2-0000": (0.3, "ONE"), "1-2-0001": (0.3, "TWO")})
    (base / "1/2/1-2-0001.flac").write_bytes(b"")
    first = prepare_split(tmp_path, SPLIT, workers=1, progress=False)
    assert len(first.utterances) == 1 and len(first.errors) == 1
    sf_path = base / "1/2/1-2-0001.flac"
    sf_path.unlink()
    os.symlink(base / "1/2/1-2-0000.flac", sf_path)  # now readable
    monkeypatch.chdir(tmp_path)  # the same root, spelled relatively
    second = prepare_split(".", SPLIT, workers=1, progress=False)
    assert [u.id for u in second.utterances] == ["1-2-0000", "1-2-0001"] and second.errors == []
    assert read_manifest(manifest_path(tmp_path, SPLIT)) == second.utterances
    assert not manifest_path(tmp_path, SPLIT).with_suffix(".errors.txt").exists()
    # a manifest in our format written by another command (evaluate's tests do this) is ours too
    write_manifest(manifest_path(tmp_path, SPLIT), second.utterances[:1])
    assert len(prepare_split(tmp_path, SPLIT, workers=1, progress=False).utterances) == 2


def test_missing_split_directory(tmp_path):
    with pytest.raises(UserError, match="split directory not found"):
        index_split(tmp_path, "test-other", progress=False)


def test_untranscribable_line_is_reported(tmp_path, write_corpus):
    write_corpus(tmp_path, SPLIT, {"1-2-0000": (0.3, "GOOD ONE"), "1-2-0001": (0.3, "1234 !!")})
    index = index_split(tmp_path, SPLIT, workers=1, progress=False)
    assert [u.id for u in index.utterances] == ["1-2-0000"]
    assert any("1-2-0001" in e and "empty after normalisation" in e for e in index.errors)
    assert any("1-2-0001" in e and "no transcript line" in e for e in index.errors)


# --- download -----------------------------------------------------------------------------------

class _ArchiveServer(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    range_requests: list[str]
    requests: list[str]
    honour_range: bool
    # what goes wrong with each next request, one entry per request: "drop" (the connection closes
    # halfway through the body), "reset" (halfway, with a TCP reset), "stall" (halfway, then silence)
    failures: list[str]
    stop_stalling: threading.Event


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the server's in-memory files, honouring single `bytes=N-` ranges as a mirror does,
    and failing mid-body as the server's `failures` say."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server: _ArchiveServer = self.server  # type: ignore[assignment]
        server.requests.append(self.path)
        body = server.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        header = self.headers.get("Range")
        if header and server.honour_range:
            server.range_requests.append(header)
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        failure = server.failures.pop(0) if server.failures else None
        if failure is None:
            self.wfile.write(body[start:])
            return
        self.wfile.write(body[start : start + (len(body) - start) // 2])
        self.wfile.flush()
        if failure == "stall":
            server.stop_stalling.wait(10)
        elif failure == "reset":  # SO_LINGER 0: close() sends RST instead of a clean FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def archive(tmp_path_factory, write_corpus):
    """A small <split>.tar.gz in LibriSpeech's layout: two good utterances. Returns (bytes, sha256)."""
    src = tmp_path_factory.mktemp("archive-src")
    write_corpus(src, SPLIT, {"7-70-0000": (0.4, "FIRST ONE"), "7-70-0001": (0.6, "SECOND ONE")})
    (src / "LibriSpeech" / "README.TXT").write_text("tiny test archive\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(src / "LibriSpeech", arcname="LibriSpeech")
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(archive):
    srv = _ArchiveServer(("127.0.0.1", 0), _RangeHandler)
    srv.files = {f"{SPLIT}.tar.gz": archive[0]}
    srv.range_requests, srv.requests, srv.honour_range = [], [], True
    srv.failures, srv.stop_stalling = [], threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.stop_stalling.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _check_extracted(root, split_path):
    assert split_path == split_dir(root, SPLIT) and split_path.is_dir()
    index = index_split(root, SPLIT, workers=1, progress=False)
    assert [u.id for u in index.utterances] == ["7-70-0000", "7-70-0001"] and index.errors == []
    assert [u.text for u in index.utterances] == ["FIRST ONE", "SECOND ONE"]


def test_download_verifies_and_extracts(tmp_path, server, archive):
    srv, url = server
    root = tmp_path / "ls"
    split_path = download_split(SPLIT, root, base_url=url, sha256=archive[1], progress=False)
    assert srv.requests == [f"/{SPLIT}.tar.gz"] and srv.range_requests == []
    assert (root / f"{SPLIT}.tar.gz").read_bytes() == archive[0]
    assert not (root / f"{SPLIT}.tar.gz.part").exists()
    _check_extracted(root, split_path)
    # A verified, extracted archive is not fetched again.
    download_split(SPLIT, root, base_url=url, sha256=archive[1], progress=False)
    assert len(srv.requests) == 1


def test_download_resumes_a_partial_file(tmp_path, server, archive):
    srv, url = server
    data, digest = archive
    root = tmp_path / "ls"
    root.mkdir()
    half = len(data) // 2
    (root / f"{SPLIT}.tar.gz.part").write_bytes(data[:half])
    split_path = download_split(SPLIT, root, base_url=url, sha256=digest, progress=False)
    assert srv.range_requests == [f"bytes={half}-"]
    assert (root / f"{SPLIT}.tar.gz").read_bytes() == data
    _check_extracted(root, split_path)


def test_download_restarts_when_the_server_ignores_range(tmp_path, server, archive):
    srv, url = server
    srv.honour_range = False
    data, digest = archive
    root = tmp_path / "ls"
    root.mkdir()
    (root / f"{SPLIT}.tar.gz.part").write_bytes(data[:100])
    download_split(SPLIT, root, base_url=url, sha256=digest, progress=False)
    assert (root / f"{SPLIT}.tar.gz").read_bytes() == data


def test_download_with_complete_part_file(tmp_path, server, archive):
    srv, url = server
    data, digest = archive
    root = tmp_path / "ls"
    root.mkdir()
    (root / f"{SPLIT}.tar.gz.part").write_bytes(data)
    _check_extracted(root, download_split(SPLIT, root, base_url=url, sha256=digest, progress=False))
    assert srv.range_requests == [f"bytes={len(data)}-"]


def test_checksum_mismatch_moves_archive_aside(tmp_path, server):
    _, url = server
    root = tmp_path / "ls"
    with pytest.raises(UserError, match="checksum mismatch") as caught:
        download_split(SPLIT, root, base_url=url, sha256="0" * 64, progress=False)
    assert f"{SPLIT}.tar.gz" in str(caught.value)
    assert not (root / f"{SPLIT}.tar.gz").exists()
    assert (root / f"{SPLIT}.tar.gz.corrupt").is_file()
    assert not split_dir(root, SPLIT).exists()


@pytest.mark.parametrize("failure", ["drop", "reset", "stall"])
def test_interrupted_download_is_one_error_and_the_next_call_resumes(tmp_path, server, archive, failure):
    srv, url = server
    data, digest = archive
    root = tmp_path / "ls"
    part = root / f"{SPLIT}.tar.gz.part"
    srv.failures = [failure]
    half = len(data) // 2
    with pytest.raises(UserError) as caught:
        download_split(SPLIT, root, base_url=url, sha256=digest, progress=False, timeout=0.5)
    message = str(caught.value)
    assert message.startswith(f"{url}{SPLIT}.tar.gz: download interrupted after {half} bytes (")
    assert message.endswith(f"{SPLIT}.tar.gz.part is kept: run the same command again to resume")
    if failure == "stall":
        assert "no data from the server for 0.5 s" in message
    assert "\n" not in message
    assert part.read_bytes() == data[:half] and not (root / f"{SPLIT}.tar.gz").exists()

    split_path = download_split(SPLIT, root, base_url=url, sha256=digest, progress=False, timeout=0.5)
    assert srv.range_requests == [f"bytes={half}-"]
    assert (root / f"{SPLIT}.tar.gz").read_bytes() == data and not part.exists()
    _check_extracted(root, split_path)


def test_interrupted_download_through_the_cli_is_one_line(tmp_path, server, capsys):
    srv, url = server
    srv.failures = ["drop"]
    root = tmp_path / "ls"
    rc = main(["data", "prepare", "librispeech", "--root", str(root), "--download", SPLIT, "--mirror", url])
    err = capsys.readouterr().err  # the progress bar, then the error
    assert rc == 2
    assert err.endswith("\n") and err.count("error:") == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"asr data prepare librispeech: error: {url}{SPLIT}.tar.gz: download interrupted after ")
    assert (root / f"{SPLIT}.tar.gz.part").stat().st_size > 0


def test_default_read_timeout():
    assert READ_TIMEOUT == 60.0


def test_wrong_bytes_then_a_fresh_download(tmp_path, server, archive):
    """A mismatch is one line; the next call downloads the whole archive again, not a resume."""
    srv, url = server
    data, digest = archive
    srv.files[f"{SPLIT}.tar.gz"] = bytes(reversed(data))
    root = tmp_path / "ls"
    with pytest.raises(UserError) as caught:
        download_split(SPLIT, root, base_url=url, sha256=digest, progress=False)
    message = str(caught.value)
    assert message == (f"{root / SPLIT}.tar.gz: checksum mismatch (sha256 {hashlib.sha256(bytes(reversed(data))).hexdigest()}, "
                       f"expected {digest}); moved to {SPLIT}.tar.gz.corrupt")
    srv.files[f"{SPLIT}.tar.gz"] = data
    split_path = download_split(SPLIT, root, base_url=url, sha256=digest, progress=False)
    assert srv.range_requests == [] and len(srv.requests) == 2
    _check_extracted(root, split_path)


def test_published_checksum_is_used_by_default(tmp_path, server):
    """The served archive is not the published one, so the default checksum must reject it."""
    _, url = server
    with pytest.raises(UserError, match="checksum mismatch"):
        download_split(SPLIT, tmp_path, base_url=url, progress=False)


def test_http_error_is_a_user_error(tmp_path, server):
    _, url = server
    with pytest.raises(UserError, match=r"test-other\.tar\.gz: download failed \(HTTP 404"):
        download_split("test-other", tmp_path, base_url=url, sha256="0" * 64, progress=False)


def test_unreachable_server_is_a_user_error(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"127.0.0.1:{port}/{SPLIT}.tar.gz: download failed"):
        download_split(SPLIT, tmp_path, base_url=f"http://127.0.0.1:{port}", sha256="0" * 64, progress=False)


def test_unknown_split_without_checksum(tmp_path):
    assert SPLIT in SPLITS and len(SPLITS) == 7
    with pytest.raises(UserError, match="unknown LibriSpeech split"):
        download_split("train-clean-5", tmp_path, progress=False)


def test_archive_that_is_not_a_tarball(tmp_path, server):
    srv, url = server
    srv.files[f"{SPLIT}.tar.gz"] = b"not a tarball at all" * 10
    digest = hashlib.sha256(srv.files[f"{SPLIT}.tar.gz"]).hexdigest()
    with pytest.raises(UserError, match="cannot extract"):
        download_split(SPLIT, tmp_path, base_url=url, sha256=digest, progress=False)


def test_decode_workers_do_not_deadlock_after_the_parent_used_torch(tmp_path):
    """Forked decode workers that resample must not hang when the parent already ran torch ops
    (libgomp is not fork-safe). Run in a subprocess so that a regression fails instead of hanging."""
    script = f"""
import numpy as np, soundfile as sf, torch, torchaudio.functional as AF
from pathlib import Path
from asr.data.librispeech import index_split
AF.resample(torch.randn(441000), 44100, 16000)  # the parent uses OpenMP before the pool forks
chapter = Path({str(tmp_path)!r}) / "LibriSpeech" / "{SPLIT}" / "1" / "2"
chapter.mkdir(parents=True)
lines = []
for k in range(6):
    sf.write(chapter / f"1-2-{{k:04d}}.flac", 0.1 * np.random.default_rng(k).standard_normal(22050), 22050)
    lines.append(f"1-2-{{k:04d}} WORD")
(chapter / "1-2.trans.txt").write_text("\\n".join(lines) + "\\n")
index = index_split({str(tmp_path)!r}, "{SPLIT}", workers=2, progress=False)
print(len(index.utterances), len(index.errors))
"""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["6", "0"]
