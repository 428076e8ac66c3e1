"""Time spent in the recurrent op during training, and the FLOPs it did: a Callback the trainer holds.

It hooks onto the network's recurrent modules (asr.model.deepspeech.Recurrence, or torch's GRU),
so the network carries nothing for it. Only training batches are timed, forward and backward. On the
CPU each call is timed with perf_counter; on CUDA with events recorded on the current stream, read
only when `seconds()` is asked (once per epoch), so no call synchronises the device. The backward
pass is timed from the moment the op's output gradient is ready to the moment its input gradient
is, through tensor hooks, so the op's backward kernels are counted without wrapping them. The
totals are kept in checkpoints: a resumed run reports the op time of the whole run.
"""

from __future__ import annotations

import time

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from asr.model.deepspeech import Recurrence

BACKWARD_FLOP_FACTOR = 2  # backward does two products per step (dh @ W_hh and the dW_hh update)


def forward_flops(module: nn.Module, inputs: tuple) -> float:
    """FLOPs of one forward call of a recurrent module, from its first input."""
    if isinstance(module, Recurrence):
        T, N, D, H = inputs[0].shape  # u (T, N, D, H)
        return 2.0 * T * N * D * H * H
    # torch GRU on a packed batch: the recurrent GEMMs (3 gates) and its input GEMM, over the padded T x N
    packed = inputs[0]
    T, N = len(packed.batch_sizes), int(packed.batch_sizes[0])
    D, H, C = 2 if module.bidirectional else 1, module.hidden_size, module.input_size
    return 2.0 * T * N * D * 3 * H * (H + C)


class OpTiming(Callback):
    def __init__(self):
        self.flops = 0.0
        self._cpu_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._active = False
        self._starts: dict[int, object] = {}
        self._handles: list = []

    # -- the clock --

    @staticmethod
    def _mark(device: torch.device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _add(self, start, end) -> None:
        if isinstance(start, float):
            self._cpu_seconds += end - start
        else:
            self._events.append((start, end))

    def seconds(self) -> float:
        """Total timed seconds; synchronises CUDA once to read the events."""
        if self._events:
            torch.cuda.synchronize()
            self._cpu_seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
            self._events.clear()
        return self._cpu_seconds

    # -- the hooks --

    def attach(self, net: nn.Module) -> None:
        """Hook every recurrent module of `net` (once)."""
        if self._handles:
            return
        for module in net.modules():
            if isinstance(module, (Recurrence, nn.GRU)):
                self._handles.append(module.register_forward_pre_hook(self._before))
                self._handles.append(module.register_forward_hook(self._after))

    def _before(self, module, inputs) -> None:
        if self._active:
            data = inputs[0].data if isinstance(inputs[0], PackedSequence) else inputs[0]
            self._starts[id(module)] = (self._mark(data.device), data)

    def _after(self, module, inputs, output) -> None:
        started = self._starts.pop(id(module), None)
        if started is None:
            return
        start, u = started
        device = u.device
        self._add(start, self._mark(device))
        flops = forward_flops(module, inputs)
        self.flops += flops
        y = output[0] if isinstance(output, tuple) else output
        y = y.data if isinstance(y, PackedSequence) else y
        if torch.is_grad_enabled() and y.requires_grad and u.requires_grad:
            backward_start = {}
            # The hooks must not hold u or y: a tensor whose own hook refers to it is a cycle through
            # autograd's C++ side that Python's collector cannot free (every step's graph would leak).

            def output_grad_ready(grad):
                backward_start["t"] = self._mark(device)

            def input_grad_ready(grad):
                if "t" in backward_start:
                    self._add(backward_start.pop("t"), self._mark(device))
                    self.flops += BACKWARD_FLOP_FACTOR * flops

            y.register_hook(output_grad_ready)
            u.register_hook(input_grad_ready)

    # -- the Callback --

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.attach(pl_module.net)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._active = False  # the batch's backward has run by now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds()  # folds CUDA events into seconds: one synchronisation per epoch, not per step

    def state_dict(self) -> dict:
        return {"seconds": self.seconds(), "flops": self.flops}

    def load_state_dict(self, state: dict) -> None:
        self._cpu_seconds, self.flops = float(state["seconds"]), float(state["flops"])
