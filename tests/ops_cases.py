"""Shared helpers for the recurrent-op tests: torch.nn.RNN with copied weights as the ground truth,
and a per-sequence loop oracle for what nn.RNN cannot express (clipped ReLU, zero lengths)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from asr.ops import recurrence
from asr.ops.reference import activate


def make_rnn(input_size, hidden, activation, directions, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    rnn = torch.nn.RNN(input_size, hidden, nonlinearity=activation, bidirectional=directions == 2)
    return rnn.to(dtype)


def _direction_suffixes(directions):
    return ["", "_reverse"][:directions]


def rnn_reference(rnn, x, h0, lengths):
    """torch.nn.RNN on x (T, N, I), h0 (D, N, H), lengths (N,) or None -> y (T, N, D*H), h_n (D, N, H)."""
    T = x.shape[0]
    if lengths is None:
        return rnn(x, h0)
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    out, h_n = rnn(packed, h0)
    y, _ = pad_packed_sequence(out, total_length=T)
    return y, h_n


def op_from_rnn(rnn, x, h0, lengths, activation, backend, single_direction_api=True):
    """The same layer through `recurrence`: u = x W_ih^T + b_ih + b_hh, w_hh copied from rnn."""
    T, N, _ = x.shape
    D = 2 if rnn.bidirectional else 1
    H = rnn.hidden_size
    us = [
        F.linear(x, getattr(rnn, f"weight_ih_l0{s}"), getattr(rnn, f"bias_ih_l0{s}") + getattr(rnn, f"bias_hh_l0{s}"))
        for s in _direction_suffixes(D)
    ]
    w = [getattr(rnn, f"weight_hh_l0{s}") for s in _direction_suffixes(D)]
    if D == 1 and single_direction_api:
        y, h_last = recurrence(us[0], w[0], h0[0], lengths, activation, backend)  # (T, N, H), (N, H)
        return y, h_last.unsqueeze(0)
    u = torch.stack(us, dim=2)  # (T, N, D, H)
    y, h_last = recurrence(u, torch.stack(w), h0.transpose(0, 1), lengths, activation, backend)
    return y.reshape(T, N, D * H), h_last.transpose(0, 1)  # (T, N, D*H), (D, N, H)


def loop_oracle(u, w_hh, h0, lengths, activation):
    """Canonical shapes; one sequence and direction at a time, straight from the definition."""
    T, N, D, H = u.shape
    y = torch.zeros_like(u)
    h_last = torch.empty_like(h0)
    for n in range(N):
        L = int(lengths[n])
        for d in range(D):
            order = range(L) if d == 0 else reversed(range(L))
            h = h0[n, d]
            for t in order:
                h = activate(u[t, n, d] + w_hh[d] @ h, activation)
                y[t, n, d] = h
            h_last[n, d] = h
    return y, h_last


def random_problem(T, N, D, H, dtype=torch.float64, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    u = (torch.randn(T, N, D, H, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    w = (torch.randn(D, H, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).to(device)
    h0 = (torch.randn(N, D, H, generator=g, dtype=torch.float64) * 0.5).to(dtype).to(device)
    return u, w, h0


def grads(outputs, inputs, seed=1):
    """Gradients of a random linear functional of `outputs` wrt `inputs`."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)
