"""`asr transcribe CKPT FILE...`: text, or JSON with each word's start and end in seconds.

Any format asr.data.audio reads. Long files are cut into chunks of about --chunk-seconds, each cut
placed at the quietest moment near the chunk's end so that it rarely splits a word; chunks are
recognised separately and their words put back on the file's time line. A file that cannot be
read gets a one-line error on stderr, the others are still transcribed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asr.decode import DEFAULT_BEAM_SIZE, DEFAULT_LM_WEIGHT, DEFAULT_WORD_SCORE, Decoder, Hypothesis
from asr.errors import AudioError, UserError, check_range, printable

DEFAULT_CHUNK_SECONDS = 30.0
CUT_SEARCH_FRACTION = 0.2  # look for the quietest cut point in the last 20% of a chunk
CUT_WINDOW_SECONDS = 0.1  # energy is compared over windows this long
MIN_CHUNK_SECONDS = 1.0


@dataclass(frozen=True)
class TimedWord:
    word: str
    start: float  # seconds from the start of the file
    end: float


@dataclass(frozen=True)
class Transcript:
    path: str
    text: str
    duration: float  # seconds of audio
    words: list[TimedWord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "text": self.text,
            "duration": round(self.duration, 3),
            "words": [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in self.words],
        }


def chunk_bounds(wave: torch.Tensor, sample_rate: int, chunk_seconds: float) -> list[tuple[int, int]]:
    """(start, end) sample ranges covering the wave, each at most chunk_seconds long, cut at the
    quietest CUT_WINDOW_SECONDS in the last CUT_SEARCH_FRACTION of each chunk."""
    total = wave.numel()
    chunk = int(chunk_seconds * sample_rate)
    window = max(1, int(CUT_WINDOW_SECONDS * sample_rate))
    bounds = []
    start = 0
    while total - start > chunk:
        search_from = start + int(chunk * (1 - CUT_SEARCH_FRACTION))
        region = wave[search_from : start + chunk]
        usable = (region.numel() // window) * window
        if usable >= window:
            energy = region[:usable].reshape(-1, window).pow(2).mean(dim=1)  # (windows,)
            cut = search_from + int(energy.argmin()) * window + window // 2
        else:
            cut = start + chunk
        bounds.append((start, cut))
        start = cut
    bounds.append((start, total))
    return bounds


def transcribe_wave(model, decoder: Decoder, wave: torch.Tensor, chunk_seconds: float = DEFAULT_CHUNK_SECONDS) -> tuple[str, list[TimedWord]]:
    """Recognise a whole (num_samples,) wave in chunks; words carry file-relative times."""
    from asr.data.features import LogMel
    from asr.evaluate import acoustic_log_probs

    sample_rate = model.feature_config.sample_rate
    logmel = LogMel(model.feature_config)
    words: list[TimedWord] = []
    for start, end in chunk_bounds(wave, sample_rate, chunk_seconds):
        offset = start / sample_rate
        log_probs, out_lengths = acoustic_log_probs(model, [logmel(wave[start:end])])
        [hyp] = decoder.decode(log_probs, out_lengths)
        words += _timed_words(hyp, model.frame_shift_seconds, offset, (end - start) / sample_rate)
    return " ".join(w.word for w in words), words


def _timed_words(hyp: Hypothesis, frame_seconds: float, offset: float, chunk_duration: float) -> list[TimedWord]:
    if hyp.text and not hyp.words:  # a decoder that could not time its words
        return [TimedWord(w, offset, offset + chunk_duration) for w in hyp.text.split()]
    return [
        TimedWord(w.word, offset + w.start_frame * frame_seconds, offset + min(w.end_frame * frame_seconds, chunk_duration))
        for w in hyp.words
    ]


def transcribe_files(model, decoder: Decoder, paths: list[str], chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
    """Yield a Transcript or an AudioError for each path, in order."""
    from asr.data.audio import load_audio

    sample_rate = model.feature_config.sample_rate
    for path in paths:
        try:
            wave = load_audio(path, sample_rate)
        except AudioError as err:
            yield err
            continue
        text, words = transcribe_wave(model, decoder, wave, chunk_seconds)
        yield Transcript(str(path), text, wave.numel() / sample_rate, words)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model checkpoint (.ckpt)")
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV, FLAC, OGG, MP3)")
    parser.add_argument("--json", action="store_true", help="print JSON with per-word start/end seconds")
    parser.add_argument("--chunk-seconds", type=float, default=DEFAULT_CHUNK_SECONDS, help="longest piece recognised at once (default %(default)s)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default="greedy", help="default %(default)s; beam needs --lm or a checkpoint that records its training splits")
    parser.add_argument("--lm", default=None, help="ARPA word LM for --decoder beam (default: the run folder's lm.arpa, else one built from the run's training splits)")
    # beam options default to None so that giving one with the greedy decoder can be refused
    parser.add_argument("--beam-size", type=int, default=None, help=f"--decoder beam only (default {DEFAULT_BEAM_SIZE})")
    parser.add_argument("--lm-weight", type=float, default=None, help=f"--decoder beam only (default {DEFAULT_LM_WEIGHT})")
    parser.add_argument("--word-score", type=float, default=None, help=f"--decoder beam only (default {DEFAULT_WORD_SCORE})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")


def _decoder(args, model, checkpoint: Path) -> Decoder:
    from asr.evaluate import build_decoders, recorded_training_texts, run_language_model

    if args.decoder == "greedy":
        return build_decoders(model.tokenizer, "greedy")["greedy"]
    if args.lm is not None and not Path(args.lm).is_file():
        raise UserError(f"{args.lm}: language model file not found")
    # the decoder reads the LM into memory when it is built: a temporary one can go right after
    with tempfile.TemporaryDirectory(prefix="asr-lm-") as tmp:
        lm_path = args.lm or run_language_model(checkpoint)
        if lm_path is None:
            texts = recorded_training_texts(model, checkpoint)
            if texts:
                from asr.lm import build_arpa

                lm_path = build_arpa(texts, Path(tmp) / "lm.arpa")
        # the lexicon is the LM's vocabulary
        decoders = build_decoders(model.tokenizer, "beam", lm_path, None, args.beam_size, args.lm_weight,
                                  args.word_score)
    return next(iter(decoders.values()))


BEAM_OPTIONS = ("lm", "beam_size", "lm_weight", "word_score")


def check_decoder_options(args: argparse.Namespace, beam: bool) -> None:
    """Refuse beam-search options with the greedy decoder (they would be silently ignored), range-check
    the others, and fill in the defaults of those not given."""
    given = [f"--{name.replace('_', '-')}" for name in BEAM_OPTIONS if getattr(args, name) is not None]
    if given and not beam:
        raise UserError(f"{', '.join(given)}: only used by the beam decoder; add --decoder beam or leave "
                        f"{'them' if len(given) > 1 else 'it'} out")
    for name, default in (("beam_size", DEFAULT_BEAM_SIZE), ("lm_weight", DEFAULT_LM_WEIGHT),
                          ("word_score", DEFAULT_WORD_SCORE)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    check_range("--beam-size", args.beam_size, low=1)
    check_range("--lm-weight", args.lm_weight)
    check_range("--word-score", args.word_score)


def run(args: argparse.Namespace) -> int:
    from asr.model.inference import load_for_inference

    check_range("--chunk-seconds", args.chunk_seconds, low=MIN_CHUNK_SECONDS)
    check_decoder_options(args, beam=args.decoder == "beam")
    checkpoint = Path(args.checkpoint)
    model = load_for_inference(str(checkpoint), map_location=args.device)
    decoder = _decoder(args, model, checkpoint)
    failures = 0
    transcripts = []
    for result in transcribe_files(model, decoder, args.files, args.chunk_seconds):
        if isinstance(result, AudioError):
            failures += 1
            print(f"asr transcribe: error: {printable(result)}", file=sys.stderr)
            continue
        if args.json:
            transcripts.append(result.to_dict())
        elif len(args.files) == 1:
            print(result.text, flush=True)
        else:
            print(f"{printable(result.path)}\t{result.text}", flush=True)
    if args.json:
        print(json.dumps(transcripts, indent=2))
    if failures:
        print(f"asr transcribe: {failures} of {len(args.files)} file(s) failed", file=sys.stderr)
    return 1 if failures else 0
