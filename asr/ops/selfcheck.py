"""The first-use check behind backend "auto" on CUDA: a persistent kernel is used only after it has
been seen to be right and fast on this device.

The first time a (device, dtype, H, D, activation, kernel variant) is met in a process, before
"auto" commits to the persistent op:

1. correctness: the persistent op runs a small random problem of that shape class (T <= 16,
   N <= 8, the same H, D, dtype and activation) and is compared with the float64 reference on the
   same inputs; an error above the dtype's bound (TOLERANCE) means the kernel is wrong on this
   device: one warning with the numbers, and the fallback backend;
2. speed: where the fallback is cuDNN, both run the shape of the first call of that kind (forward,
   after one warm-up, median of TIMED_RUNS); if cuDNN is faster by more than SLOWER_MARGIN the
   fallback is used. Later calls of the kind, whatever their T and N, reuse the verdict (a training
   run meets a new T in nearly every batch).

The decision and its figures are logged once (INFO for the persistent op, WARNING for a fallback)
and cached for the process. ASR_AUTO_CHECK=0 skips the check (the support query alone decides, as
before); the check never runs for CPU tensors (the extension's CPU loop is tested in CI) or while
torch.compile traces. PRNN_VARIANT (v1, v2, auto) is part of the key because it changes the kernel.

The check code runs on CPU in tests with stand-in backends (tests/test_ops_selfcheck.py); on a GPU
it has not yet run (no GPU session since it was written).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("asr.ops.dispatch")

# max |y - y_float64| / max(1, max |y_float64|) a correct kernel stays under on the check problem:
# fp32 (FFMA in v1, 3xTF32 in v2) is about 1e-6 there; half types carry their state rounded (v2) or
# their outputs (v1) to 11 / 8 bits for up to 16 steps.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
TF32_TOLERANCE = 1e-2  # PRNN_V2_FP32=tf32: plain TF32 products (10-bit mantissa)
CHECK_STEPS, CHECK_BATCH = 16, 8
TIMED_RUNS = 3
SLOWER_MARGIN = 1.05  # cuDNN must be this much faster for "auto" to leave the persistent op


@dataclass(frozen=True)
class Verdict:
    use_persistent: bool
    reason: str  # the figures behind the decision, for the log and for run reports


_verdicts: dict[tuple, Verdict] = {}


def enabled() -> bool:
    value = os.environ.get("ASR_AUTO_CHECK", "1")
    if value not in ("0", "1"):
        from asr.errors import UserError

        raise UserError(f"ASR_AUTO_CHECK={value!r}: must be 0 or 1")
    return value == "1"


def variant() -> str:
    """The kernel the C API will run: PRNN_VARIANT, and for v2 / auto the exchange mode (PRNN_V2_MODE)."""
    name = os.environ.get("PRNN_VARIANT", "") or "v1"
    if name in ("v2", "auto"):
        name += "/" + (os.environ.get("PRNN_V2_MODE", "") or "auto")
    return name


def tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and variant().split("/")[0] in ("v2", "auto") and os.environ.get("PRNN_V2_FP32") == "tf32":
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def _median_seconds(run: Callable[[], object], synchronize: Callable[[], None]) -> float:
    run()
    synchronize()
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(key: tuple, shape: tuple, activation: str, dtype: torch.dtype, device: torch.device,
          persistent: Callable, reference: Callable, fallback: Callable | None, fallback_name: str,
          synchronize: Callable[[], None]) -> Verdict:
    """The verdict for `key` (computed once per process). persistent/reference/fallback(u, w) -> y on
    canonical shapes (T, N, D, H) / (D, H, H); reference is given float64 tensors. fallback None: no
    timing (the fallback is the slow reference, never faster)."""
    if key in _verdicts:
        return _verdicts[key]
    T, N, D, H = shape
    generator = torch.Generator(device="cpu").manual_seed(20261202)
    t, n = min(T, CHECK_STEPS), min(N, CHECK_BATCH)
    u = torch.randn(t, n, D, H, generator=generator)
    w = torch.randn(D, H, H, generator=generator) * (0.9 / math.sqrt(H))
    if activation == "clipped_relu":
        u = u * 8.0
    u_dev, w_dev = u.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    what = f"{device} {str(dtype).replace('torch.', '')} H={H} D={D} {activation}, kernel {variant()}"
    try:
        with torch.no_grad():
            got = persistent(u_dev, w_dev).double().cpu()
            want = reference(u_dev.double(), w_dev.double()).double().cpu()
    except RuntimeError as err:
        verdict = Verdict(False, f"the persistent op failed its first-use check on {what}: {str(err).splitlines()[0]}")
        return _decide(key, verdict, fallback_name)
    scale = max(1.0, float(want.abs().max()))
    error = float((got - want).abs().max()) / scale if got.shape == want.shape else math.inf
    bound = tolerance(dtype)
    if not error <= bound:  # also NaN
        verdict = Verdict(False, f"the persistent op gave a wrong result on its first-use check on {what}: error "
                                 f"{error:.3g} against float64 (bound {bound:g}, T={t} N={n})")
        return _decide(key, verdict, fallback_name)
    figures = f"first-use check on {what}: error {error:.2g} (bound {bound:g})"
    if fallback is not None:
        u_full = torch.randn(T, N, D, H, generator=generator).to(device=device, dtype=dtype)
        with torch.no_grad():
            ours = _median_seconds(lambda: persistent(u_full, w_dev), synchronize)
            theirs = _median_seconds(lambda: fallback(u_full, w_dev), synchronize)
        figures += (f"; T={T} N={N} forward {1e3 * ours:.3f} ms vs {fallback_name} {1e3 * theirs:.3f} ms "
                    f"(median of {TIMED_RUNS})")
        if theirs * SLOWER_MARGIN < ours:
            return _decide(key, Verdict(False, f"the persistent op is slower: {figures}"), fallback_name)
    return _decide(key, Verdict(True, figures), fallback_name)


def _decide(key: tuple, verdict: Verdict, fallback_name: str) -> Verdict:
    _verdicts[key] = verdict
    if verdict.use_persistent:
        log.info("recurrence: backend 'auto' uses the persistent op: %s", verdict.reason)
    else:
        log.warning("recurrence: backend 'auto' uses %r instead of the persistent op: %s", fallback_name, verdict.reason)
    return verdict


def verdicts() -> dict[tuple, Verdict]:
    """The decisions made so far (for run reports and tests)."""
    return dict(_verdicts)


def forget() -> None:
    """Drop every cached verdict (tests)."""
    _verdicts.clear()
