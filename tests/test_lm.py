"""The ARPA builder: a proper distribution in every context, correct backoffs, loadable by KenLM."""

import math

import pytest

from asr.errors import UserError
from asr.lm import SENTENCE_END, SENTENCE_START, UNKNOWN_WORD, ArpaModel, build_arpa, estimate

TEXTS = [
    "THE CAT SAT ON THE MAT",
    "THE DOG SAT ON THE LOG",
    "A CAT AND A DOG",
    "THE CAT SAW THE DOG",
    "THE DOG SAW A CAT ON THE MAT",
    "ON THE MAT THE CAT SAT",
    "THE CAT SAT",
    "THE CAT SAT",
]


def _contexts(model: ArpaModel) -> set[tuple[str, ...]]:
    """Every history the model can be asked about: all stored n-grams shorter than the order
    (except </s>, which ends a sentence), plus the empty one and some unseen ones."""
    contexts = {ngram for ngram in model.logprob if len(ngram) < model.order and SENTENCE_END not in ngram}
    contexts |= {(), ("MAT", "DOG"), ("ZEBRA",), (SENTENCE_START, "ZEBRA")}
    return contexts


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one_in_every_context(tmp_path, order):
    model = ArpaModel(build_arpa(TEXTS, tmp_path / "lm.arpa", order=order))
    predictable = [w for w in model.vocabulary if w != SENTENCE_START]
    assert SENTENCE_END in predictable and UNKNOWN_WORD in predictable
    for context in _contexts(model):
        total = sum(10 ** model.score(word, context) for word in predictable)
        assert total == pytest.approx(1.0, abs=2e-5), f"context {context}: {total}"


def test_backoff_weight_is_the_mass_left_by_discounting(tmp_path):
    probs, backoffs = estimate(TEXTS, order=3)
    # For every context h of order 2: sum over seen followers of p(w|h), plus gamma(h) times the
    # lower-order mass of the unseen followers, is 1. This ties gamma to the probabilities written.
    vocabulary = [ngram[0] for ngram in probs[0]]
    for context, gamma in backoffs[1].items():
        seen = {ngram[-1]: p for ngram, p in probs[2].items() if ngram[:-1] == context}
        assert seen, context
        unseen_mass = sum(_lower(probs, backoffs, context[-1], w) for w in vocabulary if w not in seen)
        assert sum(seen.values()) + gamma * unseen_mass == pytest.approx(1.0, abs=1e-9)


def _lower(probs, backoffs, previous, word):
    """p(word | previous) from a bigram model with unigram backoff."""
    if (previous, word) in probs[1]:
        return probs[1][(previous, word)]
    return backoffs[0].get((previous,), 1.0) * probs[0][(word,)]


def test_kneser_ney_uses_continuation_counts():
    # "FRANCISCO" is frequent but only ever follows "SAN": as a unigram (continuation count 1) it
    # must be less likely than "CITY", which follows many different words.
    texts = ["SAN FRANCISCO"] * 6 + ["BIG CITY", "OLD CITY", "NEW CITY", "SAN FRANCISCO CITY"]
    probs, _ = estimate(texts, order=2)
    assert probs[0][("FRANCISCO",)] < probs[0][("CITY",)]
    # while after "SAN" it is the overwhelming choice
    assert probs[1][("SAN", "FRANCISCO")] > 0.7


def test_arpa_layout_and_special_words(tmp_path):
    path = build_arpa(TEXTS, tmp_path / "lm.arpa", order=3)
    text = path.read_text()
    assert text.lstrip().startswith("\\data\\") and text.rstrip().endswith("\\end\\")
    model = ArpaModel(path)
    assert model.order == 3
    # <s> is a context with a backoff weight but is never predicted
    assert model.logprob[(SENTENCE_START,)] == -99.0
    assert (SENTENCE_START,) in model.logbackoff
    # every n-gram's prefix and suffix are stored too, as ARPA readers require
    for ngram in model.logprob:
        if len(ngram) > 1:
            assert ngram[:-1] in model.logprob and ngram[1:] in model.logprob, ngram
    # the header counts match the sections
    for n in (1, 2, 3):
        count = sum(1 for ngram in model.logprob if len(ngram) == n)
        assert f"ngram {n}={count}" in text
    # an unknown word gets <unk>'s probability
    assert model.score("ZEBRA", ("THE",)) == model.score(UNKNOWN_WORD, ("THE",))


def test_kenlm_from_flashlight_loads_it_and_agrees(tmp_path):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    path = build_arpa(TEXTS, tmp_path / "lm.arpa", order=3)
    ours = ArpaModel(path)
    words = sorted(w for w in ours.vocabulary if w != SENTENCE_START)
    dictionary = Dictionary(words)
    kenlm = KenLM(str(path), dictionary)
    for sentence in ["THE CAT SAT ON THE MAT", "A DOG SAW THE CAT", "MAT MAT ON"]:
        state = kenlm.start(False)
        context: tuple[str, ...] = (SENTENCE_START,)
        for word in sentence.split():
            state, score = kenlm.score(state, dictionary.get_index(word))
            assert score == pytest.approx(ours.score(word, context), abs=1e-4), (sentence, word)
            context = context + (word,)
        state, score = kenlm.finish(state)
        assert score == pytest.approx(ours.score(SENTENCE_END, context), abs=1e-4)


def test_tiny_corpus_falls_back_to_fixed_discounts(tmp_path):
    model = ArpaModel(build_arpa(["HELLO"], tmp_path / "lm.arpa", order=3))
    total = sum(10 ** model.score(w, (SENTENCE_START,)) for w in model.vocabulary if w != SENTENCE_START)
    assert total == pytest.approx(1.0, abs=2e-5)
    assert math.isfinite(model.score("HELLO", (SENTENCE_START,)))


def test_no_text_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no text"):
        build_arpa(["", "   "], tmp_path / "lm.arpa")
    with pytest.raises(UserError, match="order"):
        build_arpa(["A B"], tmp_path / "lm.arpa", order=0)


# --- the command: bad input is one line naming the file, and nothing but an ARPA file is overwritten

def _lm_build(capsys, *argv) -> tuple[int, str]:
    from asr.cli import main

    rc = main(["lm", "build", *map(str, argv)])
    return rc, capsys.readouterr().err


def _assert_one_error_line(err: str, *words: str) -> None:
    assert err.startswith("asr lm build: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_cli_builds_a_loadable_model(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "lm.arpa"
    assert _lm_build(capsys, text, out)[0] == 0
    assert ArpaModel(out).order == 3


@pytest.mark.parametrize("content", [bytes(range(256)) * 16, b"RIFF\x24\x00\x00\x00WAVE" + b"\x00" * 64],
                         ids=["random bytes", "zero-filled wav"])
def test_cli_binary_input_is_one_line_naming_the_file(tmp_path, capsys, content):
    path = tmp_path / "random.wav"
    path.write_bytes(content)
    rc, err = _lm_build(capsys, path, tmp_path / "o.arpa")
    assert rc == 2
    _assert_one_error_line(err, str(path), "not UTF-8 text" if b"\xff" in content else "binary data")
    assert not (tmp_path / "o.arpa").exists()


def test_cli_missing_input_and_directory_input(tmp_path, capsys):
    rc, err = _lm_build(capsys, tmp_path / "nope.txt", tmp_path / "o.arpa")
    assert rc == 2
    _assert_one_error_line(err, f"{tmp_path / 'nope.txt'}: no such file")
    rc, err = _lm_build(capsys, tmp_path, tmp_path / "o.arpa")
    assert rc == 2
    _assert_one_error_line(err, f"{tmp_path}: not a text file")


def test_cli_output_directory_is_one_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("HELLO WORLD\n")
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _lm_build(capsys, text, out)
    assert rc == 2
    _assert_one_error_line(err, f"{out}: is a directory")
    assert list(out.iterdir()) == []


def test_cli_refuses_to_overwrite_a_file_that_is_not_arpa(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("HELLO WORLD\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    rc, err = _lm_build(capsys, text, notes)
    assert rc == 2
    _assert_one_error_line(err, f"{notes}: exists and is not an ARPA file; not overwriting it")
    assert notes.read_text() == "my notes\n"
    with pytest.raises(UserError, match="not an ARPA file"):  # the library refuses too, not only the command
        build_arpa(TEXTS, notes)
    assert notes.read_text() == "my notes\n"


def test_cli_replaces_an_existing_arpa_file(tmp_path, capsys):
    text = tmp_path / "t.txt"
    out = tmp_path / "lm.arpa"
    text.write_text("HELLO WORLD\n")
    assert _lm_build(capsys, text, out)[0] == 0
    text.write_text("\n".join(TEXTS) + "\n")
    assert _lm_build(capsys, text, out)[0] == 0
    assert "CAT" in ArpaModel(out).vocabulary
