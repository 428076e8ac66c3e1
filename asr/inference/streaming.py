"""Streaming recognition with the unidirectional + lookahead network: audio in as it arrives, the same
output as the offline network on the whole recording.

Every stage keeps what the next frames need and nothing more:
  features     the STFT's half window (reflect-padded at the start, and at the end when the stream
               ends, as the offline features are) and global mean/variance normalisation (the training
               set's, from the checkpoint: per-utterance statistics need the whole utterance)
  convolutions each Conv2d's time context: `padding` zero frames at the start, the kernel's last
               frames between chunks, `padding` zeros appended at the end
  recurrence   the state h of every layer, carried from chunk to chunk (asr.ops.recurrence's h0)
  lookahead    the row convolution's `context` future frames
BatchNorm in eval mode, the projections and the output layer work frame by frame.

Algorithmic latency (how far the network looks past a frame): the half window of the STFT, the
convolutions' right context and the lookahead; add the chunk length for when a frame is computed.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from asr.errors import UserError
from asr.inference.recognizer import Recognizer, Transcript
from asr.model.deepspeech import DeepSpeech, clipped_relu

PCM_BYTES_PER_SAMPLE = 2  # s16le
PCM_FULL_SCALE = 32768.0


def check_streamable(model, source: str = "checkpoint") -> None:
    """UserError unless the network and features can stream."""
    config = model.net.config
    if config.bidirectional:
        raise UserError(f"{source}: streaming needs a unidirectional network (this one is bidirectional); train one "
                        "like recipes/synth/streaming.yaml")
    if model.feature_config.normalization != "global":
        raise UserError(f"{source}: its features are normalised per utterance, which a stream cannot have; train with "
                        "model.feature_normalization global (recipes/synth/streaming.yaml)")


class StreamingFeatures:
    """The frames asr.data.features.LogMel computes on a whole recording, from its samples in pieces."""

    def __init__(self, logmel):
        self.logmel = logmel
        self.config = logmel.config
        self.half = self.config.n_fft // 2
        self.hop = self.config.hop_length
        self.reset()

    def reset(self) -> None:
        self.head: torch.Tensor | None = None  # the first samples, until there are enough to reflect
        self.buffer = torch.zeros(0)  # padded-signal samples from frame `self.frames`' window start on
        self.frames = 0  # frames emitted
        self.samples = 0  # samples received

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """New samples -> the (T, n_mels) normalised frames they complete."""
        self.samples += samples.numel()
        if self.head is not None or self.frames == 0 and self.buffer.numel() == 0:
            self.head = samples if self.head is None else torch.cat([self.head, samples])
            if self.head.numel() <= self.half:
                return torch.zeros(0, self.config.n_mels)
            head, self.head = self.head, None
            self.buffer = torch.cat([head[1 : self.half + 1].flip(0), head])  # reflect, as torch.stft's centring
        else:
            self.buffer = torch.cat([self.buffer, samples])
        count = (self.buffer.numel() - self.config.n_fft) // self.hop + 1 if self.buffer.numel() >= self.config.n_fft else 0
        return self._emit(count)

    def finish(self) -> torch.Tensor:
        """The frames that need the end of the signal (its reflect padding)."""
        total = self.config.num_frames(self.samples)
        if self.head is not None or self.samples <= self.half:  # too short to have started: as LogMel does it
            wave = self.head if self.head is not None else torch.zeros(0)
            self.head = None
            frames = self.logmel(wave) if wave.numel() else torch.zeros(0, self.config.n_mels)
            self.frames = frames.shape[0]
            return frames
        tail = self.buffer[-self.half - 1 : -1].flip(0)
        self.buffer = torch.cat([self.buffer, tail])
        return self._emit(total - self.frames)

    def _emit(self, count: int) -> torch.Tensor:
        if count <= 0:
            return torch.zeros(0, self.config.n_mels)
        spectrogram = self.logmel.mel.spectrogram
        piece = self.buffer[: (count - 1) * self.hop + self.config.n_fft]
        power = torch.stft(piece, n_fft=spectrogram.n_fft, hop_length=spectrogram.hop_length,
                           win_length=spectrogram.win_length, window=spectrogram.window, center=False,
                           normalized=False, onesided=True, return_complex=True).abs().pow(2)  # (freq, count)
        mel = self.logmel.mel.mel_scale(power)  # (n_mels, count)
        from asr.data.features import LOG_FLOOR

        frames = self.logmel.normalize(torch.log(mel + LOG_FLOOR).transpose(0, 1))  # (count, n_mels)
        self.buffer = self.buffer[count * self.hop :]
        self.frames += count
        return frames


class _ConvState:
    def __init__(self, padding: int):
        self.buffer: torch.Tensor | None = None  # (1, C, F, frames) input not yet fully used
        self.padding = padding


class StreamingNetwork:
    """A unidirectional DeepSpeech network run chunk by chunk with its state carried (module docstring)."""

    def __init__(self, net: DeepSpeech):
        self.net = net
        self.config = net.config
        self.reset()

    def reset(self) -> None:
        fe = self.net.front_end
        self.convs = [_ConvState(pt) for (_, pt) in fe.paddings]
        self.hidden: list[torch.Tensor | None] = [None] * len(self.net.rnns)
        self.lookahead_buffer: torch.Tensor | None = None  # (1, C, frames)
        self.started = False

    @property
    def right_context_frames(self) -> int:
        """Feature frames the network looks past the frame it outputs (convolutions and lookahead)."""
        frames, stride = 0, 1
        for (_, kt), (_, st), (_, pt) in zip(self.net.front_end.kernels, self.net.front_end.strides,
                                             self.net.front_end.paddings):
            frames += (kt - 1 - pt) * stride
            stride *= st
        return frames + self.config.lookahead * stride

    def _conv(self, k: int, x: torch.Tensor, final: bool) -> torch.Tensor:
        """Block k on new input frames x (1, C, F, t) -> the output frames they complete."""
        fe = self.net.front_end
        block, (pf, _), (_, st), (_, kt), state = fe.blocks[k], fe.paddings[k], fe.strides[k], fe.kernels[k], self.convs[k]
        if state.buffer is None:
            zeros = x.new_zeros(*x.shape[:3], state.padding)
            state.buffer = torch.cat([zeros, x], dim=3)
        else:
            state.buffer = torch.cat([state.buffer, x], dim=3)
        if final:
            state.buffer = torch.cat([state.buffer, x.new_zeros(*x.shape[:3], state.padding)], dim=3)
        available = state.buffer.shape[3]
        count = (available - kt) // st + 1 if available >= kt else 0
        if count <= 0:  # nothing completed yet: no frames, but the frequency size the next block expects
            kf, sf = fe.kernels[k][0], fe.strides[k][0]
            return x.new_zeros(1, block["conv"].out_channels, (x.shape[2] + 2 * pf - kf) // sf + 1, 0)
        used = state.buffer[..., : (count - 1) * st + kt]
        conv = block["conv"]
        y = F.conv2d(used, conv.weight, None, conv.stride, (pf, 0))  # (1, C', F', count)
        state.buffer = state.buffer[..., count * st :]
        return clipped_relu(block["norm"](y))

    def _lookahead(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        """x (t, 1, C) -> the lookahead outputs it completes."""
        la = self.net.lookahead
        y = x.permute(1, 2, 0)  # (t, 1, C) -> (1, C, t)
        self.lookahead_buffer = y if self.lookahead_buffer is None else torch.cat([self.lookahead_buffer, y], dim=2)
        if final:
            self.lookahead_buffer = F.pad(self.lookahead_buffer, (0, la.context))
        count = self.lookahead_buffer.shape[2] - la.context
        if count <= 0:
            return x[:0]
        out = la.conv(self.lookahead_buffer[:, :, : count + la.context]).permute(2, 0, 1)  # (count, 1, C)
        self.lookahead_buffer = self.lookahead_buffer[:, :, count:]
        return clipped_relu(out)

    @torch.inference_mode()
    def accept(self, features: torch.Tensor, final: bool = False) -> torch.Tensor:
        """features (t, F) normalised -> (t', V) log-probs of the output frames they complete."""
        device = next(self.net.parameters()).device
        x = features.to(device).transpose(0, 1)[None, None]  # (t, F) -> (1, 1, F, t)
        for k in range(len(self.net.front_end.blocks)):
            x = self._conv(k, x, final)
        if x.shape[-1] == 0 and not final:
            return torch.zeros(0, self.config.vocab_size)
        N, C, Fr, T = x.shape if x.dim() == 4 else (1, 0, 0, 0)
        x = x.reshape(1, C * Fr, T).permute(2, 0, 1) if T else x.new_zeros(0, 1, self.net.front_end.output_size)
        for i, layer in enumerate(self.net.rnns):
            x = self._recurrent(i, layer, x)
        if self.net.lookahead is not None:
            x = self._lookahead(x, final)
        if x.shape[0] == 0:
            return torch.zeros(0, self.config.vocab_size)
        logits = self.net.output(self.net.output_norm.norm(x[:, 0]))  # (t', V)
        return logits.float().log_softmax(dim=-1).cpu()

    def _recurrent(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        """x (t, 1, C) -> (t, 1, H), layer i's state carried."""
        if x.shape[0] == 0:
            return x.new_zeros(0, 1, layer.output_size)
        if layer.norm is not None:
            x = layer.norm.norm(x[:, 0])[:, None]  # eval-mode BatchNorm: frame by frame
        if layer.cell == "gru":
            h0 = self.hidden[i]
            y, h = layer.gru(x, h0)
            self.hidden[i] = h
            return y
        from asr.ops import recurrence

        u = layer.input_projection(x)  # (t, 1, H)
        y, h = recurrence(u, layer.w_hh[0], h0=self.hidden[i], activation=layer.recurrence.activation,
                          backend=layer.recurrence.backend)
        self.hidden[i] = h
        return y


class StreamingRecognizer:
    """Audio in pieces -> partial text as it forms, and the final Transcript (words with times and confidence).

    Partials are the greedy best path of the frames so far; the final transcript is decoded from all
    frames by the recognizer's decoder (greedy or beam+LM)."""

    def __init__(self, recognizer: Recognizer, source: str = "checkpoint"):
        check_streamable(recognizer.model, source)
        self.recognizer = recognizer
        self.features = StreamingFeatures(recognizer.logmel)
        self.network = StreamingNetwork(recognizer.model.net)
        self.reset()

    def reset(self) -> None:
        self.features.reset()
        self.network.reset()
        self.log_probs: list[torch.Tensor] = []
        self.best: list[int] = []  # the greedy path so far
        self.samples = 0

    @property
    def algorithmic_latency_seconds(self) -> float:
        """How far past a frame's time the network must hear before that frame is known (chunk not included)."""
        config = self.recognizer.model.feature_config
        return (self.network.right_context_frames * config.hop_length + config.n_fft // 2) / config.sample_rate

    def accept(self, samples: torch.Tensor) -> str:
        """A piece of 16 kHz mono float samples -> the partial text so far."""
        samples = torch.as_tensor(samples, dtype=torch.float32).reshape(-1)
        self.samples += samples.numel()
        self._add(self.network.accept(self.features.accept(samples)))
        return self.partial()

    def _add(self, log_probs: torch.Tensor) -> None:
        if log_probs.shape[0]:
            self.log_probs.append(log_probs)
            self.best += log_probs.argmax(dim=-1).tolist()

    def partial(self) -> str:
        from asr.decode import _token_runs, _words_from_runs

        return " ".join(w.word for w in _words_from_runs(self.recognizer.model.tokenizer, _token_runs(self.best)))

    def finish(self) -> Transcript:
        """End of stream: the last frames, then the final transcript. reset() starts a new stream."""
        self._add(self.network.accept(self.features.finish(), final=True))
        log_probs = self.stream_log_probs()
        duration = self.samples / self.recognizer.sample_rate
        if log_probs.shape[0] == 0:
            return Transcript("", duration)
        [hypothesis] = self.recognizer.decoder.decode(log_probs[None], torch.tensor([log_probs.shape[0]]))
        words = self.recognizer.timed_words(log_probs, hypothesis, 0.0, duration)
        from asr.inference.confidence import utterance_confidence

        return Transcript(" ".join(w.word for w in words), duration, words,
                          utterance_confidence([w.confidence for w in words]))

    def stream_log_probs(self) -> torch.Tensor:
        """(T', V) every output frame so far."""
        vocab = self.recognizer.model.tokenizer.vocab_size
        return torch.cat(self.log_probs) if self.log_probs else torch.zeros(0, vocab)


def _pcm_pieces(stream, samples_per_piece: int):
    """Raw s16le PCM from a binary stream -> float32 pieces of samples_per_piece (the last one shorter)."""
    import numpy as np

    pending = b""
    while True:
        data = stream.read(samples_per_piece * PCM_BYTES_PER_SAMPLE - len(pending))
        if not data:
            break
        pending += data
        if len(pending) >= samples_per_piece * PCM_BYTES_PER_SAMPLE:
            yield torch.from_numpy(np.frombuffer(pending, dtype="<i2").astype(np.float32) / PCM_FULL_SCALE)
            pending = b""
    usable = len(pending) - len(pending) % PCM_BYTES_PER_SAMPLE
    if usable:
        yield torch.from_numpy(np.frombuffer(pending[:usable], dtype="<i2").astype(np.float32) / PCM_FULL_SCALE)


def run_stream(args, options) -> int:
    """`asr transcribe --stream FILE|-`: partial results on stderr as they change, the final words with
    their times (start, end, confidence, word; or --json) on stdout."""
    import json

    from asr.errors import check_range, printable

    if len(args.files) != 1:
        raise UserError(f"--stream: one FILE (or - for PCM on stdin), got {len(args.files)}")
    check_range("--stream-chunk-ms", args.stream_chunk_ms, low=10.0, high=10000.0)
    recognizer = Recognizer.load(args.checkpoint, options=options)
    stream = StreamingRecognizer(recognizer, args.checkpoint)
    piece = int(round(args.stream_chunk_ms / 1000 * recognizer.sample_rate))
    [name] = args.files
    if name == "-":
        pieces = _pcm_pieces(sys.stdin.buffer, piece)
    else:
        from asr.data.audio import load_audio

        wave = load_audio(name, recognizer.sample_rate)
        pieces = (wave[i : i + piece] for i in range(0, wave.numel(), piece))
    shown = ""
    started = time.perf_counter()
    for samples in pieces:
        text = stream.accept(samples)
        if text != shown:
            print(f"partial {stream.samples / recognizer.sample_rate:8.2f}s: {text}", file=sys.stderr, flush=True)
            shown = text
    result = stream.finish()
    seconds = time.perf_counter() - started
    if args.json:
        out = result.to_dict() | {"path": None if name == "-" else printable(name),
                                  "algorithmic_latency_seconds": round(stream.algorithmic_latency_seconds, 3),
                                  "chunk_seconds": piece / recognizer.sample_rate}
        print(json.dumps(out, indent=2))
    else:
        for w in result.words:
            print(f"{w.start:.2f}\t{w.end:.2f}\t{w.confidence:.3f}\t{w.word}")
    rtf = seconds / result.duration if result.duration else float("nan")
    print(f"streamed {result.duration:.2f} s of audio in {seconds:.2f} s (RTF {rtf:.3f}); algorithmic latency "
          f"{1000 * stream.algorithmic_latency_seconds:.0f} ms + {args.stream_chunk_ms:.0f} ms chunks", file=sys.stderr)
    return 0
