"""The default corpus: sentence extraction, the render plan (pure), and one real small render."""

import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile as sf

from asr.data import synth
from asr.data.librispeech import index_split
from asr.cli import main as cli_main
from asr.data.audio import load_audio
from asr.data.sentences import MAX_WORDS, MIN_WORDS, Sentence, find_fortune_dir, load_sentences
from asr.data.text import is_normalized
from asr.errors import UserError

ENGINES = ("espeak-ng", "flite")


# --- sentences ----------------------------------------------------------------------------------

def _fortune_db(directory: Path, name: str, entries: list[str]) -> None:
    (directory / name).write_text("\n%\n".join(entries) + "\n", encoding="utf-8")
    (directory / f"{name}.dat").write_bytes(b"\0" * 24)  # strfile index: only its presence matters


def test_sentence_extraction_rules(tmp_path):
    _fortune_db(tmp_path, "wisdom", [
        "A stitch in time saves nine. Look before you leap!",
        "Don't count your chickens before they hatch.\n\t\t-- A farmer",
        "He was born in 1984 and moved away.",  # digits: dropped
        "Too short.",  # under four words
        "Roses are red,\n    violets are blue.",  # indented verse: dropped
        "Is this the real life or just fantasy?",
        "a lowercase start is not a sentence here.",
        "Email me at home@example right now please.",  # symbol read aloud
        "This one goes on and on " + "and on " * 20 + "forever.",  # over 24 words
        "The café was quiet and warm that evening.",  # non-ASCII letters: TTS may not say them as written
        "A stitch in time saves nine.",  # duplicate of an earlier sentence
        "Mr. Smith went to the market today.",  # written out: the voices say "mister"
    ])
    _fortune_db(tmp_path, "art", ["This whole database is excluded from the corpus."])
    (tmp_path / "notes").write_text("No dat file, so this is not a database at all.\n")

    sentences = load_sentences(tmp_path)

    assert [s.text for s in sentences] == [
        "A STITCH IN TIME SAVES NINE",
        "LOOK BEFORE YOU LEAP",
        "DON'T COUNT YOUR CHICKENS BEFORE THEY HATCH",
        "IS THIS THE REAL LIFE OR JUST FANTASY",
        "MISTER SMITH WENT TO THE MARKET TODAY",
    ]
    assert sentences[2].spoken == "Don't count your chickens before they hatch."
    assert {s.source for s in sentences} == {"fortunes/wisdom"}


def test_missing_fortune_databases_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr("asr.data.sentences.FORTUNE_DIRS", (str(tmp_path / "none"),))
    with pytest.raises(UserError, match="fortune"):
        load_sentences()


@pytest.mark.skipif(find_fortune_dir() is None, reason="Debian's fortune databases are not installed")
def test_system_fortunes_give_clean_sentences():
    sentences = load_sentences()
    assert len(sentences) > 5000
    texts = [s.text for s in sentences]
    assert len(set(texts)) == len(texts), "deduplicated by normalised text"
    for s in sentences:
        assert is_normalized(s.text), s
        assert not re.search(r"\d", s.spoken + s.text), s
        assert MIN_WORDS <= len(s.text.split()) <= MAX_WORDS, s
        assert s.source.startswith("fortunes/")


@pytest.mark.skipif(find_fortune_dir() is None, reason="Debian's fortune databases are not installed")
def test_system_fortunes_transcribe_abbreviations_as_spoken():
    for s in load_sentences():
        # what the voices say for these is "mister", "doctor", ...: the transcript must say it too
        assert not re.search(r"\b(MR|MRS|DR|ST|JR|SR|VS|ETC|INC|LTD|EG|IE)\b", s.text), s  # "prof" is a word
        assert not re.search(r"\b(Prof|Gen|Col|Capt|Lt|Sgt|Rev|Mt|Ms)\.", s.spoken), s
        assert not re.search(r"[a-z]{2}\.[a-z]", s.spoken), s  # "sci.physics" is read "sci dot physics"


# --- the speaker table (pure) -------------------------------------------------------------------

def _held_and_seen(seed=0, held_out=synth.DEFAULT_HELD_OUT):
    table = synth.speaker_table(seed)
    return [s for s in table if s.speaker_id in held_out], [s for s in table if s.speaker_id not in held_out]


def test_speaker_table_size_and_ids():
    table = synth.speaker_table(0)
    assert 60 <= len(table) <= 120
    ids = [s.speaker_id for s in table]
    assert len(set(ids)) == len(ids) and ids == sorted(ids) and tuple(ids) == synth.SPEAKER_IDS
    assert all(isinstance(i, int) and 1000 <= i < 10000 for i in ids)  # LibriSpeech-style integers
    assert {s.engine for s in table} == set(ENGINES)
    n_espeak = sum(s.engine == "espeak-ng" for s in table)
    assert f"{len(table)} speakers: {n_espeak} of espeak-ng, {len(table) - n_espeak} of flite" in " ".join(synth.__doc__.split())
    assert len({(s.engine, s.voice, s.variant) for s in table if s.engine == "espeak-ng"}) == sum(
        s.engine == "espeak-ng" for s in table), "one espeak-ng speaker per (accent, variant)"
    assert {s.sex for s in table} == {"F", "M"}
    for s in table:
        assert s.sex == (dict(synth.ESPEAK_VARIANTS)[s.variant] if s.variant else synth.FLITE_VOICES[s.voice][0])
        assert s.ranges and all(lo <= hi for _, lo, hi in s.ranges)
        if s.engine == "espeak-ng":
            assert s.name == f"{s.voice}+{s.variant}" and s.warp == 1.0
            r = {p: (lo, hi) for p, lo, hi in s.ranges}
            assert set(r) == {"rate", "pitch", "range", "word_gap"}
            assert 80 <= r["rate"][0] and r["rate"][1] <= 260 and 0 <= r["pitch"][0] and r["pitch"][1] <= 99
            assert 0 < r["range"][0] and 0 <= r["word_gap"][0]
        else:
            assert s.name == s.voice and s.variant == "" and 0.9 <= s.warp <= 1.1
            expected = {"duration_stretch"} | ({"f0_mean", "f0_stddev"} if synth.FLITE_VOICES[s.voice][1] else set())
            assert {p for p, _, _ in s.ranges} == expected


def test_speakers_of_one_flite_voice_differ_in_warp():
    for voice in synth.FLITE_VOICES:
        warps = [s.warp for s in synth.speaker_table(0) if s.engine == "flite" and s.voice == voice]
        assert len(warps) == len(set(warps)) == synth.FLITE_VOICES[voice][2]


def test_default_held_out_speakers_are_unseen_voices_of_both_engines():
    held, seen = _held_and_seen()
    assert len(held) >= 4 and {s.engine for s in held} == set(ENGINES) and {s.sex for s in held} == {"F", "M"}
    assert seen and not {s.speaker_id for s in held} & {s.speaker_id for s in seen}
    # a flite voice held out entirely: no seen speaker uses it
    held_flite = {s.voice for s in held if s.engine == "flite"}
    assert held_flite and not held_flite & {s.voice for s in seen if s.engine == "flite"}
    # every held-out espeak-ng speaker has an accent or a variant that no seen speaker has
    seen_accents = {s.voice for s in seen if s.engine == "espeak-ng"}
    seen_variants = {s.variant for s in seen if s.engine == "espeak-ng"}
    seen_pairs = {(s.voice, s.variant) for s in seen}
    for s in held:
        if s.engine == "espeak-ng":
            assert (s.voice, s.variant) not in seen_pairs
            assert s.voice not in seen_accents or s.variant not in seen_variants, s
    assert synth.HELD_OUT_ACCENT not in seen_accents
    assert not {v for v, _ in synth.HELD_OUT_VARIANTS} & seen_variants


def test_speaker_table_is_deterministic_for_a_seed():
    assert synth.speaker_table(3) == synth.speaker_table(3)
    other = synth.speaker_table(4)
    assert [s.speaker_id for s in other] == [s.speaker_id for s in synth.speaker_table(3)]  # same speakers
    assert [s.ranges for s in other] != [s.ranges for s in synth.speaker_table(3)]  # drawn from the seed


def test_speaker_table_does_not_depend_on_the_process(tmp_path):
    # str seeds of random.Random hash the same in every process (PYTHONHASHSEED does not matter)
    code = "from asr.data import synth; print(repr(synth.speaker_table(5)))"
    runs = {subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parent.parent).stdout
            for h in (1, 2)}
    assert len(runs) == 1 and runs.pop() == repr(synth.speaker_table(5)) + "\n"


# --- --held-out-speakers ------------------------------------------------------------------------

def test_parse_held_out():
    assert synth.parse_held_out(None) == synth.parse_held_out("default") == synth.DEFAULT_HELD_OUT
    assert synth.parse_held_out("2001, 1001") == (1001, 2001)


@pytest.mark.parametrize("value,message", [
    ("abc", "--held-out-speakers abc: 'abc' is not a speaker id"),
    ("2001,,1001", "'' is not a speaker id"),
    ("", "--held-out-speakers : '' is not a speaker id"),
    ("999", "--held-out-speakers 999: no speaker 999"),
    ("2001,2001", "speaker 2001 is given twice"),
    (",".join(map(str, synth.SPEAKER_IDS)), "leaving none for train, dev and test-clean"),
])
def test_parse_held_out_errors_name_the_option(value, message):
    with pytest.raises(UserError, match=re.escape(message)):
        synth.parse_held_out(value)


def test_plan_rejects_an_empty_held_out_set(tmp_path, engines_present):
    with pytest.raises(UserError, match="--held-out-speakers"):
        synth.plan_corpus(tmp_path, 0.1, 0, (), _sentences(100))


@pytest.mark.parametrize("argv,message", [
    (["--held-out-speakers", "1001,x"], "--held-out-speakers 1001,x: 'x' is not a speaker id"),
    (["--held-out-speakers", "77"], "--held-out-speakers 77: no speaker 77"),
    (["--held-out-voice", "208"], "--held-out-voice 208: replaced by --held-out-speakers"),
])
def test_cli_held_out_errors(tmp_path, capsys, argv, message):
    rc = cli_main(["data", "synth", "--out", str(tmp_path / "new"), "--hours", "0.01", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("asr data synth: error: ") and message in lines[0], err
    assert not (tmp_path / "new").exists()


def test_cli_lists_speakers_and_documents_the_option(tmp_path, capsys):
    assert cli_main(["data", "synth", "--list-speakers", "--seed", "2", "--held-out-speakers", "1001"]) == 0
    out = capsys.readouterr().out
    assert f"{len(synth.SPEAKER_IDS)} speakers: {len(synth.SPEAKER_IDS) - 1} seen" in out
    assert re.search(r"^ 1001 flite +kal +- +M +held-out", out, re.M)
    assert re.search(r"^ 2001 espeak-ng en-us +m1 +M +seen", out, re.M)
    with pytest.raises(SystemExit):
        cli_main(["data", "synth", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--held-out-speakers IDS" in help_text and "test-unseen-voice" in help_text
    assert "--held-out-voice" not in help_text


# --- plan (pure: no rendering) ------------------------------------------------------------------

WORDS = "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIET KILO LIMA MIKE NOVEMBER".split()


def _sentences(n: int) -> list[Sentence]:
    out = []
    for i in range(n):
        words = [WORDS[(i // len(WORDS) ** k) % len(WORDS)] for k in range(3)] + ["END"] * (1 + i % 5)
        text = " ".join(words)
        out.append(Sentence(text=text, spoken=text.capitalize() + ".", source="test"))
    return out


@pytest.fixture
def engines_present(monkeypatch):
    monkeypatch.setattr(synth, "engine_available", lambda engine: True)


def _by_split(jobs):
    groups = defaultdict(list)
    for job in jobs:
        groups[job.split].append(job)
    return groups


@pytest.mark.parametrize("hours,pool", [(0.5, 2000), (0.3, 60)])  # the second runs out and reuses sentences
def test_plan_splits_are_disjoint_and_hold_out_speakers(tmp_path, engines_present, hours, pool):
    held_out = set(synth.DEFAULT_HELD_OUT)
    jobs = synth.plan_corpus(tmp_path, hours, 0, None, _sentences(pool))
    groups = _by_split(jobs)
    assert set(groups) == set(synth.SPLIT_SHARES)

    texts = {split: {j.sentence.text for j in js} for split, js in groups.items()}
    splits = list(texts)
    for a in range(len(splits)):
        for b in range(a + 1, len(splits)):
            assert not texts[splits[a]] & texts[splits[b]], (splits[a], splits[b])

    held_speakers = {j.speaker for j in groups[synth.HELD_OUT_SPLIT]}
    assert {s.speaker_id for s in held_speakers} <= held_out
    assert len(held_speakers) >= 4 and {s.engine for s in held_speakers} == set(ENGINES)
    seen_jobs = [j for split, js in groups.items() if split != synth.HELD_OUT_SPLIT for j in js]
    assert not held_out & {j.speaker.speaker_id for j in seen_jobs}
    assert synth.HELD_OUT_FLITE_VOICE not in {j.speaker.voice for j in seen_jobs if j.speaker.engine == "flite"}
    assert synth.HELD_OUT_FLITE_VOICE in {j.speaker.voice for j in groups[synth.HELD_OUT_SPLIT]}
    assert len({j.speaker.speaker_id for j in groups["train"]}) > 40
    assert {j.speaker.engine for j in groups["train"]} == set(ENGINES)

    ids = [j.utt_id for j in jobs]
    assert len(set(ids)) == len(ids)
    assert len({j.path for j in jobs}) == len(jobs)
    for j in jobs:
        speaker, chapter, _ = j.utt_id.split("-")
        assert speaker == str(j.speaker.speaker_id)
        assert Path(j.path) == tmp_path / "LibriSpeech" / j.split / speaker / chapter / f"{j.utt_id}.flac"

    planned_seconds = sum(synth._estimate_seconds(j.sentence) for j in jobs)
    assert planned_seconds == pytest.approx(hours * 3600, rel=0.1)


def test_plan_draws_prosody_inside_each_speakers_ranges(tmp_path, engines_present):
    jobs = synth.plan_corpus(tmp_path, 0.5, 1, None, _sentences(2000))
    for j in jobs:
        ranges = {p: (lo, hi) for p, lo, hi in j.speaker.ranges}
        values = dict(j.prosody)
        assert set(values) == set(ranges)
        for p, v in values.items():
            assert ranges[p][0] <= v <= ranges[p][1], (j.speaker, p, v)
            if j.speaker.engine == "espeak-ng":
                assert isinstance(v, int)  # what the command line gets, and the metadata records
    assert len({j.prosody for j in jobs if j.speaker.speaker_id == 2001}) > 1  # varies per utterance


def test_plan_gives_each_engine_its_share(tmp_path, engines_present):
    jobs = synth.plan_corpus(tmp_path, 2.0, 0, None, _sentences(4000))
    for split, js in _by_split(jobs).items():
        flite = sum(j.speaker.engine == "flite" for j in js) / len(js)
        assert flite == pytest.approx(synth.ENGINE_SHARES["flite"], abs=0.1 if len(js) > 100 else 0.25), split


def test_a_reused_sentence_gets_another_speaker(tmp_path, engines_present):
    jobs = synth.plan_corpus(tmp_path, 0.3, 0, None, _sentences(60))
    said = defaultdict(list)
    for j in jobs:
        said[(j.split, j.sentence.text)].append(j.speaker.speaker_id)
    assert any(len(v) > 1 for v in said.values())
    for (split, _), speakers in said.items():
        n_speakers = len({j.speaker.speaker_id for j in jobs if j.split == split})
        if len(speakers) <= n_speakers:
            assert len(set(speakers)) == len(speakers), (split, speakers)


def test_plan_is_deterministic_for_a_seed(tmp_path, engines_present):
    sentences = _sentences(500)
    first = synth.plan_corpus(tmp_path, 0.2, 7, None, sentences)
    assert synth.plan_corpus(tmp_path, 0.2, 7, synth.DEFAULT_HELD_OUT, sentences) == first
    other = synth.plan_corpus(tmp_path, 0.2, 8, None, sentences)
    assert [(j.utt_id, j.sentence) for j in other] != [(j.utt_id, j.sentence) for j in first]


def test_plan_other_held_out_speakers(tmp_path, engines_present):
    chosen = (1001, 1002, 1003, 2001)
    jobs = synth.plan_corpus(tmp_path, 0.1, 0, chosen, _sentences(300))
    groups = _by_split(jobs)
    assert {j.speaker.speaker_id for j in groups[synth.HELD_OUT_SPLIT]} <= set(chosen)
    seen_ids = {j.speaker.speaker_id for s, js in groups.items() if s != synth.HELD_OUT_SPLIT for j in js}
    assert not seen_ids & set(chosen)
    assert seen_ids & set(synth.DEFAULT_HELD_OUT), "the default held-out speakers are seen now"


def test_plan_rejects_missing_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "engine_available", lambda engine: engine != "flite")
    with pytest.raises(UserError, match="flite"):
        synth.plan_corpus(tmp_path, 0.1, 0, None, _sentences(100))


def test_synthesize_rejects_non_positive_hours(tmp_path):
    with pytest.raises(UserError, match="--hours"):
        synth.synthesize(tmp_path, hours=0)


def test_espeak_command_reads_the_text_as_written(tmp_path):
    # The SSML that carries the pitch range must not change what is said: a closed <prosody> right
    # after a sentence's final '".' made espeak-ng say "dot".
    if not synth.engine_available("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    speaker = next(s for s in synth.speaker_table(0) if s.engine == "espeak-ng")
    text = 'Never write anything down that might go into a "Pearl Harbor File".'
    job = synth.RenderJob("train", "x", "/dev/null", speaker, (("rate", 160), ("pitch", 50), ("range", 70), ("word_gap", 1)),
                          Sentence(text="", spoken=text, source="test"))
    command = synth._tts_command(job, "unused.wav")
    i = command.index("-w")
    ssml = subprocess.run(["espeak-ng", "-q", "-x", *command[1:i], *command[i + 2:]], capture_output=True, text=True)
    options = [a for a in command[1:i] if a != "-m"]  # the same voice, rate, pitch and word gap, without SSML
    plain = subprocess.run(["espeak-ng", "-q", "-x", *options, text], capture_output=True, text=True)
    assert ssml.stdout.split() == plain.stdout.split() and "d'0t" not in ssml.stdout
    # nor add silence (a closed <prosody> adds 0.3 s at the end)
    subprocess.run(synth._tts_command(job, str(tmp_path / "ssml.wav")), check=True, capture_output=True)
    subprocess.run(["espeak-ng", *options, "-w", str(tmp_path / "plain.wav"), text], check=True, capture_output=True)
    assert sf.info(tmp_path / "ssml.wav").duration == pytest.approx(sf.info(tmp_path / "plain.wav").duration, abs=0.05)


# --- every voice renders ------------------------------------------------------------------------

def _render_check(tmp_path, speaker):
    if not synth.engine_available(speaker.engine):
        pytest.skip(f"{speaker.engine} is not installed")
    text = "The quick brown fox jumps over the lazy dog."
    mid = tuple((p, (lo + hi) // 2 if isinstance(lo, int) else round((lo + hi) / 2, 3)) for p, lo, hi in speaker.ranges)
    job = synth.RenderJob("train", "x", str(tmp_path / "x.flac"), speaker, mid,
                          Sentence(text=text.upper().rstrip("."), spoken=text, source="test"))
    _, seconds, error = synth.render_one(job)
    assert error is None, error
    wave = load_audio(tmp_path / "x.flac")
    assert 1.2 < seconds < 6.0 and wave.numel() / 16000 == pytest.approx(seconds)
    rms = float(wave.pow(2).mean().sqrt())
    assert rms > 0.01, f"{speaker.name}: near-silent ({rms:.4f})"
    frames = wave[: wave.numel() // 160 * 160].reshape(-1, 160).pow(2).mean(1).sqrt()
    assert 0.3 < float((frames > 0.1 * frames.max()).float().mean()) < 0.98  # speech and pauses, not noise
    return seconds


def _first(predicate):
    return next(s for s in synth.speaker_table(0) if predicate(s))


@pytest.mark.parametrize("variant", [v for v, _ in synth.ESPEAK_VARIANTS])
def test_every_espeak_variant_renders(tmp_path, variant):
    _render_check(tmp_path, _first(lambda s: s.variant == variant))


@pytest.mark.parametrize("accent", synth.ESPEAK_ACCENTS)
def test_every_espeak_accent_renders(tmp_path, accent):
    _render_check(tmp_path, _first(lambda s: s.engine == "espeak-ng" and s.voice == accent))


@pytest.mark.parametrize("voice", list(synth.FLITE_VOICES))
def test_every_flite_voice_renders(tmp_path, voice):
    _render_check(tmp_path, _first(lambda s: s.engine == "flite" and s.voice == voice))


def test_warp_scales_duration(tmp_path):
    base = _first(lambda s: s.engine == "flite" and s.voice == "slt")
    low, high = (synth.Speaker(base.speaker_id, "flite", "slt", "", "F", base.ranges, w) for w in (0.92, 1.08))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    slow, fast = _render_check(tmp_path / "a", low), _render_check(tmp_path / "b", high)
    assert slow / fast == pytest.approx(1.08 / 0.92, rel=0.01)


# --- one real render ----------------------------------------------------------------------------

def _render_skip_reason():
    missing = [e for e in ENGINES if not synth.engine_available(e)]
    if missing:
        return f"TTS engine(s) not installed: {', '.join(missing)}"
    if find_fortune_dir() is None:
        return "Debian's fortune databases are not installed"
    return None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    reason = _render_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("synth")
    summary = synth.synthesize(out, hours=0.02, seed=0, workers=2, progress=False)
    return out, summary


def test_render_reads_back_with_zero_errors(rendered):
    out, summary = rendered
    assert summary.failed == 0 and summary.utterances > 0
    assert summary.audio_hours == pytest.approx(0.02, rel=0.5)
    total = 0
    for split in synth.SPLIT_SHARES:
        index = index_split(out, split, workers=2, progress=False)
        assert index.errors == [], index.errors
        assert index.utterances, split
        for u in index.utterances:
            assert is_normalized(u.text)
            assert u.duration > 0.3
        total += len(index.utterances)
        speakers = {int(u.speaker) for u in index.utterances}
        if split == synth.HELD_OUT_SPLIT:
            assert speakers <= set(synth.DEFAULT_HELD_OUT)
        else:
            assert not speakers & set(synth.DEFAULT_HELD_OUT)
    assert total == summary.utterances


def test_render_is_16k_flac_in_librispeech_layout(rendered):
    out, _ = rendered
    flacs = sorted((out / "LibriSpeech").rglob("*.flac"))
    assert flacs
    for f in flacs:
        info = sf.info(f)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
        speaker, chapter, _ = f.stem.split("-")
        assert (f.parent.parent.name, f.parent.name) == (speaker, chapter)
        assert (f.parent / f"{speaker}-{chapter}.trans.txt").is_file()
    assert not list((out / "LibriSpeech").rglob(".*.tmp-*"))  # asr.fileio's temporary files
    lines = (out / "LibriSpeech" / "SPEAKERS.TXT").read_text().splitlines()
    assert lines[0].startswith(";") and len(lines) > 10
    assert any(re.search(r"\| espeak-ng:en-[a-z0-9-]+\+\w+$", ln) for ln in lines)


def test_render_metadata_is_complete(rendered):
    out, summary = rendered
    records = [json.loads(line) for line in (out / "synth_metadata.jsonl").read_text().splitlines()]
    assert len(records) == summary.utterances
    speakers = {s.speaker_id: s for s in synth.speaker_table(0)}
    flacs = {f.stem: f for f in (out / "LibriSpeech").rglob("*.flac")}
    assert {r["id"] for r in records} == set(flacs)
    for r in records:
        s = speakers[r["speaker"]]
        assert (r["engine"], r["voice"], r["variant"]) == (s.engine, s.voice, s.variant)
        ranges = {p: (lo, hi) for p, lo, hi in s.ranges}
        expected = set(ranges) | ({"warp"} if s.engine == "flite" else set())
        assert set(r["prosody"]) == expected
        for p, v in r["prosody"].items():
            assert (v == s.warp) if p == "warp" else ranges[p][0] <= v <= ranges[p][1]
        assert r["text_source"].startswith("fortunes/")
        assert r["split"] in synth.SPLIT_SHARES
        assert flacs[r["id"]].parts[-4] == r["split"]
        assert r["duration"] == pytest.approx(sf.info(flacs[r["id"]]).duration, abs=1e-3)
    corpus = json.loads((out / "synth_corpus.json").read_text())
    assert corpus["seed"] == 0 and corpus["failed"] == [] and corpus["utterances"] == summary.utterances
    assert corpus["version"] == synth.CORPUS_VERSION
    assert corpus["held_out_speakers"] == list(synth.DEFAULT_HELD_OUT)
    assert [c["speaker_id"] for c in corpus["speakers"]] == list(synth.SPEAKER_IDS)
    assert {c["speaker_id"] for c in corpus["speakers"] if c["held_out"]} == set(synth.DEFAULT_HELD_OUT)
    assert corpus["speakers"][0] == dict(speakers[corpus["speakers"][0]["speaker_id"]].as_json(), held_out=False)


def test_render_is_deterministic(rendered, tmp_path):
    # the same options give byte-identical transcripts and metadata
    out, _ = rendered
    again = tmp_path / "again"
    synth.synthesize(again, hours=0.02, seed=0, workers=2, progress=False)
    for name in ("synth_metadata.jsonl", "synth_corpus.json", "lm_text.txt"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    transcripts = sorted(p.relative_to(out) for p in (out / "LibriSpeech").rglob("*.trans.txt"))
    assert transcripts == sorted(p.relative_to(again) for p in (again / "LibriSpeech").rglob("*.trans.txt"))
    for rel in transcripts:
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_sentences_of_one_fortune_stay_in_one_split_and_out_of_the_lm_text(tmp_path, engines_present):
    # Three sentences per fortune: the planner must never put two of them in different splits,
    # and the LM text must hold no sentence of a fortune that gave a dev or test utterance.
    sentences = [
        Sentence(text=s.text, spoken=s.spoken, source="test", entry=f"db:{i // 3}")
        for i, s in enumerate(_sentences(900))
    ]
    jobs = synth.plan_corpus(tmp_path, 0.3, 3, None, sentences)
    split_of_entry = defaultdict(set)
    for job in jobs:
        split_of_entry[job.sentence.entry].add(job.split)
    assert split_of_entry and all(len(splits) == 1 for splits in split_of_entry.values())

    lm = synth.lm_text(sentences, jobs)
    evaluation_entries = {j.sentence.entry for j in jobs if j.split != "train"}
    assert lm and not {s.text for s in sentences if s.entry in evaluation_entries} & set(lm)
    assert {j.sentence.text for j in jobs if j.split == "train"} <= set(lm)


def test_a_rendered_corpus_is_recognised_and_other_options_are_not(rendered):
    out, _ = rendered
    assert synth.is_rendered(out, 0.02, 0)
    assert synth.is_rendered(out, 0.02, 0, synth.DEFAULT_HELD_OUT)
    assert not synth.is_rendered(out, 0.03, 0)
    assert not synth.is_rendered(out, 0.02, 1)
    assert not synth.is_rendered(out, 0.02, 0, (1001,))
    assert (out / synth.LM_TEXT_FILE).read_text().strip()


def test_cli_reports_another_corpus_with_its_held_out_speakers(rendered, tmp_path, capsys):
    out, _ = rendered
    rc = cli_main(["data", "synth", "--out", str(out), "--hours", "0.02", "--held-out-speakers", "1001", "--no-prepare"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another corpus" in err and "--held-out-speakers default" in err, err
    rc = cli_main(["data", "synth", "--out", str(out), "--hours", "0.02", "--no-prepare"])
    assert rc == 0 and "already holds this corpus" in capsys.readouterr().out
