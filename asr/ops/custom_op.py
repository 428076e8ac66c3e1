"""The Python half of the `asr_prnn` custom ops whose schemas live in csrc/torch_binding.cpp:
fake (meta) implementations for torch.compile / FakeTensor, and autograd for the forward op.

Backward of recurrence_forward = recurrence_backward_data (the recurrence run backwards: a
persistent kernel on CUDA) followed by recurrence_backward_weight (dW_hh as batched GEMMs over all
timesteps: one in fp16/bf16; in fp32/fp64 one per chunk of rows, accumulated, to bound rounding).
Both are ops themselves, so a compiled graph sees them.

A run-time failure of the persistent path raises RuntimeError "<op>: persistent kernel:
PRNN_STATUS_<name>: ..." (csrc/torch_binding.cpp). When recurrence_backward_data fails so, the
backward falls back only if the forward ran under backend "auto" in eager mode (asr.ops.dispatch
sets that up with `backward_fallback`): it then computes du and dh0 from y in plain PyTorch
(asr.ops.reference.backward_data_from_output), after the callback has logged why and switched the
problem to the fallback backend for later calls. Otherwise (backend "persistent", or a compiled
graph) the failure is raised as PersistentKernelError.

A grid-barrier timeout is found on the GPU, after the launch: by default the CUDA implementation
checks asynchronously and reports it at the next persistent call on the device or at check_status
(csrc/torch_binding.cpp, "Status checks"), with ": deferred: " after the status. Such a failure is
about an earlier call whose outputs have been used since, so it is never answered with a fallback
result: it is raised as PersistentKernelError (and under "auto" the device's problems switch to the
fallback for later calls, asr.ops.dispatch.fall_back_device_after_deferred_failure).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch

from asr.errors import UserError

NAMESPACE = "asr_prnn"
TENSOR_OPS = ("recurrence_forward", "recurrence_backward_data", "recurrence_backward_weight")
QUERY_OPS = ("cuda_available", "persistent_support", "measure_barrier", "check_status", "status_check_mode",
             "simulate_status_checks")

KERNEL_FAILURE_MARKER = ": persistent kernel: PRNN_STATUS_"  # every run-time failure of the op carries it
DEFERRED_MARKER = ": deferred: "  # after the status: the failure is an earlier launch's, found late

_registered = False
_local = threading.local()  # .on_backward_failure: set around an eager "auto" forward call


class PersistentKernelError(UserError, RuntimeError):
    """The persistent op failed at run time (its planner refused, the launch failed, or a grid
    barrier timed out) where no fallback was allowed. A UserError so that the CLI prints one line;
    a RuntimeError for code that catches what torch ops raise."""


def kernel_failure_reason(err: BaseException) -> str | None:
    """The one-line reason if `err` is a run-time failure of the persistent path, else None."""
    text = str(err)
    if KERNEL_FAILURE_MARKER not in text:
        return None
    return text.strip().splitlines()[0]


def is_deferred(reason: str) -> bool:
    """Is this kernel_failure_reason the late report of an earlier launch (whose outputs were used)?"""
    return DEFERRED_MARKER in reason


def deferred_error(reason: str, device: torch.device | None) -> PersistentKernelError:
    """The error for a deferred failure; under "auto" (device given) the device's problems switch to
    the fallback for later calls."""
    message = ("recurrence: an earlier persistent launch failed on the GPU after its call had returned, so results "
               "computed since (this step's loss and gradients included) cannot be trusted")
    if device is not None:
        from asr.ops import dispatch

        dispatch.fall_back_device_after_deferred_failure(device.type, device.index, reason)
        message += f"; backend 'auto' takes the fallback for every problem on {device} from now on"
    return PersistentKernelError(f"{message}: {reason}")


@contextlib.contextmanager
def backward_fallback(on_failure: Callable[[str], None]):
    """Forward calls made inside let their backward fall back: on a kernel failure the backward
    calls on_failure(reason) and computes the gradients in plain PyTorch instead of raising."""
    previous = getattr(_local, "on_backward_failure", None)
    _local.on_backward_failure = on_failure
    try:
        yield
    finally:
        _local.on_backward_failure = previous


def _forward_fake(u, w_hh, h0, lengths, activation):
    return torch.empty_like(u), torch.empty_like(h0)  # y (T, N, D, H), h_last (N, D, H)


def _backward_data_fake(w_hh, y, dy, dh_last, lengths, activation):
    return torch.empty_like(y), torch.empty_like(dh_last)  # du (T, N, D, H), dh0 (N, D, H)


def _backward_weight_fake(y, h0, du, lengths):
    T, N, D, H = y.shape
    return y.new_empty(D, H, H)


def _setup_context(ctx, inputs, output):
    u, w_hh, h0, lengths, activation = inputs
    y, _ = output
    ctx.activation = activation
    ctx.on_backward_failure = getattr(_local, "on_backward_failure", None)
    ctx.save_for_backward(w_hh, h0, lengths, y)


def _backward(ctx, dy, dh_last):
    w_hh, h0, lengths, y = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    if dh_last is None:
        dh_last = torch.zeros_like(h0)
    op = ops()
    try:
        du, dh0 = op.recurrence_backward_data(w_hh, y, dy, dh_last, lengths, ctx.activation)
    except RuntimeError as err:
        reason = kernel_failure_reason(err)
        if reason is None:
            raise
        if is_deferred(reason):  # y itself may come from the failed launch: no gradients from it
            raise deferred_error(reason, y.device if ctx.on_backward_failure is not None else None) from err
        if ctx.on_backward_failure is None:
            raise PersistentKernelError("recurrence: the persistent op failed in backward (no fallback under backend "
                                        f"'persistent' or in a compiled graph): {reason}") from err
        ctx.on_backward_failure(reason)
        from asr.ops.reference import backward_data_from_output

        du, dh0 = backward_data_from_output(w_hh, y, dy, dh_last, lengths, ctx.activation)
    dw = op.recurrence_backward_weight(y, h0, du, lengths) if ctx.needs_input_grad[1] else None
    return du, dw, (dh0 if ctx.needs_input_grad[2] else None), None, None


def register_python_parts() -> None:
    """Called once, right after the extension library is loaded (the schemas must exist)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake(f"{NAMESPACE}::recurrence_forward")(_forward_fake)
    torch.library.register_fake(f"{NAMESPACE}::recurrence_backward_data")(_backward_data_fake)
    torch.library.register_fake(f"{NAMESPACE}::recurrence_backward_weight")(_backward_weight_fake)
    torch.library.register_autograd(f"{NAMESPACE}::recurrence_forward", _backward, setup_context=_setup_context)
    _registered = True


def ops():
    """torch.ops.asr_prnn (the extension must be loaded: asr.ops.build.load)."""
    return getattr(torch.ops, NAMESPACE)
