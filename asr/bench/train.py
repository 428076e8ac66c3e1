"""`asr bench train`: the training step of a real recipe's Deep Speech network, asr.ops vs torch.nn.RNN.

    asr bench train --device cuda                    # clean100 + DS2-class networks, bf16 and fp32, batch 1..64
    asr bench train --device cpu                     # clean100's network, short utterances, a few minutes
    asr bench train --networks clean100 --batch 4,16 --precision bf16 --seconds 10 --json out.json
    asr bench train --layers 4 --hidden 320 --batch 16          # a network of your own ("custom")

What one step is: forward + CTC loss + backward + gradient clipping (5.0, as the recipes) + AdamW, on
a batch of `--batch` utterances that all last `--seconds` (fixed duration: no padding, so the FLOP
count is exact). Both networks of a row share every initial weight (conv front end, projections,
recurrent matrices, output); only the recurrent layers differ: "ours" is one input GEMM +
asr.ops.recurrence (backend --op-backend, `auto` as in training: the persistent kernel on a GPU, the
C++ loop on the CPU; the backend each row ran on is recorded), "torch_rnn" is torch.nn.RNN (cuDNN's
RNN on a GPU, PyTorch's CPU loop on the CPU) on a packed batch. Precision bf16/fp16 runs forward and
loss under autocast with fp32 weights, as Lightning's bf16-mixed / 16-mixed training does.

Networks (NETWORKS): `clean100` is recipes/librispeech/clean100.yaml's (5 x bidirectional clipped-ReLU
800, its conv front end); `ds2` a Deep Speech 2-class network, 7 x bidirectional 1760 on the same front
end; `custom` is built from --layers/--hidden/--cell/--conv-channels/--time-stride/--unidirectional.

Time split of a step (the step whose total is the median of `--repeats`, after WARMUP_STEPS):
  recurrent  forward + backward of the recurrent part of every layer: for ours the op alone (the
             input GEMM is outside it, in "rest"); for torch_rnn the whole nn.RNN call, whose cuDNN
             kernels include the input GEMM. Backward is timed from the moment the part's output
             gradient is ready to the moment its input gradient is (tensor hooks), as
             asr.training.timing does in training.
  optimizer  gradient clipping + AdamW step + zero_grad.
  rest       everything else: conv front end, BatchNorm, projections (ours), output layer, CTC.
On a GPU the marks are CUDA events on the current stream, read after one synchronisation per step.
On the CPU they are wall-clock time (time.perf_counter): the CPU runs one thing at a time, so the
split is exact there, but it is the CPU's split, not a GPU's.

FLOP model (multiply-add = 2 FLOPs; elementwise work, BatchNorm, CTC and the optimizer not counted):
  forward = sum over convs 2*Cin*Cout*kf*kt*F'*T'   + sum over layers 2*T'*N*D*H*(C + H)   + 2*T'*N*C_out*V
  step    = 3 x forward, less one forward of the first conv (its input needs no gradient)
  recurrence (ours' timed part)      = 3 * sum over layers 2*T'*N*D*H^2   (forward, backward-data, dW)
  recurrent part of torch_rnn         = 3 * sum over layers 2*T'*N*D*H*(C + H) (its input GEMM included)
where T' is the frames after the front end, N the batch, D the directions, H the hidden size, C a
layer's input size. TFLOP/s = those FLOPs / the measured seconds.

The JSON (rewritten atomically after every row, "complete": false until the sweep ends) holds every
row; its top level also repeats the first row in the keys earlier versions wrote (precision, batch,
config, ours_step_seconds, torch_rnn_step_seconds, speedup, ours_backends). The first rows are the
recipe network (clean100) at per-GPU batch 4 and 16, the figures the strong-scaling claim rests on.
`asr bench scaling --train-json` reads this file. The PNG (matplotlib) goes beside the JSON.

The GPU path (CUDA events, bf16 autocast, cuDNN twin, the DS2-class sizes) has not run on a GPU yet:
it is unverified until a GPU check commits its JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from asr.bench import invocation

FRAMES_PER_SECOND = 100  # feature frames per second of audio (10 ms hop)
WARMUP_STEPS = 2  # untimed steps per row: caches, allocator, cuDNN plans, the op's build
GRADIENT_CLIP = 5.0  # the recipes' trainer.gradient_clip_val
LEARNING_RATE = 1e-4
TARGET_FRAMES_PER_LABEL = 4  # CTC targets: one label per 4 output frames (about 12 characters per second)
CLEAN100_FRONT_END = dict(conv_channels=(32, 32), conv_kernels=((21, 11), (11, 11)), conv_strides=((2, 2), (2, 1)))
NETWORKS = {  # name -> DeepSpeechConfig fields (n_mels 80, vocab 29: the recipes' char tokenizer)
    "clean100": dict(**CLEAN100_FRONT_END, rnn_cell="relu", rnn_layers=5, rnn_hidden=800, bidirectional=True,
                     merge_directions="sum"),
    "ds2": dict(**CLEAN100_FRONT_END, rnn_cell="relu", rnn_layers=7, rnn_hidden=1760, bidirectional=True,
                merge_directions="sum"),
}
RECIPE_NETWORK = "clean100"
GPU_DEFAULT = dict(networks=("clean100", "ds2"), batch=(4, 16, 1, 2, 8, 32, 64), seconds=10.0,
                   precision=("bf16", "fp32"), repeats=5)
CPU_DEFAULT = dict(networks=("clean100",), batch=(4, 16, 1, 2, 8, 32), seconds=1.0, precision=("fp32",), repeats=3)
CUSTOM_DEFAULT = dict(cell="relu", layers=4, hidden=320, conv_channels=32, time_stride=3)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SIDES = ("ours", "torch_rnn")


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


# --- timing ------------------------------------------------------------------------------------------


class Clock:
    """Marks on a device's timeline: CUDA events on the current stream, or perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class RecurrentTimer:
    """Times the recurrent modules of a network (asr's Recurrence, or nn.RNN), forward and backward,
    and remembers which asr.ops backend each Recurrence call resolved to."""

    def __init__(self, net: nn.Module, clock: Clock):
        from asr.model.deepspeech import Recurrence

        self.clock = clock
        self.spans: list[tuple] = []  # (start mark, end mark) of this step
        self.backends: set[str] = set()
        self._starts: dict[int, object] = {}
        self._handles = []
        for module in net.modules():
            if isinstance(module, (Recurrence, nn.RNN)):
                self._handles.append(module.register_forward_pre_hook(self._before))
                self._handles.append(module.register_forward_hook(self._after))

    def _before(self, module, inputs) -> None:
        self._starts[id(module)] = self.clock.mark()

    def _after(self, module, inputs, output) -> None:
        self.spans.append((self._starts.pop(id(module)), self.clock.mark()))
        x = inputs[0].data if isinstance(inputs[0], PackedSequence) else inputs[0]
        y = output[0] if isinstance(output, tuple) else output
        y = y.data if isinstance(y, PackedSequence) else y
        if not isinstance(module, nn.RNN):
            from asr.ops.dispatch import choose_backend

            # the decision is cached per problem: this looks it up (and sees a run-time fallback)
            self.backends.add(choose_backend(module.backend, x.device.type, x.device.index, tuple(x.shape),
                                             module.activation, x.dtype))
        if torch.is_grad_enabled() and x.requires_grad and y.requires_grad:
            started = {}
            # The hooks hold neither x nor y (a tensor whose hook refers to it leaks the graph).

            def output_grad_ready(grad):
                started["mark"] = self.clock.mark()

            def input_grad_ready(grad):
                if "mark" in started:
                    self.spans.append((started.pop("mark"), self.clock.mark()))

            y.register_hook(output_grad_ready)
            x.register_hook(input_grad_ready)

    def take_seconds(self) -> float:
        """Seconds of this step's spans (after the step's synchronisation); starts the next step."""
        total = sum(self.clock.seconds(a, b) for a, b in self.spans)
        self.spans = []
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class StepTimes:
    step: float  # seconds, forward + loss + backward + optimizer
    forward: float  # forward + loss
    backward: float
    optimizer: float  # clipping + AdamW + zero_grad
    recurrent: float  # the recurrent parts' forward + backward (inside forward and backward)

    @property
    def rest(self) -> float:
        return self.step - self.recurrent - self.optimizer


def time_steps(net, features, lengths, targets, target_lengths, repeats: int, precision: str,
               clock: Clock) -> tuple[StepTimes, list[float], list[str]]:
    """The median step of `repeats` (after WARMUP_STEPS), every step's seconds, the op backends used."""
    device = features.device
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast_dtype = AUTOCAST[precision]
    timer = RecurrentTimer(net, clock)
    steps: list[StepTimes] = []
    try:
        for i in range(repeats + WARMUP_STEPS):
            clock.sync()
            t0 = clock.mark()
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits, out_lengths = net(features, lengths)  # (T', N, V)
                loss = F.ctc_loss(logits.float().log_softmax(-1), targets, out_lengths, target_lengths,
                                  zero_infinity=True)
            t1 = clock.mark()
            scaler.scale(loss).backward()
            t2 = clock.mark()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), GRADIENT_CLIP)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            t3 = clock.mark()
            clock.sync()
            recurrent = timer.take_seconds()
            if i >= WARMUP_STEPS:
                steps.append(StepTimes(step=clock.seconds(t0, t3), forward=clock.seconds(t0, t1),
                                       backward=clock.seconds(t1, t2), optimizer=clock.seconds(t2, t3),
                                       recurrent=recurrent))
    finally:
        timer.remove()
    median = sorted(steps, key=lambda s: s.step)[(len(steps) - 1) // 2]
    return median, [s.step for s in steps], sorted(timer.backends)


# --- the FLOP model ----------------------------------------------------------------------------------


def layer_sizes(config) -> list[tuple[int, int]]:
    """(input size C, hidden H) of each recurrent layer."""
    from asr.model.deepspeech import ConvFrontEnd

    sizes, size = [], ConvFrontEnd(config).output_size
    D = 2 if config.bidirectional else 1
    for _ in range(config.rnn_layers):
        sizes.append((size, config.rnn_hidden))
        size = config.rnn_hidden * (D if config.merge_directions == "concat" else 1)
    return sizes


def step_flops(config, batch: int, frames: int) -> dict:
    """FLOPs of one training step by the model in the module docstring."""
    N, D, freq, T = batch, 2 if config.bidirectional else 1, config.n_mels, frames
    conv, in_channels = [], 1
    for channels, (kf, kt), (sf, st) in zip(config.conv_channels, config.conv_kernels, config.conv_strides):
        freq = (freq + 2 * (kf // 2) - kf) // sf + 1
        T = (T + 2 * (kt // 2) - kt) // st + 1
        conv.append(2.0 * in_channels * channels * kf * kt * freq * T * N)
        in_channels = channels
    sizes = layer_sizes(config)
    recurrence = sum(2.0 * T * N * D * H * H for _, H in sizes)
    projection = sum(2.0 * T * N * D * H * C for C, H in sizes)
    out_size = sizes[-1][1] * (D if config.merge_directions == "concat" else 1)
    output = 2.0 * T * N * out_size * config.vocab_size
    forward = sum(conv) + recurrence + projection + output
    return {"rnn_steps": T, "step": 3 * forward - conv[0], "ours_recurrent": 3 * recurrence,
            "torch_rnn_recurrent": 3 * (recurrence + projection)}


FLOP_MODEL = ("forward = sum_conv 2*Cin*Cout*kf*kt*F'*T' + sum_layers 2*T'*N*D*H*(C+H) + 2*T'*N*C_out*V; "
              "step = 3*forward - forward(first conv); ours_recurrent = 3*sum_layers 2*T'*N*D*H^2 "
              "(forward, backward-data, dW); torch_rnn_recurrent = 3*sum_layers 2*T'*N*D*H*(C+H) "
              "(nn.RNN's timed part includes its input GEMM); elementwise work, BatchNorm, CTC, optimizer not counted")


# --- the sweep ---------------------------------------------------------------------------------------


def _csv(kind):
    def parse(text: str):
        try:
            values = tuple(kind(item) for item in text.split(",") if item)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: empty list")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--networks", type=_csv(str), default=None,
                        help=f"comma list of {','.join(NETWORKS)},custom (default: GPU clean100,ds2; CPU clean100; "
                             "custom when --layers/--hidden/... are given)")
    parser.add_argument("--batch", type=_csv(int), default=None,
                        help="per-GPU batches, comma list, measured in this order (default GPU 4,16,1,2,8,32,64; "
                             "CPU 4,16,1,2,8,32)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="duration of every utterance (default GPU 10, CPU 1)")
    parser.add_argument("--precision", type=_csv(str), default=None,
                        help="comma list of fp32,bf16,fp16 (default GPU bf16,fp32; CPU fp32; mixed precision: GPU only)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default GPU 5, CPU 3)")
    parser.add_argument("--op-backend", default="auto", choices=("auto", "persistent", "cudnn", "reference"),
                        help="asr.ops backend of our network (default auto, as training)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="start no new row after this long; the rows left are listed as not run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here (rewritten after every row)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG beside the JSON")
    custom = parser.add_argument_group("the custom network")
    custom.add_argument("--cell", choices=("relu", "tanh"), default=None)
    custom.add_argument("--layers", type=int, default=None)
    custom.add_argument("--hidden", type=int, default=None)
    custom.add_argument("--unidirectional", action="store_true")
    custom.add_argument("--conv-channels", type=int, default=None)
    custom.add_argument("--time-stride", type=int, default=None)


def network_config(name: str, args: argparse.Namespace):
    from asr.errors import UserError
    from asr.model.deepspeech import DeepSpeechConfig

    if name in NETWORKS:
        return DeepSpeechConfig(**NETWORKS[name], backend=args.op_backend)
    if name != "custom":
        raise UserError(f"--networks: unknown {name!r} (choose from {', '.join(NETWORKS)}, custom)")
    pick = {key: getattr(args, key) if getattr(args, key) is not None else value
            for key, value in CUSTOM_DEFAULT.items()}
    c = pick["conv_channels"]
    return DeepSpeechConfig(conv_channels=(c, c), conv_kernels=((11, 11), (11, 5)),
                            conv_strides=((2, pick["time_stride"]), (2, 1)), rnn_cell=pick["cell"],
                            rnn_layers=pick["layers"], rnn_hidden=pick["hidden"],
                            bidirectional=not args.unidirectional, backend=args.op_backend)


def sweep_plan(args: argparse.Namespace, device_type: str) -> dict:
    """What to measure: explicit options win, else the device's defaults."""
    from asr.errors import UserError

    defaults = GPU_DEFAULT if device_type == "cuda" else CPU_DEFAULT
    custom_given = any(getattr(args, key) is not None for key in CUSTOM_DEFAULT) or args.unidirectional
    plan = dict(networks=args.networks or (("custom",) if custom_given else defaults["networks"]),
                batch=args.batch or defaults["batch"], seconds=args.seconds or defaults["seconds"],
                precision=args.precision or defaults["precision"], repeats=args.repeats or defaults["repeats"])
    bad = [p for p in plan["precision"] if p not in AUTOCAST]
    if bad:
        raise UserError(f"--precision: unknown {', '.join(bad)} (choose from {', '.join(AUTOCAST)})")
    if device_type == "cpu" and any(p != "fp32" for p in plan["precision"]):
        mixed = next(p for p in plan["precision"] if p != "fp32")
        raise UserError(f"--precision {mixed}: mixed precision is benchmarked on a GPU only")
    if min(plan["batch"]) < 1 or plan["repeats"] < 1 or plan["seconds"] <= 0:
        raise UserError("--batch, --repeats and --seconds must be positive")
    return plan


def _side(label: str, times: StepTimes | None, all_steps: list[float], backends: list[str], flop: dict,
          recurrent_flop: float, batch: int, error: str | None = None) -> dict:
    if times is None:
        return {"label": label, "error": error}
    return {"label": label, "backends": backends, "step_seconds": times.step, "forward_seconds": times.forward,
            "backward_seconds": times.backward, "optimizer_seconds": times.optimizer,
            "recurrent_seconds": times.recurrent, "rest_seconds": times.rest,
            "utterances_per_second": batch / times.step, "step_tflops": flop["step"] / times.step / 1e12,
            "recurrent_tflops": recurrent_flop / times.recurrent / 1e12 if times.recurrent > 0 else None,
            "recurrent_flop": recurrent_flop, "step_seconds_all": all_steps, "error": None}


def _labels(device_type: str) -> dict:
    if device_type == "cuda":
        return {"ours": "asr.ops", "torch_rnn": "cuDNN (torch.nn.RNN)"}
    return {"ours": "asr.ops (CPU)", "torch_rnn": "torch.nn.RNN (CPU)"}


def measure_row(nets: dict, config, name: str, precision: str, batch: int, frames: int, repeats: int,
                clock: Clock, labels: dict) -> dict:
    device = clock.device
    flop = step_flops(config, batch, frames)
    generator = torch.Generator().manual_seed(batch)
    features = torch.randn(batch, frames, config.n_mels, generator=generator).to(device)
    lengths = torch.full((batch,), frames, dtype=torch.long).to(device)
    label_count = max(1, flop["rnn_steps"] // TARGET_FRAMES_PER_LABEL)
    targets = torch.randint(1, config.vocab_size, (batch, label_count), generator=generator).to(device)
    target_lengths = torch.full((batch,), label_count, dtype=torch.long)
    row = {"network": name, "precision": precision, "batch": batch, "frames": frames, "rnn_steps": flop["rnn_steps"],
           "step_flop": flop["step"]}
    for side in SIDES:
        recurrent_flop = flop[f"{side}_recurrent"]
        try:
            times, all_steps, backends = time_steps(nets[side], features, lengths, targets, target_lengths, repeats,
                                                    precision, clock)
            row[side] = _side(labels[side], times, all_steps, backends, flop, recurrent_flop, batch)
        except (RuntimeError, MemoryError) as err:  # out of memory, or a backend that cannot run it
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row[side] = _side(labels[side], None, [], [], flop, recurrent_flop, batch,
                              error=str(err).strip().splitlines()[0][:300])
    ok = all(row[side].get("step_seconds") for side in SIDES)
    row["speedup"] = row["torch_rnn"]["step_seconds"] / row["ours"]["step_seconds"] if ok else None
    return row


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def run_sweep(args: argparse.Namespace, on_progress=None) -> dict:
    from asr.errors import UserError
    from asr.model.deepspeech import DeepSpeech

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: expected cpu or cuda")
    plan = sweep_plan(args, device.type)
    configs = {name: network_config(name, args) for name in plan["networks"]}
    if args.threads:
        torch.set_num_threads(args.threads)
    frames = int(round(plan["seconds"] * FRAMES_PER_SECOND))
    clock, labels = Clock(device), _labels(device.type)
    started = time.perf_counter()
    networks, rows = {}, []
    timing = ("CUDA events on the current stream, one synchronisation per step" if device.type == "cuda" else
              "wall clock (time.perf_counter) on the CPU: the CPU's time split, not a GPU's")

    def report(complete: bool) -> dict:
        result = {"command": invocation(), "device": device_description(device), "device_type": device.type,
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                  "platform": platform.processor() or platform.machine(), "timing": timing,
                  "flop_model": FLOP_MODEL, "seconds_per_utterance": plan["seconds"], "frames": frames,
                  "repeats": plan["repeats"], "warmup_steps": WARMUP_STEPS, "op_backend": args.op_backend,
                  "networks": networks, "rows": rows, "elapsed_seconds": time.perf_counter() - started,
                  "complete": complete}
        first = next((r for r in rows if r.get("speedup")), None)
        if first is not None:  # the headline row, in the keys earlier versions of this command wrote
            result.update(precision=first["precision"], batch=first["batch"],
                          config=networks[first["network"]]["config"],
                          max_abs_output_difference=networks[first["network"]]["max_abs_output_difference"],
                          ours_step_seconds=first["ours"]["step_seconds"],
                          torch_rnn_step_seconds=first["torch_rnn"]["step_seconds"],
                          speedup=first["speedup"], ours_backends=first["ours"]["backends"])
        return result

    print(f"asr bench train: {device_description(device)}; networks {','.join(plan['networks'])}; "
          f"batch {','.join(map(str, plan['batch']))}; {plan['seconds']:g} s utterances ({frames} frames); "
          f"{','.join(plan['precision'])}; {plan['repeats']} timed steps after {WARMUP_STEPS}; timing: {timing}",
          flush=True)
    for name, config in configs.items():
        torch.manual_seed(0)
        ours = DeepSpeech(config).to(device)
        theirs = torch_rnn_twin(ours)
        check_batch = min(plan["batch"])
        features = torch.randn(check_batch, frames, config.n_mels).to(device)
        lengths = torch.full((check_batch,), frames, dtype=torch.long).to(device)
        with torch.no_grad():
            ours.eval(), theirs.eval()
            difference = (ours(features, lengths)[0] - theirs(features, lengths)[0]).abs().max().item()
            ours.train(), theirs.train()
        networks[name] = {"config": config.to_dict(),
                          "parameters": {"ours": sum(p.numel() for p in ours.parameters()),
                                         "torch_rnn": sum(p.numel() for p in theirs.parameters())},
                          "parameter_names": [n for n, _ in ours.named_parameters()],
                          "parameter_sizes": [p.numel() for p in ours.parameters()],
                          "max_abs_output_difference": difference}
        nets = {"ours": ours, "torch_rnn": theirs}
        for precision in plan["precision"]:
            for batch in plan["batch"]:
                if args.budget_seconds is not None and time.perf_counter() - started > args.budget_seconds:
                    rows.append({"network": name, "precision": precision, "batch": batch, "frames": frames,
                                 "speedup": None, **{side: {"label": labels[side], "error":
                                                            f"not run: --budget-seconds {args.budget_seconds:g} spent"}
                                                     for side in SIDES}})
                    continue
                row = measure_row(nets, config, name, precision, batch, frames, plan["repeats"], clock, labels)
                rows.append(row)
                print("  " + row_line(row), flush=True)
                if on_progress is not None:
                    on_progress(report(complete=False))
        del ours, theirs, nets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report(complete=True)


def row_line(row: dict) -> str:
    parts = [f"{row['network']} {row['precision']} N={row['batch']}:"]
    for side in SIDES:
        r = row[side]
        if r.get("error"):
            parts.append(f"{r['label']} n/a ({r['error'][:60]})")
            continue
        backends = f" [{','.join(r['backends'])}]" if r["backends"] else ""
        parts.append(f"{r['label']}{backends} {1000 * r['step_seconds']:.1f} ms (rec {1000 * r['recurrent_seconds']:.1f}"
                     f" / rest {1000 * r['rest_seconds']:.1f} / opt {1000 * r['optimizer_seconds']:.1f}), "
                     f"{r['utterances_per_second']:.1f} utt/s, {r['step_tflops']:.3f} TFLOP/s")
    if row.get("speedup"):
        parts.append(f"ours {row['speedup']:.2f}x")
    return "  ".join(parts)


def print_table(result: dict, file=None) -> None:
    file = file or sys.stdout
    labels = {side: next((r[side]["label"] for r in result["rows"]), side) for side in SIDES}
    print(f"\n{result['device']}; {result['seconds_per_utterance']:g} s utterances; timing: {result['timing']}",
          file=file)
    header = (f"{'network':<9}{'prec':<5}{'N':>4} | " + " | ".join(
        f"{labels[side][:24]:<24} {'ms/step':>8} {'rec':>7} {'rest':>7} {'opt':>6} {'utt/s':>7} {'TF/s':>6} {'recTF':>6}"
        for side in SIDES) + " | speedup")
    print(header, file=file)
    for row in result["rows"]:
        cells = []
        for side in SIDES:
            r = row[side]
            if r.get("error"):
                cells.append(f"{'n/a: ' + r['error']:<84.84}")
                continue
            rec_tf = f"{r['recurrent_tflops']:.3f}" if r["recurrent_tflops"] else "-"
            cells.append(f"{','.join(r['backends']) or '':<24.24} {1000 * r['step_seconds']:>8.1f} "
                         f"{1000 * r['recurrent_seconds']:>7.1f} {1000 * r['rest_seconds']:>7.1f} "
                         f"{1000 * r['optimizer_seconds']:>6.1f} {r['utterances_per_second']:>7.1f} "
                         f"{r['step_tflops']:>6.3f} {rec_tf:>6}")
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        print(f"{row['network']:<9}{row['precision']:<5}{row['batch']:>4} | " + " | ".join(cells) + f" | {speedup}",
              file=file)
    print("ms: recurrent part (rec), rest of the network, optimizer (opt) of the median step; TF/s: the step's "
          "TFLOP/s; recTF: the recurrent part's (FLOP model in the JSON)", file=file)


def plot(result: dict, path: Path) -> str | None:
    """PNG: utterances/s and the recurrent share of the step vs batch; returns a message if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG"
    rows = [r for r in result["rows"] if any(r[side].get("step_seconds") for side in SIDES)]
    if not rows:
        return "no measured rows: skipped the PNG"
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    names = list(dict.fromkeys(r["network"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"ours": "-", "torch_rnn": "--"}
    figure, axes = plt.subplots(2, len(precisions), figsize=(6.5 * len(precisions), 8), squeeze=False)
    for col, precision in enumerate(precisions):
        for ci, name in enumerate(names):
            for side, style in styles.items():
                points = sorted((r["batch"], r[side]) for r in rows if r["precision"] == precision and
                                r["network"] == name and r[side].get("step_seconds"))
                if not points:
                    continue
                label = f"{name}, {points[0][1]['label']}"
                batches = [b for b, _ in points]
                axes[0][col].plot(batches, [s["utterances_per_second"] for _, s in points], style, marker="o",
                                  markersize=3, color=colors[ci % len(colors)], label=label)
                axes[1][col].plot(batches, [100 * s["recurrent_seconds"] / s["step_seconds"] for _, s in points],
                                  style, marker="o", markersize=3, color=colors[ci % len(colors)], label=label)
        for axis, ylabel in zip((axes[0][col], axes[1][col]), ("utterances / s", "recurrent part, % of the step")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("per-GPU batch (utterances)")
            axis.set_ylabel(ylabel)
            axis.grid(True, alpha=0.3)
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"{precision}: training step, {result['seconds_per_utterance']:g} s utterances")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"asr bench train: {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def run(args: argparse.Namespace) -> int:
    from asr.fileio import atomic_write_text

    def save(result: dict) -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")

    try:
        result = run_sweep(args, on_progress=save)
    except KeyboardInterrupt:
        if args.json and args.json.is_file():
            print(f"interrupted: {args.json} keeps the rows measured so far (\"complete\": false)", file=sys.stderr)
        raise
    save(result)
    print_table(result)
    for name, info in result["networks"].items():
        print(f"{name}: {info['parameters']['ours']:,} parameters; outputs of the two networks agree to "
              f"{info['max_abs_output_difference']:.1e} (fp32, eval mode)")
    if args.json:
        print(f"wrote {args.json}")
        if not args.no_plot:
            png = args.json.with_suffix(".png")
            print(plot(result, png) or f"wrote {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asr bench train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
