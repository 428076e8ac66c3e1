"""The one beam tuner: the LM weight and word score with the lowest beam+LM WER on a dev split.

`asr evaluate --tune-on dev` and the end of training (asr.training.finish) both call tune_beam, so
their figures come from the same grid and the same tie-break.

Grid: lm_weight in TUNE_LM_WEIGHTS x word_score in TUNE_WORD_SCORES (20 points; the grid training
used for the published tiny/small results). Tie-break among equal WERs: the smaller LM weight, then
the word score closest to 0 (the point that leans least on the LM), so the choice is deterministic.
The network runs once; every grid point decodes the same log-probabilities. The points are
independent, so on Linux they are decoded by `jobs` forked worker processes (the beam decoder holds
the GIL, so threads would not help); each point's WER is the same as in one process, and the grid
keeps its order.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from asr.errors import UserError

TUNE_LM_WEIGHTS = (1.0, 2.0, 3.0, 4.0, 6.0)
TUNE_WORD_SCORES = (-3.0, -2.0, -1.0, 0.0)
TUNE_MAX_UTTERANCES = 200  # asr evaluate's default; training tunes on the whole dev split unless told


@dataclass(frozen=True)
class BeamTuning:
    lm_weight: float  # the best of the grid
    word_score: float
    wer: float  # its WER on the tuning utterances
    utterances: int  # how many were decoded
    grid: list[tuple[float, float, float]]  # every (lm_weight, word_score, wer) tried, in grid order

    def to_dict(self) -> dict:
        return asdict(self)


def spread_subset(items: list, limit: int | None) -> list:
    """At most `limit` of `items`, evenly spaced (deterministic); all of them when limit is None."""
    if limit is None or len(items) <= limit:
        return list(items)
    if limit < 1:
        raise UserError(f"--tune_utterances {limit}: must be at least 1")
    return [items[i * len(items) // limit] for i in range(limit)]


# What forked workers read: set by tune_beam just before its pool starts, cleared after it.
_GRID_STATE: dict | None = None


def default_jobs() -> int:
    """Worker processes for the grid: the CPUs this process may run on, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _point_wer(point: tuple[float, float]) -> float:
    """Decode the tuning batches at one (lm_weight, word_score) and return the WER (corpus level)."""
    from asr.decode import BeamLMDecoder
    from asr.evaluate import count_edits

    state = _GRID_STATE
    lm_weight, word_score = point
    decoder = BeamLMDecoder(state["tokenizer"], state["lm_path"], state["lexicon"], beam_size=state["beam_size"],
                            lm_weight=lm_weight, word_score=word_score)
    hypotheses = [h.text for b in state["batches"] for h in decoder.decode(b.log_probs, b.lengths)]
    counts = count_edits(state["references"], hypotheses)
    return counts.word_edits / max(counts.reference_words, 1)


def _worker_start() -> None:
    import torch

    torch.set_num_threads(1)  # each worker has one CPU's share; the decoder itself is single-threaded


def tune_beam(
    recognizer,
    utterances: list,
    lm_path: str | Path,
    lexicon: Iterable[str],
    beam_size: int | None = None,
    max_utterances: int | None = TUNE_MAX_UTTERANCES,
    lm_weights: Sequence[float] = TUNE_LM_WEIGHTS,
    word_scores: Sequence[float] = TUNE_WORD_SCORES,
    jobs: int | None = None,
) -> BeamTuning:
    """Grid-search on (at most max_utterances, evenly spread by id, of) `utterances` — a dev split,
    never a test split. beam_size: the recognizer's options' unless given. jobs: worker processes
    (default_jobs() unless given; 1, or a platform without fork, decodes in this process)."""
    global _GRID_STATE
    from asr.decode import BeamLMDecoder

    if not utterances:
        raise UserError("nothing to tune on: no utterances")
    if jobs is not None and jobs < 1:
        raise UserError(f"tuning jobs {jobs}: must be at least 1")
    subset = spread_subset(sorted(utterances, key=lambda u: u.id), max_utterances)
    batches = list(recognizer.utterance_batches(subset))
    if not batches:
        raise UserError("nothing to tune on: no utterance's audio could be read")
    references = [u.text for b in batches for u in b.items]
    lexicon = list(lexicon)
    beam_size = beam_size or recognizer.options.beam_size
    points = [(w, s) for w in lm_weights for s in word_scores]
    # Built once here so that a bad LM path or option fails in this process, with its own message.
    BeamLMDecoder(recognizer.model.tokenizer, lm_path, lexicon, beam_size=beam_size)
    workers = min(jobs or default_jobs(), len(points))
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1
    _GRID_STATE = dict(tokenizer=recognizer.model.tokenizer, lm_path=lm_path, lexicon=lexicon, beam_size=beam_size,
                       batches=batches, references=references)
    try:
        if workers == 1:
            wers = [_point_wer(p) for p in points]
        else:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_worker_start) as pool:
                wers = list(pool.map(_point_wer, points))
    finally:
        _GRID_STATE = None
    grid = [(w, s, wer) for (w, s), wer in zip(points, wers)]
    best = min(grid, key=lambda g: (g[2], g[0], abs(g[1])))
    return BeamTuning(best[0], best[1], best[2], len(references), grid)
