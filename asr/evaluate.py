"""Word and character error rates of a model on splits or manifests, with jiwer.

`evaluate(recognizer, utterances)` is the library function (training calls it at the end of a run,
with a Recognizer from asr.inference); `asr evaluate --checkpoint CKPT --split NAME...` is the
command around it, which writes evaluation.json and evaluation.md and prints the Markdown.

References and hypotheses are both LibriSpeech-normalised before scoring. WER and CER are
corpus-level: total edits over total reference words (characters, spaces included). The
real-time factor is processing time over audio time: audio decoding, features, the acoustic
model, then that decoder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from asr.decode import Decoder, GreedyDecoder, Hypothesis, lexicon_words
from asr.errors import UserError, check_range
from asr.inference.confidence import confidence_by_correctness, word_confidences
from asr.inference.decoders import (
    LM_FILE,
    arpa_vocabulary,
    build_decoders,
    recorded_training_texts,
    run_language_model,
)
from asr.inference.options import BEAM_NAME, DECODERS, DecodingOptions, add_decoding_arguments, decoding_options
from asr.inference.recognizer import Recognizer
from asr.inference.tuning import TUNE_MAX_UTTERANCES, tune_beam

DEFAULT_WORST = 10  # utterances listed per decoder, most word errors first
DEFAULT_ROOT = "data/synth"
RESULT_JSON = "evaluation.json"
RESULT_MARKDOWN = "evaluation.md"


@dataclass(frozen=True)
class UtteranceScore:
    id: str
    reference: str
    hypothesis: str
    word_errors: int  # substitutions + deletions + insertions
    reference_words: int


@dataclass(frozen=True)
class DecoderScores:
    wer: float  # word edits / reference words
    cer: float  # character edits / reference characters
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int
    utterances: int
    rtf: float  # (audio + features + acoustic model + this decoder) seconds / audio seconds
    decode_seconds: float  # this decoder alone
    worst: list[UtteranceScore] = field(default_factory=list)
    # mean word confidence (asr.inference.confidence) of right and of wrong hypothesis words, and their counts
    confidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalResult:
    scores: dict[str, DecoderScores]  # by decoder name
    utterances: int  # scored
    skipped: list[tuple[str, str]]  # (utterance id, reason) of utterances whose audio failed
    audio_seconds: float
    acoustic_seconds: float  # audio loading, features and the acoustic model

    def to_dict(self) -> dict:
        return {
            "utterances": self.utterances,
            "skipped": [{"id": i, "reason": r} for i, r in self.skipped],
            "audio_seconds": self.audio_seconds,
            "acoustic_seconds": self.acoustic_seconds,
            "decoders": {name: s.to_dict() for name, s in self.scores.items()},
        }


def _normalize(text: str) -> str:
    from asr.data.text import normalize_text

    return normalize_text(text)


@dataclass(frozen=True)
class EditCounts:
    """Word and character edits of hypotheses against references (both LibriSpeech-normalised)."""

    substitutions: int  # words
    deletions: int
    insertions: int
    reference_words: int
    char_edits: int
    reference_chars: int  # spaces included
    utterance_word_errors: list[int]  # per pair, in input order

    @property
    def word_edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def count_edits(references: Sequence[str], hypotheses: Sequence[str]) -> EditCounts:
    """The one scoring function: evaluation (score) and training's dev WER both count with it.
    A pair with an empty reference counts each hypothesis word (character) as an insertion."""
    import jiwer

    refs = [_normalize(r) for r in references]
    hyps = [_normalize(h) for h in hypotheses]
    scored = [i for i, r in enumerate(refs) if r]
    per_utterance = [len(h.split()) for h in hyps]  # what an empty reference makes of each hypothesis
    s = d = 0
    insertions = sum(per_utterance[i] for i in range(len(refs)) if not refs[i])
    char_edits = sum(len(hyps[i]) for i in range(len(refs)) if not refs[i])
    if scored:
        words = jiwer.process_words([refs[i] for i in scored], [hyps[i] for i in scored])
        chars = jiwer.process_characters([refs[i] for i in scored], [hyps[i] for i in scored])
        s, d, insertions = words.substitutions, words.deletions, insertions + words.insertions
        char_edits += chars.substitutions + chars.deletions + chars.insertions
        for i, alignment in zip(scored, words.alignments):
            per_utterance[i] = sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
                                   for c in alignment if c.type != "equal")
    return EditCounts(s, d, insertions, sum(len(r.split()) for r in refs), char_edits, sum(len(r) for r in refs),
                      per_utterance)


def score(references: Sequence[str], hypotheses: Sequence[str], ids: Sequence[str], worst: int = DEFAULT_WORST) -> dict:
    """Corpus WER/CER and edit counts of normalised texts, and the `worst` utterances."""
    counts = count_edits(references, hypotheses)
    refs = [_normalize(r) for r in references]
    hyps = [_normalize(h) for h in hypotheses]
    per_utterance = [UtteranceScore(ids[i], refs[i], hyps[i], errors, len(refs[i].split()))
                     for i, errors in enumerate(counts.utterance_word_errors)]
    per_utterance.sort(key=lambda u: (-u.word_errors, -u.word_errors / max(u.reference_words, 1), u.id))
    return {
        # the rates are undefined for an all-empty reference; count every inserted word as 100%
        "wer": counts.word_edits / counts.reference_words if counts.reference_words else float(counts.word_edits > 0),
        "cer": counts.char_edits / counts.reference_chars if counts.reference_chars else float(counts.char_edits > 0),
        "substitutions": counts.substitutions,
        "deletions": counts.deletions,
        "insertions": counts.insertions,
        "reference_words": counts.reference_words,
        "utterances": len(refs),
        "worst": [u for u in per_utterance[:worst] if u.word_errors > 0],
    }


def evaluate(
    recognizer,
    utterances: list,
    decoders: dict[str, Decoder] | None = None,
    worst: int = DEFAULT_WORST,
    progress: bool = False,
) -> EvalResult:
    """Decode `utterances` (asr.data.manifest.Utterance) with every decoder (the recognizer's unless
    given) and score them. The network runs once per batch (asr.inference.Recognizer.utterance_batches).
    Utterances whose audio cannot be read are skipped and listed, not fatal."""
    decoders = recognizer.decoders if decoders is None else decoders
    if not utterances:
        raise UserError("nothing to evaluate: no utterances")
    if not decoders:
        raise UserError("nothing to evaluate: no decoders")
    skipped: list[tuple[str, str]] = []
    ids: list[str] = []
    references: list[str] = []
    hypotheses: dict[str, list[str]] = {name: [] for name in decoders}
    confidences: dict[str, list[list[float]]] = {name: [] for name in decoders}
    decode_seconds = {name: 0.0 for name in decoders}
    acoustic_seconds = 0.0
    audio_seconds = 0.0
    for batch in recognizer.utterance_batches(utterances, skipped):
        acoustic_seconds += batch.seconds
        audio_seconds += batch.audio_seconds
        for name, decoder in decoders.items():
            start = time.perf_counter()
            hyps: list[Hypothesis] = decoder.decode(batch.log_probs, batch.lengths)
            decode_seconds[name] += time.perf_counter() - start
            hypotheses[name].extend(h.text for h in hyps)
            confidences[name].extend(word_confidences(batch.log_probs[k, : int(batch.lengths[k])], h, recognizer.model.tokenizer)
                                     for k, h in enumerate(hyps))
        ids.extend(u.id for u in batch.items)
        references.extend(u.text for u in batch.items)
        if progress:
            print(f"\revaluated {len(ids) + len(skipped)}/{len(utterances)} utterances", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    if not ids:
        raise UserError(f"no utterance could be evaluated: the audio of all {len(utterances)} failed to load")
    scores = {}
    for name in decoders:
        scored = score(references, hypotheses[name], ids, worst)
        rtf = (acoustic_seconds + decode_seconds[name]) / audio_seconds if audio_seconds > 0 else float("nan")
        confidence = confidence_by_correctness([_normalize(r) for r in references], hypotheses[name], confidences[name])
        scores[name] = DecoderScores(rtf=rtf, decode_seconds=decode_seconds[name], confidence=confidence, **scored)
    return EvalResult(scores, len(ids), skipped, audio_seconds, acoustic_seconds)


def evaluate_splits(
    model,
    options: DecodingOptions,
    splits: dict[str, list],
    lm_texts: Sequence[str] | None,
    out_dir: str | Path,
    lm_path: str | Path | None = None,
    lm_order: int = 3,
    tune_on: list | None = None,
    tune_utterances: int | None = TUNE_MAX_UTTERANCES,
    worst: int = DEFAULT_WORST,
    progress: bool = False,
    title: str = "",
) -> dict:
    """Everything `asr evaluate` does: build the word LM from `lm_texts` (the training transcripts,
    plus any other text that shares no sentence with the evaluated splits) into out_dir unless lm_path
    is given, optionally tune lm_weight/word_score on `tune_on` (dev utterances, asr.inference.tuning),
    evaluate every split with the decoders `options` ask for, and write evaluation.json + evaluation.md
    into out_dir. The beam decoder's lexicon is the LM's vocabulary. Returns the JSON payload; its
    "eval" entry is {split: {decoder: scores}}, and "markdown" the text written."""
    out_dir = Path(out_dir)
    lexicon = None
    lm_path = lm_path if lm_path is not None else options.lm
    if options.beam and lm_path is None and lm_texts:
        from asr.lm import build_arpa

        lexicon = lexicon_words(lm_texts)
        lm_path = build_arpa(lm_texts, out_dir / LM_FILE, order=lm_order)
        print(f"built a {lm_order}-gram word LM of {len(lexicon)} words from {len(lm_texts)} sentences: {lm_path}", file=sys.stderr)
    if options.beam and lm_path is not None and lexicon is None:
        lexicon = arpa_vocabulary(lm_path)
    tuning = None
    if tune_on and options.beam and lm_path is not None:
        acoustic = Recognizer(model, {"greedy": GreedyDecoder(model.tokenizer)}, options)
        tuning = tune_beam(acoustic, tune_on, lm_path, lexicon, max_utterances=tune_utterances)
        options = options.with_(lm_weight=tuning.lm_weight, word_score=tuning.word_score)
        print(f"tuned on {tuning.utterances} utterances: lm_weight {options.lm_weight}, word_score "
              f"{options.word_score} (WER {100 * tuning.wer:.2f}%)", file=sys.stderr)
    recognizer = Recognizer(model, build_decoders(model.tokenizer, options, lm_path, lexicon), options)
    results = {}
    for name, utterances in splits.items():
        print(f"evaluating {name}: {len(utterances)} utterances", file=sys.stderr)
        results[name] = evaluate(recognizer, utterances, worst=worst, progress=progress)
    payload = {
        "title": title,
        "lm": None if lm_path is None else str(lm_path),
        "lexicon_words": None if lexicon is None else len(lexicon),
        "decoder_options": {"beam_size": options.beam_size, "lm_weight": options.lm_weight,
                            "word_score": options.word_score,
                            "tuning": None if tuning is None else tuning.to_dict()},
        "splits": {name: r.to_dict() for name, r in results.items()},
        "eval": {name: {d: s.to_dict() for d, s in r.scores.items()} for name, r in results.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_JSON).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    markdown = format_markdown(results, title)
    (out_dir / RESULT_MARKDOWN).write_text(markdown, encoding="utf-8")
    payload["markdown"] = markdown
    return payload


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, LibriSpeech-normalised (LM text)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: text file not found")
    lines = [_normalize(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"{path}: no text")
    return lines


# --- Markdown -------------------------------------------------------------------------------------


def _pct(x) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) and x == x else "—"


def format_markdown(results: dict[str, EvalResult], title: str = "", worst: int = 5) -> str:
    lines = [f"# Evaluation{' of ' + title if title else ''}", ""]
    lines += ["| split | decoder | WER % | CER % | sub | del | ins | ref words | utterances | RTF |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for split, result in results.items():
        for name, s in result.scores.items():
            lines.append(
                f"| {split} | {name} | {_pct(s.wer)} | {_pct(s.cer)} | {s.substitutions} | {s.deletions} | "
                f"{s.insertions} | {s.reference_words} | {s.utterances} | {s.rtf:.3f} |"
            )
    for split, result in results.items():
        if result.skipped:
            lines += ["", f"**{split}**: {len(result.skipped)} utterance(s) skipped (audio unreadable):"]
            lines += [f"- {i}: {r}" for i, r in result.skipped[:20]]
    for split, result in results.items():
        for name, s in result.scores.items():
            if not s.worst:
                continue
            lines += ["", f"## Worst utterances: {split}, {name}", ""]
            for u in s.worst[:worst]:
                lines += [f"- `{u.id}` ({u.word_errors} errors / {u.reference_words} words)", f"  - REF: {u.reference}", f"  - HYP: {u.hypothesis}"]
    return "\n".join(lines) + "\n"


# --- command ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (.ckpt)")
    parser.add_argument("--split", action="extend", nargs="+", default=[], metavar="NAME", help="split(s) under --root, e.g. test-clean")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="corpus root holding LibriSpeech/ (default %(default)s)")
    parser.add_argument("--manifest", action="extend", nargs="+", default=[], metavar="FILE", help="manifest file(s) (JSON lines)")
    add_decoding_arguments(parser, decoders=DECODERS, default="both", chunking=False)
    parser.add_argument("--lm-text", default=None, metavar="FILE",
                        help="more LM text (one sentence per line, normalised here) beside the training transcripts; "
                             "it must share no sentence with the evaluated splits")
    parser.add_argument("--lm-order", type=int, default=3, help="order of the LM built when --lm is not given (default %(default)s)")
    parser.add_argument("--worst", type=int, default=DEFAULT_WORST, help="worst utterances kept per decoder (default %(default)s)")
    parser.add_argument("--tune-on", default=None, metavar="SPLIT", help="tune --lm-weight and --word-score on this split under --root first (a dev split)")
    parser.add_argument("--tune-utterances", type=int, default=TUNE_MAX_UTTERANCES,
                        help="--tune-on: at most this many of its utterances, evenly spread (default %(default)s)")
    parser.add_argument("--out", default=None, help=f"folder for {RESULT_JSON} and {RESULT_MARKDOWN} (default: <checkpoint folder>/eval)")


def run(args: argparse.Namespace) -> int:
    from asr.data.librispeech import load_split
    from asr.data.manifest import read_manifest
    from asr.model.inference import load_for_inference

    if not args.split and not args.manifest:
        raise UserError("give at least one --split NAME or --manifest FILE")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: checkpoint not found")
    options = decoding_options(args)
    if not options.beam and (args.lm_text is not None or args.tune_on is not None):
        raise UserError(f"{'--lm-text' if args.lm_text is not None else '--tune-on'}: only used by the beam decoder; "
                        "add --decoder beam or both")
    check_range("--worst", args.worst, low=0)
    check_range("--lm-order", args.lm_order, low=1)
    check_range("--tune-utterances", args.tune_utterances, low=1)
    out_dir = Path(args.out) if args.out else checkpoint.parent / "eval"
    for path in (out_dir, out_dir / RESULT_JSON, out_dir / RESULT_MARKDOWN):
        if path.exists() and path.is_dir() != (path == out_dir):  # checked now, not after the evaluation
            raise UserError(f"--out {out_dir}: {path} exists and is {'not ' if path == out_dir else ''}a folder; "
                            "choose another --out")
    # read every input first, so a bad manifest fails before minutes of decoding
    splits: dict[str, list] = {}
    for split in args.split:
        splits[split] = load_split(args.root, split)
    for manifest in args.manifest:
        splits[Path(manifest).stem] = read_manifest(manifest)
    tune_on = load_split(args.root, args.tune_on) if args.tune_on else None

    model = load_for_inference(str(checkpoint), map_location=options.device)
    lm_path, lm_texts = options.lm, None
    if options.beam and lm_path is None:
        # an LM built from the run's training transcripts (plus --lm-text), else the one training
        # left in the run folder
        lm_texts = recorded_training_texts(model, checkpoint) or []
        if args.lm_text:
            lm_texts += read_text_lines(args.lm_text)
        if not args.lm_text:
            lm_path = run_language_model(checkpoint)
        if lm_path is None and not lm_texts:
            raise UserError("the beam decoder needs a language model: give --lm or --lm-text, or a checkpoint whose run records its training splits")
    payload = evaluate_splits(
        model, options, splits, lm_texts, out_dir, lm_path=lm_path, lm_order=args.lm_order, tune_on=tune_on,
        tune_utterances=args.tune_utterances, worst=args.worst, progress=sys.stderr.isatty(), title=str(checkpoint),
    )
    print(payload["markdown"])
    print(f"wrote {out_dir / RESULT_JSON} and {out_dir / RESULT_MARKDOWN}", file=sys.stderr)
    skipped = sum(len(s["skipped"]) for s in payload["splits"].values())
    if skipped:
        print(f"warning: {skipped} utterance(s) skipped because their audio could not be read", file=sys.stderr)
    return 0
