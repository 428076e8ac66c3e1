"""Word confidence from CTC posteriors (asr.inference.confidence): a constructed posterior where one word
is doubtful, a trained model on a word whose letter is made ambiguous, and evaluation's right/wrong split."""

import numpy as np
import pytest
import torch

from asr.data.tokenizer import CharTokenizer
from asr.decode import GreedyDecoder
from asr.inference.confidence import confidence_by_correctness, utterance_confidence, word_confidences


def _posterior(spikes: list[tuple[str, float, str | None]], tokenizer, frames_per_token: int = 3) -> torch.Tensor:
    """(T, V) log-probs: for each (token, probability, runner-up) a frame where the token has that probability
    and the runner-up the rest, then blank frames."""
    V = tokenizer.vocab_size
    rows = []
    for token, p, runner_up in spikes:
        row = torch.full((V,), 1e-6)
        row[tokenizer.encode(token)[0]] = p
        row[tokenizer.encode(runner_up)[0] if runner_up else 0] += 1 - p
        rows.append(row)
        for _ in range(frames_per_token - 1):
            blank = torch.full((V,), 1e-6)
            blank[0] = 1.0
            rows.append(blank)
    probs = torch.stack(rows)
    return (probs / probs.sum(-1, keepdim=True)).log()


def test_a_doubtful_letter_makes_a_doubtful_word():
    tok = CharTokenizer()
    # "THE CAT SAT": every letter at 0.95 except the S of SAT, 0.55 against H 0.45 (the model nearly heard HAT)
    spikes = [("T", .95, None), ("H", .95, None), ("E", .95, None), (" ", .95, None),
              ("C", .95, None), ("A", .95, None), ("T", .95, None), (" ", .95, None),
              ("S", .55, "H"), ("A", .95, None), ("T", .95, None)]
    log_probs = _posterior(spikes, tok)
    [hyp] = GreedyDecoder(tok).decode(log_probs[None], torch.tensor([log_probs.shape[0]]))
    assert hyp.text == "THE CAT SAT"
    the, cat, sat = word_confidences(log_probs, hyp, tok)
    assert sat == pytest.approx(0.55, abs=1e-3) and the == pytest.approx(0.95, abs=1e-3)
    assert sat < min(the, cat)
    assert utterance_confidence([the, cat, sat]) == pytest.approx((0.95 + 0.95 + 0.55) / 3, abs=1e-3)
    assert utterance_confidence([]) is None


def test_the_trained_model_doubts_the_words_it_gets_wrong(trained_run, letter_wave, letter_timing):
    """Each letter in turn sounded halfway between two letters' tones: over all these transcripts, the words
    the model gets wrong have a lower mean confidence than the words it gets right.

    Over many perturbations, not one: which words a single blurred letter breaks, and their confidences,
    depend on the trained weights, which differ bit for bit between CPUs (their BLAS kernels differ); on
    one machine a blurred letter broke every word of its sentence, leaving no right word to compare."""
    from asr.inference import Recognizer

    r = Recognizer.load(trained_run("bidirectional") / "last.ckpt")
    references, hypotheses, confidences = [], [], []
    for text in ("TO RED NIGHT", "SAT ON A MAT"):
        clean = letter_wave(text, seed=7)
        assert r.transcribe(clean.astype(np.float32)).text == text  # the model hears the clean sentence
        for blurred, letter in enumerate(text):
            if letter == " ":
                continue
            wave = clean.copy()
            start, end = letter_timing(text, blurred)
            t = np.arange(end - start) / 16000
            between = 300.0 * 1.13 ** (ord(letter) - ord("A") + 0.5)  # the letter tones' spacing, halved
            wave[start:end] = 0.3 * np.sin(2 * np.pi * between * t) * np.hanning(end - start)
            result = r.transcribe(wave.astype(np.float32))
            references.append(text)
            hypotheses.append(result.text)
            confidences.append([w.confidence for w in result.words])
    assert sum(h != ref for h, ref in zip(hypotheses, references)) >= len(references) // 2, hypotheses
    split = confidence_by_correctness(references, hypotheses, confidences)
    assert split["wrong_words"] >= 3 and split["right_words"] >= 3, (split, hypotheses)
    assert split["wrong_mean"] < split["right_mean"], (split, hypotheses)


def test_right_and_wrong_words_are_told_apart_by_alignment():
    split = confidence_by_correctness(["THE CAT SAT", "A DOG"], ["THE HAT SAT", "A DOG RAN"],
                                      [[0.9, 0.4, 0.8], [0.95, 0.9, 0.3]])
    assert (split["right_words"], split["wrong_words"]) == (4, 2)
    assert split["right_mean"] == pytest.approx((0.9 + 0.8 + 0.95 + 0.9) / 4)
    assert split["wrong_mean"] == pytest.approx((0.4 + 0.3) / 2)
