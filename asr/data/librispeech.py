"""LibriSpeech in its published layout, and nowhere else.

    <root>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <root>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

`asr data prepare librispeech --root DIR [--download SPLITS]` fetches the OpenSLR archives (resumable,
checksum-verified) and writes one JSON-lines manifest per split to <root>/manifests/<split>.jsonl.
Every audio file is decoded once while indexing; a broken file, an audio file without a transcript
line and a transcript line without audio are each reported, skipped and counted.

It replaces or removes only files it made: a manifest that reads as one (asr.data.manifest's format)
and an errors list whose every line names a path in the split's directory. Anything else at those
paths is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from asr.data.audio import SAMPLE_RATE, init_decode_worker, load_audio
from asr.data.manifest import Utterance, read_manifest, write_manifest
from asr.data.text import normalize_text
from asr.errors import AudioError, UserError
from asr.fileio import atomic_write_text
from asr.progress import progress_bar

OPENSLR_URL = "https://www.openslr.org/resources/12/"
# SHA-256 of the published archives (OpenSLR SLR12).
SPLIT_SHA256 = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}
SPLITS = tuple(SPLIT_SHA256)
DOWNLOAD_CHUNK = 1 << 20  # bytes
READ_TIMEOUT = 60.0  # s without a byte from the server before a download counts as stalled
AUDIO_EXTENSIONS = (".flac", ".wav")


@dataclass
class SplitIndex:
    split: str
    utterances: list[Utterance] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "path: reason", one per skipped item


# --- download -----------------------------------------------------------------------------------

def download_split(split: str, root: str | os.PathLike, base_url: str = OPENSLR_URL,
                   sha256: str | None = None, progress: bool = True, timeout: float = READ_TIMEOUT) -> Path:
    """Fetch <split>.tar.gz into <root>, resuming a partial download, verify it, and extract it.

    An interrupted or stalled (`timeout` seconds without data) download keeps <split>.tar.gz.part,
    which the next call resumes; an archive with the wrong checksum is moved aside, so the next
    call downloads afresh.
    """
    if split not in SPLIT_SHA256 and sha256 is None:
        raise UserError(f"--download {split}: unknown LibriSpeech split (one of {', '.join(SPLITS)})")
    expected = sha256 or SPLIT_SHA256[split]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{split}.tar.gz"
    if not (archive.exists() and _sha256(archive) == expected):
        _fetch_resumable(base_url.rstrip("/") + f"/{split}.tar.gz", archive, progress, timeout)
        actual = _sha256(archive)
        if actual != expected:
            bad = archive.with_name(archive.name + ".corrupt")
            os.replace(archive, bad)
            raise UserError(f"{archive}: checksum mismatch (sha256 {actual}, expected {expected}); moved to {bad.name}")
    _extract(archive, root)
    return root / "LibriSpeech" / split


def _fetch_resumable(url: str, dest: Path, progress: bool, timeout: float) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # the timeout bounds every read too
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # range past the end: the part file is already complete
            os.replace(part, dest)
            return
        raise UserError(f"{url}: download failed (HTTP {err.code} {err.reason})") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        resume = f"; run the same command again to resume from the {have} bytes in {part.name}" if have else ""
        raise UserError(f"{url}: download failed ({_timeout_reason(reason, timeout)}){resume}") from None
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        expected = int(length) if length else None  # bytes of this response, not of the whole file
        received = 0
        try:
            with open(part, "ab" if resumed else "wb") as f, progress_bar(
                total=None if expected is None else expected + (have if resumed else 0),
                initial=have if resumed else 0, unit="B", unit_scale=True, desc=dest.name, enabled=progress,
            ) as bar:
                # read1: what has arrived, so a stall loses nothing already received (read waits for a full chunk)
                while chunk := response.read1(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (http.client.HTTPException, OSError) as err:  # connection reset, read timeout, short body
            raise _interrupted(url, part, _timeout_reason(err, timeout)) from None
        # http.client ends a body that stops short of Content-Length as if it were complete
        if expected is not None and received < expected:
            raise _interrupted(url, part, f"the server closed the connection {expected - received} bytes early")
    os.replace(part, dest)


def _timeout_reason(err, timeout: float) -> str:
    if isinstance(err, TimeoutError):
        return f"no data from the server for {timeout:g} s"
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _interrupted(url: str, part: Path, reason: str) -> UserError:
    size = part.stat().st_size if part.exists() else 0
    return UserError(f"{url}: download interrupted after {size} bytes ({reason}); "
                     f"{part.name} is kept: run the same command again to resume")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(DOWNLOAD_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: Path, root: Path) -> None:
    marker = root / f".{archive.name}.extracted"
    if marker.exists():
        return
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")  # refuses absolute paths, links out of root, devices
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{archive}: cannot extract ({err})") from None
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


# --- indexing -----------------------------------------------------------------------------------

def split_dir(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "LibriSpeech" / split


def manifest_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "manifests" / f"{split}.jsonl"


def _probe(path: str) -> tuple[str, float | None, str | None]:
    try:
        wave = load_audio(path, SAMPLE_RATE)
    except AudioError as err:
        return path, None, err.reason
    return path, wave.numel() / SAMPLE_RATE, None


def index_split(root: str | os.PathLike, split: str, workers: int | None = None, progress: bool = True) -> SplitIndex:
    """Walk one split, decode every audio file, pair it with its transcript line."""
    base = split_dir(root, split)
    if not base.is_dir():
        raise UserError(f"{base}: split directory not found (expected LibriSpeech's layout under --root)")
    index = SplitIndex(split)
    transcripts: dict[str, tuple[str, str]] = {}  # utt id -> (text, speaker)
    audio: dict[str, Path] = {}
    for speaker_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        for chapter_dir in sorted(p for p in speaker_dir.iterdir() if p.is_dir()):
            for trans in sorted(chapter_dir.glob("*.trans.txt")):
                for line_no, line in enumerate(trans.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if not line.strip():
                        continue
                    utt_id, _, text = line.strip().partition(" ")
                    normalized = normalize_text(text)
                    if not normalized:
                        index.errors.append(f"{trans}:{line_no}: transcript of {utt_id} is empty after normalisation")
                        continue
                    transcripts[utt_id] = (normalized, speaker_dir.name)
            for f in sorted(chapter_dir.iterdir()):
                if f.suffix.lower() in AUDIO_EXTENSIONS:
                    audio[f.stem] = f.absolute()  # not resolve(): the errors list names paths inside the split
    for utt_id in sorted(set(transcripts) - set(audio)):
        index.errors.append(f"{base}: transcript line {utt_id} has no audio file")
    paired = sorted(set(audio) & set(transcripts))
    for utt_id in sorted(set(audio) - set(transcripts)):
        index.errors.append(f"{audio[utt_id]}: no transcript line for this audio file")
    durations: dict[str, float] = {}
    workers = workers or os.cpu_count() or 1
    paths = [str(audio[u]) for u in paired]
    with ProcessPoolExecutor(workers, initializer=init_decode_worker) as pool:
        results = pool.map(_probe, paths, chunksize=32)
        for path, seconds, error in progress_bar(results, total=len(paths), unit="file", desc=f"indexing {split}", enabled=progress):
            if error is None:
                durations[path] = seconds
            else:
                index.errors.append(f"{path}: {error}")
    for utt_id in paired:
        path = str(audio[utt_id])
        if path in durations:
            text, speaker = transcripts[utt_id]
            index.utterances.append(Utterance(utt_id, path, round(durations[path], 4), text, speaker))
    return index


def prepare_split(root: str | os.PathLike, split: str, workers: int | None = None, progress: bool = True) -> SplitIndex:
    """Index a split and write its manifest (and an .errors.txt listing every skipped item)."""
    manifest = manifest_path(root, split)
    errors = manifest.with_suffix(".errors.txt")
    # before indexing, which can take minutes: refuse rather than replace what someone else put there
    _refuse_foreign_file(manifest, "manifest", _is_our_manifest)
    _refuse_foreign_file(errors, "list of skipped items", lambda path: _is_our_errors_list(path, split_dir(root, split)))
    index = index_split(root, split, workers, progress)
    if index.errors:
        atomic_write_text(errors, "\n".join(index.errors) + "\n")
    elif errors.exists():
        errors.unlink()
    if not index.utterances:
        # A manifest left from an earlier indexing would describe audio that is no longer readable;
        # remove it so that nothing reads it later as if this split were fine.
        manifest.unlink(missing_ok=True)
        first = f"; first: {index.errors[0]}; all listed in {errors}" if index.errors else ""
        raise UserError(f"{split_dir(root, split)}: no readable utterances ({len(index.errors)} errors{first})")
    write_manifest(manifest, index.utterances)
    return index


def _refuse_foreign_file(path: Path, role: str, is_ours) -> None:
    """UserError unless `path` is free or holds what prepare_split writes there (`role`)."""
    if not (path.exists() or path.is_symlink()):
        return
    what = "a directory" if path.is_dir() else "a symbolic link" if path.is_symlink() else None
    if what is None and is_ours(path):
        return
    what = what or "a file that `asr data prepare` did not write"
    raise UserError(f"{path}: {what} is in the way of the split's {role}; it is left untouched: "
                    "move it elsewhere (or delete it), then run again")


def _is_our_manifest(path: Path) -> bool:
    try:
        read_manifest(path)
    except UserError:
        return False
    return True


def _is_our_errors_list(path: Path, base: Path) -> bool:
    """Every line that index_split writes starts with a path in the split's directory; the root may
    have been spelled relatively or absolutely then."""
    prefixes = tuple({str(p) for p in (base, base.absolute(), base.resolve())})
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(lines) and all(line.startswith(prefixes) for line in lines)


def prepare_splits(root, splits, workers=None, progress=True) -> dict[str, list[Utterance]]:
    out = {}
    for split in splits:
        index = prepare_split(root, split, workers, progress)
        for error in index.errors:
            print(f"skipped: {error}")
        print(f"{split}: {len(index.utterances)} utterances indexed, {len(index.errors)} skipped")
        out[split] = index.utterances
    return out


def load_split(root: str | os.PathLike, split: str) -> list[Utterance]:
    """A split's utterances from its cached manifest, indexing the split first if there is none."""
    manifest = manifest_path(root, split)
    if not manifest.exists():
        prepare_split(root, split, progress=False)
    return read_manifest(manifest)


# --- command ------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--root", required=True, help="directory holding (or to receive) LibriSpeech/")
    parser.add_argument("--download", default="", help=f"comma-separated splits to download first ({','.join(SPLITS)})")
    parser.add_argument("--splits", default="", help="comma-separated splits to index (default: every split present)")
    parser.add_argument("--mirror", default=OPENSLR_URL, help="base URL of the archives")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    parser.add_argument("--timeout", type=float, default=READ_TIMEOUT,
                        help="seconds without data before a download counts as stalled (default %(default)g); "
                             "an interrupted download resumes when the command is run again")


def _split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args) -> int:
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout}: must be a positive number of seconds")
    for split in _split_list(args.download):
        download_split(split, args.root, args.mirror, timeout=args.timeout)
    splits = _split_list(args.splits) or _split_list(args.download)
    if not splits:
        base = Path(args.root) / "LibriSpeech"
        splits = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not splits:
        raise UserError(f"{args.root}: no LibriSpeech/<split> directories found (use --download)")
    from asr.data.summary import print_summary

    manifests = prepare_splits(args.root, splits, args.workers)
    print_summary(manifests)
    return 0
