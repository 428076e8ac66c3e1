"""Word n-gram language models in ARPA format: interpolated modified Kneser-Ney.

The beam-search decoder scores words with KenLM (bundled in flashlight-text), which reads ARPA
files but cannot build them; KenLM's builder (lmplz) is a C++ program that PyPI does not ship.
This module estimates the model itself, the way lmplz does (Chen & Goodman 1998; Heafield et al.
2013), small enough for the transcripts of a training corpus:

- counts: the highest order uses raw counts; lower orders use continuation counts (the number of
  distinct words seen to the left), except n-grams that start with <s>, which have no left
  context and keep their raw counts;
- discounts D1, D2, D3+ per order from the counts-of-counts of those adjusted counts, with
  lmplz's fallback (0.5, 1.0, 1.5) where a small corpus makes the estimate invalid;
- interpolation: p(w|h) = (a(hw) - D(a(hw))) / a(h.) + gamma(h) * p(w|h'), down to a uniform
  distribution over the vocabulary (all words, </s> and <unk>; <s> is never predicted);
- written as a backoff model: each n-gram stores its interpolated probability and, where it is
  a context, gamma as its backoff weight, so that an unseen hw gets gamma(h) * p(w|h').

`asr lm build TEXT_FILE OUT.arpa [--order 3]` builds one from a file of sentences. It replaces an
existing ARPA file at OUT (what it makes) and refuses to overwrite anything else.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from asr.errors import UserError
from asr.fileio import atomic_write_text

DEFAULT_ORDER = 3
SENTENCE_START = "<s>"
SENTENCE_END = "</s>"
UNKNOWN_WORD = "<unk>"
# log10 probability written for <s>, which is never predicted (ARPA's and KenLM's convention)
LOG10_ZERO = -99.0
# lmplz's --discount_fallback values, used where the corpus is too small to estimate D1..D3+
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)

NGram = tuple[str, ...]


def _sentences(texts: Iterable[str]) -> list[list[str]]:
    return [text.split() for text in texts if text.split()]


def _raw_counts(sentences: list[list[str]], order: int) -> dict[NGram, int]:
    """Counts of the highest-order n-grams, plus shorter ones anchored at <s> (which only
    occur as sentence starts and cannot be extended to the left)."""
    counts: dict[NGram, int] = defaultdict(int)
    for words in sentences:
        padded = [SENTENCE_START, *words, SENTENCE_END]
        for end in range(1, len(padded)):
            start = max(0, end + 1 - order)
            counts[tuple(padded[start : end + 1])] += 1
    return counts


def _adjusted_counts(sentences: list[list[str]], order: int) -> list[dict[NGram, int]]:
    """adjusted[n-1][ngram] for n = 1..order: raw counts at the top order and for n-grams that
    start with <s>; continuation counts N1+(. ngram) otherwise."""
    adjusted: list[dict[NGram, int]] = [defaultdict(int) for _ in range(order)]
    for ngram, count in _raw_counts(sentences, order).items():
        n = len(ngram)
        # an n-gram shorter than the top order is one that starts at <s>: its count is raw
        adjusted[n - 1][ngram] += count
    # continuation counts: every distinct n-gram (n >= 2) adds one to its suffix of length n-1,
    # unless that suffix starts with <s> (then it has its own raw count)
    for n in range(order, 1, -1):
        for ngram in list(adjusted[n - 1]):
            suffix = ngram[1:]
            if suffix[0] == SENTENCE_START:
                continue
            adjusted[n - 2][suffix] += 1
    return adjusted


def _discounts(counts: dict[NGram, int]) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts (D1, D2, D3+) from the counts-of-counts."""
    count_of_counts = [0, 0, 0, 0, 0]
    for count in counts.values():
        if count <= 4:
            count_of_counts[count] += 1
    n1, n2, n3, n4 = count_of_counts[1:]
    if min(n1, n2, n3, n4) == 0:
        return FALLBACK_DISCOUNTS
    y = n1 / (n1 + 2 * n2)
    discounts = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    if not all(0 < d < k for k, d in enumerate(discounts, start=1)):
        return FALLBACK_DISCOUNTS
    return discounts


def _discount(discounts: tuple[float, float, float], count: int) -> float:
    return discounts[min(count, 3) - 1]


def estimate(texts: Iterable[str], order: int = DEFAULT_ORDER) -> tuple[list[dict[NGram, float]], list[dict[NGram, float]]]:
    """Interpolated modified Kneser-Ney. Returns (probs, backoffs): per order n (index n-1),
    probs[n-1][ngram] = p(last word | first n-1 words) (natural probabilities, not logs) and
    backoffs[n-1][ngram] = gamma(ngram) for n-grams that are contexts of a longer n-gram."""
    if order < 1:
        raise UserError(f"language model order must be at least 1, got {order}")
    sentences = _sentences(texts)
    if not sentences:
        raise UserError("cannot build a language model from no text (all transcripts are empty)")
    adjusted = _adjusted_counts(sentences, order)

    vocabulary = {word for words in sentences for word in words} | {SENTENCE_END, UNKNOWN_WORD}
    probs: list[dict[NGram, float]] = [dict() for _ in range(order)]
    backoffs: list[dict[NGram, float]] = [dict() for _ in range(order)]

    for n in range(1, order + 1):
        counts = adjusted[n - 1]
        discounts = _discounts(counts)
        # per context: total adjusted count and the number of followers with count 1, 2, 3+
        context_total: dict[NGram, int] = defaultdict(int)
        context_followers: dict[NGram, list[int]] = defaultdict(lambda: [0, 0, 0])
        for ngram, count in counts.items():
            context_total[ngram[:-1]] += count
            context_followers[ngram[:-1]][min(count, 3) - 1] += 1
        gamma = {
            context: sum(d * k for d, k in zip(discounts, context_followers[context])) / total
            for context, total in context_total.items()
        }
        for ngram, count in counts.items():
            context = ngram[:-1]
            lower = 1.0 / len(vocabulary) if n == 1 else probs[n - 2][ngram[1:]]
            discounted = (count - _discount(discounts, count)) / context_total[context]
            probs[n - 1][ngram] = discounted + gamma[context] * lower
        if n == 1:
            # words never seen as a continuation (only <unk> here) get the uniform share alone
            for word in vocabulary:
                if (word,) not in probs[0]:
                    probs[0][(word,)] = gamma[()] / len(vocabulary)
            # <s> is a context but never a prediction
            probs[0].pop((SENTENCE_START,), None)
        else:
            for context, weight in gamma.items():
                backoffs[n - 2][context] = weight
    return probs, backoffs


def _log10(p: float) -> float:
    return math.log10(p) if p > 0 else LOG10_ZERO


def write_arpa(probs: list[dict[NGram, float]], backoffs: list[dict[NGram, float]], path: str | Path) -> Path:
    path = Path(path)
    _check_replaceable(path)
    order = len(probs)
    # <s> appears in the unigram section with probability zero and its backoff weight
    unigrams = dict(probs[0])
    unigrams[(SENTENCE_START,)] = 0.0
    sections = [unigrams, *probs[1:]]
    lines = ["", "\\data\\"]
    lines += [f"ngram {n}={len(section)}" for n, section in enumerate(sections, start=1)]
    for n, section in enumerate(sections, start=1):
        lines += ["", f"\\{n}-grams:"]
        for ngram in sorted(section):
            entry = f"{_log10(section[ngram]):.7f}\t{' '.join(ngram)}"
            if n < order and ngram in backoffs[n - 1]:
                entry += f"\t{_log10(backoffs[n - 1][ngram]):.7f}"
            lines.append(entry)
    lines += ["", "\\end\\", ""]
    try:
        return atomic_write_text(path, "\n".join(lines))
    except OSError as err:
        raise UserError(f"{path}: cannot write the language model ({err.strerror or err})") from None


def _check_replaceable(path: Path) -> None:
    """An ARPA file may be replaced (that is what this module makes); nothing else is overwritten."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the ARPA file to write, e.g. {path / 'lm.arpa'}")
    if path.exists() or path.is_symlink():
        if not _is_arpa(path):
            raise UserError(f"{path}: exists and is not an ARPA file; not overwriting it "
                            "(remove it or choose another output name)")


def _is_arpa(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)  # the header is enough: ARPA files can be gigabytes
    except OSError:
        return False
    return head.lstrip().startswith(b"\\data\\")


def read_sentences(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file; UserError naming the file if it is missing, binary or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a text file (it is a directory or a device)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                        "give a text file of sentences, one per line") from None
    if "\0" in text:  # valid UTF-8 can still be binary (zero-filled audio, say)
        raise UserError(f"{path}: binary data (NUL bytes), not text; give a text file of sentences, one per line")
    return text.splitlines()


def build_arpa(texts: Iterable[str], path: str | Path, order: int = DEFAULT_ORDER) -> Path:
    """Build an interpolated modified Kneser-Ney word n-gram model of `texts` (one sentence each,
    words separated by spaces, already normalised) and write it to `path` in ARPA format."""
    probs, backoffs = estimate(texts, order)
    return write_arpa(probs, backoffs, path)


class ArpaModel:
    """A small reader of ARPA backoff models (log10), for tests and inspection."""

    def __init__(self, path: str | Path):
        self.logprob: dict[NGram, float] = {}
        self.logbackoff: dict[NGram, float] = {}
        self.order = 0
        section = 0
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("ngram ") or line in ("\\data\\", "\\end\\"):
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:].split("-")[0])
                self.order = max(self.order, section)
                continue
            fields = line.split("\t")
            ngram = tuple(fields[1].split())
            if len(ngram) != section:
                raise UserError(f"{path}: malformed ARPA line {line!r}")
            self.logprob[ngram] = float(fields[0])
            if len(fields) > 2:
                self.logbackoff[ngram] = float(fields[2])

    @property
    def vocabulary(self) -> list[str]:
        return [ngram[0] for ngram in self.logprob if len(ngram) == 1]

    def score(self, word: str, context: tuple[str, ...]) -> float:
        """log10 p(word | context), backing off as ARPA prescribes."""
        context = tuple(context)[-(self.order - 1) :] if self.order > 1 else ()
        if (word,) not in self.logprob:
            word = UNKNOWN_WORD
        penalty = 0.0
        while context and context + (word,) not in self.logprob:
            penalty += self.logbackoff.get(context, 0.0)
            context = context[1:]
        return penalty + self.logprob[context + (word,)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="file with one normalised sentence per line")
    parser.add_argument("out", help="ARPA file to write (an existing ARPA file is replaced; any other file is refused)")
    parser.add_argument("--order", type=int, default=DEFAULT_ORDER, help="n-gram order (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    # check the output before minutes of counting, as well as when writing
    _check_replaceable(Path(args.out))
    path = build_arpa(read_sentences(args.text), args.out, order=args.order)
    print(path)
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m asr.lm", description="build an ARPA word n-gram model")
    add_arguments(parser)
    try:
        sys.exit(run(parser.parse_args()))
    except UserError as err:
        print(f"asr.lm: error: {err}", file=sys.stderr)
        sys.exit(2)
