"""Benchmarks: `asr bench rnn` (the recurrent op alone), `asr bench train` (a training step), `asr bench
scaling` (strong scaling modelled from it), `asr bench allreduce` (that model checked against gloo) and
`asr bench onnx` (onnxruntime against PyTorch, real-time factor)."""

from __future__ import annotations

import os
import shlex
import sys


def invocation() -> str:
    """The command line that started this process, as a user would retype it: `asr …` when run
    through the `asr` entry point or asr/cli.py, else the raw argv. Recorded in every result JSON."""
    if not sys.argv:
        return ""
    program = os.path.basename(sys.argv[0])
    if program == "asr" or sys.argv[0].endswith(os.path.join("asr", "cli.py")):
        return shlex.join(["asr", *sys.argv[1:]])
    return shlex.join(sys.argv)
