"""`asr transcribe CKPT FILE...`: text, or JSON with each word's start, end and confidence.

A thin command around asr.inference.Recognizer: any format asr.data.audio reads; long files are cut
into pieces of at most --chunk-seconds and the pieces of all files batched by duration. A file that
cannot be read gets a one-line error on stderr, the others are still transcribed, and the exit status
is 1. `--stream FILE` (or `-` for raw 16 kHz s16le PCM on stdin) recognises as the audio arrives, with
the unidirectional model (asr.inference.streaming).
"""

from __future__ import annotations

import argparse
import json
import sys

from asr.errors import AudioError, UserError, printable
from asr.inference.options import add_decoding_arguments, decoding_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model checkpoint (.ckpt), or a model.onnx written by `asr export` "
                                           "(run by onnxruntime)")
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV, FLAC, OGG, MP3); with --stream "
                                                                 "one file, or - for raw 16 kHz s16le PCM on stdin")
    parser.add_argument("--json", action="store_true", help="print JSON with per-word start/end seconds and confidence")
    add_decoding_arguments(parser)
    parser.add_argument("--stream", action="store_true",
                        help="recognise as the audio arrives (a unidirectional model): partial results on stderr, "
                             "final words with times on stdout")
    parser.add_argument("--stream-chunk-ms", type=float, default=320.0,
                        help="--stream: audio fed to the network at a time (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from asr.inference.recognizer import Recognizer

    options = decoding_options(args)
    if args.stream:
        from asr.inference.streaming import run_stream

        if str(args.checkpoint).endswith(".onnx"):
            raise UserError(f"{args.checkpoint}: --stream needs the checkpoint (the exported graph has no "
                            "state in/out); give the .ckpt")

        return run_stream(args, options)
    recognizer = Recognizer.load(args.checkpoint, options=options)
    failures = 0
    transcripts = []
    for result in recognizer.transcribe_files(args.files):
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

