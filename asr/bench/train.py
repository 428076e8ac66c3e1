"""Training-step speed of the Deep Speech network through asr.ops vs the same network on torch.nn.RNN.

    asr bench train [--cell relu] [--layers 4] [--hidden 320] [--batch 16] [--seconds 6] [--json out.json]
                    [--device cpu|cuda] [--precision fp32|bf16|fp16]

Both networks share every weight (conv front end, projections, recurrent matrices, output); only the
recurrent layers differ: ours is one input GEMM + asr.ops.recurrence, the other is torch.nn.RNN (tanh
or relu; torch has no clipped ReLU, the clip costs nothing measurable) on a packed batch. One step is
forward + CTC-shaped loss + backward + AdamW, on a padded batch with ragged lengths, as in training.
Timing is the median of `--repeats` steps after a warmup step; on a GPU each step ends with a device
synchronisation, and `--precision bf16|fp16` runs forward and loss under autocast as mixed-precision
training does (the comparison network is then cuDNN's RNN under the same autocast).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from asr.bench import invocation

FRAMES_PER_SECOND = 100  # feature frames per second of audio


class TorchRNNLayer(nn.Module):
    """A RecurrentLayer's weights run through torch.nn.RNN (the comparison network)."""

    def __init__(self, layer):
        super().__init__()
        self.norm = layer.norm
        self.merge, self.hidden, self.directions = layer.merge, layer.hidden, layer.directions
        H, D = layer.hidden, layer.directions
        nonlinearity = "tanh" if layer.cell == "tanh" else "relu"
        self.rnn = nn.RNN(layer.input_projection.in_features, H, nonlinearity=nonlinearity, bidirectional=D == 2)
        with torch.no_grad():
            for d, suffix in enumerate(["", "_reverse"][:D]):
                getattr(self.rnn, f"weight_ih_l0{suffix}").copy_(layer.input_projection.weight[d * H:(d + 1) * H])
                getattr(self.rnn, f"bias_ih_l0{suffix}").copy_(layer.input_projection.bias[d * H:(d + 1) * H])
                getattr(self.rnn, f"bias_hh_l0{suffix}").zero_()
                getattr(self.rnn, f"weight_hh_l0{suffix}").copy_(layer.w_hh[d])
        self.output_size = layer.output_size

    def forward(self, x, lengths, mask):
        if self.norm is not None:
            x = self.norm(x, mask)
        T, N, _ = x.shape
        y, _ = self.rnn(pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False))
        y, _ = pad_packed_sequence(y, total_length=T)  # (T, N, D*H)
        y = y.view(T, N, self.directions, self.hidden)
        return y.sum(dim=2) if self.merge == "sum" else y.reshape(T, N, -1)


def torch_rnn_twin(net):
    """A copy of `net` whose relu/tanh recurrent layers run on torch.nn.RNN with the same weights."""
    twin = copy.deepcopy(net)
    twin.rnns = nn.ModuleList(TorchRNNLayer(layer) for layer in twin.rnns)
    return twin.to(next(net.parameters()).device)  # the new nn.RNN modules are made on the CPU


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_seconds(net, features, lengths, repeats: int, precision: str = "fp32") -> float:
    device = features.device
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = AUTOCAST[precision]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(repeats + 2):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits, _ = net(features, lengths)
            loss = logits.float().log_softmax(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()
        if i > 1:  # the first two steps warm caches, allocators, cuDNN plans and the op's build
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cell", choices=("relu", "tanh"), default="relu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=320)
    parser.add_argument("--unidirectional", action="store_true")
    parser.add_argument("--conv-channels", type=int, default=32)
    parser.add_argument("--time-stride", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=6.0, help="longest utterance; others are 50-100%% of it")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--precision", choices=tuple(AUTOCAST), default="fp32",
                        help="fp32, or bf16/fp16 autocast as in mixed-precision training (GPU)")
    parser.add_argument("--json", default=None, help="also write the result here")


def run(args: argparse.Namespace) -> int:
    from asr.errors import UserError
    from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch")
    if device.type == "cpu" and args.precision != "fp32":
        raise UserError(f"--precision {args.precision}: mixed precision is benchmarked on a GPU only")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = args.conv_channels
    config = DeepSpeechConfig(conv_channels=(c, c), conv_kernels=((11, 11), (11, 5)),
                              conv_strides=((2, args.time_stride), (2, 1)), rnn_cell=args.cell,
                              rnn_layers=args.layers, rnn_hidden=args.hidden, bidirectional=not args.unidirectional)
    ours = DeepSpeech(config).to(device)
    theirs = torch_rnn_twin(ours)
    T = int(args.seconds * FRAMES_PER_SECOND)
    lengths = torch.randint(T // 2, T + 1, (args.batch,))
    lengths[0] = T
    features = torch.randn(args.batch, T, config.n_mels).to(device)
    lengths = lengths.to(device)
    with torch.no_grad():
        ours.eval(), theirs.eval()
        difference = (ours(features, lengths)[0] - theirs(features, lengths)[0]).abs().max().item()
        ours.train(), theirs.train()
    from asr.ops.dispatch import backends_used

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    result = {
        "command": invocation(),
        "device": where, "threads": torch.get_num_threads(), "precision": args.precision,
        "config": config.to_dict(), "batch": args.batch, "frames": T, "max_abs_output_difference": difference,
    }
    result["ours_step_seconds"] = step_seconds(ours, features, lengths, args.repeats, args.precision)
    result["ours_backends"] = sorted(backends_used())
    result["torch_rnn_step_seconds"] = step_seconds(theirs, features, lengths, args.repeats, args.precision)
    result["speedup"] = result["torch_rnn_step_seconds"] / result["ours_step_seconds"]
    print(f"{where}, {args.precision}; {args.layers} x {'uni' if args.unidirectional else 'bi'}directional "
          f"{args.cell} {args.hidden}; batch {args.batch} x {T} frames")
    print(f"  asr.ops network      {1000 * result['ours_step_seconds']:8.1f} ms/step (backend {', '.join(result['ours_backends'])})")
    print(f"  torch.nn.RNN network {1000 * result['torch_rnn_step_seconds']:8.1f} ms/step")
    print(f"  ours is {result['speedup']:.2f}x the speed of torch.nn.RNN (outputs agree to {difference:.1e})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asr bench train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
