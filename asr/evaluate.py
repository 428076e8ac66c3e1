"""Word and character error rates of a model on splits or manifests, with jiwer.

`evaluate(model, utterances, decoders)` is the library function (training calls it at the end of
a run); `asr evaluate --checkpoint CKPT --split NAME...` is the command around it, which writes
evaluation.json and evaluation.md and prints the Markdown.

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
from typing import Iterable, Protocol, Sequence

import torch

from asr.decode import (
    DEFAULT_BEAM_SIZE,
    DEFAULT_LM_WEIGHT,
    DEFAULT_WORD_SCORE,
    BeamLMDecoder,
    Decoder,
    GreedyDecoder,
    Hypothesis,
    lexicon_words,
)
from asr.errors import AudioError, UserError, check_range

DEFAULT_MAX_BATCH_SECONDS = 120.0  # padded audio per acoustic-model batch
DEFAULT_WORST = 10  # utterances listed per decoder, most word errors first
DEFAULT_ROOT = "data/synth"
DECODER_CHOICES = ("greedy", "beam", "both")
BEAM_NAME = "beam+lm"  # the beam decoder's name in results and reports
RESULT_JSON = "evaluation.json"
RESULT_MARKDOWN = "evaluation.md"
LM_FILE = "lm.arpa"  # the word LM training leaves in its run folder
RUN_CONFIG_FILE = "config.yaml"  # the resolved config training saves in its run folder
# lm_weight x word_score grid searched by tune_beam (on a dev split)
TUNE_LM_WEIGHTS = (1.0, 2.0, 3.0, 4.0)
TUNE_WORD_SCORES = (-2.0, -1.0, 0.0, 1.0)
TUNE_MAX_UTTERANCES = 200


class AcousticModel(Protocol):
    """What evaluation needs of a model: the contract asr.model.inference.InferenceModel fulfils."""

    tokenizer: object
    feature_config: object
    frame_shift_seconds: float
    device: torch.device

    def log_probs(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


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


def _batches(utterances, max_batch_seconds: float) -> list[list[int]]:
    from asr.data.datamodule import pack_batches

    order = sorted(range(len(utterances)), key=lambda i: utterances[i].duration)
    return pack_batches(order, [u.duration for u in utterances], max_batch_seconds)


def _pad(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    batch = torch.zeros(len(features), int(lengths.max()), features[0].shape[1])  # (N, T, F)
    for k, f in enumerate(features):
        batch[k, : f.shape[0]] = f
    return batch, lengths


def acoustic_log_probs(model: AcousticModel, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One acoustic-model batch: (N, T', V) float32 log-probs and (N,) lengths, on the CPU."""
    batch, lengths = _pad(features)
    with torch.inference_mode():
        log_probs, out_lengths = model.log_probs(batch.to(model.device), lengths.to(model.device))
    return log_probs.float().cpu(), out_lengths.cpu()


@dataclass
class _AcousticBatch:
    utterances: list  # the batch's readable utterances
    log_probs: torch.Tensor  # (N, T', V) float32, CPU
    lengths: torch.Tensor  # (N,)
    audio_seconds: float
    seconds: float  # audio loading + features + acoustic model


def _acoustic_batches(model: AcousticModel, utterances: list, max_batch_seconds: float, skipped: list[tuple[str, str]]):
    """Yield _AcousticBatch per batch, shortest utterances first; utterances whose audio cannot be
    read are appended to `skipped` as (id, reason) and left out."""
    from asr.data.audio import load_audio
    from asr.data.features import LogMel

    logmel = LogMel(model.feature_config)
    sample_rate = model.feature_config.sample_rate
    for batch in _batches(utterances, max_batch_seconds):
        start = time.perf_counter()
        features, kept, audio_seconds = [], [], 0.0
        for i in batch:
            utt = utterances[i]
            try:
                wave = load_audio(utt.path, sample_rate)
            except AudioError as err:
                skipped.append((utt.id, str(err)))
                print(f"warning: skipping {utt.id}: {err}", file=sys.stderr)
                continue
            audio_seconds += wave.numel() / sample_rate
            features.append(logmel(wave))  # (T, F)
            kept.append(utt)
        if kept:
            log_probs, out_lengths = acoustic_log_probs(model, features)
            yield _AcousticBatch(kept, log_probs, out_lengths, audio_seconds, time.perf_counter() - start)


def evaluate(
    model: AcousticModel,
    utterances: list,
    decoders: dict[str, Decoder],
    max_batch_seconds: float = DEFAULT_MAX_BATCH_SECONDS,
    worst: int = DEFAULT_WORST,
    progress: bool = False,
) -> EvalResult:
    """Decode `utterances` (asr.data.manifest.Utterance) with every decoder and score them.
    Utterances whose audio cannot be read are skipped and listed, not fatal."""
    if not utterances:
        raise UserError("nothing to evaluate: no utterances")
    if not decoders:
        raise UserError("nothing to evaluate: no decoders")
    skipped: list[tuple[str, str]] = []
    ids: list[str] = []
    references: list[str] = []
    hypotheses: dict[str, list[str]] = {name: [] for name in decoders}
    decode_seconds = {name: 0.0 for name in decoders}
    acoustic_seconds = 0.0
    audio_seconds = 0.0
    for batch in _acoustic_batches(model, utterances, max_batch_seconds, skipped):
        acoustic_seconds += batch.seconds
        audio_seconds += batch.audio_seconds
        for name, decoder in decoders.items():
            start = time.perf_counter()
            hyps: list[Hypothesis] = decoder.decode(batch.log_probs, batch.lengths)
            decode_seconds[name] += time.perf_counter() - start
            hypotheses[name].extend(h.text for h in hyps)
        ids.extend(u.id for u in batch.utterances)
        references.extend(u.text for u in batch.utterances)
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
        scores[name] = DecoderScores(rtf=rtf, decode_seconds=decode_seconds[name], **scored)
    return EvalResult(scores, len(ids), skipped, audio_seconds, acoustic_seconds)


@dataclass(frozen=True)
class BeamTuning:
    lm_weight: float  # the best of the grid
    word_score: float
    wer: float  # its WER on the tuning utterances
    utterances: int  # how many were decoded
    grid: list[tuple[float, float, float]]  # every (lm_weight, word_score, wer) tried

    def to_dict(self) -> dict:
        return asdict(self)


def tune_beam(
    model: AcousticModel,
    utterances: list,
    lm_path: str | Path,
    lexicon: Iterable[str],
    lm_weights: Sequence[float] = TUNE_LM_WEIGHTS,
    word_scores: Sequence[float] = TUNE_WORD_SCORES,
    beam_size: int = DEFAULT_BEAM_SIZE,
    max_utterances: int = TUNE_MAX_UTTERANCES,
    max_batch_seconds: float = DEFAULT_MAX_BATCH_SECONDS,
) -> BeamTuning:
    """Grid-search the beam decoder's lm_weight and word_score for the lowest WER on (at most
    max_utterances, evenly spread, of) `utterances` — a dev split, never a test split. The
    acoustic model runs once; each grid point rebuilds the decoder (and reloads the LM)."""
    if not utterances:
        raise UserError("nothing to tune on: no utterances")
    ordered = sorted(utterances, key=lambda u: u.id)
    step = max(1, len(ordered) // max_utterances)
    subset = ordered[::step][:max_utterances]
    batches = list(_acoustic_batches(model, subset, max_batch_seconds, skipped=[]))
    if not batches:
        raise UserError("nothing to tune on: no utterance's audio could be read")
    references = [u.text for b in batches for u in b.utterances]
    ids = [u.id for b in batches for u in b.utterances]
    lexicon = list(lexicon)
    grid = []
    for lm_weight in lm_weights:
        for word_score in word_scores:
            decoder = BeamLMDecoder(model.tokenizer, lm_path, lexicon, beam_size=beam_size, lm_weight=lm_weight, word_score=word_score)
            hypotheses = [h.text for b in batches for h in decoder.decode(b.log_probs, b.lengths)]
            grid.append((lm_weight, word_score, score(references, hypotheses, ids, worst=0)["wer"]))
    best = min(grid, key=lambda g: (g[2], g[0], abs(g[1])))
    return BeamTuning(best[0], best[1], best[2], len(references), grid)


# --- decoders for a model -------------------------------------------------------------------------


def arpa_vocabulary(path: str | Path) -> list[str]:
    """The words of an ARPA model's unigram section (without <s>, </s>, <unk>)."""
    words = []
    in_unigrams = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif in_unigrams and line.startswith("\\"):
                break
            elif in_unigrams and line:
                fields = line.split()
                if len(fields) >= 2 and fields[1] not in ("<s>", "</s>", "<unk>"):
                    words.append(fields[1])
    if not words:
        raise UserError(f"{path}: not an ARPA language model (no unigrams)")
    return words


def build_decoders(
    tokenizer,
    which: str = "both",
    lm_path: str | Path | None = None,
    lexicon: Iterable[str] | None = None,
    beam_size: int = DEFAULT_BEAM_SIZE,
    lm_weight: float = DEFAULT_LM_WEIGHT,
    word_score: float = DEFAULT_WORD_SCORE,
) -> dict[str, Decoder]:
    """{"greedy": ..., "beam+lm": ...} as `which` asks. The beam decoder's lexicon is `lexicon`
    (training words) or, without it, the LM's vocabulary."""
    if which not in DECODER_CHOICES:
        raise UserError(f"--decoder {which!r}: expected one of {', '.join(DECODER_CHOICES)}")
    decoders: dict[str, Decoder] = {}
    if which in ("greedy", "both"):
        decoders["greedy"] = GreedyDecoder(tokenizer)
    if which in ("beam", "both"):
        if lm_path is None:
            raise UserError("the beam decoder needs a language model: give --lm, or a checkpoint that records its training splits")
        words = list(lexicon) if lexicon is not None else arpa_vocabulary(lm_path)
        decoders[BEAM_NAME] = BeamLMDecoder(tokenizer, lm_path, words, beam_size=beam_size, lm_weight=lm_weight, word_score=word_score)
    return decoders


def _data_section_of_run_config(checkpoint: Path) -> dict:
    """The `data` section of the resolved config that training saved in the checkpoint's run
    folder (config.yaml beside the checkpoint), or {}."""
    import yaml

    config_path = checkpoint.parent / RUN_CONFIG_FILE
    if not config_path.is_file():
        return {}
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    data = config.get("data") if isinstance(config, dict) else None
    return data.get("init_args", data) if isinstance(data, dict) else {}


def run_language_model(checkpoint: str | Path) -> Path | None:
    """The word LM that training left in the checkpoint's run folder (lm.arpa), if any."""
    path = Path(checkpoint).parent / LM_FILE
    return path if path.is_file() else None


def recorded_training_texts(model, checkpoint: str | Path | None = None) -> list[str] | None:
    """The transcripts a checkpoint was trained on, where it says which: `model.training_texts`
    (a list), `model.data_config` ({"root", "train_splits"}), or the run folder's config.yaml.
    None if none of them tells."""
    texts = getattr(model, "training_texts", None)
    if texts:
        return list(texts)
    config = getattr(model, "data_config", None) or {}
    if not config.get("train_splits") and checkpoint is not None:
        config = _data_section_of_run_config(Path(checkpoint))
    splits, root = config.get("train_splits"), config.get("root")
    if not splits or not root:
        return None
    from asr.data.librispeech import load_split

    return [u.text for split in splits for u in load_split(root, split)]


def evaluate_splits(
    model: AcousticModel,
    splits: dict[str, list],
    lm_texts: Sequence[str] | None,
    out_dir: str | Path,
    decoder: str = "both",
    lm_path: str | Path | None = None,
    lm_order: int = 3,
    tune_on: list | None = None,
    beam_size: int = DEFAULT_BEAM_SIZE,
    lm_weight: float = DEFAULT_LM_WEIGHT,
    word_score: float = DEFAULT_WORD_SCORE,
    max_batch_seconds: float = DEFAULT_MAX_BATCH_SECONDS,
    worst: int = DEFAULT_WORST,
    progress: bool = False,
    title: str = "",
) -> dict:
    """Everything `asr evaluate` and the end of training do: build the word LM from `lm_texts`
    (the training transcripts, plus any other text that shares no sentence with the evaluated
    splits) into out_dir unless lm_path is given, optionally tune lm_weight/word_score on
    `tune_on` (dev utterances), evaluate every split with the chosen decoders, and write
    evaluation.json + evaluation.md into out_dir. The beam decoder's lexicon is the LM's
    vocabulary. Returns the JSON payload; its "eval" entry is {split: {decoder: scores}} as the
    run report wants it, and "markdown" the text written."""
    out_dir = Path(out_dir)
    beam = decoder in ("beam", "both")
    lexicon = None
    if beam and lm_path is None and lm_texts:
        from asr.lm import build_arpa

        lexicon = lexicon_words(lm_texts)
        lm_path = build_arpa(lm_texts, out_dir / LM_FILE, order=lm_order)
        print(f"built a {lm_order}-gram word LM of {len(lexicon)} words from {len(lm_texts)} sentences: {lm_path}", file=sys.stderr)
    if beam and lm_path is not None and lexicon is None:
        lexicon = arpa_vocabulary(lm_path)
    tuning = None
    if tune_on and decoder in ("beam", "both") and lm_path is not None:
        tuning = tune_beam(model, tune_on, lm_path, lexicon, beam_size=beam_size, max_batch_seconds=max_batch_seconds)
        lm_weight, word_score = tuning.lm_weight, tuning.word_score
        print(f"tuned on {tuning.utterances} utterances: lm_weight {lm_weight}, word_score {word_score} (WER {100 * tuning.wer:.2f}%)", file=sys.stderr)
    decoders = build_decoders(model.tokenizer, decoder, lm_path, lexicon, beam_size, lm_weight, word_score)
    results = {}
    for name, utterances in splits.items():
        print(f"evaluating {name}: {len(utterances)} utterances", file=sys.stderr)
        results[name] = evaluate(model, utterances, decoders, max_batch_seconds, worst, progress=progress)
    payload = {
        "title": title,
        "lm": None if lm_path is None else str(lm_path),
        "lexicon_words": None if lexicon is None else len(lexicon),
        "decoder_options": {"beam_size": beam_size, "lm_weight": lm_weight, "word_score": word_score,
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
    parser.add_argument("--decoder", choices=DECODER_CHOICES, default="both", help="default %(default)s")
    parser.add_argument("--lm", default=None, help="ARPA word LM for beam search (default: the run folder's lm.arpa, else one built from the run's training splits)")
    parser.add_argument("--lm-text", default=None, metavar="FILE",
                        help="more LM text (one sentence per line, normalised here) beside the training transcripts; "
                             "it must share no sentence with the evaluated splits")
    parser.add_argument("--lm-order", type=int, default=3, help="order of the LM built when --lm is not given (default %(default)s)")
    parser.add_argument("--beam-size", type=int, default=None, help=f"default {DEFAULT_BEAM_SIZE}")
    parser.add_argument("--lm-weight", type=float, default=None, help=f"default {DEFAULT_LM_WEIGHT}")
    parser.add_argument("--word-score", type=float, default=None, help=f"default {DEFAULT_WORD_SCORE}")
    parser.add_argument("--max-batch-seconds", type=float, default=DEFAULT_MAX_BATCH_SECONDS, help="default %(default)s")
    parser.add_argument("--worst", type=int, default=DEFAULT_WORST, help="worst utterances kept per decoder (default %(default)s)")
    parser.add_argument("--tune-on", default=None, metavar="SPLIT", help="tune --lm-weight and --word-score on this split under --root first (a dev split)")
    parser.add_argument("--out", default=None, help=f"folder for {RESULT_JSON} and {RESULT_MARKDOWN} (default: <checkpoint folder>/eval)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from asr.data.librispeech import load_split
    from asr.data.manifest import read_manifest
    from asr.model.inference import load_for_inference

    from asr.transcribe import check_decoder_options

    if not args.split and not args.manifest:
        raise UserError("give at least one --split NAME or --manifest FILE")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: checkpoint not found")
    beam = args.decoder in ("beam", "both")
    check_decoder_options(args, beam)
    if not beam and (args.lm_text is not None or args.tune_on is not None):
        raise UserError(f"{'--lm-text' if args.lm_text is not None else '--tune-on'}: only used by the beam decoder; "
                        "add --decoder beam or both")
    check_range("--max-batch-seconds", args.max_batch_seconds, low=0.0, low_open=True)
    check_range("--worst", args.worst, low=0)
    check_range("--lm-order", args.lm_order, low=1)
    if args.lm is not None and not Path(args.lm).is_file():
        raise UserError(f"{args.lm}: language model file not found")
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

    model = load_for_inference(str(checkpoint), map_location=args.device)
    lm_path, lm_texts = args.lm, None
    if beam and lm_path is None:
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
        model, splits, lm_texts, out_dir, decoder=args.decoder, lm_path=lm_path, lm_order=args.lm_order, tune_on=tune_on,
        beam_size=args.beam_size, lm_weight=args.lm_weight, word_score=args.word_score,
        max_batch_seconds=args.max_batch_seconds, worst=args.worst, progress=sys.stderr.isatty(), title=str(checkpoint),
    )
    print(payload["markdown"])
    print(f"wrote {out_dir / RESULT_JSON} and {out_dir / RESULT_MARKDOWN}", file=sys.stderr)
    skipped = sum(len(s["skipped"]) for s in payload["splits"].values())
    if skipped:
        print(f"warning: {skipped} utterance(s) skipped because their audio could not be read", file=sys.stderr)
    return 0
