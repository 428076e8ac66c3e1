"""`recurrence(...)`: argument checking, canonical shapes, and the choice of backend.

Every backend sees canonical shapes: u (T, N, D, H), w_hh (D, H, H), h0 (N, D, H), lengths (N,)
int64. One-direction calls (u of rank 3) are lifted to D=1 here and squeezed back on return.

Run-time failures of the persistent op (its planner refuses at launch, the launch fails, a grid
barrier times out; see csrc/torch_binding.cpp): under "auto" the call logs one warning with the
reason, switches its problem to the fallback (cudnn, or reference for clipped_relu) for this and
every later call, and returns the fallback's result. A failure in the backward of a forward made
under "auto" does the same for the gradients (custom_op.backward_fallback). Under "persistent" both
raise PersistentKernelError. Compiled graphs (torch.compile) get no run-time fallback: they raise.

A grid-barrier timeout is, by default, reported late: at the next persistent call on the device or
at check_status() (csrc/torch_binding.cpp, "Status checks"; PRNN_SYNC_CHECK=1 reports it at the
call that caused it, and then it falls back as above). A late report is about an earlier call whose
outputs have been used since, so no fallback result can repair it: it raises PersistentKernelError
under every backend, and under "auto" every problem on that device takes its fallback from then on
(a caller that catches the error and redoes the step gets the fallback).
"""

from __future__ import annotations

import logging
import re

import torch

from asr.errors import UserError
from asr.ops import build, custom_op, selfcheck
from asr.ops.custom_op import PersistentKernelError, deferred_error, is_deferred, kernel_failure_reason
from asr.ops.cudnn import recurrence_cudnn, unsupported_reason as cudnn_unsupported_reason
from asr.ops.reference import ACTIVATIONS, recurrence_reference

BACKENDS = ("auto", "persistent", "cudnn", "reference")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

log = logging.getLogger(__name__)


def _canonical(u, w_hh, h0, lengths):
    """Check shapes/dtypes/devices and lift a one-direction call to D=1."""
    if not isinstance(u, torch.Tensor) or u.dim() not in (3, 4):
        raise UserError(f"recurrence: u must be a (T, N, H) or (T, N, D, H) tensor, got {_describe(u)}")
    single_direction = u.dim() == 3
    if single_direction:
        u = u.unsqueeze(2)  # (T, N, 1, H)
    T, N, D, H = u.shape
    if D not in (1, 2):
        raise UserError(f"recurrence: u has {D} directions, only 1 or 2 are supported")
    if u.dtype not in FLOAT_DTYPES:
        raise UserError(f"recurrence: u must be floating point, got {u.dtype}")
    expected_w = (H, H) if single_direction else (D, H, H)
    if not isinstance(w_hh, torch.Tensor) or tuple(w_hh.shape) != expected_w:
        raise UserError(f"recurrence: w_hh must have shape {expected_w} for u of shape "
                        f"{tuple(u.shape if not single_direction else u.squeeze(2).shape)}, got {_describe(w_hh)}")
    w_hh = w_hh.reshape(D, H, H)  # (D, H, H)
    if h0 is None:
        h0 = u.new_zeros(N, D, H)
    else:
        expected_h = (N, H) if single_direction else (N, D, H)
        if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != expected_h:
            raise UserError(f"recurrence: h0 must have shape {expected_h}, got {_describe(h0)}")
        h0 = h0.reshape(N, D, H)  # (N, D, H)
    for name, tensor in (("w_hh", w_hh), ("h0", h0)):
        if tensor.dtype != u.dtype or tensor.device != u.device:
            raise UserError(f"recurrence: {name} is {tensor.dtype} on {tensor.device}, "
                            f"u is {u.dtype} on {u.device}; they must match")
    if lengths is None:
        lengths = torch.full((N,), T, dtype=torch.long, device=u.device)
    else:
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != N:
            raise UserError(f"recurrence: lengths must be a ({N},) integer tensor, got {_describe(lengths)}")
        if lengths.dtype not in (torch.int64, torch.int32):
            raise UserError(f"recurrence: lengths must be int64 (or int32), got {lengths.dtype}")
        if lengths.device.type != "cpu" and lengths.device != u.device:
            raise UserError(f"recurrence: lengths on {lengths.device} but u on {u.device}")
        if lengths.device.type == "cpu" and N > 0 and not torch.compiler.is_compiling():
            # Checked only for host lengths: a device-side check would synchronise every call.
            low, high = int(lengths.min()), int(lengths.max())
            if low < 0 or high > T:
                raise UserError(f"recurrence: lengths must lie in [0, T={T}], got values in [{low}, {high}]")
        lengths = lengths.to(device=u.device, dtype=torch.long)
    return u, w_hh, h0, lengths, single_direction


_decisions: dict[tuple, str] = {}
_logged_fallbacks: set[str] = set()
_failed_devices: dict[tuple, str] = {}  # (device type, index) -> the deferred failure that switched it


def persistent_unavailable_reason(device_type: str, device_index: int | None, shape: tuple, activation: str,
                                  dtype: torch.dtype) -> str | None:
    """None if the extension op can run this problem; otherwise why not, in words."""
    if device_type not in ("cpu", "cuda"):
        return f"the extension has no implementation for {device_type} tensors"
    try:
        build.load(build.variant_for(device_type))
    except build.ExtensionUnavailable as err:
        return str(err)
    if device_type == "cpu":
        return None  # the CPU implementation covers every problem
    T, N, D, H = shape
    device = device_index if device_index is not None else torch.cuda.current_device()
    try:
        supported, reason = custom_op.ops().persistent_support(T, N, D, H, activation, dtype, device)
    except RuntimeError as err:  # the C API could not answer (a CUDA error): say so, do not crash
        return f"the support query failed: {err}"
    return None if supported else (reason or "the persistent kernel does not support this problem")


def _fallback_backend(activation: str) -> str:
    return "cudnn" if cudnn_unsupported_reason(activation, None) is None else "reference"


def _log_once(message: str) -> None:
    if message not in _logged_fallbacks:
        _logged_fallbacks.add(message)
        log.warning(message)


def fall_back_after_failure(key: tuple, reason: str) -> str:
    """An "auto" problem whose persistent op failed at run time: from now on it takes the fallback.
    Logs why (once per reason) and returns the fallback backend."""
    _, device_type, _, shape, activation, _ = key
    choice = _fallback_backend(activation)
    _decisions[key] = choice
    T, N, D, H = shape
    _log_once(f"recurrence: backend 'auto' falls back to {choice!r} ({device_type}, T={T} N={N} D={D} H={H}, "
              f"{activation}): the persistent op failed at run time: {reason}")
    return choice


def fall_back_device_after_deferred_failure(device_type: str, device_index: int | None, reason: str) -> None:
    """A persistent launch on this device failed and was reported late: every "auto" problem on the
    device, decided or not, takes its fallback from now on. Logs why once."""
    _failed_devices[(device_type, device_index)] = reason
    for key, choice in list(_decisions.items()):
        if key[0] == "auto" and key[1] == device_type and key[2] == device_index and choice == "persistent":
            _decisions[key] = _fallback_backend(key[4])
    where = device_type if device_index is None else f"{device_type}:{device_index}"
    _log_once(f"recurrence: backend 'auto' falls back for every problem on {where}: a persistent launch failed at "
              f"run time and was reported late: {reason}")


def check_status(device: torch.device | int | None = None, wait: bool = False) -> int:
    """Raise PersistentKernelError if a persistent launch (on `device`, default every device) has
    failed and not been reported yet; wait=True first waits for every launch enqueued so far (their
    status copies, not the whole stream), so that none is left unchecked. Returns how many launches
    are still unchecked. Cheap without wait; nothing to do if the extension is not loaded."""
    if build.loaded() is None:
        return 0
    index = -1 if device is None else (device if isinstance(device, int) else torch.device(device).index or 0)
    try:
        return int(custom_op.ops().check_status(index, wait))
    except RuntimeError as err:
        reason = kernel_failure_reason(err)
        if reason is None:
            raise
        found = re.search(r" on cuda:(\d+),", reason)  # the report names the failed launch's device
        failed = torch.device("cuda", int(found.group(1))) if found else None
        raise deferred_error(reason, failed) from err


def backends_used() -> list[str]:
    """The backends that calls in this process have resolved to so far (for run reports)."""
    return sorted(set(_decisions.values()))


@torch.compiler.assume_constant_result
def choose_backend(requested: str, device_type: str, device_index: int | None, shape: tuple, activation: str,
                   dtype: torch.dtype) -> str:
    """The backend that runs a call: "persistent" (the extension op: the persistent kernel on
    CUDA, its C++ loop on CPU), "cudnn" or "reference". "auto" takes the persistent op where it
    can run the problem and otherwise falls back, logging why once per reason. Decisions are
    cached per problem, and treated as constants under torch.compile."""
    key = (requested, device_type, device_index, shape, activation, dtype)
    if key in _decisions:
        return _decisions[key]
    if requested == "reference":
        choice = "reference"
    elif requested == "cudnn":
        reason = cudnn_unsupported_reason(activation, None)
        if reason:
            raise UserError(f"recurrence: backend 'cudnn': {reason}")
        choice = "cudnn"
    else:
        reason = persistent_unavailable_reason(device_type, device_index, shape, activation, dtype)
        if reason is None and requested == "auto" and (device_type, device_index) in _failed_devices:
            reason = f"an earlier persistent launch on this device failed: {_failed_devices[device_type, device_index]}"
        if reason is None and requested == "auto" and device_type == "cuda":
            reason = _first_use_check(device_index, shape, activation, dtype)
        if reason is None:
            choice = "persistent"
        elif requested == "persistent":
            raise UserError(f"recurrence: backend 'persistent' cannot run this call: {reason}")
        else:
            choice = _fallback_backend(activation)
            _log_once(f"recurrence: backend 'auto' falls back to {choice!r} ({device_type}): {reason}")
    _decisions[key] = choice
    return choice


def _first_use_check(device_index: int | None, shape: tuple, activation: str, dtype: torch.dtype) -> str | None:
    """None when "auto" may take the persistent op on CUDA (asr/ops/selfcheck.py: right on a small
    problem against float64, not slower than cuDNN on this shape), else why not."""
    if not selfcheck.enabled() or torch.compiler.is_compiling():
        return None
    T, N, D, H = shape
    device = torch.device("cuda", device_index if device_index is not None else torch.cuda.current_device())
    key = (device.index, dtype, H, D, activation, selfcheck.variant())  # once per kind, not per batch shape
    fallback = _fallback_backend(activation)

    def persistent(u, w):
        return custom_op.ops().recurrence_forward(u, w, u.new_zeros(u.shape[1], D, H),
                                                  torch.full((u.shape[1],), u.shape[0], dtype=torch.long, device=u.device),
                                                  activation)[0]

    def reference(u, w):
        return recurrence_reference(u, w, u.new_zeros(u.shape[1], D, H),
                                    torch.full((u.shape[1],), u.shape[0], dtype=torch.long, device=u.device),
                                    activation)[0]

    def cudnn(u, w):
        return recurrence_cudnn(u, w, u.new_zeros(u.shape[1], D, H),
                                torch.full((u.shape[1],), u.shape[0], dtype=torch.long, device=u.device), activation,
                                all_full_length=True)[0]

    verdict = selfcheck.check(key, shape, activation, dtype, device, persistent, reference,
                              cudnn if fallback == "cudnn" else None, fallback,
                              lambda: torch.cuda.synchronize(device))
    return None if verdict.use_persistent else verdict.reason


def _run_persistent(key, u, w_hh, h0, lengths, activation):
    if key[0] != "auto":
        return custom_op.ops().recurrence_forward(u, w_hh, h0, lengths, activation)
    with custom_op.backward_fallback(lambda reason: fall_back_after_failure(key, reason)):
        return custom_op.ops().recurrence_forward(u, w_hh, h0, lengths, activation)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def recurrence(
    u: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    activation: str = "relu",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = act(u_t + h_{t-1} @ w_hh.T) over all timesteps; torch.nn.RNN's semantics with b_hh
    folded into u.

    u: (T, N, H), or (T, N, D, H) with D=2 (direction 1 runs backwards within each length).
    w_hh: (H, H) or (D, H, H). h0: None (zeros) or (N, H) / (N, D, H).
    lengths: None (all T) or an int64 (N,) tensor on the CPU or u's device.
    Returns y (same shape as u, zero at t >= lengths[n]) and h_last ((N, H) / (N, D, H)), the last
    valid state of each sequence. Differentiable wrt u, w_hh and h0.

    backend: "persistent" is the compiled op of csrc/ (the persistent kernel for CUDA tensors, its
    C++ loop for CPU tensors); "cudnn" is torch.nn.RNN's kernel; "reference" the plain-PyTorch
    oracle; "auto" takes "persistent" where it can run the problem and otherwise falls back
    (cudnn, or reference for clipped_relu), logging why.
    """
    if activation not in ACTIVATIONS:
        raise UserError(f"recurrence: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if backend not in BACKENDS:
        raise UserError(f"recurrence: backend must be one of {BACKENDS}, got {backend!r}")
    full_length = lengths is None
    u4, w3, h03, lengths, single_direction = _canonical(u, w_hh, h0, lengths)
    key = (backend, u4.device.type, u4.device.index, tuple(u4.shape), activation, u4.dtype)
    chosen = choose_backend(*key)
    if chosen == "persistent":
        if torch.compiler.is_compiling():  # a graph has no run-time fallback (and no try/except to trace)
            y, h_last = custom_op.ops().recurrence_forward(u4, w3, h03, lengths, activation)
        else:
            try:
                y, h_last = _run_persistent(key, u4, w3, h03, lengths, activation)
            except RuntimeError as err:
                reason = kernel_failure_reason(err)
                if reason is None or isinstance(err, PersistentKernelError):
                    raise
                if is_deferred(reason):  # an earlier call's outputs, already used: no fallback result helps
                    raise deferred_error(reason, u4.device if backend == "auto" else None) from err
                if backend != "auto":
                    raise PersistentKernelError(f"recurrence: backend 'persistent' failed at run time: {reason}") from err
                chosen = fall_back_after_failure(key, reason)
    if chosen == "cudnn":
        y, h_last = recurrence_cudnn(u4, w3, h03, lengths, activation, all_full_length=full_length)
    elif chosen == "reference":
        y, h_last = recurrence_reference(u4, w3, h03, lengths, activation)
    if single_direction:
        return y.squeeze(2), h_last.squeeze(1)  # (T, N, H), (N, H)
    return y, h_last
