"""The default corpus: sentence extraction, the render plan (pure), and one real small render."""

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import soundfile as sf

from asr.data import synth
from asr.data.librispeech import index_split
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
        "Mr. Smith went to the market today.",  # the abbreviation is split off, leaving fragments
    ])
    _fortune_db(tmp_path, "art", ["This whole database is excluded from the corpus."])
    (tmp_path / "notes").write_text("No dat file, so this is not a database at all.\n")

    sentences = load_sentences(tmp_path)

    assert [s.text for s in sentences] == [
        "A STITCH IN TIME SAVES NINE",
        "LOOK BEFORE YOU LEAP",
        "DON'T COUNT YOUR CHICKENS BEFORE THEY HATCH",
        "IS THIS THE REAL LIFE OR JUST FANTASY",
        "SMITH WENT TO THE MARKET TODAY",
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
def test_plan_splits_are_disjoint_and_hold_out_one_voice(tmp_path, engines_present, hours, pool):
    held_out = synth.DEFAULT_HELD_OUT
    jobs = synth.plan_corpus(tmp_path, hours, 0, held_out, _sentences(pool))
    groups = _by_split(jobs)
    assert set(groups) == set(synth.SPLIT_SHARES)

    texts = {split: {j.sentence.text for j in js} for split, js in groups.items()}
    splits = list(texts)
    for a in range(len(splits)):
        for b in range(a + 1, len(splits)):
            assert not texts[splits[a]] & texts[splits[b]], (splits[a], splits[b])

    assert {j.voice.speaker_id for j in groups[synth.HELD_OUT_SPLIT]} == {held_out}
    for split, js in groups.items():
        if split != synth.HELD_OUT_SPLIT:
            assert held_out not in {j.voice.speaker_id for j in js}
    assert len({j.voice.speaker_id for j in groups["train"]}) > 3

    ids = [j.utt_id for j in jobs]
    assert len(set(ids)) == len(ids)
    assert len({j.path for j in jobs}) == len(jobs)
    for j in jobs:
        speaker, chapter, _ = j.utt_id.split("-")
        assert speaker == str(j.voice.speaker_id)
        assert Path(j.path) == tmp_path / "LibriSpeech" / j.split / speaker / chapter / f"{j.utt_id}.flac"

    planned_seconds = sum(synth._estimate_seconds(j.sentence) for j in jobs)
    assert planned_seconds == pytest.approx(hours * 3600, rel=0.1)


def test_plan_is_deterministic_for_a_seed(tmp_path, engines_present):
    sentences = _sentences(500)
    first = synth.plan_corpus(tmp_path, 0.2, 7, synth.DEFAULT_HELD_OUT, sentences)
    assert synth.plan_corpus(tmp_path, 0.2, 7, synth.DEFAULT_HELD_OUT, sentences) == first
    other = synth.plan_corpus(tmp_path, 0.2, 8, synth.DEFAULT_HELD_OUT, sentences)
    assert [(j.utt_id, j.sentence) for j in other] != [(j.utt_id, j.sentence) for j in first]


def test_plan_other_held_out_voice(tmp_path, engines_present):
    jobs = synth.plan_corpus(tmp_path, 0.1, 0, 101, _sentences(300))
    groups = _by_split(jobs)
    assert {j.voice.speaker_id for j in groups[synth.HELD_OUT_SPLIT]} == {101}
    assert all(j.voice.speaker_id != 101 for s, js in groups.items() if s != synth.HELD_OUT_SPLIT for j in js)


def test_plan_rejects_bad_voice_and_missing_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "engine_available", lambda engine: True)
    with pytest.raises(UserError, match="--held-out-voice 999"):
        synth.plan_corpus(tmp_path, 0.1, 0, 999, _sentences(100))
    monkeypatch.setattr(synth, "engine_available", lambda engine: engine != "flite")
    with pytest.raises(UserError, match="flite"):
        synth.plan_corpus(tmp_path, 0.1, 0, synth.DEFAULT_HELD_OUT, _sentences(100))


def test_synthesize_rejects_non_positive_hours(tmp_path):
    with pytest.raises(UserError, match="--hours"):
        synth.synthesize(tmp_path, hours=0)


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
        if split == synth.HELD_OUT_SPLIT:
            assert {u.speaker for u in index.utterances} == {str(synth.DEFAULT_HELD_OUT)}
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
    assert (out / "LibriSpeech" / "SPEAKERS.TXT").is_file()


def test_render_metadata_is_complete(rendered):
    out, summary = rendered
    records = [json.loads(line) for line in (out / "synth_metadata.jsonl").read_text().splitlines()]
    assert len(records) == summary.utterances
    voices = {v.speaker_id: v for v in synth.VOICES}
    flacs = {f.stem: f for f in (out / "LibriSpeech").rglob("*.flac")}
    assert {r["id"] for r in records} == set(flacs)
    for r in records:
        voice = voices[r["speaker"]]
        assert (r["engine"], r["voice"]) == (voice.engine, voice.name)
        assert isinstance(r["rate"], float) and isinstance(r["pitch"], float)
        assert r["text_source"].startswith("fortunes/")
        assert r["split"] in synth.SPLIT_SHARES
        assert flacs[r["id"]].parts[-4] == r["split"]
        assert r["duration"] == pytest.approx(sf.info(flacs[r["id"]]).duration, abs=1e-3)
    corpus = json.loads((out / "synth_corpus.json").read_text())
    assert corpus["seed"] == 0 and corpus["failed"] == [] and corpus["utterances"] == summary.utterances
    assert corpus["held_out_voice"]["speaker_id"] == synth.DEFAULT_HELD_OUT


def test_sentences_of_one_fortune_stay_in_one_split_and_out_of_the_lm_text(tmp_path, engines_present):
    # Three sentences per fortune: the planner must never put two of them in different splits,
    # and the LM text must hold no sentence of a fortune that gave a dev or test utterance.
    sentences = [
        Sentence(text=s.text, spoken=s.spoken, source="test", entry=f"db:{i // 3}")
        for i, s in enumerate(_sentences(900))
    ]
    jobs = synth.plan_corpus(tmp_path, 0.3, 3, synth.DEFAULT_HELD_OUT, sentences)
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
    assert not synth.is_rendered(out, 0.03, 0)
    assert not synth.is_rendered(out, 0.02, 1)
    assert (out / synth.LM_TEXT_FILE).read_text().strip()
