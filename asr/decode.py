"""CTC decoding: greedy (best path) and beam search with a word n-gram language model.

Both decoders take log-probabilities (N, T, V) with the blank at index 0 and return one
`Hypothesis` per utterance: the text and each word's first and last frame from the CTC
alignment (the best path for greedy, the winning beam's path for beam search).

The beam decoder is flashlight's lexicon decoder through torchaudio's `ctc_decoder`: words are
restricted to a lexicon (the LM's words, spelled with the model's tokenizer) and scored with a
KenLM model (an ARPA file, see asr.lm). With a character tokenizer the lexicon spells "CAT" as
"C A T", and "|", which the model emits between words, is the decoder's silence token. A
SentencePiece tokenizer has no word delimiter (a word starts at a piece with "▁"), so the
lexicon spells words as pieces and the decoder gets a silence token of its own that the
acoustic model never emits (its log-probability column is filled with LOG_PROB_NEVER).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch

from asr.data.tokenizer import Tokenizer
from asr.errors import UserError, check_range

BLANK_ID = 0
BLANK_TOKEN = "<blank>"
UNKNOWN_WORD = "<unk>"
# silence token added for tokenizers without a word delimiter; never emitted by the model
EXTRA_SILENCE_TOKEN = "<sil>"
LOG_PROB_NEVER = -1.0e4  # log-probability of a token the model cannot emit (finite: no NaN in sums)
SENTENCEPIECE_WORD_START = "\u2581"  # "▁"

# Beam search defaults. lm_weight and word_score: the best point of a grid search on the synthetic
# corpus's dev split (LM from the training transcripts) with the tiny recipe's character model
# (greedy dev WER 50%): lm_weight 1-4 x word_score -3..1 gave 36.7% at (3, -1), within 1.5 points
# of it for lm_weight 2-3 and word_score -3..0. Another model or corpus may want other values:
# tune them on its dev split (`asr evaluate --tune-on dev`, asr.inference.tuning.tune_beam).
DEFAULT_BEAM_SIZE = 50  # hypotheses kept per frame
DEFAULT_BEAM_SIZE_TOKEN = 16  # tokens tried per frame (the most likely ones)
DEFAULT_BEAM_THRESHOLD = 25.0  # drop hypotheses this far (natural log) below the best
DEFAULT_LM_WEIGHT = 3.0  # weight of the LM's log-probability
DEFAULT_WORD_SCORE = -1.0  # added per word: > 0 favours more, shorter words


@dataclass(frozen=True)
class WordTiming:
    word: str
    start_frame: int  # first output frame of the word's first token
    end_frame: int  # one past the last output frame of the word's last token (exclusive)


@dataclass(frozen=True)
class Hypothesis:
    text: str  # words separated by single spaces
    words: list[WordTiming] = field(default_factory=list)
    path: list[int] = field(default_factory=list)  # the token chosen at each frame (greedy: argmax; beam: the winner's)


class Decoder(Protocol):
    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[Hypothesis]: ...


def _as_cpu_batch(log_probs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    if log_probs.ndim != 3:
        raise ValueError(f"log_probs must be (N, T, V), got shape {tuple(log_probs.shape)}")
    log_probs = log_probs.detach().to("cpu", torch.float32).contiguous()  # (N, T, V)
    lengths_list = [int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist()]
    if len(lengths_list) != log_probs.shape[0]:
        raise ValueError(f"{len(lengths_list)} lengths for a batch of {log_probs.shape[0]}")
    T = log_probs.shape[1]
    return log_probs, [max(0, min(n, T)) for n in lengths_list]


def _token_runs(path: Sequence[int]) -> list[tuple[int, int, int]]:
    """(token, first frame, end frame exclusive) for each non-blank emission of a frame path:
    maximal runs of the same token, which CTC collapses into one."""
    runs = []
    start = 0
    for t in range(1, len(path) + 1):
        if t == len(path) or path[t] != path[start]:
            if path[start] != BLANK_ID:
                runs.append((int(path[start]), start, t))
            start = t
    return runs


def _words_from_runs(tokenizer: Tokenizer, runs: list[tuple[int, int, int]]) -> list[WordTiming]:
    """Group token emissions into words: at the tokenizer's word delimiter (characters) or at
    pieces that begin with "▁" (SentencePiece)."""
    words: list[WordTiming] = []
    current: list[tuple[int, int, int]] = []

    def close() -> None:
        if current:
            text = tokenizer.decode([token for token, _, _ in current]).strip()
            if text:
                words.append(WordTiming(text, current[0][1], current[-1][2]))
            current.clear()

    delimiter = tokenizer.word_delimiter
    for run in runs:
        piece = tokenizer.tokens[run[0]] if run[0] < len(tokenizer.tokens) else ""
        if delimiter is not None and piece == delimiter:
            close()
            continue
        if delimiter is None and piece.startswith(SENTENCEPIECE_WORD_START):
            close()
        current.append(run)
    close()
    return words


def _hypothesis(words: list[WordTiming], path: list[int]) -> Hypothesis:
    return Hypothesis(" ".join(w.word for w in words), words, path)


class GreedyDecoder:
    """Best path: the most likely token at every frame, repeats collapsed, blanks removed."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[Hypothesis]:
        log_probs, lengths_list = _as_cpu_batch(log_probs, lengths)
        best = log_probs.argmax(dim=-1)  # (N, T)
        hypotheses = []
        for n, length in enumerate(lengths_list):
            path = best[n, :length].tolist()
            hypotheses.append(_hypothesis(_words_from_runs(self.tokenizer, _token_runs(path)), path))
        return hypotheses


def spell(tokenizer: Tokenizer, word: str) -> list[str] | None:
    """The word as the tokenizer's tokens, as the lexicon lists it; None if it cannot be spelled
    (a token outside the vocabulary)."""
    try:
        ids = tokenizer.encode(word)
    except UserError:  # a character outside the vocabulary
        return None
    if not ids or any(i <= BLANK_ID or i >= len(tokenizer.tokens) for i in ids):
        return None
    # no trailing word delimiter: the model emits "|" only between words, never after the last
    # one, so a spelling that ended in "|" would force a frame the model does not predict; the
    # decoder takes "|" as its silence token between words instead
    pieces = [tokenizer.tokens[i] for i in ids]
    if any(not p or p.isspace() or p == UNKNOWN_WORD or p == tokenizer.word_delimiter for p in pieces):
        return None
    return pieces


def lexicon_words(texts: Iterable[str]) -> list[str]:
    """The distinct words of some transcripts, sorted."""
    return sorted({word for text in texts for word in text.split()})


@contextlib.contextmanager
def _quiet_stderr():
    """KenLM prints a progress bar to the process's stderr while it reads an ARPA file: keep it
    off the terminal, and show it only if loading fails."""
    fd = 2
    sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no stderr to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            if failed:
                sink.seek(0)
                os.write(fd, sink.read())


class BeamLMDecoder:
    """CTC prefix beam search over a lexicon with a KenLM word n-gram model (flashlight).

    lm_path None: the lexicon alone constrains the search (no LM scores).
    Scores are natural logs: acoustic + lm_weight * LM + word_score * words.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        lm_path: str | os.PathLike | None,
        lexicon_words: Iterable[str],
        beam_size: int = DEFAULT_BEAM_SIZE,
        lm_weight: float = DEFAULT_LM_WEIGHT,
        word_score: float = DEFAULT_WORD_SCORE,
        beam_size_token: int | None = DEFAULT_BEAM_SIZE_TOKEN,
        beam_threshold: float = DEFAULT_BEAM_THRESHOLD,
    ):
        from torchaudio.models.decoder import ctc_decoder  # imported here: flashlight is heavy

        check_range("beam_size", beam_size, low=1)  # 0 would return an empty text for every input
        check_range("lm_weight", lm_weight)
        check_range("word_score", word_score)
        if beam_size_token is not None:
            check_range("beam_size_token", beam_size_token, low=1)
        check_range("beam_threshold", beam_threshold, low=0.0, low_open=True)
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer.tokens)
        self.options = dict(
            beam_size=beam_size,
            lm_weight=lm_weight,
            word_score=word_score,
            beam_size_token=beam_size_token,
            beam_threshold=beam_threshold,
        )
        if lm_path is not None and not Path(lm_path).is_file():
            raise UserError(f"{lm_path}: language model file not found")
        if tokenizer.tokens[BLANK_ID] != BLANK_TOKEN:
            raise UserError(f"tokenizer's token 0 is {tokenizer.tokens[BLANK_ID]!r}, expected the CTC blank {BLANK_TOKEN!r}")

        tokens = list(tokenizer.tokens)
        if tokenizer.word_delimiter is not None:
            silence = tokenizer.word_delimiter
            self.extra_silence_column = False
        else:
            silence = EXTRA_SILENCE_TOKEN
            tokens.append(EXTRA_SILENCE_TOKEN)
            self.extra_silence_column = True

        spelled = {}
        for word in dict.fromkeys(lexicon_words):
            if word == UNKNOWN_WORD:
                continue
            pieces = spell(tokenizer, word)
            if pieces is not None:
                spelled[word] = pieces
        if not spelled:
            raise UserError("beam search needs a lexicon: no word of the training transcripts can be spelled with the tokenizer")
        self.lexicon_size = len(spelled)

        with tempfile.TemporaryDirectory(prefix="asr-lexicon-") as tmp:
            lexicon_path = Path(tmp) / "lexicon.txt"
            lexicon_path.write_text("".join(f"{w} {' '.join(p)}\n" for w, p in spelled.items()), encoding="utf-8")
            beam_size_token = min(beam_size_token or len(tokens), len(tokens))
            with _quiet_stderr():
                self._ctc = ctc_decoder(
                    lexicon=str(lexicon_path),
                    tokens=tokens,
                    lm=None if lm_path is None else str(lm_path),
                    nbest=1,
                    beam_size=beam_size,
                    beam_size_token=beam_size_token,
                    beam_threshold=beam_threshold,
                    lm_weight=lm_weight,
                    word_score=word_score,
                    blank_token=BLANK_TOKEN,
                    sil_token=silence,
                    unk_word=UNKNOWN_WORD,
                )

    def _timed(self, path: list[int], completions: list[tuple[int, str]]) -> Hypothesis:
        """Word timings from the winning path: flashlight marks each word at the frame where its
        last token is first emitted; the word's tokens are the emissions since the previous
        word (silence tokens excluded)."""
        words = [word for _, word in completions]
        silence = self.tokenizer.word_delimiter
        timed: list[WordTiming] = []
        start = None
        runs = iter(_token_runs(path))
        for frame, word in completions:
            for token, run_start, run_end in runs:
                if silence is not None and self.tokenizer.tokens[token] == silence:
                    continue
                start = run_start if start is None else start
                if run_start <= frame < run_end:
                    timed.append(WordTiming(word, start, run_end))
                    start = None
                    break
        if len(timed) != len(words):
            # the path does not split into the decoder's words (not expected of a lexicon
            # decoder): keep the words and give no timings rather than wrong ones
            return Hypothesis(" ".join(words), [], path)
        return _hypothesis(timed, path)

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[Hypothesis]:
        log_probs, lengths_list = _as_cpu_batch(log_probs, lengths)
        N, T, V = log_probs.shape
        if V != self.vocab_size:
            raise UserError(f"log-probabilities have {V} classes but the tokenizer has {self.vocab_size} tokens")
        if self.extra_silence_column:
            never = torch.full((N, T, 1), LOG_PROB_NEVER)
            log_probs = torch.cat([log_probs, never], dim=-1).contiguous()  # (N, T, V + 1)
            V += 1
        hypotheses = []
        word_dict = self._ctc.word_dict
        for n, length in enumerate(lengths_list):
            if length == 0:
                hypotheses.append(Hypothesis(""))
                continue
            pointer = log_probs.data_ptr() + n * log_probs.stride(0) * log_probs.element_size()
            # flashlight's raw result: .tokens is the frame path with one extra state before the
            # first frame and one after the last; .words holds word ids where words complete
            results = self._ctc.decoder.decode(pointer, length, V)
            if not results:
                hypotheses.append(Hypothesis(""))
                continue
            best = results[0]
            path = [int(t) for t in best.tokens][1 : length + 1]
            completions = [(i - 1, word_dict.get_entry(w)) for i, w in enumerate(best.words) if w >= 0]
            hypotheses.append(self._timed(path, completions))
        return hypotheses
