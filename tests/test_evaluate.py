"""Evaluation: scoring, the evaluate() loop with skipped audio, decoders, and the command."""

import json
import math

import pytest

from asr.data.manifest import Utterance, write_manifest
from asr.decode import lexicon_words
from asr.errors import UserError
from asr.evaluate import evaluate, format_markdown, score
from asr.inference import DecodingOptions, Recognizer
from asr.inference.decoders import arpa_vocabulary, build_decoders
from asr.inference.options import BEAM_NAME
from asr.lm import build_arpa


@pytest.fixture
def corpus(tmp_path, write_audio):
    """Four utterances with known recognition results; one more whose audio is missing."""
    cases = [  # (seconds, reference, what the scripted model outputs)
        (0.50, "THE CAT SAT", "THE CAT SAT"),  # correct
        (0.60, "THE DOG RAN HOME", "THE DOG RAN"),  # 1 deletion
        (0.70, "A BIRD", "A WORD IN"),  # 1 substitution, 1 insertion
        (0.80, "HELLO", "YELLOW FELLOW"),  # 1 substitution, 1 insertion
    ]
    utterances, scripts = [], {}
    for k, (seconds, reference, output) in enumerate(cases):
        path = tmp_path / f"u{k}.wav"
        scripts[write_audio(path, seconds)] = output
        utterances.append(Utterance(f"u{k}", str(path), seconds, reference, "s1"))
    utterances.append(Utterance("gone", str(tmp_path / "gone.flac"), 0.9, "NOT THERE", "s1"))
    return utterances, scripts


def test_score_counts_edits_and_ranks_worst():
    result = score(["A B C", "D E", "f-g"], ["A X C D", "D", "F G"], ["u1", "u2", "u3"])
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 1, 1)
    assert result["reference_words"] == 7  # "f-g" normalises to "F G"
    assert result["wer"] == pytest.approx(3 / 7)
    assert [u.id for u in result["worst"]] == ["u1", "u2"]  # 2 errors, then 1; u3 is correct
    assert result["worst"][0].word_errors == 2
    assert result["cer"] == pytest.approx((1 + 2 + 2) / (5 + 3 + 3))  # B->X, " D" inserted, " E" deleted


def test_evaluate_scores_skips_missing_audio_and_times(corpus, scripted_model):
    utterances, scripts = corpus
    model = scripted_model(scripts)
    result = evaluate(Recognizer(model, options=DecodingOptions(max_batch_seconds=1.5)), utterances)
    s = result.scores["greedy"]
    assert result.utterances == s.utterances == 4
    assert [i for i, _ in result.skipped] == ["gone"] and "no such file" in result.skipped[0][1]
    assert (s.substitutions, s.deletions, s.insertions, s.reference_words) == (2, 1, 2, 10)
    assert s.wer == pytest.approx(5 / 10)
    # most errors first, ties by error rate: u3 (2 errors, 1 word), u2 (2 of 2), u1 (1 of 4)
    assert [u.id for u in s.worst] == ["u3", "u2", "u1"]
    assert s.worst[0].reference == "HELLO" and s.worst[0].hypothesis == "YELLOW FELLOW"
    assert result.audio_seconds == pytest.approx(0.5 + 0.6 + 0.7 + 0.8)
    assert s.rtf > 0 and math.isfinite(s.rtf)
    assert model.calls >= 2  # 1.5 s of padded audio per batch: more than one batch
    as_dict = result.to_dict()
    json.dumps(as_dict)
    assert as_dict["decoders"]["greedy"]["wer"] == pytest.approx(0.5)


def test_evaluate_bad_input(corpus, tmp_path, scripted_model):
    utterances, scripts = corpus
    model = scripted_model(scripts)
    with pytest.raises(UserError, match="no utterances"):
        evaluate(Recognizer(model), [])
    with pytest.raises(UserError, match="all 1"):
        evaluate(Recognizer(model), utterances[-1:])


def test_beam_decoder_in_evaluation_uses_lm_vocabulary(corpus, tmp_path, scripted_model):
    utterances, scripts = corpus
    model = scripted_model(scripts)
    lm = build_arpa(["THE CAT SAT", "THE DOG RAN HOME", "A BIRD", "HELLO"], tmp_path / "lm.arpa")
    assert sorted(arpa_vocabulary(lm)) == ["A", "BIRD", "CAT", "DOG", "HELLO", "HOME", "RAN", "SAT", "THE"]
    decoders = build_decoders(model.tokenizer, DecodingOptions(decoder="both"), lm)
    assert set(decoders) == {"greedy", BEAM_NAME}
    result = evaluate(Recognizer(model, decoders), utterances[:2])
    assert result.scores[BEAM_NAME].wer == pytest.approx(1 / 7)  # the deletion in u2 stays
    assert "| greedy |" in format_markdown({"test": result})
    with pytest.raises(UserError, match="language model"):
        build_decoders(model.tokenizer, DecodingOptions(decoder="beam"), None)


def test_command_writes_json_and_markdown(corpus, tmp_path, capsys, make_checkpoint):
    from asr.cli import main

    utterances, _ = corpus
    manifest = tmp_path / "mini.jsonl"
    write_manifest(manifest, utterances)  # the last one's audio is missing: skipped and counted
    (tmp_path / "run").mkdir()
    ckpt = make_checkpoint(tmp_path / "run" / "last.ckpt")
    lm = build_arpa([u.text for u in utterances], tmp_path / "lm.arpa")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--lm", str(lm),
               "--out", str(out), "--beam-size", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    payload = json.loads((out / "evaluation.json").read_text())
    split = payload["splits"]["mini"]
    assert split["utterances"] == 4 and [s["id"] for s in split["skipped"]] == ["gone"]
    assert set(split["decoders"]) == {"greedy", BEAM_NAME}
    assert split["decoders"]["greedy"]["reference_words"] == 10
    assert "| mini | greedy |" in (out / "evaluation.md").read_text()
    assert "| mini | beam+lm |" in captured.out
    assert "1 utterance(s) skipped" in captured.err


def test_command_bad_input(tmp_path, capsys, make_checkpoint, write_audio):
    from asr.cli import main

    good = make_checkpoint(tmp_path / "good.ckpt")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["evaluate", "--checkpoint", str(good), "--manifest", str(empty), "--decoder", "greedy"]) == 2
    assert "manifest is empty" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(good), "--decoder", "greedy"]) == 2
    assert "--split" in capsys.readouterr().err
    manifest = tmp_path / "one.jsonl"
    write_audio(tmp_path / "a.wav", 0.3)
    write_manifest(manifest, [Utterance("a", str(tmp_path / "a.wav"), 0.3, "A", "s")])
    bad = make_checkpoint(tmp_path / "bad.ckpt", vocabulary_override=["<blank>", "A", "B"])
    assert main(["evaluate", "--checkpoint", str(bad), "--manifest", str(manifest), "--decoder", "greedy"]) == 2
    err = capsys.readouterr().err
    assert "vocabulary mismatch" in err and len(err.strip().splitlines()) == 1
    # beam search without --lm and without recorded training splits
    assert main(["evaluate", "--checkpoint", str(good), "--manifest", str(manifest), "--decoder", "beam"]) == 2
    assert "language model" in capsys.readouterr().err


def test_command_builds_lm_from_the_runs_training_splits(corpus, tmp_path, capsys, make_checkpoint):
    from asr.cli import main
    from asr.data.librispeech import manifest_path

    utterances, _ = corpus
    root = tmp_path / "corpus"
    write_manifest(manifest_path(root, "train"), utterances[:4])  # the split's cached manifest
    (tmp_path / "run").mkdir()
    ckpt = make_checkpoint(tmp_path / "run" / "last.ckpt")
    (tmp_path / "run" / "config.yaml").write_text(f"data:\n  class_path: x\n  init_args:\n    root: {root}\n    train_splits: [train]\n")
    manifest = tmp_path / "mini.jsonl"
    write_manifest(manifest, utterances[:2])
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--decoder", "beam", "--out", str(tmp_path / "e")])
    assert rc == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert payload["lm"] == str(tmp_path / "e" / "lm.arpa")
    assert sorted(arpa_vocabulary(payload["lm"])) == sorted({w for u in utterances[:4] for w in u.text.split()})
    assert set(payload["splits"]["mini"]["decoders"]) == {BEAM_NAME}


def test_tune_beam_searches_the_grid(corpus, tmp_path, scripted_model):
    from asr.inference.tuning import tune_beam

    utterances, scripts = corpus
    model = scripted_model(scripts)
    texts = [u.text for u in utterances[:4]]
    lm = build_arpa(texts, tmp_path / "lm.arpa")
    tuning = tune_beam(Recognizer(model), utterances, lm, lexicon_words(texts), lm_weights=(0.5, 2.0),
                       word_scores=(-1.0, 0.0, 1.0), max_utterances=3)
    assert tuning.utterances == 2  # 3 of the 5 by id, evenly spread: gone, u0, u2; "gone" has no audio
    assert [(w, s) for w, s, _ in tuning.grid] == [(0.5, -1.0), (0.5, 0.0), (0.5, 1.0), (2.0, -1.0), (2.0, 0.0), (2.0, 1.0)]
    assert tuning.wer == min(wer for _, _, wer in tuning.grid)
    assert (tuning.lm_weight, tuning.word_score, tuning.wer) in tuning.grid


def test_tune_beam_in_worker_processes_equals_one_process(corpus, tmp_path, scripted_model):
    """The grid decoded by 2 forked workers gives every point the WER one process gives, in grid order."""
    from asr.inference.tuning import tune_beam

    utterances, scripts = corpus
    model = scripted_model(scripts)
    texts = [u.text for u in utterances[:4]]
    lm = build_arpa(texts, tmp_path / "lm.arpa")
    # No point with lm_weight 0 and word_score 0: there the scripted model's exact ties leave the
    # decoder's choice to chance, in one process as in several (seen: WER 0.3-0.6 from run to run).
    runs = {jobs: tune_beam(Recognizer(model), utterances, lm, lexicon_words(texts), lm_weights=(0.5, 2.0, 8.0),
                            word_scores=(-4.0, 0.0, 2.0), jobs=jobs) for jobs in (1, 2)}
    assert runs[2].grid == runs[1].grid
    assert len(runs[1].grid) == 9
    assert len({wer for _, _, wer in runs[1].grid}) > 1  # the points differ, so a mix-up of their order would show
    assert (runs[2].lm_weight, runs[2].word_score, runs[2].wer) == (runs[1].lm_weight, runs[1].word_score, runs[1].wer)
    with pytest.raises(UserError, match="jobs 0"):
        tune_beam(Recognizer(model), utterances, lm, lexicon_words(texts), jobs=0)


def test_command_tunes_on_a_dev_split(corpus, tmp_path, capsys, make_checkpoint):
    from asr.cli import main
    from asr.data.librispeech import manifest_path

    utterances, _ = corpus
    root = tmp_path / "corpus"
    write_manifest(manifest_path(root, "dev"), utterances[:3])
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    lm = build_arpa([u.text for u in utterances], tmp_path / "lm.arpa")
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--split", "dev", "--root", str(root), "--lm", str(lm),
               "--tune-on", "dev", "--out", str(tmp_path / "e"), "--beam-size", "4"])
    assert rc == 0, capsys.readouterr().err
    options = json.loads((tmp_path / "e" / "evaluation.json").read_text())["decoder_options"]
    tuning = options["tuning"]
    assert len(tuning["grid"]) == 20 and tuning["utterances"] == 3
    assert (options["lm_weight"], options["word_score"]) == (tuning["lm_weight"], tuning["word_score"])


def test_command_uses_the_lm_in_the_run_folder(corpus, tmp_path, capsys, make_checkpoint):
    from asr.cli import main

    utterances, _ = corpus
    (tmp_path / "run").mkdir()
    ckpt = make_checkpoint(tmp_path / "run" / "best.ckpt")
    lm = build_arpa([u.text for u in utterances], tmp_path / "run" / "lm.arpa")
    manifest = tmp_path / "mini.jsonl"
    write_manifest(manifest, utterances[:2])
    assert main(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--decoder", "beam", "--beam-size", "4"]) == 0
    payload = json.loads((tmp_path / "run" / "eval" / "evaluation.json").read_text())  # default --out
    assert payload["lm"] == str(lm)
    capsys.readouterr()


def test_command_adds_lm_text_to_the_training_transcripts(corpus, tmp_path, capsys, make_checkpoint):
    from asr.cli import main
    from asr.data.librispeech import manifest_path

    utterances, _ = corpus
    root = tmp_path / "corpus"
    write_manifest(manifest_path(root, "train"), utterances[:1])
    (tmp_path / "run").mkdir()
    ckpt = make_checkpoint(tmp_path / "run" / "last.ckpt")
    (tmp_path / "run" / "config.yaml").write_text(f"data:\n  root: {root}\n  train_splits: [train]\n")
    build_arpa(["STALE MODEL"], tmp_path / "run" / "lm.arpa")  # ignored: --lm-text asks for a new one
    extra = tmp_path / "more.txt"
    extra.write_text("The dog ran home.\n\nA bird, a word!\n")
    manifest = tmp_path / "mini.jsonl"
    write_manifest(manifest, utterances[:2])
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--decoder", "beam",
               "--lm-text", str(extra), "--out", str(tmp_path / "e"), "--beam-size", "4"])
    assert rc == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert sorted(arpa_vocabulary(payload["lm"])) == ["A", "BIRD", "CAT", "DOG", "HOME", "RAN", "SAT", "THE", "WORD"]
    assert payload["lexicon_words"] == 9
    assert payload["title"] == str(ckpt)
    assert (tmp_path / "e" / "evaluation.md").read_text().startswith(f"# Evaluation of {ckpt}")


def test_run_language_model_is_looked_for_beside_the_checkpoint_only(tmp_path):
    from asr.inference.decoders import run_language_model

    (tmp_path / "run").mkdir()
    build_arpa(["SOME WORDS"], tmp_path / "lm.arpa")  # a folder up: not this run's
    assert run_language_model(tmp_path / "run" / "best.ckpt") is None
    build_arpa(["SOME WORDS"], tmp_path / "run" / "lm.arpa")
    assert run_language_model(tmp_path / "run" / "best.ckpt") == tmp_path / "run" / "lm.arpa"
