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


def activation_grad_from_output(y: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(pre-activation) read from y = act(pre-activation), zero on the kinks (as the kernels do)."""
    if activation == "relu":
        return (y > 0).to(y.dtype)
    if activation == "clipped_relu":
        return ((y > 0) & (y < CLIP_CEILING)).to(y.dtype)
    if activation == "tanh":
        return 1 - y * y
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def backward_data_from_output(
    w_hh: torch.Tensor,
    y: torch.Tensor,
    dy: torch.Tensor,
    dh_last: torch.Tensor,
    lengths: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """du (T, N, D, H) and dh0 (N, D, H) from the forward output alone: the persistent op's
    backward-data (`recurrence_backward_data`) in plain PyTorch, which is what its autograd falls
    back to when that kernel fails under backend "auto" (u is not saved, so the oracle above cannot
    be re-run). Canonical shapes; lengths int64 on y's device."""
    T, N, D, H = y.shape
    lengths = lengths.to(device=y.device, dtype=torch.long)
    valid = (torch.arange(T, device=y.device).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(2)  # (T, N, 1)
    is_last = (torch.arange(T, device=y.device).unsqueeze(1) == (lengths - 1).unsqueeze(0)).unsqueeze(2)  # (T, N, 1)
    du = torch.zeros_like(y)
    dh0 = torch.empty_like(dh_last)
    for d in range(D):
        # Direction 1 is direction 0 on each sequence reversed within its length (an involution).
        index = reverse_within_lengths_index(lengths, T).unsqueeze(2).expand(T, N, H) if d == 1 else None  # (T, N, H)
        y_d, dy_d = y[:, :, d], dy[:, :, d]
        if index is not None:
            y_d, dy_d = torch.gather(y_d, 0, index), torch.gather(dy_d, 0, index)
        grad = activation_grad_from_output(y_d, activation) * valid  # (T, N, H), zero in the padding
        carry = torch.zeros_like(dh_last[:, d])  # dL/dh_t from step t+1, (N, H)
        steps = []
        for t in range(T - 1, -1, -1):
            dh = dy_d[t] + carry + is_last[t] * dh_last[:, d]
            du_t = dh * grad[t]
            steps.append(du_t)
            carry = du_t @ w_hh[d]  # h_t = act(u_t + h_{t-1} W^T)  =>  dL/dh_{t-1} += du_t W
        du_d = torch.stack(steps[::-1]) if steps else torch.zeros_like(y_d)  # (T, N, H)
        if index is not None:
            du_d = torch.gather(du_d, 0, index)
        du[:, :, d] = du_d
        empty = (lengths == 0).unsqueeze(1)  # (N, 1): never stepped, dh0 is dh_last itself
        dh0[:, d] = torch.where(empty, dh_last[:, d], carry)
    return du, dh0
