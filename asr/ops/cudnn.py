"""The `cudnn` backend: PyTorch's own RNN kernel (cuDNN on CUDA, ATen's native loop on CPU), the
path torch.nn.RNN takes, for comparison and as the fallback of `auto`.

cuDNN exposes no recurrence-only entry point, so u, viewed as (T, N, D*H), is fed as the layer
input, and W_ih of direction d is the slice of an identity that selects u[:, :, d] (no biases).
The result is the same recurrence, at the price of one extra GEMM over all timesteps per
direction (u @ I), which cuDNN batches across time. Ragged batches go through packed sequences
(their lengths are read on the host). Supports relu and tanh only, and lengths >= 1.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from asr.errors import UserError

SUPPORTED_ACTIVATIONS = ("relu", "tanh")

_identity_cache: dict[tuple, list[torch.Tensor]] = {}


def _input_selectors(D: int, H: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """W_ih of direction d: the rows d*H..(d+1)*H of the (D*H) identity, so that a layer input of
    u reshaped to (T, N, D*H) hands direction d exactly its own u[:, :, d]."""
    key = (D, H, dtype, device)
    if key not in _identity_cache:
        eye = torch.eye(D * H, dtype=dtype, device=device)  # (D*H, D*H)
        _identity_cache[key] = [eye[d * H:(d + 1) * H].contiguous() for d in range(D)]  # D x (H, D*H)
    return _identity_cache[key]


def unsupported_reason(activation: str, lengths: torch.Tensor | None) -> str | None:
    if activation not in SUPPORTED_ACTIVATIONS:
        return f"torch.nn.RNN has no {activation} activation (only {', '.join(SUPPORTED_ACTIVATIONS)})"
    return None


def recurrence_cudnn(u, w_hh, h0, lengths, activation, all_full_length: bool):
    """Canonical shapes in and out: u (T, N, D, H), w_hh (D, H, H), h0 (N, D, H), lengths (N,)."""
    reason = unsupported_reason(activation, lengths)
    if reason:
        raise UserError(f"recurrence: backend 'cudnn': {reason}")
    T, N, D, H = u.shape
    params = []
    for d, w_ih in enumerate(_input_selectors(D, H, u.dtype, u.device)):
        params += [w_ih, w_hh[d]]
    run = torch._VF.rnn_relu if activation == "relu" else torch._VF.rnn_tanh
    x = u.reshape(T, N, D * H)  # (T, N, D*H)
    hx = h0.transpose(0, 1).contiguous()  # (D, N, H)
    bidirectional = D == 2
    train = torch.is_grad_enabled()
    if all_full_length:
        y, h_n = run(x, hx, params, False, 1, 0.0, train, bidirectional, False)
    else:
        lengths_host = lengths.cpu()
        if int(lengths_host.min()) < 1:
            raise UserError("recurrence: backend 'cudnn' needs every length >= 1 (packed sequences)")
        packed = pack_padded_sequence(x, lengths_host, enforce_sorted=False)
        hx = hx.index_select(1, packed.sorted_indices)
        data, h_n = run(packed.data, packed.batch_sizes, hx, params, False, 1, 0.0, train, bidirectional)
        h_n = h_n.index_select(1, packed.unsorted_indices)
        y, _ = pad_packed_sequence(packed._replace(data=data), total_length=T)
    return y.reshape(T, N, D, H), h_n.transpose(0, 1)  # (T, N, D, H), (N, D, H)
