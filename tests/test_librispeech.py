"""LibriSpeech reader (published layout, broken items reported/skipped/counted) and downloader
(resume, checksum) against a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from asr.data.librispeech import (
    SPLITS, download_split, index_split, load_split, manifest_path, prepare_split, split_dir,
)
from asr.data.manifest import read_manifest
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
    with pytest.raises(UserError, match=r"no readable utterances \(2 errors; first: .*1-2-0000\.flac: cannot decode"):
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


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the server's in-memory files, honouring single `bytes=N-` ranges as a mirror does."""

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
        self.wfile.write(body[start:])

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
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/"
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
