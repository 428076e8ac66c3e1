"""`asr bench onnx`: real-time factor of onnxruntime against PyTorch on the same checkpoint and audio, CPU.

    asr bench onnx runs/tiny/best.ckpt FILE... [--onnx model.onnx] [--repeats 3] [--json out.json]

Both run through asr.inference.Recognizer with the greedy decoder, the same batching and the same
features; only the acoustic model differs (the checkpoint's network in PyTorch, or the exported graph
in onnxruntime, both with --threads threads). Per repeat, in alternating order:
  - network: the network alone on the same pre-computed feature batches (seconds / audio seconds);
  - transcribe: Recognizer.transcribe(FILES) end to end, audio decoding and features included.
Medians over repeats. Without --onnx the checkpoint is exported to a temporary folder first. The
transcripts of the two must be the same (reported: files whose text differs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from asr.bench import invocation
from asr.errors import UserError

DEFAULT_REPEATS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model checkpoint (.ckpt)")
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files to transcribe")
    parser.add_argument("--onnx", default=None, help="its `asr export` graph (default: exported to a temporary folder)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed repeats per runtime (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of both runtimes (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")


def _time_network(recognizer, batches) -> float:
    start = time.perf_counter()
    for features, lengths in batches:
        recognizer.model.log_probs(features, lengths)
    return time.perf_counter() - start


def _time_transcribe(recognizer, files) -> tuple[float, list[str]]:
    start = time.perf_counter()
    texts = [t.text for t in recognizer.transcribe(files)]
    return time.perf_counter() - start, texts


def run(args: argparse.Namespace) -> int:
    import torch

    from asr.data.audio import load_audio
    from asr.export.onnx import export_checkpoint
    from asr.fileio import atomic_write_text
    from asr.inference import Recognizer
    from asr.inference.recognizer import duration_batches, pad_features

    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="asr-bench-onnx-") as tmp:
        onnx_path = args.onnx
        if onnx_path is None:
            onnx_path, _, _ = export_checkpoint(args.checkpoint, Path(tmp) / "model.onnx")
        runtimes = {"pytorch": Recognizer.load(args.checkpoint), "onnxruntime": Recognizer.load(onnx_path)}
        reference = runtimes["pytorch"]
        waves = [load_audio(f, reference.sample_rate) for f in args.files]
        audio_seconds = sum(w.numel() for w in waves) / reference.sample_rate
        batches = [pad_features([reference.features(waves[i]) for i in batch])
                   for batch in duration_batches([w.numel() / reference.sample_rate for w in waves],
                                                 reference.options.max_batch_seconds)]
        network = {name: [] for name in runtimes}
        transcribe = {name: [] for name in runtimes}
        texts = {}
        for name, recognizer in runtimes.items():  # warm-up: allocators, thread pools, the op's first call
            _time_network(recognizer, batches[:1])
        for repeat in range(args.repeats):
            order = list(runtimes) if repeat % 2 == 0 else list(runtimes)[::-1]
            for name in order:
                network[name].append(_time_network(runtimes[name], batches))
                seconds, texts[name] = _time_transcribe(runtimes[name], args.files)
                transcribe[name].append(seconds)
    differing = [f for f, a, b in zip(args.files, texts["pytorch"], texts["onnxruntime"]) if a != b]
    result = {
        "command": invocation(),
        "device": f"CPU ({platform.processor() or platform.machine()}), {threads} thread(s)",
        "checkpoint": str(args.checkpoint), "files": len(args.files), "audio_seconds": round(audio_seconds, 3),
        "repeats": args.repeats, "decoder": "greedy",
        "runtimes": {},
        "files_with_different_text": len(differing),
    }
    print(f"{len(args.files)} files, {audio_seconds:.1f} s of audio, {threads} thread(s), median of {args.repeats}:")
    for name in runtimes:
        net, full = statistics.median(network[name]), statistics.median(transcribe[name])
        result["runtimes"][name] = {"network_seconds": network[name], "transcribe_seconds": transcribe[name],
                                    "network_rtf": net / audio_seconds, "transcribe_rtf": full / audio_seconds}
        print(f"  {name:12s} network RTF {net / audio_seconds:.4f}   transcribe RTF {full / audio_seconds:.4f}")
    torch_rt, onnx_rt = result["runtimes"]["pytorch"], result["runtimes"]["onnxruntime"]
    result["network_speedup"] = torch_rt["network_rtf"] / onnx_rt["network_rtf"]
    result["transcribe_speedup"] = torch_rt["transcribe_rtf"] / onnx_rt["transcribe_rtf"]
    print(f"  onnxruntime / pytorch speed: network {result['network_speedup']:.2f}x, "
          f"transcribe {result['transcribe_speedup']:.2f}x; files whose text differs: {len(differing)}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asr bench onnx", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
