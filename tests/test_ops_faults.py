"""Run-time failures of the persistent op, forced through PRNN_FAULT (csrc/prnn_fault.h), which the
extension itself reads: its CPU implementation fails exactly where and as the CUDA path would
(planner refusal, failed launch, grid-barrier timeout). Under backend "auto" a call must log one
warning naming the reason and return the fallback's result (equal to the reference, gradients
included); under "persistent" it must raise PersistentKernelError."""

import logging

import pytest
import torch

from asr.ops import PersistentKernelError, build, dispatch, recurrence
from ops_cases import grads, random_problem

FAULTS = ("plan", "launch", "timeout")
STATUS = {"plan": "PRNN_STATUS_NOT_SUPPORTED", "launch": "PRNN_STATUS_CUDA_ERROR", "timeout": "PRNN_STATUS_TIMEOUT"}


@pytest.fixture(scope="module")
def extension():
    try:
        return build.load("cpu")
    except build.ExtensionUnavailable as err:
        pytest.skip(f"the extension cannot be built here: {err}")


@pytest.fixture
def fresh_decisions(monkeypatch):
    """Backend decisions and logged fallbacks are per process; each test starts from none."""
    monkeypatch.setattr(dispatch, "_decisions", {})
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    monkeypatch.setattr(dispatch, "_failed_devices", {})


def _problem():
    u, w, h0 = random_problem(6, 3, 2, 5)
    return u, w, h0, torch.tensor([6, 2, 4])


def _run(backend, activation, u, w, h0, lengths):
    """y, h_last and the gradients wrt u, w, h0 of one call."""
    inputs = [t.clone().requires_grad_() for t in (u, w, h0)]
    y, h_last = recurrence(*inputs, lengths, activation, backend)
    return (y, h_last, *grads([y, h_last], inputs))


def _auto_decision(activation):
    """What backend "auto" now runs _problem() with (dispatch's cache key for it)."""
    return dispatch._decisions.get(("auto", "cpu", None, (6, 3, 2, 5), activation, torch.float64))


def _fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "asr.ops.dispatch" and r.levelno == logging.WARNING and "falls back" in r.getMessage()]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("activation, fallback", [("tanh", "cudnn"), ("clipped_relu", "reference")])
def test_auto_falls_back_at_run_time_with_one_warning(extension, fresh_decisions, monkeypatch, caplog, fault,
                                                      activation, fallback):
    u, w, h0, lengths = _problem()
    expected = _run("reference", activation, u, w, h0, lengths)
    monkeypatch.setenv("PRNN_FAULT", fault)
    with caplog.at_level(logging.WARNING, logger="asr.ops.dispatch"):
        first = _run("auto", activation, u, w, h0, lengths)
        second = _run("auto", activation, u, w, h0, lengths)
    for got in (first, second):
        for name, ours, oracle in zip(["y", "h_last", "du", "dw", "dh0"], got, expected):
            torch.testing.assert_close(ours, oracle, msg=lambda m: f"{name}: {m}")
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"falls back to {fallback!r}" in warnings[0] and "failed at run time" in warnings[0]
    assert STATUS[fault] in warnings[0] and f"PRNN_FAULT={fault}" in warnings[0]
    assert _auto_decision(activation) == fallback


@pytest.mark.parametrize("fault", FAULTS)
def test_persistent_raises_a_clear_error(extension, fresh_decisions, monkeypatch, fault):
    u, w, h0, lengths = _problem()
    monkeypatch.setenv("PRNN_FAULT", fault)
    with pytest.raises(PersistentKernelError, match=f"backend 'persistent' failed at run time: .*{STATUS[fault]}"):
        recurrence(u, w, h0, lengths, "tanh", "persistent")
    assert dispatch.backends_used() == ["persistent"]  # no fallback was taken or recorded
    assert _auto_decision("tanh") is None


@pytest.mark.parametrize("fault", ["launch:backward", "timeout:backward"])
def test_auto_backward_falls_back_when_only_the_backward_kernel_fails(extension, fresh_decisions, monkeypatch,
                                                                       caplog, fault):
    """The forward ran on the persistent op; its backward fails and computes the gradients from y in
    plain PyTorch instead, and later calls of the problem take the fallback from the start."""
    u, w, h0, lengths = _problem()
    expected = _run("reference", "relu", u, w, h0, lengths)
    monkeypatch.setenv("PRNN_FAULT", fault)
    with caplog.at_level(logging.WARNING, logger="asr.ops.dispatch"):
        first = _run("auto", "relu", u, w, h0, lengths)
        assert _auto_decision("relu") == "cudnn"
        second = _run("auto", "relu", u, w, h0, lengths)
    for got in (first, second):
        for name, ours, oracle in zip(["y", "h_last", "du", "dw", "dh0"], got, expected):
            torch.testing.assert_close(ours, oracle, msg=lambda m: f"{name}: {m}")
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 1 and "recurrence_backward_data" in warnings[0] and fault in warnings[0], warnings


def test_persistent_backward_failure_raises(extension, fresh_decisions, monkeypatch):
    u, w, h0, lengths = _problem()
    monkeypatch.setenv("PRNN_FAULT", "timeout:backward")
    inputs = [t.clone().requires_grad_() for t in (u, w, h0)]
    y, h_last = recurrence(*inputs, lengths, "tanh", "persistent")  # the forward kernel is fine
    with pytest.raises(PersistentKernelError, match="failed in backward.*PRNN_STATUS_TIMEOUT"):
        torch.autograd.grad(y.sum() + h_last.sum(), inputs)


def test_forward_only_fault_leaves_backward_alone(extension, fresh_decisions, monkeypatch):
    """PRNN_FAULT=...:forward fails the forward pass only: the backward op runs normally."""
    u, w, h0, lengths = _problem()
    y, _ = recurrence(u, w, h0, lengths, "tanh", "reference")
    monkeypatch.setenv("PRNN_FAULT", "launch:forward")
    du, dh0 = torch.ops.asr_prnn.recurrence_backward_data(w, y.detach(), torch.ones_like(y), torch.zeros_like(h0),
                                                          lengths, "tanh")
    assert du.shape == y.shape and torch.isfinite(du).all()
    with pytest.raises(RuntimeError, match="PRNN_STATUS_CUDA_ERROR"):
        torch.ops.asr_prnn.recurrence_forward(u, w, h0, lengths, "tanh")


def test_unknown_fault_is_refused(extension, fresh_decisions, monkeypatch):
    u, w, h0, lengths = _problem()
    monkeypatch.setenv("PRNN_FAULT", "segfault")
    with pytest.raises(RuntimeError, match="PRNN_FAULT=segfault: PRNN_FAULT must be plan, launch or timeout"):
        recurrence(u, w, h0, lengths, "tanh", "persistent")


def test_fault_is_read_per_call(extension, fresh_decisions, monkeypatch):
    """Unset again, the same process runs the persistent op normally (the C++ side caches nothing)."""
    u, w, h0, lengths = _problem()
    monkeypatch.setenv("PRNN_FAULT", "launch")
    with pytest.raises(PersistentKernelError):
        recurrence(u, w, h0, lengths, "tanh", "persistent")
    monkeypatch.delenv("PRNN_FAULT")
    y, _ = recurrence(u, w, h0, lengths, "tanh", "persistent")
    y_ref, _ = recurrence(u, w, h0, lengths, "tanh", "reference")
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("activation", ["relu", "clipped_relu", "tanh"])
def test_backward_from_output_matches_the_op(extension, activation):
    """The plain-PyTorch backward the fallback uses equals the extension's backward-data op (float64,
    ragged lengths with a zero, both directions, a dh_last)."""
    from asr.ops.reference import backward_data_from_output

    u, w, h0 = random_problem(7, 4, 2, 5, scale=10.0 if activation == "clipped_relu" else 1.0)
    lengths = torch.tensor([7, 0, 3, 1])
    y, _ = recurrence(u, w, h0, lengths, activation, "reference")
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    dh_last = torch.randn(h0.shape, generator=g, dtype=h0.dtype)
    ours = backward_data_from_output(w, y, dy, dh_last, lengths, activation)
    op = torch.ops.asr_prnn.recurrence_backward_data(w, y, dy, dh_last, lengths, activation)
    for name, a, b in zip(["du", "dh0"], ours, op):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Asynchronous status checks (csrc/torch_binding.cpp, "Status checks"). The GPU side is in
# tests/test_ops_cuda.py; here: the env-var parsing, the slot bookkeeping driven on a simulated
# device, and what dispatch does with a late ("deferred") report.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_check_env(monkeypatch):
    monkeypatch.delenv("PRNN_SYNC_CHECK", raising=False)
    monkeypatch.delenv("PRNN_DEBUG", raising=False)


@pytest.mark.parametrize("env, mode", [({}, "async"), ({"PRNN_SYNC_CHECK": "0"}, "async"),
                                       ({"PRNN_SYNC_CHECK": "1"}, "sync"), ({"PRNN_DEBUG": "1"}, "sync"),
                                       ({"PRNN_SYNC_CHECK": "0", "PRNN_DEBUG": "1"}, "sync")])
def test_status_check_mode_follows_the_environment(extension, no_check_env, monkeypatch, env, mode):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert torch.ops.asr_prnn.status_check_mode() == mode


def test_unknown_sync_check_value_is_refused(extension, no_check_env, monkeypatch):
    monkeypatch.setenv("PRNN_SYNC_CHECK", "yes")
    with pytest.raises(RuntimeError, match="PRNN_SYNC_CHECK=yes: must be 1"):
        torch.ops.asr_prnn.status_check_mode()


def _simulate(capacity, script):
    return torch.ops.asr_prnn.simulate_status_checks(capacity, script).splitlines()


def test_a_timeout_is_reported_once_by_the_first_call_after_it_finished(extension):
    lines = _simulate(4, "Lrecurrence_forward Srecurrence_backward_data Lrecurrence_backward_data F1 D2 "
                         "Srecurrence_forward P Srecurrence_forward C")
    assert lines[:4] == ["Lrecurrence_forward:slot0#1", "S:ok", "Lrecurrence_backward_data:slot1#2", "F1"]
    report = lines[5]
    assert report.startswith("S:recurrence_forward: persistent kernel: PRNN_STATUS_TIMEOUT: deferred: launch #1 "
                             "(recurrence_forward on cuda:0, "), report
    assert "simulated timeout" in report and "later launch" not in report
    assert lines[6:] == ["P:0", "S:ok", "C:ok"]  # both settled, the failure reported once


def test_a_report_reads_as_a_deferred_kernel_failure(extension):
    from asr.ops.custom_op import is_deferred, kernel_failure_reason

    report = _simulate(2, "Lrecurrence_forward F1 Srecurrence_forward")[-1].removeprefix("S:")
    reason = kernel_failure_reason(RuntimeError(report))
    assert reason == report and is_deferred(reason)
    assert not is_deferred(kernel_failure_reason(RuntimeError("recurrence_forward: persistent kernel: "
                                                              "PRNN_STATUS_TIMEOUT: forward kernel: block 3 ...")))


def test_unfinished_launches_stay_pending_until_check_status_waits(extension):
    lines = _simulate(8, "La Lb Lc F3 Sd P W P")
    assert lines[3:] == ["F3", lines[4], "P:2", "W:ok", "P:0"]
    assert lines[4].startswith("S:d: persistent kernel: PRNN_STATUS_TIMEOUT: deferred: launch #3 (c on")


def test_several_failures_name_the_oldest(extension):
    lines = _simulate(8, "La Lb Lc F3 F2 D1 C")
    assert "deferred: launch #2 (b on" in lines[-1] and "(1 later launch(es) failed too)" in lines[-1], lines


def test_a_full_ring_waits_for_the_oldest_check(extension):
    """Every slot pending: the next call waits for the oldest launch (here it finishes ok), so its own
    launch gets a slot; a launch that still finds no slot (another thread took it) checks itself
    synchronously."""
    assert _simulate(2, "La Lb Sc Lc P") == ["La:slot0#1", "Lb:slot1#2", "S:ok", "Lc:slot0#3", "P:2"]
    assert _simulate(2, "La Lb Lc")[-1] == "Lc:sync"
    lines = _simulate(2, "La Lb F1 Sc")
    assert "deferred: launch #1 (a on" in lines[-1]


def test_check_status_on_the_cpu_build_has_nothing_pending(extension):
    assert torch.ops.asr_prnn.check_status(-1, True) == 0
    from asr.ops import check_status

    assert check_status(wait=True) == 0


class _LateReportingOps:
    """torch.ops.asr_prnn, except that the named ops raise the late report of an earlier failed
    launch, as the CUDA implementation does in asynchronous mode."""

    def __init__(self, real, failing):
        self._real, self._failing = real, set(failing)

    def __getattr__(self, name):
        if name not in self._failing:
            return getattr(self._real, name)

        def report(*args, **kwargs):
            script = f"Lrecurrence_forward F1 S{name}" if name != "check_status" else "Lrecurrence_forward F1 C"
            raise RuntimeError(self._real.simulate_status_checks(1, script).splitlines()[-1][2:])

        return report


@pytest.mark.parametrize("activation, fallback", [("tanh", "cudnn"), ("clipped_relu", "reference")])
def test_auto_raises_a_deferred_failure_and_falls_back_afterwards(extension, fresh_decisions, monkeypatch, caplog,
                                                                  activation, fallback):
    """A late report concerns an earlier call whose outputs were used: "auto" must not hide it behind
    a fallback result. It raises, and every problem on the device takes the fallback from then on."""
    from asr.ops import custom_op

    u, w, h0, lengths = _problem()
    expected = _run("reference", activation, u, w, h0, lengths)
    _run("auto", activation, u, w, h0, lengths)
    assert _auto_decision(activation) == "persistent"
    real = custom_op.ops()
    monkeypatch.setattr(custom_op, "ops", lambda: _LateReportingOps(real, ["recurrence_forward"]))
    with caplog.at_level(logging.WARNING, logger="asr.ops.dispatch"):
        with pytest.raises(PersistentKernelError, match="earlier persistent launch failed.*takes the fallback for "
                                                        "every problem on cpu.*PRNN_STATUS_TIMEOUT: deferred"):
            _run("auto", activation, u, w, h0, lengths)
        assert _auto_decision(activation) == fallback
        for name, ours, oracle in zip(["y", "h_last", "du", "dw", "dh0"], _run("auto", activation, u, w, h0, lengths),
                                      expected):
            torch.testing.assert_close(ours, oracle, msg=lambda m: f"{name}: {m}")
        other = random_problem(4, 2, 1, 3)  # a problem not decided yet, on the same device
        recurrence(*other, None, activation, "auto")
        assert dispatch._decisions[("auto", "cpu", None, (4, 2, 1, 3), activation, torch.float64)] == fallback
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 2 and "reported late" in warnings[0], warnings


def test_persistent_raises_a_deferred_failure(extension, fresh_decisions, monkeypatch):
    from asr.ops import custom_op

    u, w, h0, lengths = _problem()
    real = custom_op.ops()
    monkeypatch.setattr(custom_op, "ops", lambda: _LateReportingOps(real, ["recurrence_forward"]))
    with pytest.raises(PersistentKernelError, match="earlier persistent launch failed") as raised:
        recurrence(u, w, h0, lengths, "tanh", "persistent")
    assert "takes the fallback" not in str(raised.value)
    assert dispatch._failed_devices == {} and _auto_decision("tanh") is None


def test_auto_backward_does_not_compute_gradients_from_a_deferred_failure(extension, fresh_decisions, monkeypatch):
    """Reported at the backward call, the failure may be the forward's own: y is then garbage, and
    gradients computed from it in plain PyTorch would corrupt training silently. It raises."""
    from asr.ops import custom_op

    u, w, h0, lengths = _problem()
    inputs = [t.clone().requires_grad_() for t in (u, w, h0)]
    y, h_last = recurrence(*inputs, lengths, "relu", "auto")
    real = custom_op.ops()
    monkeypatch.setattr(custom_op, "ops", lambda: _LateReportingOps(real, ["recurrence_backward_data"]))
    with pytest.raises(PersistentKernelError, match="recurrence_backward_data: persistent kernel: "
                                                    "PRNN_STATUS_TIMEOUT: deferred: launch #1 \\(recurrence_forward"):
        torch.autograd.grad(y.sum() + h_last.sum(), inputs)
    assert _auto_decision("relu") == "cudnn"


def test_check_status_raises_a_deferred_failure(extension, fresh_decisions, monkeypatch):
    from asr.ops import check_status, custom_op

    real = custom_op.ops()
    monkeypatch.setattr(custom_op, "ops", lambda: _LateReportingOps(real, ["check_status"]))
    with pytest.raises(PersistentKernelError, match="every problem on cuda:0.*check_status: persistent kernel"):
        check_status(wait=True)
    assert list(dispatch._failed_devices) == [("cuda", 0)]
