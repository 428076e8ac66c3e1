"""The default corpus: natural English sentences rendered by offline TTS, in LibriSpeech's layout.

    asr data synth --out data/synth --hours 1 --seed 0

writes <out>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac (16 kHz) and
<speaker>-<chapter>.trans.txt, so the LibriSpeech reader reads it unchanged. A voice is a speaker.
Splits: train, dev and test-clean use the seen voices; test-unseen-voice uses one voice that no other
split contains. Sentences are partitioned between splits first, so no sentence is in two splits.
How each utterance was made (engine, voice, rate, pitch, text source) goes to synth_metadata.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

from asr.data.audio import SAMPLE_RATE, init_decode_worker, load_audio, save_flac
from asr.data.sentences import Sentence, load_sentences
from asr.errors import AudioError, UserError, check_range
from asr.fileio import atomic_write_text
from asr.progress import progress_bar

CORPUS_VERSION = 2  # bump when the same options would render a different corpus
UTTERANCES_PER_CHAPTER = 40
SECONDS_PER_WORD = 0.31  # planning estimate for TTS speech at the default rates (measured: ~0.3)
SECONDS_PER_UTTERANCE_OVERHEAD = 0.45  # leading/trailing silence the engines add
SPLIT_SHARES = {"train": 0.82, "dev": 0.06, "test-clean": 0.06, "test-unseen-voice": 0.06}
HELD_OUT_SPLIT = "test-unseen-voice"
LM_TEXT_FILE = "lm_text.txt"  # text-only LM corpus written beside LibriSpeech/
CORPUS_FILE = "synth_corpus.json"  # written last: its presence marks a complete corpus
METADATA_FILE = "synth_metadata.jsonl"
# Written first, into a folder that was empty: synth owns a folder that holds it, and nothing else.
OWNER_FILE = ".asr-synth-owned"
# What synth (and the indexing and training that read its corpus) write under --out; a folder of an
# older version without the owner file is adopted only if it holds nothing else.
OWNED_ENTRIES = ("LibriSpeech", "manifests", "tokenizers", LM_TEXT_FILE, METADATA_FILE, CORPUS_FILE, OWNER_FILE)


@dataclass(frozen=True)
class Voice:
    speaker_id: int  # LibriSpeech-style numeric speaker id
    engine: str  # "espeak-ng" or "flite"
    name: str  # engine voice name, e.g. "en-us+f2" or "slt"
    sex: str  # "F" or "M", for SPEAKERS.TXT


VOICES = (
    Voice(101, "flite", "kal", "M"),
    Voice(102, "flite", "awb", "M"),
    Voice(103, "flite", "rms", "M"),
    Voice(104, "flite", "slt", "F"),
    Voice(201, "espeak-ng", "en-us+m1", "M"),
    Voice(202, "espeak-ng", "en-us+f2", "F"),
    Voice(203, "espeak-ng", "en-gb+m3", "M"),
    Voice(204, "espeak-ng", "en-gb-x-rp+f3", "F"),
    Voice(205, "espeak-ng", "en-gb-scotland+m2", "M"),
    Voice(206, "espeak-ng", "en-029+f1", "F"),
    Voice(207, "espeak-ng", "en-gb-x-gbcwmd+m4", "M"),
    Voice(208, "espeak-ng", "en-us+f4", "F"),
)
DEFAULT_HELD_OUT = 208  # en-us+f4: a voice variant no training utterance uses


@dataclass(frozen=True)
class RenderJob:
    split: str
    utt_id: str
    path: str  # output FLAC
    voice: Voice
    rate: float  # espeak-ng: words per minute; flite: duration stretch (1.0 = engine default)
    pitch: float  # espeak-ng: 0-99; flite: mean F0 in Hz
    sentence: Sentence


def engine_available(engine: str) -> bool:
    return shutil.which(engine) is not None


def _tts_command(job: RenderJob, wav_path: str) -> list[str]:
    v = job.voice
    if v.engine == "espeak-ng":
        return ["espeak-ng", "-v", v.name, "-s", str(int(job.rate)), "-p", str(int(job.pitch)), "-w", wav_path, job.sentence.spoken]
    return [
        "flite", "-voice", v.name, "-t", job.sentence.spoken, "-o", wav_path,
        "--setf", f"duration_stretch={job.rate:.3f}", "--setf", f"int_f0_target_mean={job.pitch:.1f}",
    ]


def render_one(job: RenderJob) -> tuple[RenderJob, float | None, str | None]:
    """Render one utterance to FLAC. Returns (job, duration seconds, error or None)."""
    with tempfile.TemporaryDirectory(prefix="asr-tts-") as tmp:
        wav = os.path.join(tmp, "out.wav")
        try:
            proc = subprocess.run(_tts_command(job, wav), capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return job, None, f"{job.voice.engine} failed: {err}"
        if proc.returncode != 0:
            return job, None, f"{job.voice.engine} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[:200]}"
        try:
            wave = load_audio(wav, SAMPLE_RATE)
        except AudioError as err:
            return job, None, f"{job.voice.engine} wrote unreadable audio: {err.reason}"
    save_flac(job.path, wave, SAMPLE_RATE)
    return job, wave.numel() / SAMPLE_RATE, None


def _estimate_seconds(sentence: Sentence) -> float:
    return SECONDS_PER_UTTERANCE_OVERHEAD + SECONDS_PER_WORD * (sentence.text.count(" ") + 1)


def _voice_params(voice: Voice, rng: random.Random) -> tuple[float, float]:
    if voice.engine == "espeak-ng":
        return rng.uniform(140, 185), rng.uniform(35, 65)
    base_f0 = {"slt": 170.0, "kal": 105.0, "awb": 110.0, "rms": 100.0}.get(voice.name, 120.0)
    return rng.uniform(0.9, 1.15), base_f0 * rng.uniform(0.88, 1.12)


def plan_corpus(out: Path, hours: float, seed: int, held_out: int, sentences: list[Sentence]) -> list[RenderJob]:
    """Assign sentences to splits (disjoint), voices and prosody to utterances. Pure and deterministic."""
    rng = random.Random(seed)
    # Shuffle whole fortunes, not sentences: a joke's set-up and punch line never straddle two splits.
    groups: dict[str, list[Sentence]] = defaultdict(list)
    for sentence in sentences:
        groups[sentence.group].append(sentence)
    order = list(groups)
    rng.shuffle(order)
    pool = [s for g in order for s in groups[g]]
    voices = [v for v in VOICES if v.speaker_id != held_out]
    held = [v for v in VOICES if v.speaker_id == held_out]
    if not held:
        raise UserError(f"--held-out-voice {held_out}: no such voice (choose from {[v.speaker_id for v in VOICES]})")
    available = [v for v in VOICES if engine_available(v.engine)]
    missing = sorted({v.engine for v in VOICES} - {v.engine for v in available})
    if missing:
        raise UserError(f"TTS engine(s) not installed: {', '.join(missing)} (Debian packages espeak-ng and flite)")

    # Sentences per split: what the requested duration needs, but never more than the split's share
    # of the pool; a split that runs out reuses its own sentences with other voices, never another split's.
    mean_seconds = sum(map(_estimate_seconds, pool)) / len(pool)
    jobs: list[RenderJob] = []
    start = 0
    chapter_counter = defaultdict(int)
    for split, share in SPLIT_SHARES.items():
        wanted = max(1, math.ceil(hours * 3600 * share / mean_seconds))
        end = start + min(wanted, max(1, int(len(pool) * share)))
        while 0 < end < len(pool) and pool[end].group == pool[end - 1].group:
            end += 1  # finish the fortune
        split_sentences = pool[start:end]
        n_sentences = len(split_sentences)
        if n_sentences == 0:
            raise UserError(f"not enough sentences for split {split}: the text pool has {len(pool)}")
        start = end
        split_voices = held if split == HELD_OUT_SPLIT else voices
        per_speaker: dict[int, list] = defaultdict(list)
        for k in range(wanted):
            sentence = split_sentences[k % n_sentences]
            cycle = k // n_sentences
            voice = split_voices[(k + cycle) % len(split_voices)] if cycle else rng.choice(split_voices)
            per_speaker[voice.speaker_id].append((voice, sentence))
        for speaker_id, items in sorted(per_speaker.items()):
            for c0 in range(0, len(items), UTTERANCES_PER_CHAPTER):
                chapter_counter[speaker_id] += 1
                chapter = 1000 * speaker_id + chapter_counter[speaker_id]
                for u, (voice, sentence) in enumerate(items[c0 : c0 + UTTERANCES_PER_CHAPTER]):
                    utt_id = f"{speaker_id}-{chapter}-{u:04d}"
                    rate, pitch = _voice_params(voice, rng)
                    path = out / "LibriSpeech" / split / str(speaker_id) / str(chapter) / f"{utt_id}.flac"
                    jobs.append(RenderJob(split, utt_id, str(path), voice, rate, pitch, sentence))
    return jobs


def lm_text(sentences: list[Sentence], jobs: list[RenderJob]) -> list[str]:
    """A text-only LM corpus, like LibriSpeech's: every pool sentence whose fortune gave no
    dev or test utterance (training sentences included, evaluation fortunes excluded whole)."""
    held = {job.sentence.group for job in jobs if job.split != "train"}
    return [s.text for s in sentences if s.group not in held]


@dataclass(frozen=True)
class SynthSummary:
    utterances: int
    failed: int
    audio_hours: float
    wall_seconds: float


def synthesize(out: str | os.PathLike, hours: float, seed: int = 0, held_out: int = DEFAULT_HELD_OUT,
               workers: int | None = None, progress: bool = True) -> SynthSummary:
    if hours <= 0:
        raise UserError(f"--hours {hours}: must be positive")
    out = Path(out)
    started = time.perf_counter()
    check_output_folder(out)
    sentences = load_sentences()
    jobs = plan_corpus(out, hours, seed, held_out, sentences)
    claim_output_folder(out)
    # A corpus is rendered whole, never mixed with an older one; what was derived from it goes too.
    # Only in a folder this command owns (claim_output_folder), so all of it was made here.
    (out / CORPUS_FILE).unlink(missing_ok=True)  # first: an interrupted re-render is never taken as complete
    for derived in ("LibriSpeech", "manifests", "tokenizers"):
        if (out / derived).exists():
            shutil.rmtree(out / derived)
    results: dict[str, tuple[RenderJob, float]] = {}
    failures: list[tuple[RenderJob, str]] = []
    workers = workers or os.cpu_count() or 1
    with Pool(workers, initializer=init_decode_worker) as pool, progress_bar(total=len(jobs), unit="utt", desc="rendering", enabled=progress) as bar:
        for job, seconds, error in pool.imap_unordered(render_one, jobs, chunksize=8):
            if error is None:
                results[job.utt_id] = (job, seconds)
            else:
                failures.append((job, error))
            bar.update()
    _write_transcripts(results)
    atomic_write_text(out / LM_TEXT_FILE, "".join(line + "\n" for line in lm_text(sentences, jobs)))
    _write_metadata(out, hours, seed, held_out, results, failures)
    audio_hours = sum(s for _, s in results.values()) / 3600
    for job, error in failures:
        print(f"asr data synth: {job.utt_id}: {error}")
    return SynthSummary(len(results), len(failures), audio_hours, time.perf_counter() - started)


def check_output_folder(out: Path) -> None:
    """UserError unless synth may write `out`: a new or empty folder, or one it owns."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose a new or empty folder with --out")
    if not out.is_dir() or (out / OWNER_FILE).is_file():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    # A corpus of an earlier version of this command (no owner file): adopted if nothing else is there.
    if (out / CORPUS_FILE).is_file() and set(entries) <= set(OWNED_ENTRIES):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise UserError(f"--out {out}: holds files that `asr data synth` did not make ({shown}) and would be "
                    "replaced; choose a new or empty folder with --out")


def claim_output_folder(out: Path) -> None:
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / OWNER_FILE).is_file():
        atomic_write_text(out / OWNER_FILE, "This folder was created by `asr data synth`, which may replace what is "
                                            "in it. Do not keep other files here.\n")


def _write_transcripts(results: dict[str, tuple[RenderJob, float]]) -> None:
    chapters: dict[Path, list[str]] = defaultdict(list)
    for utt_id, (job, _) in results.items():
        chapters[Path(job.path).parent].append(utt_id)
    for chapter_dir, ids in chapters.items():
        spk, chap = chapter_dir.parent.name, chapter_dir.name
        lines = [f"{i} {results[i][0].sentence.text}\n" for i in sorted(ids)]
        (chapter_dir / f"{spk}-{chap}.trans.txt").write_text("".join(lines), encoding="utf-8")


def _write_metadata(out: Path, hours: float, seed: int, held_out: int, results, failures) -> None:
    with open(out / METADATA_FILE, "w", encoding="utf-8") as f:
        for utt_id in sorted(results):
            job, seconds = results[utt_id]
            f.write(json.dumps({
                "id": utt_id, "split": job.split, "engine": job.voice.engine, "voice": job.voice.name,
                "speaker": job.voice.speaker_id, "rate": round(job.rate, 3), "pitch": round(job.pitch, 2),
                "text_source": job.sentence.source, "duration": round(seconds, 3),
            }) + "\n")
    speakers = ["; ID  |SEX| SUBSET            |MINUTES| NAME"]
    minutes: dict[tuple[int, str], float] = defaultdict(float)
    for job, seconds in results.values():
        minutes[(job.voice.speaker_id, job.split)] += seconds / 60
    by_id = {v.speaker_id: v for v in VOICES}
    for (spk, split), mins in sorted(minutes.items()):
        v = by_id[spk]
        speakers.append(f"{spk:<5}| {v.sex} | {split:<17} | {mins:6.2f}| {v.engine}:{v.name}")
    (out / "LibriSpeech").mkdir(parents=True, exist_ok=True)
    (out / "LibriSpeech" / "SPEAKERS.TXT").write_text("\n".join(speakers) + "\n", encoding="utf-8")
    # Written last and atomically: its presence marks a complete corpus (see is_rendered).
    atomic_write_text(out / CORPUS_FILE, json.dumps({
        "version": CORPUS_VERSION, "hours_requested": hours, "seed": seed,
        "held_out_voice": asdict(by_id[held_out]), "split_shares": SPLIT_SHARES,
        "voices": [asdict(v) for v in VOICES], "utterances": len(results),
        "failed": [{"id": j.utt_id, "error": e} for j, e in failures],
        "text_source": "Debian fortune databases (fortune-mod, fortunes)",
    }, indent=2) + "\n")


def is_rendered(out: str | os.PathLike, hours: float, seed: int, held_out: int = DEFAULT_HELD_OUT) -> bool:
    """True when `out` already holds a complete corpus rendered with these options by this version."""
    out = Path(out)
    try:
        meta = json.loads((out / CORPUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = (meta.get("version") == CORPUS_VERSION and meta.get("hours_requested") == hours
            and meta.get("seed") == seed and meta.get("held_out_voice", {}).get("speaker_id") == held_out
            and not meta.get("failed"))
    return same and sum(1 for _ in (out / "LibriSpeech").rglob("*.flac")) == meta.get("utterances")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="data/synth", help="corpus root (LibriSpeech/ is written inside)")
    parser.add_argument("--hours", type=float, default=1.0, help="audio hours to render, all splits together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out-voice", type=int, default=DEFAULT_HELD_OUT,
                        help="speaker id of the voice kept for test-unseen-voice only")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    parser.add_argument("--no-prepare", action="store_true", help="do not build the manifests afterwards")
    parser.add_argument("--force", action="store_true",
                        help="render again even if --out holds this corpus, or replace the other corpus it holds")


def _rendered_options(out: Path) -> dict | None:
    """The options of the complete corpus in `out`, or None when there is none."""
    try:
        meta = json.loads((out / CORPUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def run(args) -> int:
    failed = 0
    check_range("--hours", args.hours, low=0.0, low_open=True)
    if args.workers is not None:
        check_range("--workers", args.workers, low=1)
    out = Path(args.out)
    check_output_folder(out)
    if not args.force and is_rendered(out, args.hours, args.seed, args.held_out_voice):
        print(f"{args.out}: already holds this corpus (version {CORPUS_VERSION}, {args.hours} h, seed {args.seed}); "
              "reading it back (--force renders it again)")
    else:
        existing = _rendered_options(out)
        if existing is not None and not args.force:
            held = (existing.get("held_out_voice") or {}).get("speaker_id")
            if (existing.get("version"), existing.get("hours_requested"), existing.get("seed"), held) == (
                    CORPUS_VERSION, args.hours, args.seed, args.held_out_voice):
                raise UserError(f"--out {args.out}: holds this corpus, but incomplete "
                                f"({len(existing.get('failed') or [])} utterances failed to render, or files are "
                                "missing); pass --force to render it again")
            raise UserError(
                f"--out {args.out}: holds another corpus (version {existing.get('version')}, --hours "
                f"{existing.get('hours_requested')}, --seed {existing.get('seed')}, --held-out-voice {held}); "
                "pass --force to replace it, or choose another --out")
        summary = synthesize(args.out, args.hours, args.seed, args.held_out_voice, args.workers)
        rate = summary.audio_hours / (summary.wall_seconds / 60)
        print(f"rendered {summary.utterances} utterances, {summary.audio_hours:.2f} h of audio in "
              f"{summary.wall_seconds:.1f} s ({rate:.2f} audio hours per wall minute); {summary.failed} failed")
        failed = summary.failed
    if not args.no_prepare:
        from asr.data.librispeech import prepare_splits
        from asr.data.summary import print_summary

        splits = list(SPLIT_SHARES)
        manifests = prepare_splits(args.out, splits, workers=args.workers)
        print_summary({s: manifests[s] for s in splits})
    return 1 if failed else 0
