"""The `asr` command. It only parses the command path and delegates to the module that owns it.

Each command module exposes either
  add_arguments(parser) and run(args) -> int   (argparse commands), or
  main(argv) -> int                            (commands with their own parser, e.g. LightningCLI).
Modules are imported only when their command runs, so `asr --help` stays fast and nothing touches
CUDA at import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from asr.errors import UserError, printable


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)} (`{self.prog} --help` shows the usage)\n")

# command path -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "synth"): ("asr.data.synth", "render the default corpus with offline TTS, in LibriSpeech's layout"),
    ("data", "prepare", "librispeech"): ("asr.data.librispeech", "download (optional) and index LibriSpeech splits into manifests"),
    ("data", "summary"): ("asr.data.summary", "print utterances, hours, voices and words per manifest"),
    ("ops", "build"): ("asr.ops.build", "compile the recurrent-op extension ahead of time"),
    ("bench", "rnn"): ("asr.bench.rnn", "benchmark the recurrent op: persistent vs cuDNN vs reference"),
    ("bench", "train"): ("asr.bench.train", "training-step speed sweep: our network vs the same network on torch.nn.RNN"),
    ("bench", "scaling"): ("asr.bench.scaling", "strong scaling over 1..128 GPUs, modelled from an `asr bench train` JSON"),
    ("bench", "allreduce"): ("asr.bench.allreduce", "the scaling model's all-reduce cost checked against gloo here"),
    ("bench", "onnx"): ("asr.bench.onnx", "real-time factor of onnxruntime against PyTorch on one checkpoint, CPU"),
    ("lm", "build"): ("asr.lm", "build a word n-gram ARPA language model (interpolated modified Kneser-Ney)"),
    ("train",): ("asr.training.cli", "train a model from a LightningCLI recipe"),
    ("evaluate",): ("asr.evaluate", "WER/CER of a checkpoint on splits or manifests"),
    ("transcribe",): ("asr.transcribe", "transcribe audio files with a checkpoint"),
    ("export",): ("asr.export.cli", "export a checkpoint's network as an ONNX graph (with its settings beside it)"),
    ("report",): ("asr.report", "print training speed and WER of runs side by side"),
}


def _usage(group: tuple[str, ...] = ()) -> str:
    """The commands under `group` (all of them for the empty group)."""
    paths = [path for path in COMMANDS if path[: len(group)] == group]
    width = max(len(" ".join(path)) for path in paths)
    lines = [f"usage: asr {' '.join(group + ('COMMAND',))} [ARGS...]", "", "commands:"]
    for path in paths:
        lines.append(f"  {' '.join(path):<{width}}  {COMMANDS[path][1]}")
    lines.append("")
    lines.append("Run `asr COMMAND --help` for a command's arguments.")
    return "\n".join(lines)


def _group(argv: list[str]) -> tuple[str, ...]:
    """The longest prefix of argv that is a group of commands (e.g. ("data",) or ("data", "prepare"))."""
    for n in range(min(2, len(argv)), 0, -1):
        prefix = tuple(argv[:n])
        if any(path[:n] == prefix and len(path) > n for path in COMMANDS):
            return prefix
    return ()


def _resolve(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """The longest command path that prefixes argv, and the remaining arguments."""
    for n in range(min(3, len(argv)), 0, -1):
        path = tuple(argv[:n])
        if path in COMMANDS:
            return path, argv[n:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from asr import __version__

        print(__version__)
        return 0
    resolved = _resolve(argv)
    if resolved is None:
        group = _group(argv)
        rest = argv[len(group):]
        if group and (not rest or rest[0] in ("-h", "--help", "help")):
            asked = bool(rest)  # `asr data --help` asks; a bare `asr data` lacks its command
            print(_usage(group), file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        print(f"asr: unknown command {' '.join(argv[:3])!r}\n\n{_usage(group)}", file=sys.stderr)
        return 2
    path, rest = resolved
    module_name, help_text = COMMANDS[path]
    prog = "asr " + " ".join(path)
    try:
        module = importlib.import_module(module_name)
        if hasattr(module, "main"):
            return int(module.main(rest) or 0)
        parser = _OneLineParser(prog=prog, description=help_text)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"{prog}: error: {printable(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `asr ... | head`: the reader has gone; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
