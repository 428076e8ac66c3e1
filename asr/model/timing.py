"""Time spent in the recurrent op and the FLOPs it did, without synchronising the device per call.

On the CPU each call is timed with perf_counter; on CUDA with events recorded on the current stream,
read only when `seconds()` is asked (end of training). The backward pass is timed from the moment
the op's output gradient is ready to the moment its input gradient is, through tensor hooks, so the
op's backward kernels are counted without wrapping them.
"""

from __future__ import annotations

import time

import torch
from torch.nn.utils.rnn import PackedSequence

BACKWARD_FLOP_FACTOR = 2  # backward does two products per step (dh @ W_hh and the dW_hh update)


class OpTimer:
    def __init__(self):
        self.enabled = True
        self.flops = 0.0
        self._cpu_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _mark(self, device: torch.device):
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

    def run(self, fn, u: torch.Tensor, forward_flops: float):
        """Call fn(u) -> (y, h_last) (u, y tensors or PackedSequences), timing its forward and (if gradients flow) its backward."""
        if not self.enabled:
            return fn(u)
        u_data = u.data if isinstance(u, PackedSequence) else u
        device = u_data.device
        start = self._mark(device)
        y, h_last = fn(u)
        self._add(start, self._mark(device))
        self.flops += forward_flops
        y_data = y.data if isinstance(y, PackedSequence) else y
        if torch.is_grad_enabled() and y_data.requires_grad and u_data.requires_grad:
            backward_start = {}

            def output_grad_ready(grad):
                backward_start["t"] = self._mark(device)

            def input_grad_ready(grad):
                if "t" in backward_start:
                    self._add(backward_start.pop("t"), self._mark(device))
                    self.flops += BACKWARD_FLOP_FACTOR * forward_flops

            y_data.register_hook(output_grad_ready)
            u_data.register_hook(input_grad_ready)
        return y, h_last

    def seconds(self) -> float:
        """Total timed seconds; synchronises CUDA once to read the events."""
        if self._events:
            torch.cuda.synchronize()
            self._cpu_seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
            self._events.clear()
        return self._cpu_seconds

    def reset(self) -> None:
        self.seconds()
        self._cpu_seconds = 0.0
        self.flops = 0.0
