"""backend "auto"'s first-use check (asr/ops/selfcheck.py), driven on CPU with stand-in backends: a
wrong kernel is refused with the error in the warning, a slower one loses to the fallback, a good
one is taken, and the verdict is computed once per key."""

import logging

import pytest
import torch

from asr.ops import selfcheck
from asr.ops.reference import recurrence_reference


def _reference(u, w):
    T, N, D, H = u.shape
    return recurrence_reference(u, w, u.new_zeros(N, D, H), torch.full((N,), T, dtype=torch.long), "tanh")[0]


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv("ASR_AUTO_CHECK", raising=False)
    monkeypatch.delenv("PRNN_VARIANT", raising=False)
    selfcheck.forget()
    yield
    selfcheck.forget()


def _check(persistent, fallback=None, dtype=torch.float32, key="k"):
    return selfcheck.check((key,), (40, 12, 2, 24), "tanh", dtype, torch.device("cpu"), persistent, _reference,
                           fallback, "cudnn", lambda: None)


def test_a_correct_kernel_is_taken_and_the_verdict_is_cached():
    calls = []

    def persistent(u, w):
        calls.append(tuple(u.shape))
        return _reference(u, w)

    verdict = _check(persistent)
    assert verdict.use_persistent, verdict.reason
    assert "error" in verdict.reason
    assert calls == [(16, 8, 2, 24)]  # the small check problem: T <= 16, N <= 8, same D and H
    assert _check(persistent).use_persistent and len(calls) == 1  # cached: not run again


def test_a_wrong_kernel_is_refused_with_its_error(caplog):
    def off_by_a_little(u, w):
        y = _reference(u, w)
        y[3, 1, 0, 5] += 0.01  # one element wrong by 1e-2: far above fp32's bound
        return y

    with caplog.at_level(logging.WARNING, logger="asr.ops.dispatch"):
        verdict = _check(off_by_a_little)
    assert not verdict.use_persistent
    assert "wrong result" in verdict.reason and "bound 0.0001" in verdict.reason
    assert any("instead of the persistent op" in r.message for r in caplog.records)


def test_nan_and_failures_are_refused():
    assert not _check(lambda u, w: _reference(u, w) * float("nan"), key="nan").use_persistent

    def raises(u, w):
        raise RuntimeError("recurrence_forward: persistent kernel: PRNN_STATUS_TIMEOUT: simulated")

    verdict = _check(raises, key="raises")
    assert not verdict.use_persistent and "PRNN_STATUS_TIMEOUT" in verdict.reason


def test_a_slower_kernel_loses_to_the_fallback_but_a_faster_one_wins():
    import time

    def slow(u, w):
        if u.shape[0] == 40:  # the timed runs use the caller's real shape
            time.sleep(0.02)
            return u
        return _reference(u, w)

    def fast_fallback(u, w):
        return u

    verdict = _check(slow, fast_fallback, key="slow")
    assert not verdict.use_persistent and "slower" in verdict.reason and "ms vs cudnn" in verdict.reason

    def fast(u, w):  # right on the check problem, instant on the timed one
        return _reference(u, w) if u.shape[0] != 40 else u

    def slow_fallback(u, w):
        time.sleep(0.02)
        return u

    assert _check(fast, slow_fallback, key="fast").use_persistent


def test_half_types_use_their_own_bounds():
    # bf16 carries 8 bits: an error of 1e-2 is within its bound, not fp32's
    def close(u, w):
        return _reference(u, w) + 1e-2

    assert _check(close, dtype=torch.bfloat16, key="bf16").use_persistent
    assert not _check(close, dtype=torch.float32, key="fp32").use_persistent


def test_the_switch_is_validated(monkeypatch):
    from asr.errors import UserError

    monkeypatch.setenv("ASR_AUTO_CHECK", "yes")
    with pytest.raises(UserError, match="ASR_AUTO_CHECK"):
        selfcheck.enabled()
    monkeypatch.setenv("ASR_AUTO_CHECK", "0")
    assert not selfcheck.enabled()
    monkeypatch.setenv("PRNN_VARIANT", "v2")
    monkeypatch.delenv("PRNN_V2_MODE", raising=False)
    assert selfcheck.variant() == "v2/auto"
    monkeypatch.setenv("PRNN_V2_MODE", "ring")  # another kernel: another first-use check
    assert selfcheck.variant() == "v2/ring"
    monkeypatch.setenv("PRNN_VARIANT", "v1")
    assert selfcheck.variant() == "v1"
