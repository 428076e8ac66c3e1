"""`asr export CKPT --onnx model.onnx`: the network as an ONNX graph, its settings in model.json beside it.

After writing, the graph is run by onnxruntime on a ragged batch of random features and compared with
the PyTorch network on the same batch; the largest difference of the log-probabilities is printed, and
the export fails (nothing left behind) if it exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import sys

from asr.errors import UserError

DEFAULT_TOLERANCE = 1e-4  # largest |log-prob difference| accepted between onnxruntime and PyTorch
CHECK_LENGTHS = (400, 257, 61, 9)  # feature frames of the check batch's rows: ragged, down to a few frames


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model checkpoint (.ckpt)")
    parser.add_argument("--onnx", required=True, metavar="FILE.onnx",
                        help="write the network here as an ONNX graph (opset 17), and its tokenizer, feature and "
                             "network settings to FILE.json beside it")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest log-probability difference to PyTorch accepted by the check (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE.onnx / FILE.json if they exist")
    parser.add_argument("--no-check", action="store_true", help="do not run the graph with onnxruntime after writing it")


def compare(model, onnx_path, lengths=CHECK_LENGTHS, seed: int = 0) -> float:
    """Largest |log-prob difference| over valid frames between onnxruntime and the PyTorch network on a
    ragged batch of random (normalised-scale) features; UserError if the output lengths differ."""
    import torch

    from asr.inference.onnx_model import load_onnx

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    features = torch.randn(len(lengths), int(lengths.max()), model.config.n_mels, generator=generator)  # (N, T, F)
    features *= (torch.arange(features.shape[1])[None, :] < lengths[:, None])[:, :, None]
    expected, expected_lengths = model.log_probs(features, lengths)
    got, got_lengths = load_onnx(onnx_path).log_probs(features, lengths)
    if not torch.equal(expected_lengths, got_lengths):
        raise UserError(f"{onnx_path}: output lengths {got_lengths.tolist()} differ from PyTorch's {expected_lengths.tolist()}")
    return max(float((got[k, :n] - expected[k, :n]).abs().max()) for k, n in enumerate(expected_lengths.tolist()) if n > 0)


def run(args: argparse.Namespace) -> int:
    from asr.export.onnx import check_onnx_path, export_checkpoint, sidecar_path
    from asr.model.inference import load_for_inference

    if args.tolerance <= 0:
        raise UserError(f"--tolerance {args.tolerance}: must be positive")
    for path in (check_onnx_path(args.onnx), sidecar_path(args.onnx)):
        if path.exists() and not args.overwrite:
            raise UserError(f"--onnx {args.onnx}: {path} exists; pass --overwrite to replace it, or choose another name")
    onnx_path, json_path = export_checkpoint(args.checkpoint, args.onnx)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {json_path}")
    if args.no_check:
        return 0
    difference = compare(load_for_inference(args.checkpoint), onnx_path)
    if not difference <= args.tolerance:
        onnx_path.unlink(missing_ok=True)
        sidecar_path(onnx_path).unlink(missing_ok=True)
        print(f"asr export: error: onnxruntime's log-probabilities differ from PyTorch's by {difference:.3g} "
              f"(> --tolerance {args.tolerance:g}); removed {onnx_path} and its .json", file=sys.stderr)
        return 1
    print(f"checked with onnxruntime: ragged batch of {len(CHECK_LENGTHS)} (frames {', '.join(map(str, CHECK_LENGTHS))}), "
          f"largest log-probability difference to PyTorch {difference:.2g}")
    return 0
