"""`asr export CKPT --onnx model.onnx`: the network as an ONNX graph, its settings in model.json beside it.

Before anything is written, the graph is run by onnxruntime on a ragged batch of random features and
compared with the PyTorch network on the same batch (asr.export.onnx.graph_difference); the largest
difference of the log-probabilities is printed, and above --tolerance the export fails with nothing
written. Existing files are replaced only with --overwrite.
"""

from __future__ import annotations

import argparse

from asr.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from asr.export.onnx import DEFAULT_TOLERANCE

    parser.add_argument("checkpoint", help="model checkpoint (.ckpt)")
    parser.add_argument("--onnx", required=True, metavar="FILE.onnx",
                        help="write the network here as an ONNX graph (opset 17), and its tokenizer, feature and "
                             "network settings to FILE.json beside it")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest log-probability difference to PyTorch accepted by the check (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE.onnx / FILE.json if they exist")
    parser.add_argument("--no-check", action="store_true", help="write the graph without running it with onnxruntime")


def run(args: argparse.Namespace) -> int:
    from asr.export.onnx import CHECK_LENGTHS, check_onnx_path, export_checkpoint, sidecar_path

    if not args.tolerance > 0:
        raise UserError(f"--tolerance {args.tolerance}: must be positive")
    for path in (check_onnx_path(args.onnx), sidecar_path(args.onnx)):
        if path.exists() and not args.overwrite:
            raise UserError(f"--onnx {args.onnx}: {path} exists; pass --overwrite to replace it, or choose another name")
    onnx_path, json_path, difference = export_checkpoint(args.checkpoint, args.onnx,
                                                         None if args.no_check else args.tolerance)
    if difference is not None:
        print(f"checked with onnxruntime: ragged batch of {len(CHECK_LENGTHS)} (frames "
              f"{', '.join(map(str, CHECK_LENGTHS))}), largest log-probability difference to PyTorch {difference:.2g}")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {json_path}")
    return 0
