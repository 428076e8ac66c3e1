"""Word and utterance confidence from the CTC posteriors.

Definition: each token the decoder emitted is a run of frames on its path (asr.decode._token_runs);
the token's confidence is its highest posterior on that run, max_t p(token | frame t) (the height of
its CTC spike). A word's confidence is the lowest of its tokens' (word delimiters excluded): one
doubtful letter makes a doubtful word. An utterance's confidence is the mean of its words' (None
without words). All are probabilities in [0, 1].
"""

from __future__ import annotations

import torch

from asr.decode import Hypothesis, _token_runs


def word_confidences(log_probs: torch.Tensor, hypothesis: Hypothesis, tokenizer) -> list[float]:
    """log_probs (T, V) of one utterance, the hypothesis decoded from them -> one confidence per word
    of hypothesis.words. A hypothesis without a frame path (none is expected) gets NaN per word."""
    path = hypothesis.path
    if not path:
        return [float("nan")] * len(hypothesis.words)
    delimiter = tokenizer.word_delimiter
    confidences = []
    for word in hypothesis.words:
        token_scores = []
        for token, start, end in _token_runs(path[word.start_frame:word.end_frame]):
            if delimiter is not None and tokenizer.tokens[token] == delimiter:
                continue
            frames = log_probs[word.start_frame + start:word.start_frame + end, token]  # (run,)
            token_scores.append(float(frames.max().exp()))
        confidences.append(min(token_scores) if token_scores else float("nan"))
    return confidences


def utterance_confidence(word_scores: list[float]) -> float | None:
    """The mean of the words' confidences; None for an utterance without words."""
    return sum(word_scores) / len(word_scores) if word_scores else None


def confidence_by_correctness(references: list[str], hypotheses: list[str],
                              confidences: list[list[float]]) -> dict:
    """Mean word confidence of the hypothesis words that are right (aligned equal to the reference, as
    jiwer aligns them) and of those that are wrong (substituted or inserted), with their counts.
    references LibriSpeech-normalised; hypotheses[i] has one confidence per word in confidences[i]."""
    import jiwer

    right: list[float] = []
    wrong: list[float] = []
    for reference, hypothesis, scores in zip(references, hypotheses, confidences):
        words = hypothesis.split()
        if not words or len(words) != len(scores):
            continue
        if not reference.split():
            wrong += scores
            continue
        [alignment] = jiwer.process_words(reference, hypothesis).alignments
        for chunk in alignment:
            span = scores[chunk.hyp_start_idx:chunk.hyp_end_idx]
            (right if chunk.type == "equal" else wrong).extend(span)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"right_words": len(right), "wrong_words": len(wrong), "right_mean": mean(right), "wrong_mean": mean(wrong)}
