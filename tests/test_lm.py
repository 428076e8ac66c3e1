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
