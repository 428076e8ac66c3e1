"""The default corpus: natural English sentences rendered by offline TTS, in LibriSpeech's layout.

    asr data synth --out data/synth --hours 1 --seed 0

writes <out>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac (16 kHz) and
<speaker>-<chapter>.trans.txt, so the LibriSpeech reader reads it unchanged.

Speakers (`speaker_table`): a speaker is one fixed (engine, voice, variant), the same for every seed,
with its own prosody ranges, drawn from the corpus seed; each utterance draws its values inside its
speaker's ranges. 104 speakers: 87 of espeak-ng, 17 of flite (`asr data synth --list-speakers`).
  espeak-ng: an English accent (en-us, en-gb, ...) + a voice variant (m1, f2, klatt, ...); ranges of
    rate (-s, words per minute), pitch (-p, 0-99), pitch range (SSML <prosody range>, % of the
    voice's own) and word gap (-g, 10 ms units). Its id is 2000 + 100 x the accent's index in
    ESPEAK_ACCENTS + the variant's (from 1) in ESPEAK_VARIANTS.
  flite: a voice (kal, kal16, rms, slt, awb) several times over, each speaker with a fixed warp
    (the audio is resampled so that pitch and formants scale by it and duration by its inverse: a
    longer or shorter vocal tract) and ranges of duration_stretch, int_f0_target_mean and
    int_f0_target_stddev (rms ignores the last two, so its speakers vary in rate and warp only).
    Its id is 1000 + 100 x the voice's index in FLITE_VOICES + n (from 1).
Splits: train, dev and test-clean use the seen speakers; test-unseen-voice uses only held-out ones
(`DEFAULT_HELD_OUT`, or --held-out-speakers): by default every speaker of the flite voice awb, the
accent en-gb-x-gbclan, and the variants f4, f5, m6 and klatt3, none of which any seen speaker has.
Each engine gets its ENGINE_SHARES of every split's utterances (espeak-ng 65%, flite 35%), spread
evenly over the split's speakers of that engine. Sentences are partitioned between splits first, so no sentence is
in two splits. How each utterance was made (speaker, engine, voice, variant, every prosody value,
text source) goes to synth_metadata.jsonl; the speaker table and the held-out set to synth_corpus.json.
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
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import Pool
from pathlib import Path
from xml.sax.saxutils import escape

from asr.data.audio import SAMPLE_RATE, init_decode_worker, load_audio, save_flac
from asr.data.sentences import Sentence, load_sentences
from asr.errors import AudioError, UserError, check_range
from asr.fileio import atomic_write_text
from asr.progress import progress_bar

CORPUS_VERSION = 3  # bump when the same options would render a different corpus
UTTERANCES_PER_CHAPTER = 40
SECONDS_PER_WORD = 0.325  # planning estimate for TTS speech at the speakers' rates (measured on a 0.5 h corpus: 0.325)
SECONDS_PER_UTTERANCE_OVERHEAD = 0.45  # leading/trailing silence the engines add
SPLIT_SHARES = {"train": 0.82, "dev": 0.06, "test-clean": 0.06, "test-unseen-voice": 0.06}
HELD_OUT_SPLIT = "test-unseen-voice"
ENGINE_SHARES = {"espeak-ng": 0.65, "flite": 0.35}  # of each split's utterances
LM_TEXT_FILE = "lm_text.txt"  # text-only LM corpus written beside LibriSpeech/
CORPUS_FILE = "synth_corpus.json"  # written last: its presence marks a complete corpus
METADATA_FILE = "synth_metadata.jsonl"
# Written first, into a folder that was empty: synth owns a folder that holds it, and nothing else.
OWNER_FILE = ".asr-synth-owned"
# What synth (and the indexing and training that read its corpus) write under --out; a folder of an
# older version without the owner file is adopted only if it holds nothing else.
OWNED_ENTRIES = ("LibriSpeech", "manifests", "tokenizers", LM_TEXT_FILE, METADATA_FILE, CORPUS_FILE, OWNER_FILE)

# --- the speaker table ----------------------------------------------------------------------------

# English accents of espeak-ng (`espeak-ng --voices=en`; en-uk and the en-<language> voices need
# MBROLA, which is not installed). The last one is held out.
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
                  "en-gb-x-gbclan")
HELD_OUT_ACCENT = "en-gb-x-gbclan"
# Voice variants (`espeak-ng --voices=variant`) and their sex as espeak-ng lists it (M for the
# klatt ones, which set no gender). Left out: whisper and whisperf (no voicing), the robots and
# effects (robosoft*, UniRobot, announcer, Demonic, RicishayMax*, anikaRobot, Tweaky, Storm), the
# breathy ones (voicing under 60: Alicia, Annie, anika, Denis, Diogo, Henrique, Hugo, Marco, michel,
# miguel, shelby, caleb, grandma), zac (a child's pitch, 240-390 Hz), boris (third formant at 57%),
# fast, and near-copies (klatt6 renders exactly as klatt; steph2/3, iven/2/4, Gene2, edward2, adam,
# benjamin, david, Mr serious, pedro, antonio, pablo, sandro, ...).
SEEN_VARIANTS = (
    ("m1", "M"), ("m2", "M"), ("m3", "M"), ("m4", "M"), ("m5", "M"), ("m7", "M"), ("m8", "M"),
    ("f1", "F"), ("f2", "F"), ("f3", "F"),
    ("klatt", "M"), ("klatt2", "M"), ("klatt4", "M"), ("croak", "M"), ("grandpa", "M"),
    ("Andy", "M"), ("Lee", "M"), ("Gene", "M"), ("john", "M"), ("norbert", "M"), ("ed", "M"), ("iven3", "M"),
    ("travis", "M"), ("max", "M"), ("Alex", "M"), ("edward", "M"),
    ("aunty", "F"), ("belinda", "F"), ("linda", "F"), ("steph", "F"), ("Andrea", "F"),
)
HELD_OUT_VARIANTS = (("f4", "F"), ("f5", "F"), ("m6", "M"), ("klatt3", "M"))
ESPEAK_VARIANTS = SEEN_VARIANTS + HELD_OUT_VARIANTS
ACCENTS_PER_VARIANT = {"F": 4, "M": 2}  # how many seen accents each seen variant is crossed with
# Held-out espeak-ng speakers: seen variants in the held-out accent, held-out variants in seen
# accents, and one of both.
HELD_OUT_ESPEAK = (
    (HELD_OUT_ACCENT, "m3"), (HELD_OUT_ACCENT, "f2"), (HELD_OUT_ACCENT, "klatt2"), (HELD_OUT_ACCENT, "Andy"),
    ("en-us", "f4"), ("en-gb-x-rp", "f5"), ("en-gb", "m6"), ("en-029", "klatt3"), (HELD_OUT_ACCENT, "f4"),
)
# flite voices (`flite -lv`; awb_time speaks only the time): sex, the mean F0 it renders by default
# (measured; None: the voice ignores int_f0_target_*), and how many speakers it makes.
FLITE_VOICES = {"kal": ("M", 92.0, 3), "kal16": ("M", 92.0, 3), "rms": ("M", None, 4), "slt": ("F", 167.0, 4),
                "awb": ("M", 127.0, 3)}
HELD_OUT_FLITE_VOICE = "awb"
WARPS = tuple(Fraction(p, 50) for p in range(46, 55))  # 0.92 ... 1.08: small ratios resample fast


@dataclass(frozen=True)
class Speaker:
    speaker_id: int  # LibriSpeech-style numeric speaker id
    engine: str  # "espeak-ng" or "flite"
    voice: str  # espeak-ng: the accent ("en-gb-x-rp"); flite: the voice ("slt")
    variant: str  # espeak-ng: the voice variant ("f2"); flite: ""
    sex: str  # "F" or "M", for SPEAKERS.TXT
    # (parameter, low, high): each utterance draws its value uniformly inside
    ranges: tuple[tuple[str, float, float], ...] = ()
    warp: float = 1.0  # flite: pitch and formants x warp, duration / warp (a fixed resampling)

    @property
    def name(self) -> str:
        """The engine's voice name: "en-gb+f2" for espeak-ng's -v, "slt" for flite's -voice."""
        return f"{self.voice}+{self.variant}" if self.variant else self.voice

    def as_json(self) -> dict:
        return {"speaker_id": self.speaker_id, "engine": self.engine, "voice": self.voice, "variant": self.variant,
                "name": self.name, "sex": self.sex, "warp": self.warp,
                "ranges": {p: [lo, hi] for p, lo, hi in self.ranges}}


def _identities() -> list[tuple[int, str, str, str, str]]:
    """(id, engine, voice, variant, sex) of every speaker, in id order; fixed, whatever the seed."""
    out = []
    for v, voice in enumerate(FLITE_VOICES):
        sex, _, count = FLITE_VOICES[voice]
        out += [(1000 + 100 * v + n, "flite", voice, "", sex) for n in range(1, count + 1)]
    seen_accents = [a for a in ESPEAK_ACCENTS if a != HELD_OUT_ACCENT]
    sex_of = dict(ESPEAK_VARIANTS)
    pairs = []
    slot = 0
    for variant, sex in SEEN_VARIANTS:  # each in consecutive seen accents, round robin over all of them
        for _ in range(ACCENTS_PER_VARIANT[sex]):
            pairs.append((seen_accents[slot % len(seen_accents)], variant))
            slot += 1
    pairs += HELD_OUT_ESPEAK
    variant_index = {v: i + 1 for i, (v, _) in enumerate(ESPEAK_VARIANTS)}
    for accent, variant in pairs:
        sid = 2000 + 100 * ESPEAK_ACCENTS.index(accent) + variant_index[variant]
        out.append((sid, "espeak-ng", accent, variant, sex_of[variant]))
    return sorted(out)


def _is_held_out(engine: str, voice: str, variant: str) -> bool:
    if engine == "flite":
        return voice == HELD_OUT_FLITE_VOICE
    return voice == HELD_OUT_ACCENT or variant in dict(HELD_OUT_VARIANTS)


SPEAKER_IDS = tuple(sid for sid, *_ in _identities())
DEFAULT_HELD_OUT = tuple(sid for sid, engine, voice, variant, _ in _identities() if _is_held_out(engine, voice, variant))


def _espeak_ranges(rng: random.Random) -> tuple[tuple[str, float, float], ...]:
    rate, pitch, prange = rng.uniform(135, 190), rng.uniform(25, 75), rng.uniform(50, 160)
    gap = rng.randint(0, 2)
    return (("rate", round(rate - 12), round(rate + 12)), ("pitch", round(pitch - 8), round(pitch + 8)),
            ("range", round(prange - 15), round(prange + 15)), ("word_gap", gap, gap + rng.randint(0, 2)))


def _flite_ranges(rng: random.Random, base_f0: float | None) -> tuple[tuple[str, float, float], ...]:
    stretch = rng.uniform(0.88, 1.15)
    ranges = [("duration_stretch", round(stretch - 0.05, 3), round(stretch + 0.05, 3))]
    if base_f0 is not None:
        mean, spread = base_f0 * rng.uniform(0.87, 1.13), base_f0 * rng.uniform(0.08, 0.2)
        ranges += [("f0_mean", round(mean * 0.95, 1), round(mean * 1.05, 1)),
                   ("f0_stddev", round(spread * 0.85, 1), round(spread * 1.15, 1))]
    return tuple(ranges)


def speaker_table(seed: int) -> tuple[Speaker, ...]:
    """Every speaker, in id order, with prosody ranges drawn from `seed`. Pure and deterministic."""
    rng = random.Random(f"asr-synth-speakers-{seed}")  # str seeds hash the same in every process
    identities = _identities()
    warps = {}
    for voice, (_, _, count) in FLITE_VOICES.items():  # distinct warps among one voice's speakers
        picked = sorted(rng.sample(WARPS, count))
        ids = [sid for sid, engine, v, *_ in identities if engine == "flite" and v == voice]
        warps.update({sid: float(w) for sid, w in zip(ids, picked)})
    speakers = []
    for sid, engine, voice, variant, sex in identities:
        if engine == "espeak-ng":
            speakers.append(Speaker(sid, engine, voice, variant, sex, _espeak_ranges(rng)))
        else:
            speakers.append(Speaker(sid, engine, voice, variant, sex, _flite_ranges(rng, FLITE_VOICES[voice][1]),
                                    warps[sid]))
    return tuple(speakers)


def _draw_prosody(speaker: Speaker, rng: random.Random) -> tuple[tuple[str, float], ...]:
    values = []
    for param, lo, hi in speaker.ranges:
        if isinstance(lo, int) and isinstance(hi, int):
            values.append((param, rng.randint(lo, hi)))
        else:
            values.append((param, round(rng.uniform(lo, hi), 3 if param == "duration_stretch" else 1)))
    return tuple(values)


def parse_held_out(value: str | None) -> tuple[int, ...]:
    """The --held-out-speakers value ("2001,1401" or "default") as sorted speaker ids."""
    if value is None or value.strip() == "default":
        return DEFAULT_HELD_OUT
    ids = []
    for token in value.split(","):
        token = token.strip()
        try:
            ids.append(int(token))
        except ValueError:
            raise UserError(f"--held-out-speakers {value}: {token!r} is not a speaker id (give comma-separated "
                            "ids, or 'default'; `asr data synth --list-speakers` shows them)") from None
    return check_held_out(ids, value)


def check_held_out(ids, shown=None) -> tuple[int, ...]:
    """`ids` as a sorted tuple; UserError naming --held-out-speakers unless they are a valid held-out set."""
    ids = list(ids)
    shown = shown if shown is not None else ",".join(map(str, ids))
    if not ids:
        raise UserError(f"--held-out-speakers {shown!r}: give at least one speaker id")
    unknown = [i for i in ids if i not in SPEAKER_IDS]
    if unknown:
        raise UserError(f"--held-out-speakers {shown}: no speaker {unknown[0]} (ids {min(SPEAKER_IDS)}-"
                        f"{max(SPEAKER_IDS)}; `asr data synth --list-speakers` shows them)")
    twice = [i for i, n in Counter(ids).items() if n > 1]
    if twice:
        raise UserError(f"--held-out-speakers {shown}: speaker {twice[0]} is given twice")
    if len(set(ids)) == len(SPEAKER_IDS):
        raise UserError(f"--held-out-speakers {shown}: holds out every speaker, leaving none for train, dev and "
                        "test-clean")
    return tuple(sorted(ids))


def _held_out_option(held_out: tuple[int, ...]) -> str:
    return "default" if tuple(held_out) == DEFAULT_HELD_OUT else ",".join(map(str, held_out))


# --- rendering ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderJob:
    split: str
    utt_id: str
    path: str  # output FLAC
    speaker: Speaker
    prosody: tuple[tuple[str, float], ...]  # (parameter, value) drawn inside the speaker's ranges
    sentence: Sentence


def engine_available(engine: str) -> bool:
    return shutil.which(engine) is not None


def _tts_command(job: RenderJob, wav_path: str) -> list[str]:
    s, p = job.speaker, dict(job.prosody)
    if s.engine == "espeak-ng":
        # -m: SSML, for the pitch range. The tag is left open: closed on a line of its own it adds 0.3 s
        # of silence, and in <speak>...</speak> right after a final '".' espeak-ng says "dot".
        ssml = f'<prosody range="{p["range"]}%">{escape(job.sentence.spoken)}'
        return ["espeak-ng", "-m", "-v", s.name, "-s", str(p["rate"]), "-p", str(p["pitch"]),
                "-g", str(p["word_gap"]), "-w", wav_path, ssml]
    command = ["flite", "-voice", s.name, "-t", job.sentence.spoken, "-o", wav_path,
               "--setf", f"duration_stretch={p['duration_stretch']}"]
    if "f0_mean" in p:
        command += ["--setf", f"int_f0_target_mean={p['f0_mean']}", "--setf", f"int_f0_target_stddev={p['f0_stddev']}"]
    return command


def render_one(job: RenderJob) -> tuple[RenderJob, float | None, str | None]:
    """Render one utterance to FLAC. Returns (job, duration seconds, error or None)."""
    engine = job.speaker.engine
    with tempfile.TemporaryDirectory(prefix="asr-tts-") as tmp:
        wav = os.path.join(tmp, "out.wav")
        try:
            proc = subprocess.run(_tts_command(job, wav), capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return job, None, f"{engine} failed: {err}"
        if proc.returncode != 0:
            return job, None, f"{engine} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[:200]}"
        try:
            wave = load_audio(wav, SAMPLE_RATE)
        except AudioError as err:
            return job, None, f"{engine} wrote unreadable audio: {err.reason}"
    if job.speaker.warp != 1.0:
        import torchaudio.functional as AF

        warp = Fraction(job.speaker.warp).limit_denominator(100)
        wave = AF.resample(wave, warp.numerator, warp.denominator)  # played at 16 kHz: x warp in pitch
    if wave.numel() == 0 or float(wave.abs().max()) < 1e-3:
        return job, None, f"{engine} rendered silence"
    save_flac(job.path, wave, SAMPLE_RATE)
    return job, wave.numel() / SAMPLE_RATE, None


def _estimate_seconds(sentence: Sentence) -> float:
    return SECONDS_PER_UTTERANCE_OVERHEAD + SECONDS_PER_WORD * (sentence.text.count(" ") + 1)


def _weights(speakers: list[Speaker]) -> list[float]:
    """Each engine's share of utterances, spread evenly over its speakers."""
    per_engine = Counter(s.engine for s in speakers)
    total = sum(ENGINE_SHARES[e] for e in per_engine)
    return [ENGINE_SHARES[s.engine] / total / per_engine[s.engine] for s in speakers]


def plan_corpus(out: Path, hours: float, seed: int, held_out, sentences: list[Sentence]) -> list[RenderJob]:
    """Assign sentences to splits (disjoint), speakers and prosody to utterances. Pure and deterministic.

    held_out: the speaker ids kept for test-unseen-voice (None: DEFAULT_HELD_OUT)."""
    held_ids = set(DEFAULT_HELD_OUT if held_out is None else check_held_out(held_out))
    table = speaker_table(seed)
    missing = [e for e in sorted({s.engine for s in table}) if not engine_available(e)]
    if missing:
        raise UserError(f"TTS engine(s) not installed: {', '.join(missing)} (Debian packages espeak-ng and flite)")
    seen = [s for s in table if s.speaker_id not in held_ids]
    held = [s for s in table if s.speaker_id in held_ids]
    rng = random.Random(seed)
    # Shuffle whole fortunes, not sentences: a joke's set-up and punch line never straddle two splits.
    groups: dict[str, list[Sentence]] = defaultdict(list)
    for sentence in sentences:
        groups[sentence.group].append(sentence)
    order = list(groups)
    rng.shuffle(order)
    pool = [s for g in order for s in groups[g]]

    # Sentences per split: what the requested duration needs, but never more than the split's share
    # of the pool; a split that runs out reuses its own sentences with other speakers, never another split's.
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
        split_speakers = held if split == HELD_OUT_SPLIT else seen
        weights = _weights(split_speakers)
        used: dict[int, set[int]] = defaultdict(set)  # sentence index -> speakers that said it
        per_speaker: dict[int, list] = defaultdict(list)
        for k in range(wanted):
            i = k % n_sentences
            fresh = [n for n, s in enumerate(split_speakers) if s.speaker_id not in used[i]] or range(len(split_speakers))
            n = rng.choices(fresh, weights=[weights[n] for n in fresh])[0]
            speaker = split_speakers[n]
            used[i].add(speaker.speaker_id)
            per_speaker[speaker.speaker_id].append((speaker, split_sentences[i]))
        for speaker_id, items in sorted(per_speaker.items()):
            for c0 in range(0, len(items), UTTERANCES_PER_CHAPTER):
                chapter_counter[speaker_id] += 1
                chapter = 1000 * speaker_id + chapter_counter[speaker_id]
                for u, (speaker, sentence) in enumerate(items[c0 : c0 + UTTERANCES_PER_CHAPTER]):
                    utt_id = f"{speaker_id}-{chapter}-{u:04d}"
                    path = out / "LibriSpeech" / split / str(speaker_id) / str(chapter) / f"{utt_id}.flac"
                    jobs.append(RenderJob(split, utt_id, str(path), speaker, _draw_prosody(speaker, rng), sentence))
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


def synthesize(out: str | os.PathLike, hours: float, seed: int = 0, held_out=None,
               workers: int | None = None, progress: bool = True) -> SynthSummary:
    """Render the corpus into `out`; held_out: speaker ids for test-unseen-voice (None: DEFAULT_HELD_OUT)."""
    if hours <= 0:
        raise UserError(f"--hours {hours}: must be positive")
    held_out = DEFAULT_HELD_OUT if held_out is None else check_held_out(held_out)
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
    for job, error in sorted(failures, key=lambda f: f[0].utt_id):
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


def _write_metadata(out: Path, hours: float, seed: int, held_out: tuple[int, ...], results, failures) -> None:
    with open(out / METADATA_FILE, "w", encoding="utf-8") as f:
        for utt_id in sorted(results):
            job, seconds = results[utt_id]
            s = job.speaker
            prosody = dict(job.prosody)
            if s.engine == "flite":
                prosody["warp"] = s.warp
            f.write(json.dumps({
                "id": utt_id, "split": job.split, "speaker": s.speaker_id, "engine": s.engine, "voice": s.voice,
                "variant": s.variant, "prosody": prosody, "text_source": job.sentence.source,
                "duration": round(seconds, 3),
            }) + "\n")
    speakers = ["; ID  |SEX| SUBSET            |MINUTES| NAME"]
    minutes: dict[tuple[int, str], float] = defaultdict(float)
    for job, seconds in results.values():
        minutes[(job.speaker.speaker_id, job.split)] += seconds / 60
    table = speaker_table(seed)
    by_id = {s.speaker_id: s for s in table}
    for (spk, split), mins in sorted(minutes.items()):
        s = by_id[spk]
        speakers.append(f"{spk:<5}| {s.sex} | {split:<17} | {mins:6.2f}| {s.engine}:{s.name}")
    (out / "LibriSpeech").mkdir(parents=True, exist_ok=True)
    (out / "LibriSpeech" / "SPEAKERS.TXT").write_text("\n".join(speakers) + "\n", encoding="utf-8")
    # Written last and atomically: its presence marks a complete corpus (see is_rendered).
    atomic_write_text(out / CORPUS_FILE, json.dumps({
        "version": CORPUS_VERSION, "hours_requested": hours, "seed": seed,
        "held_out_speakers": list(held_out), "split_shares": SPLIT_SHARES, "engine_shares": ENGINE_SHARES,
        "speakers": [dict(s.as_json(), held_out=s.speaker_id in held_out) for s in table],
        "utterances": len(results),
        "failed": [{"id": j.utt_id, "error": e} for j, e in sorted(failures, key=lambda f: f[0].utt_id)],
        "text_source": "Debian fortune databases (fortune-mod, fortunes)",
    }, indent=2) + "\n")


def is_rendered(out: str | os.PathLike, hours: float, seed: int, held_out=None) -> bool:
    """True when `out` already holds a complete corpus rendered with these options by this version."""
    out = Path(out)
    held_out = DEFAULT_HELD_OUT if held_out is None else check_held_out(held_out)
    try:
        meta = json.loads((out / CORPUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    same = (meta.get("version") == CORPUS_VERSION and meta.get("hours_requested") == hours
            and meta.get("seed") == seed and meta.get("held_out_speakers") == list(held_out)
            and not meta.get("failed"))
    return same and sum(1 for _ in (out / "LibriSpeech").rglob("*.flac")) == meta.get("utterances")


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("--out", default="data/synth", help="corpus root (LibriSpeech/ is written inside)")
    parser.add_argument("--hours", type=float, default=1.0, help="audio hours to render, all splits together")
    parser.add_argument("--seed", type=int, default=0, help="draws the sentences' order, the speakers' prosody "
                        "ranges and every utterance's speaker and prosody")
    parser.add_argument("--held-out-speakers", default=None, metavar="IDS",
                        help="comma-separated speaker ids kept for test-unseen-voice only, never in train, dev or "
                             f"test-clean; 'default' (the default): the {len(DEFAULT_HELD_OUT)} speakers of the flite "
                             f"voice {HELD_OUT_FLITE_VOICE}, the espeak-ng accent {HELD_OUT_ACCENT} and the variants "
                             f"{', '.join(v for v, _ in HELD_OUT_VARIANTS)} ({_held_out_ids_text()}). A flite voice "
                             "is unseen only when all its speakers are held out")
    parser.add_argument("--list-speakers", action="store_true",
                        help="print the speaker table for --seed (ids, engines, voices, prosody ranges) and exit")
    parser.add_argument("--held-out-voice", default=None, help=argparse.SUPPRESS)  # replaced: explains so
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    parser.add_argument("--no-prepare", action="store_true", help="do not build the manifests afterwards")
    parser.add_argument("--force", action="store_true",
                        help="render again even if --out holds this corpus, or replace the other corpus it holds")


def _held_out_ids_text() -> str:
    return ", ".join(map(str, DEFAULT_HELD_OUT))


def format_speaker_table(seed: int, held_out: tuple[int, ...]) -> str:
    lines = [f"{'id':>5} {'engine':<9} {'voice':<15} {'variant':<8} sex {'use':<9} warp  prosody ranges (seed {seed})"]
    for s in speaker_table(seed):
        ranges = " ".join(f"{p} {lo:g}-{hi:g}" for p, lo, hi in s.ranges)
        use = "held-out" if s.speaker_id in held_out else "seen"
        lines.append(f"{s.speaker_id:>5} {s.engine:<9} {s.voice:<15} {s.variant or '-':<8} {s.sex:<3} {use:<9} "
                     f"{s.warp:.2f}  {ranges}")
    n_held = len(held_out)
    lines.append(f"{len(SPEAKER_IDS)} speakers: {len(SPEAKER_IDS) - n_held} seen (train, dev, test-clean), "
                 f"{n_held} held out ({HELD_OUT_SPLIT})")
    return "\n".join(lines)


def _rendered_options(out: Path) -> dict | None:
    """The options of the complete corpus in `out`, or None when there is none."""
    try:
        meta = json.loads((out / CORPUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def run(args) -> int:
    failed = 0
    if getattr(args, "held_out_voice", None) is not None:
        raise UserError(f"--held-out-voice {args.held_out_voice}: replaced by --held-out-speakers (corpus version "
                        f"{CORPUS_VERSION} has {len(SPEAKER_IDS)} speakers; `asr data synth --list-speakers` shows them)")
    held_out = parse_held_out(args.held_out_speakers)
    if args.list_speakers:
        print(format_speaker_table(args.seed, held_out))
        return 0
    check_range("--hours", args.hours, low=0.0, low_open=True)
    if args.workers is not None:
        check_range("--workers", args.workers, low=1)
    out = Path(args.out)
    check_output_folder(out)
    option = _held_out_option(held_out)
    if not args.force and is_rendered(out, args.hours, args.seed, held_out):
        print(f"{args.out}: already holds this corpus (version {CORPUS_VERSION}, {args.hours} h, seed {args.seed}, "
              f"held-out speakers {option}); reading it back (--force renders it again)")
    else:
        existing = _rendered_options(out)
        if existing is not None and not args.force:
            held = existing.get("held_out_speakers")
            if (existing.get("version"), existing.get("hours_requested"), existing.get("seed"), held) == (
                    CORPUS_VERSION, args.hours, args.seed, list(held_out)):
                raise UserError(f"--out {args.out}: holds this corpus, but incomplete "
                                f"({len(existing.get('failed') or [])} utterances failed to render, or files are "
                                "missing); pass --force to render it again")
            try:
                held_text = _held_out_option(tuple(held)) if held else "(none recorded)"
            except TypeError:
                held_text = "(unreadable)"
            raise UserError(
                f"--out {args.out}: holds another corpus (version {existing.get('version')}, --hours "
                f"{existing.get('hours_requested')}, --seed {existing.get('seed')}, --held-out-speakers {held_text}); "
                "pass --force to replace it, or choose another --out")
        summary = synthesize(args.out, args.hours, args.seed, held_out, args.workers)
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
