"""A trained DeepSpeech network as a standard ONNX graph, and the settings a runtime needs beside it.

    build_model(net)                          # the graph (an onnx ModelProto); inputs and outputs below
    export_checkpoint("best.ckpt", "model.onnx")   # checked with onnxruntime, then model.onnx + model.json

The graph is written node by node from the network's weights (not traced), in eval mode:

    features (N, T, F) float32, feature_lengths (N,) int64
        -> log_probs (N, T', V) float32 (log-softmax over V), output_lengths (N,) int64

It computes what asr.model.deepspeech.DeepSpeech computes followed by log_softmax, frame for frame:
  - conv front end: Conv, BatchNormalization, Clip(0, 20), frames past each (reduced) length zeroed;
  - each recurrent layer: its sequence-wise BatchNorm as a per-channel affine map on the valid frames,
    then ONNX's own RNN operator with W = the input projection, R = W_hh, B = (projection bias, 0),
    `sequence_lens` = the lengths (ragged batches: a reverse direction starts at each sequence's own
    last frame, as the op's packed semantics do). The clipped ReLU min(max(x, 0), 20) is the RNN's
    Relu with its `clip` attribute 20 (the clip bounds the activation's input to [-20, 20]), tanh is
    Tanh; a GRU layer is ONNX's GRU with linear_before_reset = 1 (torch.nn.GRU's cell), gates
    reordered from torch's (r, z, n) to ONNX's (z, r, h);
  - the lookahead (row convolution) as a grouped Conv padded on the right, the output BatchNorm and
    the linear layer, LogSoftmax.
Feature extraction (log-mel, normalisation) stays outside the graph: the sidecar JSON gives its
settings, and asr.inference.onnx_model runs the same LogMel before onnxruntime.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from asr.errors import UserError
from asr.fileio import atomic_write_bytes, atomic_write_text

OPSET = 17  # ai.onnx opset of the graph (onnxruntime >= 1.13 runs it)
IR_VERSION = 8  # the ONNX IR version that goes with opset 17
SIDECAR_FORMAT = 1
INPUTS = ("features", "feature_lengths")
OUTPUTS = ("log_probs", "output_lengths")
DEFAULT_TOLERANCE = 1e-4  # largest |log-prob difference| accepted between onnxruntime and PyTorch
CHECK_LENGTHS = (400, 257, 61, 9)  # feature frames of the check batch's rows: ragged, down to a few frames


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'asr[onnx]' (or pip install onnx)") from None
    return onnx


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    """model.onnx -> model.json: the tokenizer, feature and network settings beside the graph."""
    return Path(onnx_path).with_suffix(".json")


class _Graph:
    """Nodes and initializers of one graph, with fresh names."""

    def __init__(self):
        self.onnx = _onnx()
        self.nodes = []
        self.initializers = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value) -> str:
        """An initializer from a tensor or array (float tensors as float32)."""
        from onnx import numpy_helper

        tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if tensor.is_floating_point():
            tensor = tensor.float()
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(tensor.contiguous().numpy(), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, names, **attrs))
        return names[0] if outputs == 1 else names


def _frames_mask(g: _Graph, lengths_f: str, frames: str) -> str:
    """lengths (N,) float, frames (scalar int64) -> (N, frames) float32, 1 on valid frames."""
    positions = g.op("Cast", [g.op("Range", [g.const("zero", torch.tensor(0, dtype=torch.int64)), frames,
                                             g.const("one", torch.tensor(1, dtype=torch.int64))])],
                     to=g.onnx.TensorProto.FLOAT)  # (frames,)
    valid = g.op("Less", [g.op("Unsqueeze", [positions, g.const("axis", torch.tensor([0]))]),  # (1, frames)
                          g.op("Unsqueeze", [lengths_f, g.const("axis", torch.tensor([1]))])])  # (N, 1)
    return g.op("Cast", [valid], to=g.onnx.TensorProto.FLOAT)  # (N, frames)


def _dim(g: _Graph, x: str, axis: int) -> str:
    """Size of axis `axis` of x as a scalar int64."""
    return g.op("Squeeze", [g.op("Shape", [x], start=axis, end=axis + 1), g.const("axis", torch.tensor([0]))])


def _batch_norm_affine(g: _Graph, norm: torch.nn.BatchNorm1d, x: str) -> str:
    """Eval-mode BatchNorm1d over the last axis of x as x * scale + shift."""
    scale = norm.weight.detach().double() / torch.sqrt(norm.running_var.detach().double() + norm.eps)
    shift = norm.bias.detach().double() - norm.running_mean.detach().double() * scale
    return g.op("Add", [g.op("Mul", [x, g.const("bn_scale", scale)]), g.const("bn_shift", shift)])


def _recurrent(g: _Graph, layer, x: str, seq_lens: str) -> str:
    """x (T, N, C) -> the layer's RNN/GRU output (T, N, D, H)."""
    H, D = layer.hidden, layer.directions
    direction = "bidirectional" if D == 2 else "forward"
    if layer.cell == "gru":
        gru = layer.gru
        suffixes = [""] + (["_reverse"] if D == 2 else [])

        def gates(weight: torch.Tensor) -> torch.Tensor:  # torch (r, z, n) -> ONNX (z, r, h), along dim 0
            r, z, n = weight.detach().chunk(3, dim=0)
            return torch.cat([z, r, n], dim=0)

        W = torch.stack([gates(getattr(gru, f"weight_ih_l0{s}")) for s in suffixes])  # (D, 3H, C)
        R = torch.stack([gates(getattr(gru, f"weight_hh_l0{s}")) for s in suffixes])  # (D, 3H, H)
        B = torch.stack([torch.cat([gates(getattr(gru, f"bias_ih_l0{s}")), gates(getattr(gru, f"bias_hh_l0{s}"))])
                         for s in suffixes])  # (D, 6H)
        y = g.op("GRU", [x, g.const("W", W), g.const("R", R), g.const("B", B), seq_lens], hint="gru", outputs=2,
                 hidden_size=H, direction=direction, linear_before_reset=1)[0]
    else:
        weight = layer.input_projection.weight.detach()  # (D*H, C)
        W = weight.view(D, H, weight.shape[1])  # (D, H, C)
        R = layer.w_hh.detach()  # (D, H, H)
        B = torch.cat([layer.input_projection.bias.detach().view(D, H), torch.zeros(D, H)], dim=1)  # (D, 2H)
        attrs = {"hidden_size": H, "direction": direction}
        if layer.cell == "relu":  # clipped ReLU: Relu of the input clipped to [-20, 20]
            from asr.ops import CLIP_CEILING

            attrs.update(activations=["Relu"] * D, clip=float(CLIP_CEILING))
        else:
            attrs.update(activations=["Tanh"] * D)
        y = g.op("RNN", [x, g.const("W", W), g.const("R", R), g.const("B", B), seq_lens], hint="rnn", outputs=2,
                 **attrs)[0]
    return g.op("Transpose", [y], perm=[0, 2, 1, 3])  # (T, D, N, H) -> (T, N, D, H)


def build_model(net):
    """The onnx ModelProto of a DeepSpeech network (its weights as they are now, eval-mode semantics)."""
    from asr.model.deepspeech import DeepSpeech

    if not isinstance(net, DeepSpeech):
        raise UserError(f"ONNX export: expected a DeepSpeech network, got {type(net).__name__}")
    g = _Graph()
    onnx = g.onnx
    helper, FLOAT, INT64 = onnx.helper, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    config = net.config
    from asr.ops import CLIP_CEILING

    clip_low, clip_high = g.const("clip_low", torch.tensor(0.0)), g.const("clip_high", torch.tensor(CLIP_CEILING))

    # conv front end on (N, 1, F, T)
    x = g.op("Unsqueeze", [g.op("Transpose", [INPUTS[0]], perm=[0, 2, 1]), g.const("axis", torch.tensor([1]))])
    lengths = g.op("Cast", [INPUTS[1]], to=FLOAT)  # (N,) float: exact for any length below 2^24
    front = net.front_end
    for block, (kf, kt), (sf, st), (pf, pt) in zip(front.blocks, front.kernels, front.strides, front.paddings):
        norm = block["norm"]
        x = g.op("Conv", [x, g.const("conv_w", block["conv"].weight)], kernel_shape=[kf, kt], strides=[sf, st],
                 pads=[pf, pt, pf, pt])
        x = g.op("BatchNormalization", [x, g.const("bn_w", norm.weight), g.const("bn_b", norm.bias),
                                        g.const("bn_mean", norm.running_mean), g.const("bn_var", norm.running_var)],
                 epsilon=float(norm.eps))
        x = g.op("Clip", [x, clip_low, clip_high])  # (N, C, F', T')
        # lengths = floor((lengths + 2 pt - kt) / st) + 1, as the network computes them
        lengths = g.op("Add", [g.op("Floor", [g.op("Div", [g.op("Add", [lengths, g.const("pad", torch.tensor(float(2 * pt - kt)))]),
                                                           g.const("stride", torch.tensor(float(st)))])]),
                               g.const("one", torch.tensor(1.0))])
        mask = _frames_mask(g, lengths, _dim(g, x, 3))  # (N, T')
        x = g.op("Mul", [x, g.op("Unsqueeze", [mask, g.const("axes", torch.tensor([1, 2]))])])  # (N, C, F', T')
    channels_by_freq = front.output_size
    x = g.op("Reshape", [x, g.const("shape", torch.tensor([0, channels_by_freq, -1]))])  # (N, C*F', T')
    x = g.op("Transpose", [x], perm=[2, 0, 1])  # (T', N, C*F')
    frames = _dim(g, x, 0)
    lengths = g.op("Min", [lengths, g.op("Cast", [frames], to=FLOAT)])  # clamp to the frames there are
    valid = g.op("Transpose", [_frames_mask(g, lengths, frames)], perm=[1, 0])  # (T', N)
    valid = g.op("Unsqueeze", [valid, g.const("axis", torch.tensor([2]))])  # (T', N, 1)
    seq_lens = g.op("Cast", [lengths], to=onnx.TensorProto.INT32)  # (N,)

    for layer in net.rnns:
        if layer.norm is not None:
            x = g.op("Mul", [_batch_norm_affine(g, layer.norm.norm, x), valid])
        y = _recurrent(g, layer, x, seq_lens)  # (T', N, D, H)
        if layer.merge == "sum":
            x = g.op("ReduceSum", [y, g.const("axis", torch.tensor([2]))], keepdims=0)  # (T', N, H)
        else:
            x = g.op("Reshape", [y, g.const("shape", torch.tensor([0, 0, -1]))])  # (T', N, D*H)
        x = g.op("Mul", [x, valid])  # padded frames are zero, whatever the runtime leaves there
    if net.lookahead is not None:
        conv = net.lookahead.conv  # depthwise over time, `context` future frames
        x = g.op("Transpose", [x], perm=[1, 2, 0])  # (N, C, T')
        x = g.op("Conv", [x, g.const("lookahead_w", conv.weight)], kernel_shape=[conv.kernel_size[0]],
                 group=conv.groups, pads=[0, net.lookahead.context])
        x = g.op("Transpose", [x], perm=[2, 0, 1])  # (T', N, C)
        x = g.op("Mul", [g.op("Clip", [x, clip_low, clip_high]), valid])
    x = g.op("Mul", [_batch_norm_affine(g, net.output_norm.norm, x), valid])
    logits = g.op("Add", [g.op("MatMul", [x, g.const("out_w", net.output.weight.detach().t())]),
                          g.const("out_b", net.output.bias)])  # (T', N, V)
    log_probs = g.op("LogSoftmax", [logits], axis=-1)
    g.nodes.append(helper.make_node("Transpose", [log_probs], [OUTPUTS[0]], perm=[1, 0, 2]))  # (N, T', V)
    g.nodes.append(helper.make_node("Cast", [lengths], [OUTPUTS[1]], to=INT64))

    graph = helper.make_graph(
        g.nodes, "deepspeech",
        inputs=[helper.make_tensor_value_info(INPUTS[0], FLOAT, ["batch", "frames", config.n_mels]),
                helper.make_tensor_value_info(INPUTS[1], INT64, ["batch"])],
        outputs=[helper.make_tensor_value_info(OUTPUTS[0], FLOAT, ["batch", "output_frames", config.vocab_size]),
                 helper.make_tensor_value_info(OUTPUTS[1], INT64, ["batch"])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="asr")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def graph_difference(model, graph: bytes, lengths=CHECK_LENGTHS, seed: int = 0) -> float:
    """Largest |log-prob difference| over valid frames between onnxruntime running `graph` (serialized)
    and the PyTorch network of `model` (an InferenceModel) on a ragged batch of random features;
    UserError if the output lengths differ."""
    from asr.inference.onnx_model import make_session, run_session

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    features = torch.randn(len(lengths), int(lengths.max()), model.config.n_mels, generator=generator)  # (N, T, F)
    features *= (torch.arange(features.shape[1])[None, :] < lengths[:, None])[:, :, None]
    expected, expected_lengths = model.log_probs(features, lengths)
    got, got_lengths = run_session(make_session(graph), features, lengths)
    if not torch.equal(expected_lengths, got_lengths):
        raise UserError(f"exported graph: output lengths {got_lengths.tolist()} differ from PyTorch's "
                        f"{expected_lengths.tolist()}")
    return max(float((got[k, :n] - expected[k, :n]).abs().max()) for k, n in enumerate(expected_lengths.tolist()) if n > 0)


def sidecar(model) -> dict:
    """What a runtime needs beside the graph, from an asr.model.inference.InferenceModel."""
    return {
        "format": SIDECAR_FORMAT,
        "opset": OPSET,
        "inputs": {INPUTS[0]: "(N, T, n_mels) float32 normalised log-mel frames, zero-padded",
                   INPUTS[1]: "(N,) int64 valid frames per row"},
        "outputs": {OUTPUTS[0]: "(N, T', V) float32 log-softmax over the vocabulary; blank is id 0",
                    OUTPUTS[1]: "(N,) int64 valid output frames per row"},
        "model_config": model.config.to_dict(),
        "feature_config": model.feature_config.to_dict(),
        "tokenizer": model.tokenizer.state_dict(),
        "vocabulary": list(model.tokenizer.tokens),
        "frame_shift_seconds": model.frame_shift_seconds,
        "data": dict(getattr(model, "data_config", {}) or {}),
    }


def check_onnx_path(onnx_path: str | os.PathLike) -> Path:
    """UserError naming --onnx unless it is a file name ending in .onnx."""
    onnx_path = Path(onnx_path)
    if onnx_path.suffix != ".onnx":
        raise UserError(f"--onnx {onnx_path}: the file name should end in .onnx (its settings go to a .json beside it)")
    if onnx_path.is_dir():
        raise UserError(f"--onnx {onnx_path}: is a folder; give a file name ending in .onnx")
    return onnx_path


def export_checkpoint(checkpoint: str | os.PathLike, onnx_path: str | os.PathLike,
                      tolerance: float | None = DEFAULT_TOLERANCE) -> tuple[Path, Path, float | None]:
    """checkpoint -> (model.onnx, model.json, the check's difference). With a tolerance, the graph is
    first run by onnxruntime against PyTorch (graph_difference), and nothing is written if it differs
    by more: a file already at onnx_path is replaced only by a graph that passed."""
    from asr.model.inference import load_for_inference

    onnx_path = check_onnx_path(onnx_path)
    model = load_for_inference(checkpoint)
    graph = build_model(model.net).SerializeToString()
    difference = None
    if tolerance is not None:
        difference = graph_difference(model, graph)
        if not difference <= tolerance:
            raise UserError(f"{checkpoint}: onnxruntime's log-probabilities differ from PyTorch's by "
                            f"{difference:.3g} (> --tolerance {tolerance:g}); nothing written")
    side = dict(sidecar(model), checkpoint=str(checkpoint))
    written = atomic_write_bytes(onnx_path, graph)
    json_path = atomic_write_text(sidecar_path(onnx_path), json.dumps(side, indent=2) + "\n")
    return written, json_path, difference
