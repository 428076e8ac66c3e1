"""The Python half of the `asr_prnn` custom ops whose schemas live in csrc/torch_binding.cpp:
fake (meta) implementations for torch.compile / FakeTensor, and autograd for the forward op.

Backward of recurrence_forward = recurrence_backward_data (the recurrence run backwards: a
persistent kernel on CUDA) followed by recurrence_backward_weight (dW_hh as batched GEMMs over all
timesteps: one in fp16/bf16; in fp32/fp64 one per chunk of rows, accumulated, to bound rounding).
Both are ops themselves, so a compiled graph sees them.
"""

from __future__ import annotations

import torch

NAMESPACE = "asr_prnn"
TENSOR_OPS = ("recurrence_forward", "recurrence_backward_data", "recurrence_backward_weight")
QUERY_OPS = ("cuda_available", "persistent_support", "measure_barrier")

_registered = False


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
    ctx.save_for_backward(w_hh, h0, lengths, y)


def _backward(ctx, dy, dh_last):
    w_hh, h0, lengths, y = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    if dh_last is None:
        dh_last = torch.zeros_like(h0)
    ops = getattr(torch.ops, NAMESPACE)
    du, dh0 = ops.recurrence_backward_data(w_hh, y, dy, dh_last, lengths, ctx.activation)
    dw = ops.recurrence_backward_weight(y, h0, du, lengths) if ctx.needs_input_grad[1] else None
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
