"""The persistent kernel through the PyTorch op, on a GPU (every test here is marked `cuda` and
skips itself without one): accuracy against a float64 reference bounded by 2x the error of the
same-precision PyTorch implementation, poisoned outputs, ragged batches in both directions,
torch.compile (also with dynamic shapes), opcheck, CUDA-graph capture replayed twice with new
inputs, 3,000 back-to-back launches compared with the first, N > 64, T = 1000, empty sequences,
fallback and the barrier benchmark. gpu_check runs this file twice: v1 and PRNN_VARIANT=v2."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from asr.errors import UserError
from asr.ops import PersistentKernelError, build, check_status, custom_op, dispatch, recurrence

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (hidden, batch, time_steps, directions, ragged, activation): hidden sizes include ones that are
# not a multiple of any tile; T from 1 to 500; batch from 1 to 64.
CASES = [
    (1, 1, 1, 1, False, "relu"),
    (17, 3, 37, 2, True, "tanh"),
    (100, 64, 120, 2, True, "clipped_relu"),
    (256, 8, 500, 1, False, "relu"),
    (513, 5, 50, 2, True, "relu"),
    (1152, 4, 100, 2, True, "relu"),
    (2048, 16, 30, 1, False, "tanh"),
    (300, 70, 20, 2, True, "relu"),    # N > 64
    (64, 3, 1000, 1, True, "tanh"),    # T >= 1000
]


@pytest.fixture(scope="module")
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    build.load("cuda")  # a build failure here is a test failure, not a skip
    return torch.device("cuda")


def _problem(H, N, T, D, ragged, activation, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 8.0 if activation == "clipped_relu" else 1.0
    u = torch.randn(T, N, D, H, generator=g, dtype=torch.float64) * scale
    w = torch.randn(D, H, H, generator=g, dtype=torch.float64) * (0.9 / H**0.5)
    h0 = torch.randn(N, D, H, generator=g, dtype=torch.float64) * 0.5
    lengths = torch.randint(0, T + 1, (N,), generator=g) if ragged else torch.full((N,), T)
    if ragged:
        lengths[0] = T
        if N > 2:
            lengths[1] = 0  # an empty sequence: h_last = h0, no output
    dy = torch.randn(T, N, D, H, generator=g, dtype=torch.float64)
    dh = torch.randn(N, D, H, generator=g, dtype=torch.float64)
    to = dict(device=device)
    return [t.to(dtype=dtype, **to) for t in (u, w, h0, dy, dh)] + [lengths.to(**to)]


def _poison_allocator(nbytes, device):
    """Fill freed caching-allocator memory with 0xFF bytes so that outputs the kernel fails to write
    show up: every 2 or 4 bytes of them is a NaN in fp16, bf16 and fp32 alike (a float32 NaN written
    as words would read as +0.0 in the low half of a 16-bit pair)."""
    block = torch.full((nbytes + 4096,), 255, dtype=torch.uint8, device=device)
    del block


def _run(backend, u, w, h0, dy, dh, lengths, activation):
    """Outputs and gradients of one call (upcast to float64 for comparison)."""
    inputs = [t.detach().clone().requires_grad_() for t in (u, w, h0)]
    _poison_allocator(u.numel() * u.element_size() * 4, u.device)
    y, h_last = recurrence(*inputs, lengths, activation, backend)
    _poison_allocator(u.numel() * u.element_size() * 4, u.device)
    du, dw, dh0 = torch.autograd.grad([y, h_last], inputs, [dy, dh])
    return [t.double() for t in (y, h_last, du, dw, dh0)]


def _relative_error(x, reference):
    return ((x - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "H{}-N{}-T{}-D{}-{}-{}".format(
    c[0], c[1], c[2], c[3], "ragged" if c[4] else "full", c[5]))
def test_kernel_error_within_twice_pytorch_same_precision(gpu, case, dtype_name):
    H, N, T, D, ragged, activation = case
    dtype = DTYPES[dtype_name]
    supported, reason = custom_op.ops().persistent_support(T, N, D, H, activation, dtype, gpu.index or 0)
    if not supported:
        pytest.skip(f"persistent kernel does not support this on {torch.cuda.get_device_name()}: {reason}")
    u, w, h0, dy, dh, lengths = _problem(H, N, T, D, ragged, activation, torch.float64, gpu)
    exact = _run("reference", u, w, h0, dy, dh, lengths, activation)
    low = [t.to(dtype) for t in (u, w, h0, dy, dh)]
    pytorch = _run("reference", *low, lengths, activation)
    ours = _run("persistent", *low, lengths, activation)
    floor = 2 * torch.finfo(dtype).eps  # below this both errors are rounding noise
    for name, o, p, e in zip(["y", "h_last", "du", "dw", "dh0"], ours, pytorch, exact):
        assert torch.isfinite(o).all(), f"{name}: non-finite values (unwritten output?)"
        err_ours, err_pytorch = _relative_error(o, e), _relative_error(p, e)
        assert err_ours <= 2 * err_pytorch + floor, (
            f"{name}: error {err_ours:.3g} vs same-precision PyTorch {err_pytorch:.3g}")
    y = ours[0]
    valid = torch.arange(T, device=gpu).unsqueeze(1) < lengths.unsqueeze(0)  # (T, N)
    assert (y[~valid] == 0).all() and (ours[2][~valid] == 0).all(), "padding must be exactly zero"


def test_compile_fullgraph(gpu):
    u, w, h0, dy, dh, lengths = _problem(64, 4, 20, 2, True, "relu", torch.float32, gpu)

    def layer(u, w, h0):
        y, h_last = recurrence(u, w, h0, lengths, "relu", "persistent")
        return (y * dy).sum() + (h_last * dh).sum()

    compiled = torch.compile(layer, fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (u, w, h0)]
    compiled_in = [t.clone().requires_grad_() for t in (u, w, h0)]
    eager, out = layer(*eager_in), compiled(*compiled_in)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out, compiled_in), torch.autograd.grad(eager, eager_in)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_cuda_graph_capture_forward_and_backward(gpu):
    u, w, h0, dy, dh, lengths = _problem(128, 8, 40, 2, True, "tanh", torch.float32, gpu)
    inputs = [t.clone().requires_grad_() for t in (u, w, h0)]

    def step():
        y, h_last = recurrence(*inputs, lengths, "tanh", "persistent")
        return (y, h_last, *torch.autograd.grad([y, h_last], inputs, [dy, dh]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in inputs:
        t.data.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(captured, eager)), "replay must see the new inputs"
    first = [t.clone() for t in captured]
    for t in inputs:  # a second replay with new inputs again
        t.data.mul_(-1.5)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step()):
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(captured, first)), "the second replay must see its inputs"


def test_compile_dynamic_shapes(gpu):
    def layer(u, w, lengths):
        y, h_last = recurrence(u, w, None, lengths, "relu", "persistent")
        return y.sum() + h_last.sum()

    compiled = torch.compile(layer, dynamic=True)
    for T, N in ((12, 3), (20, 5), (7, 9)):
        u, w, _, _, _, lengths = _problem(96, N, T, 2, True, "relu", torch.float32, gpu, seed=T)
        torch.testing.assert_close(compiled(u, w, lengths), layer(u, w, lengths), rtol=1e-5, atol=1e-4)


def test_opcheck_on_cuda(gpu):
    u, w, h0, _, _, lengths = _problem(40, 3, 6, 2, True, "tanh", torch.float32, gpu)
    torch.library.opcheck(custom_op.ops().recurrence_forward, (u, w, h0, lengths, "tanh"))


def test_thousands_of_launches_do_not_hang(gpu):
    """Run in a child process with a timeout, so a barrier that never opens fails the test instead
    of hanging the whole check."""
    script = textwrap.dedent("""
        import torch
        from asr.ops import recurrence
        torch.manual_seed(0)
        u = torch.randn(50, 8, 2, 256, device="cuda", requires_grad=True)
        w = (torch.randn(2, 256, 256, device="cuda") * 0.05).requires_grad_()
        first = None
        for i in range(3000):
            y, _ = recurrence(u, w, backend="persistent")
            if first is None:
                first = y.detach().clone()
                g_first = torch.autograd.grad(y.sum(), (u, w))
            elif i % 3 == 0:
                g = torch.autograd.grad(y.sum(), (u, w))
        torch.cuda.synchronize()
        # The same inputs, the same kernel: the last launch must give the first launch's outputs.
        assert torch.equal(y.detach(), first), float((y.detach() - first).abs().max())
        assert all(torch.equal(a, b) for a, b in zip(g, g_first))
        print("launches ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0 and "launches ok" in result.stdout, result.stderr[-3000:]


def test_unsupported_problem_falls_back_with_reason(gpu, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_decisions", {})
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    reason = dispatch.persistent_unavailable_reason("cuda", gpu.index or 0, (10, 4, 1, 32768), "relu", torch.float32)
    assert reason, "hidden 32768 fp32 (4 GiB of weights) cannot be kept on chip"
    assert dispatch.persistent_unavailable_reason("cuda", 0, (10, 4, 1, 64), "relu", torch.float64)
    u = torch.randn(5, 2, 64, device=gpu, dtype=torch.float64)
    w = torch.randn(64, 64, device=gpu, dtype=torch.float64) * 0.1
    y, _ = recurrence(u, w)  # auto: float64 is not a kernel dtype -> cudnn, logged
    torch.testing.assert_close(y, recurrence(u, w, backend="reference")[0])
    assert any("falls back to 'cudnn'" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="persistent"):
        recurrence(u, w, backend="persistent")


def test_cudnn_backend_matches_reference_on_gpu(gpu):
    u, w, h0, dy, dh, lengths = _problem(96, 6, 30, 2, True, "relu", torch.float64, gpu)
    ours = _run("cudnn", u, w, h0, dy, dh, lengths, "relu")
    exact = _run("reference", u, w, h0, dy, dh, lengths, "relu")
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b)


def test_barrier_microbenchmark(gpu):
    microseconds = custom_op.ops().measure_barrier(gpu.index or 0, 0, 2000)
    assert 0.0 < microseconds < 1000.0


@pytest.mark.parametrize("fault", ["timeout", "launch", "timeout:backward"])
def test_kernel_failure_under_auto_falls_back_on_gpu(gpu, monkeypatch, caplog, fault):
    """PRNN_FAULT on the real kernel: "timeout" makes one block skip the grid barriers, so the others
    give up after PRNN_BARRIER_TIMEOUT_MS instead of hanging; auto then logs one warning and returns
    cuDNN's result (gradients included); persistent raises; the context stays usable. PRNN_SYNC_CHECK=1:
    each call checks its own launch, so the timeout is raised by the call that caused it (by default
    it is reported late: test_timeout_is_reported_late_without_sync_check)."""
    monkeypatch.setattr(dispatch, "_decisions", {})
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    monkeypatch.setattr(dispatch, "_failed_devices", {})
    monkeypatch.setenv("PRNN_SYNC_CHECK", "1")
    assert custom_op.ops().status_check_mode() == "sync"
    u, w, h0, dy, dh, lengths = _problem(256, 4, 20, 2, True, "tanh", torch.float32, gpu)
    exact = _run("reference", *(t.double() if t.is_floating_point() else t for t in (u, w, h0, dy, dh, lengths)),
                 "tanh")
    monkeypatch.setenv("PRNN_FAULT", fault)
    monkeypatch.setenv("PRNN_BARRIER_TIMEOUT_MS", "200")
    with caplog.at_level("WARNING", logger="asr.ops.dispatch"):
        got = _run("auto", u, w, h0, dy, dh, lengths, "tanh")
    for a, b in zip(got, exact):
        assert _relative_error(a, b) < 1e-4
    warnings = [r.getMessage() for r in caplog.records if "failed at run time" in r.getMessage()]
    assert len(warnings) == 1 and "falls back to 'cudnn'" in warnings[0], warnings
    monkeypatch.setattr(dispatch, "_decisions", {})
    with pytest.raises(PersistentKernelError, match="PRNN_STATUS_(TIMEOUT|CUDA_ERROR)"):
        _run("persistent", u, w, h0, dy, dh, lengths, "tanh")
    monkeypatch.delenv("PRNN_FAULT")
    monkeypatch.setattr(dispatch, "_decisions", {})
    for a, b in zip(_run("persistent", u, w, h0, dy, dh, lengths, "tanh"), exact):
        assert _relative_error(a, b) < 1e-4


def test_timeout_is_reported_late_without_sync_check(gpu, monkeypatch):
    """The default, asynchronous status check: a timed-out launch returns (its outputs undefined), and
    the failure is raised, once, by the first persistent call on the device after the kernel has
    finished, or by check_status; under "auto" it raises too (no fallback result can repair outputs
    already used) and the device's problems switch to cuDNN."""
    if os.environ.get("PRNN_DEBUG") == "1":
        pytest.skip("PRNN_DEBUG=1 checks every launch synchronously")
    monkeypatch.delenv("PRNN_SYNC_CHECK", raising=False)
    monkeypatch.setattr(dispatch, "_decisions", {})
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    monkeypatch.setattr(dispatch, "_failed_devices", {})
    assert custom_op.ops().status_check_mode() == "async"
    u, w, h0, dy, dh, lengths = _problem(256, 4, 20, 2, True, "tanh", torch.float32, gpu)
    exact = _run("reference", *(t.double() if t.is_floating_point() else t for t in (u, w, h0, dy, dh, lengths)),
                 "tanh")
    assert check_status(wait=True) == 0  # nothing left over from earlier tests
    monkeypatch.setenv("PRNN_BARRIER_TIMEOUT_MS", "200")
    late = (r"PRNN_STATUS_TIMEOUT: deferred: launch #\d+ \(recurrence_forward on cuda:\d+, T=20 N=4 D=2 H=256 "
            r"Float tanh\) failed on the GPU after the call had returned: .*waited more than 200 ms at grid barrier")

    # 1. The next call reports it, then runs normally (the failure is reported once).
    monkeypatch.setenv("PRNN_FAULT", "timeout:forward")
    recurrence(u, w, h0, lengths, "tanh", "persistent")  # returns: the check is in flight
    torch.cuda.synchronize()  # the kernel has given up and its status copy has landed
    monkeypatch.delenv("PRNN_FAULT")
    with pytest.raises(PersistentKernelError, match="recurrence_forward: persistent kernel: " + late):
        recurrence(u, w, h0, lengths, "tanh", "persistent")
    for a, b in zip(_run("persistent", u, w, h0, dy, dh, lengths, "tanh"), exact):
        assert _relative_error(a, b) < 1e-4

    # 2. check_status(wait=True) reports it without synchronising anything else; nothing stays pending.
    monkeypatch.setenv("PRNN_FAULT", "timeout:forward")
    recurrence(u, w, h0, lengths, "tanh", "persistent")
    monkeypatch.delenv("PRNN_FAULT")
    with pytest.raises(PersistentKernelError, match="check_status: persistent kernel: " + late):
        check_status(wait=True)
    assert check_status(wait=True) == 0

    # 3. A timed-out backward kernel is reported the same way, naming recurrence_backward_data.
    monkeypatch.setenv("PRNN_FAULT", "timeout:backward")
    _run("persistent", u, w, h0, dy, dh, lengths, "tanh")
    monkeypatch.delenv("PRNN_FAULT")
    with pytest.raises(PersistentKernelError, match=r"deferred: launch #\d+ \(recurrence_backward_data on cuda"):
        check_status(wait=True)

    # 4. Under "auto": raised, not hidden behind a fallback result; later calls take cuDNN.
    monkeypatch.setenv("PRNN_FAULT", "timeout:forward")
    recurrence(u, w, h0, lengths, "tanh", "auto")
    torch.cuda.synchronize()
    monkeypatch.delenv("PRNN_FAULT")
    with pytest.raises(PersistentKernelError, match="takes the fallback for every problem on cuda"):
        recurrence(u, w, h0, lengths, "tanh", "auto")
    key = ("auto", "cuda", u.device.index, (20, 4, 2, 256), "tanh", torch.float32)
    assert dispatch._decisions[key] == "cudnn"
    for a, b in zip(_run("auto", u, w, h0, dy, dh, lengths, "tanh"), exact):
        assert _relative_error(a, b) < 1e-4
    assert check_status(wait=True) == 0
