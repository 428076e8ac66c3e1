"""The Recognizer: a checkpoint's network, its feature pipeline, its tokenizer and a decoder, as one object.

    r = Recognizer.load("runs/tiny/best.ckpt", decoder="beam")
    r.transcribe("a.flac")                      # -> Transcript(text, words, duration, confidence)
    r.transcribe(["a.flac", "b.wav"])            # -> [Transcript, Transcript]
    r.transcribe(waveform, sample_rate=8000)     # a 1-D tensor or array, resampled to 16 kHz

Audio is recognised in batches: long files are cut into pieces of at most chunk_seconds (each cut at the
quietest moment near a piece's end, so that it rarely splits a word), and the pieces of many files are
sorted by duration and packed into network batches of at most max_batch_seconds of padded audio, the
batching evaluation uses (asr.data.datamodule.pack_batches). Words are put back on each file's time line.
Loading needs no Lightning and no training config (asr.model.inference).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import torch

from asr.decode import Decoder, Hypothesis
from asr.errors import AudioError, UserError
from asr.inference.confidence import utterance_confidence, word_confidences
from asr.inference.options import BEAM_NAME, DecodingOptions

CUT_SEARCH_FRACTION = 0.2  # look for the quietest cut point in the last 20% of a chunk
CUT_WINDOW_SECONDS = 0.1  # energy is compared over windows this long
# audio of this many batches is read ahead and sorted by duration before it is recognised: enough
# to batch many short files well, bounded so that a long list of long files is never held whole
WINDOW_BATCHES = 8


class AcousticModel(Protocol):
    """What recognition needs of a network: the contract asr.model.inference.InferenceModel fulfils."""

    tokenizer: object
    feature_config: object
    frame_shift_seconds: float
    device: torch.device

    def log_probs(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from the start of the file
    end: float
    confidence: float  # asr.inference.confidence: the lowest spike posterior of its tokens, in [0, 1]


@dataclass(frozen=True)
class Transcript:
    text: str
    duration: float  # seconds of audio
    words: list[Word] = field(default_factory=list)
    confidence: float | None = None  # mean of the words' confidences; None without words
    path: str | None = None  # the file, when one was given

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "text": self.text,
            "duration": round(self.duration, 3),
            "confidence": None if self.confidence is None else round(self.confidence, 4),
            "words": [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                       "confidence": round(w.confidence, 4)} for w in self.words],
        }


@dataclass
class AcousticBatch:
    items: list  # the batch's readable inputs (utterances, or segments)
    log_probs: torch.Tensor  # (N, T', V) float32, CPU
    lengths: torch.Tensor  # (N,)
    audio_seconds: float
    seconds: float  # audio loading + features + network


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


def duration_batches(durations: Sequence[float], max_batch_seconds: float) -> list[list[int]]:
    """Indices shortest first, packed into batches of at most max_batch_seconds of padded audio."""
    from asr.data.datamodule import pack_batches

    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    return pack_batches(order, list(durations), max_batch_seconds)


def pad_features(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_n, F)] -> (N, T, F) zero-padded, (N,) lengths."""
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    batch = torch.zeros(len(features), int(lengths.max()), features[0].shape[1])  # (N, T, F)
    for k, f in enumerate(features):
        batch[k, : f.shape[0]] = f
    return batch, lengths


@dataclass(frozen=True)
class _Segment:
    source: int  # index of the input it belongs to
    start: int  # samples into it
    end: int


class Recognizer:
    """A network (anything with the AcousticModel contract), its features and decoders.

    `decoders` holds every decoder evaluation scores (greedy and beam+lm with options.decoder "both");
    transcription uses `decoder`, the beam decoder where there is one."""

    def __init__(self, model: AcousticModel, decoders: dict[str, Decoder] | None = None,
                 options: DecodingOptions = DecodingOptions()):
        from asr.data.features import LogMel
        from asr.inference.decoders import build_decoders

        self.model = model
        self.options = options
        self.decoders = dict(decoders) if decoders is not None else build_decoders(model.tokenizer, options)
        if not self.decoders:
            raise UserError("a recognizer needs at least one decoder")
        self.logmel = LogMel(model.feature_config)
        self.sample_rate = model.feature_config.sample_rate

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, decoder: str | None = None, options: DecodingOptions | None = None,
             **option_values) -> "Recognizer":
        """A recognizer for a checkpoint, or for an exported model.onnx (with its model.json). `decoder` ("greedy" or "beam") and the other DecodingOptions fields
        (lm, beam_size, lm_weight, word_score, device, max_batch_seconds, chunk_seconds) may be given by
        name, over `options`. The beam decoder's LM: options.lm, else the run folder's lm.arpa, else one
        built from the training splits the checkpoint records."""
        from asr.inference.decoders import decoders_for_checkpoint
        from asr.model.inference import load_for_inference

        if decoder is not None:
            option_values["decoder"] = decoder
        options = (options or DecodingOptions()).with_(**option_values)
        if str(checkpoint).endswith(".onnx"):  # an `asr export` graph, run by onnxruntime on the CPU
            from asr.inference.onnx_model import load_onnx

            if options.device != "cpu":
                raise UserError(f"--device {options.device}: an .onnx model runs on the CPU here (onnxruntime's CPU "
                                "provider); use --device cpu or the checkpoint")
            model = load_onnx(checkpoint)
        else:
            model = load_for_inference(checkpoint, map_location=options.device)
        recognizer = cls(model, decoders_for_checkpoint(model, options, checkpoint), options)
        recognizer.checkpoint = Path(checkpoint)
        return recognizer

    @property
    def decoder_name(self) -> str:
        return BEAM_NAME if BEAM_NAME in self.decoders else next(iter(self.decoders))

    @property
    def decoder(self) -> Decoder:
        return self.decoders[self.decoder_name]

    # -- the network on batches --

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(num_samples,) 16 kHz wave -> (T, F) features as the network was trained on."""
        return self.logmel(wave)

    def log_probs(self, waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One network batch: waves -> (N, T', V) float32 log-probs and (N,) lengths, on the CPU."""
        batch, lengths = pad_features([self.features(w) for w in waves])
        with torch.inference_mode():
            log_probs, out_lengths = self.model.log_probs(batch.to(self.model.device), lengths.to(self.model.device))
        return log_probs.float().cpu(), out_lengths.cpu()

    def utterance_batches(self, utterances: list, skipped: list[tuple[str, str]] | None = None,
                          max_batch_seconds: float | None = None) -> Iterator[AcousticBatch]:
        """Network output for manifest utterances (id, path, duration), batched by their manifest durations,
        shortest first. Utterances whose audio cannot be read are appended to `skipped` as (id, reason)."""
        from asr.data.audio import load_audio

        skipped = [] if skipped is None else skipped
        for batch in duration_batches([u.duration for u in utterances], max_batch_seconds or self.options.max_batch_seconds):
            start = time.perf_counter()
            waves, kept = [], []
            for i in batch:
                utt = utterances[i]
                try:
                    waves.append(load_audio(utt.path, self.sample_rate))
                except AudioError as err:
                    skipped.append((utt.id, str(err)))
                    print(f"warning: skipping {utt.id}: {err}", file=sys.stderr)
                    continue
                kept.append(utt)
            if kept:
                log_probs, lengths = self.log_probs(waves)
                yield AcousticBatch(kept, log_probs, lengths, sum(w.numel() for w in waves) / self.sample_rate,
                                    time.perf_counter() - start)

    # -- transcription --

    def transcribe(self, audio, sample_rate: int | None = None):
        """A Transcript for a file name or a waveform, a list of Transcripts for a list of either.
        A waveform is a 1-D tensor or array of samples at `sample_rate` (default 16 kHz). A file that
        cannot be read raises AudioError; transcribe_files reports it and goes on instead."""
        if isinstance(audio, (list, tuple)):
            results = list(self._transcribe_sources(list(audio), sample_rate))
            for result in results:
                if isinstance(result, AudioError):
                    raise result
            return results
        [result] = self._transcribe_sources([audio], sample_rate)
        if isinstance(result, AudioError):
            raise result
        return result

    def transcribe_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[Transcript | AudioError]:
        """A Transcript or the AudioError of each file, in order; files are read a window at a time."""
        return self._transcribe_sources(list(paths), None)

    def _wave(self, source, sample_rate: int | None) -> torch.Tensor:
        from asr.data.audio import load_audio

        if isinstance(source, (str, os.PathLike)):
            if sample_rate is not None:
                raise UserError("sample_rate: only for waveforms; a file's rate is read from the file")
            return load_audio(source, self.sample_rate)
        wave = torch.as_tensor(source, dtype=torch.float32)
        if wave.ndim != 1:
            raise UserError(f"waveform of shape {tuple(wave.shape)}: expected one channel, (num_samples,)")
        rate = self.sample_rate if sample_rate is None else int(sample_rate)
        if rate != self.sample_rate:
            import torchaudio.functional as AF

            wave = AF.resample(wave, rate, self.sample_rate)
        return wave.contiguous()

    def _transcribe_sources(self, sources: list, sample_rate: int | None) -> Iterator[Transcript | AudioError]:
        """Read sources until WINDOW_BATCHES batches of audio are pending, recognise those, yield in order."""
        window_seconds = WINDOW_BATCHES * self.options.max_batch_seconds
        pending: list[tuple[int, torch.Tensor | AudioError]] = []
        pending_seconds = 0.0
        for index, source in enumerate(sources):
            try:
                wave = self._wave(source, sample_rate)
            except AudioError as err:
                wave = err
            pending.append((index, wave))
            if isinstance(wave, torch.Tensor):
                pending_seconds += wave.numel() / self.sample_rate
            if pending_seconds >= window_seconds:
                yield from self._recognise_window(pending, sources)
                pending, pending_seconds = [], 0.0
        if pending:
            yield from self._recognise_window(pending, sources)

    def _recognise_window(self, pending: list, sources: list) -> Iterator[Transcript | AudioError]:
        sr = self.sample_rate
        segments: list[_Segment] = []
        for index, wave in pending:
            if isinstance(wave, torch.Tensor):
                segments += [_Segment(index, a, b) for a, b in chunk_bounds(wave, sr, self.options.chunk_seconds)]
        waves = dict(pending)
        words: dict[int, list[tuple[_Segment, list[Word]]]] = {index: [] for index, _ in pending}
        decoder = self.decoder
        for batch in duration_batches([(s.end - s.start) / sr for s in segments], self.options.max_batch_seconds):
            chosen = [segments[i] for i in batch]
            log_probs, lengths = self.log_probs([waves[s.source][s.start:s.end] for s in chosen])
            for k, (segment, hypothesis) in enumerate(zip(chosen, decoder.decode(log_probs, lengths))):
                words[segment.source].append((segment, self.timed_words(log_probs[k, : int(lengths[k])], hypothesis,
                                                                        segment.start / sr, (segment.end - segment.start) / sr)))
        for index, wave in pending:
            if isinstance(wave, AudioError):
                yield wave
                continue
            ordered = [w for _, segment_words in sorted(words[index], key=lambda item: item[0].start) for w in segment_words]
            source = sources[index]
            yield Transcript(" ".join(w.word for w in ordered), wave.numel() / sr, ordered,
                             utterance_confidence([w.confidence for w in ordered]),
                             str(source) if isinstance(source, (str, os.PathLike)) else None)

    def timed_words(self, log_probs: torch.Tensor, hypothesis: Hypothesis, offset: float = 0.0,
                    duration: float | None = None) -> list[Word]:
        """The hypothesis' words with times on the file's line (offset: where the piece starts) and confidences.
        log_probs (T', V): the piece's network output the hypothesis was decoded from."""
        frame = self.model.frame_shift_seconds
        end_of_piece = float("inf") if duration is None else duration
        if hypothesis.text and not hypothesis.words:  # a decoder that could not time its words
            return [Word(w, offset, offset + (0.0 if duration is None else duration), float("nan"))
                    for w in hypothesis.text.split()]
        scores = word_confidences(log_probs, hypothesis, self.model.tokenizer)
        return [Word(w.word, offset + w.start_frame * frame, offset + min(w.end_frame * frame, end_of_piece), c)
                for w, c in zip(hypothesis.words, scores)]
