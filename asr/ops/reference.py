"""The recurrence in plain PyTorch: the oracle every other backend is tested against.

    h_t = act(u_t + h_{t-1} @ w_hh.T)

Written for clarity, not speed: one small matmul per timestep and direction, autograd does the
backward. Shapes here are always the canonical ones (see `asr.ops.dispatch`):
u (T, N, D, H), w_hh (D, H, H), h0 (N, D, H), lengths (N,) int64 on u's device.
Direction 0 runs forward in time; direction 1 runs backwards *within each sequence's own length*,
so for a sequence of length L it visits t = L-1, ..., 0 and its last state is the one at t = 0.
Outputs at t >= lengths[n] are zero; the state of a finished sequence is frozen (that is what
torch.nn.RNN does with packed sequences).

Derivatives at the kinks are zero: relu'(0) = 0 (as torch.relu and torch.nn.RNN), and clipped
relu' is 1 only strictly inside (0, 20). The other backends read act' from the output y alone, where
x == 0 and x < 0 (or x == 20 and x > 20) look the same; torch.clamp's own backward counts both
bounds as inside, so a pre-activation that lands exactly on a kink (it happens in float32) would
otherwise make the oracle and the kernels disagree on that step's gradient.
"""

from __future__ import annotations

import torch

CLIP_CEILING = 20.0  # clipped ReLU ceiling, as in Deep Speech 2

ACTIVATIONS = ("relu", "clipped_relu", "tanh")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "clipped_relu":
        # Forward is clamp(x) exactly; the gradient is the mask 0 < x < 20 (see the module docstring).
        inside = (x > 0) & (x < CLIP_CEILING)
        return torch.where(inside, x, torch.clamp(x, min=0.0, max=CLIP_CEILING).detach())
    if activation == "tanh":
        return torch.tanh(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def reverse_within_lengths_index(lengths: torch.Tensor, time_steps: int) -> torch.Tensor:
    """(T, N) time index that reverses each sequence inside its own length and leaves the padding
    in place. It is its own inverse, so the same gather maps inputs in and outputs back."""
    t = torch.arange(time_steps, device=lengths.device).unsqueeze(1)  # (T, 1)
    lengths = lengths.unsqueeze(0)  # (1, N)
    return torch.where(t < lengths, lengths - 1 - t, t)  # (T, N)


def _run_forward_in_time(
    u: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, valid: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction, forward in time. u (T, N, H), w_hh (H, H), h0 (N, H), valid (T, N) bool."""
    h = h0
    outputs = []
    for t in range(u.shape[0]):
        candidate = activate(u[t] + h @ w_hh.T, activation)  # (N, H)
        step_valid = valid[t].unsqueeze(1)  # (N, 1)
        h = torch.where(step_valid, candidate, h)
        outputs.append(torch.where(step_valid, candidate, torch.zeros_like(candidate)))
    y = torch.stack(outputs) if outputs else u.new_zeros(u.shape)  # (T, N, H)
    return y, h


def recurrence_reference(
    u: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor,
    lengths: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (T, N, D, H) and h_last (N, D, H) for canonical inputs; differentiable through autograd."""
    T, N, D, H = u.shape
    lengths = lengths.to(device=u.device, dtype=torch.long)
    valid = torch.arange(T, device=u.device).unsqueeze(1) < lengths.unsqueeze(0)  # (T, N)
    ys, h_lasts = [], []
    for d in range(D):
        u_d = u[:, :, d]  # (T, N, H)
        if d == 1:
            index = reverse_within_lengths_index(lengths, T).unsqueeze(2).expand(T, N, H)  # (T, N, H)
            u_d = torch.gather(u_d, 0, index)
        y_d, h_d = _run_forward_in_time(u_d, w_hh[d], h0[:, d], valid, activation)
        if d == 1:
            y_d = torch.gather(y_d, 0, index)
        ys.append(y_d)
        h_lasts.append(h_d)
    return torch.stack(ys, dim=2), torch.stack(h_lasts, dim=1)  # (T, N, D, H), (N, D, H)
