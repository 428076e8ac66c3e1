"""The C++ extension (CPU-only build here): ops register, the CPU implementation equals the
reference and torch.nn.RNN, gradcheck, opcheck, torch.compile, and backend selection."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr import cli
from asr.errors import UserError
from asr.ops import build, custom_op, dispatch, recurrence
from ops_cases import grads, make_rnn, op_from_rnn, random_problem, rnn_reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def extension():
    """The CPU-capable build, compiled once and cached under build/ops/."""
    return build.load("cpu")


@pytest.fixture
def fresh_decisions(monkeypatch):
    monkeypatch.setattr(dispatch, "_decisions", {})
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    monkeypatch.setattr(dispatch, "_failed_devices", {})


def test_ops_register(extension):
    ops = custom_op.ops()
    for name in custom_op.TENSOR_OPS + custom_op.QUERY_OPS:
        assert hasattr(ops, name), name
    assert ops.cuda_available() == (extension.variant == "cuda")
    if extension.variant == "cpu":
        supported, reason = ops.persistent_support(10, 4, 1, 64, "relu", torch.float32, 0)
        assert not supported and "CPU-only" in reason
        with pytest.raises(RuntimeError, match="CPU-only"):
            ops.measure_barrier(0, 0, 10)


@pytest.mark.parametrize("activation", ["relu", "clipped_relu", "tanh"])
@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("lengths", [None, [9, 0, 4, 1, 9]], ids=["full", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_op_matches_reference(extension, activation, directions, lengths, dtype):
    T, N, H = 9, 5, 6
    u, w, h0 = random_problem(T, N, directions, H, dtype=dtype, scale=10.0 if activation == "clipped_relu" else 1.0)
    lengths = None if lengths is None else torch.tensor(lengths)
    results = {}
    for backend in ("persistent", "reference"):
        inputs = [t.clone().requires_grad_() for t in (u, w, h0)]
        y, h_last = recurrence(*inputs, lengths, activation, backend)
        results[backend] = (y, h_last, *grads([y, h_last], inputs))
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, ours, oracle in zip(["y", "h_last", "du", "dw", "dh0"], results["persistent"], results["reference"]):
        torch.testing.assert_close(ours, oracle, **tolerance, msg=lambda m: f"{name}: {m}")
    if lengths is not None:
        assert (results["persistent"][0][4:, 2] == 0).all() and (results["persistent"][2][4:, 2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_gradient_over_many_row_chunks(extension, dtype):
    """dW is summed over T*N rows in chunks (256 rows here: 3 full chunks and a partial one): it must
    equal the per-step sum, and in float32 stay within 2x the oracle's rounding error."""
    T, N, D, H = 101, 8, 2, 16
    u, w, h0 = random_problem(T, N, D, H, dtype=torch.float64, scale=2.0)
    lengths = torch.tensor([101, 3, 57, 0, 88, 101, 1, 64])
    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(T, N, D, H, generator=g, dtype=torch.float64), torch.randn(N, D, H, generator=g, dtype=torch.float64)
    results = {}
    for name, backend, precision in [("exact", "reference", torch.float64), ("oracle", "reference", dtype),
                                     ("ours", "persistent", dtype)]:
        inputs = [t.to(precision).requires_grad_() for t in (u, w, h0)]
        y, h_last = recurrence(*inputs, lengths, "relu", backend)
        (dw,) = torch.autograd.grad([y, h_last], inputs[1], [dy.to(precision), dh.to(precision)])
        results[name] = dw.double()
    if dtype == torch.float64:
        torch.testing.assert_close(results["ours"], results["exact"], rtol=1e-12, atol=1e-12)
    else:
        scale = results["exact"].abs().max()
        error = {k: ((results[k] - results["exact"]).abs().max() / scale).item() for k in ("ours", "oracle")}
        assert error["ours"] <= 2 * error["oracle"] + 2 * torch.finfo(dtype).eps, error


@pytest.mark.parametrize("backend", ["reference", "persistent"])
def test_derivative_is_zero_exactly_on_the_kinks(extension, backend):
    """Pre-activations exactly 0 or 20 (float32 rounding lands on them in long runs) get act' = 0 in
    every backend: the kernels see only y, where x == 0 looks like x < 0 and x == 20 like x > 20."""
    u = torch.tensor([0.0, 20.0, 5.0, -1.0, 25.0]).view(1, 1, 1, 5)  # (T, N, D, H), W = 0, h0 = 0
    w, h0 = torch.zeros(1, 5, 5), torch.zeros(1, 1, 5)
    expected = {"clipped_relu": [0.0, 0.0, 1.0, 0.0, 0.0], "relu": [0.0, 1.0, 1.0, 0.0, 1.0]}
    for activation, mask in expected.items():
        inputs = [t.clone().requires_grad_() for t in (u, w, h0)]
        y, h_last = recurrence(*inputs, None, activation, backend)
        (du,) = torch.autograd.grad(y, inputs[0], torch.ones_like(y))
        assert du.flatten().tolist() == mask, activation
    y, _ = recurrence(u, w, h0, None, "clipped_relu", backend)
    assert y.flatten().tolist() == [0.0, 20.0, 5.0, 0.0, 20.0]


@pytest.mark.parametrize("backend", ["persistent", "cudnn"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("directions", [1, 2])
def test_backends_match_torch_rnn(extension, backend, activation, directions):
    T, N, I, H = 8, 4, 3, 5
    rnn = make_rnn(I, H, activation, directions)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(directions, N, H, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([8, 2, 5, 1])
    inputs = [x, h0, *rnn.parameters()]
    y_ref, h_ref = rnn_reference(rnn, x, h0, lengths)
    y_op, h_op = op_from_rnn(rnn, x, h0, lengths, activation, backend)
    torch.testing.assert_close(y_op, y_ref)
    torch.testing.assert_close(h_op, h_ref)
    for g_op, g_ref in zip(grads([y_op, h_op], inputs), grads([y_ref, h_ref], inputs)):
        torch.testing.assert_close(g_op, g_ref)


@pytest.mark.parametrize("activation", ["relu", "clipped_relu", "tanh"])
def test_cpu_op_gradcheck_float64(extension, activation):
    u, w, h0 = random_problem(5, 3, 2, 4, scale=8.0 if activation == "clipped_relu" else 1.0)
    lengths = torch.tensor([5, 2, 0])
    inputs = [t.requires_grad_() for t in (u, w, h0)]
    assert torch.autograd.gradcheck(lambda u, w, h0: recurrence(u, w, h0, lengths, activation, "persistent"), inputs)


def _opcheck_samples():
    samples = []
    for D, lengths in [(1, None), (2, [6, 3, 1]), (2, [0, 6, 2])]:
        u, w, h0 = random_problem(6, 3, D, 4)
        lengths = torch.full((3,), 6) if lengths is None else torch.tensor(lengths)
        samples.append((u.requires_grad_(), w.requires_grad_(), h0.requires_grad_(), lengths))
    return samples


@pytest.mark.parametrize("sample", range(3))
def test_opcheck(extension, sample):
    u, w, h0, lengths = _opcheck_samples()[sample]
    ops = custom_op.ops()
    torch.library.opcheck(ops.recurrence_forward, (u, w, h0, lengths, "tanh"))
    y, _ = ops.recurrence_forward(u.detach(), w.detach(), h0.detach(), lengths, "tanh")
    dy, dh_last = torch.randn_like(y), torch.randn_like(h0)
    torch.library.opcheck(ops.recurrence_backward_data, (w.detach(), y, dy, dh_last, lengths, "tanh"))
    torch.library.opcheck(ops.recurrence_backward_weight, (y, h0.detach(), torch.randn_like(y), lengths))


def test_torch_compile_fullgraph_with_autograd(extension):
    u, w, h0 = random_problem(6, 3, 2, 4)
    lengths = torch.tensor([6, 3, 1])

    def layer(u, w, h0):
        y, h_last = recurrence(u, w, h0, lengths, "relu", "auto")
        return y.sum() + h_last.square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_inputs = [t.clone().requires_grad_() for t in (u, w, h0)]
    compiled_inputs = [t.clone().requires_grad_() for t in (u, w, h0)]
    eager_loss, compiled_loss = layer(*eager_inputs), compiled(*compiled_inputs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(torch.autograd.grad(compiled_loss, compiled_inputs), torch.autograd.grad(eager_loss, eager_inputs)):
        torch.testing.assert_close(a, b)


def test_auto_picks_the_cpu_op(extension, fresh_decisions):
    assert dispatch.choose_backend("auto", "cpu", None, (5, 2, 1, 8), "relu", torch.float32) == "persistent"


def test_auto_falls_back_with_a_logged_reason(monkeypatch, fresh_decisions, caplog):
    def unavailable(variant=None, verbose=False):
        raise build.ExtensionUnavailable("no C++ compiler on this machine (simulated)")

    monkeypatch.setattr(build, "load", unavailable)
    u, w, h0 = random_problem(5, 2, 1, 4)
    with caplog.at_level(logging.WARNING, logger="asr.ops.dispatch"):
        y, h_last = recurrence(u[:, :, 0], w[0], h0[:, 0], activation="relu")
        recurrence(u[:, :, 0], w[0], h0[:, 0], activation="relu")
        y_clip, _ = recurrence(u[:, :, 0], w[0], h0[:, 0], activation="clipped_relu")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("falls back to 'cudnn'" in m and "simulated" in m for m in messages) == 1  # logged once
    assert any("falls back to 'reference'" in m for m in messages)  # nn.RNN has no clipped ReLU
    y_ref, h_ref = recurrence(u[:, :, 0], w[0], h0[:, 0], activation="relu", backend="reference")
    torch.testing.assert_close(y, y_ref)
    with pytest.raises(UserError, match="simulated"):
        recurrence(u[:, :, 0], w[0], h0[:, 0], activation="relu", backend="persistent")


def test_cudnn_backend_rejects_clipped_relu():
    u, w, h0 = random_problem(3, 2, 1, 4)
    with pytest.raises(UserError, match="no clipped_relu"):
        recurrence(u, w, h0, activation="clipped_relu", backend="cudnn")


@pytest.mark.slow
def test_cuda_variant_builds_and_registers(tmp_path):
    """The CUDA build of binding + kernels compiles with this machine's nvcc and its ops register
    (no GPU needed to load it). One architecture, to keep the compile short."""
    if build.find_nvcc() is None:
        pytest.skip("no nvcc on this machine")
    if not list(build.CSRC_DIR.glob("prnn_*.cu")):
        pytest.skip("the CUDA kernels (csrc/prnn_*.cu) are not in the tree yet")
    # A build folder of its own: another current cuda build in build/ops (say one made by `asr ops build`
    # for the default architectures) would rightly be preferred by the later process below.
    builds = str(tmp_path / "ops")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("ASR_TEST_CUDA_ARCH_LIST", "9.0"),
               PYTHONPATH=str(REPO), ASR_OPS_VARIANT="cuda", ASR_OPS_BUILD_DIR=builds)
    result = subprocess.run([sys.executable, "-m", "asr.cli", "ops", "build", "--variant", "cuda"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "CUDA kernels: yes" in result.stdout and "recurrence_backward_data" in result.stdout
    # A later process with the CLI's environment (no arch list, no forced variant) that needs the op
    # for CPU tensors reuses this build instead of compiling anything.
    cli_env = _cli_environment(ASR_OPS_BUILD_DIR=builds)
    code = "from asr.ops import build; e = build.load('cpu'); print(e.variant, e.arch_list)"
    later = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env, capture_output=True, text=True,
                           timeout=300)
    assert later.returncode == 0, later.stderr[-3000:]
    assert later.stdout.split() == ["cuda", env["TORCH_CUDA_ARCH_LIST"]], later.stdout


def _cli_environment(**extra) -> dict:
    """The environment of a user's `asr` process: none of the variables the tests set for builds."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "ASR_OPS_VARIANT", "ASR_TEST_CUDA_ARCH_LIST", "PRNN_FAULT")}
    return dict(env, PYTHONPATH=str(REPO), **extra)


def _python(code: str, env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


# What test_cuda_variant_builds_and_registers leaves behind, minus the minutes of nvcc: the build
# directory for the tests' arch list, a library in it, and the stamp a finished build writes.
_FAKE_TEST_BUILD = ("from asr.ops import build; d = build.build_directory('cuda', build.cuda_arch_list()); "
                    "d.mkdir(parents=True); (d / 'asr_prnn_cuda.so').write_bytes(b''); "
                    "build.record_build(d, 'cuda', build.cuda_arch_list()); print(d)")
_CLI_CHOICE = "from asr.ops import build; print(build.cached_build(), build.variant_for('cpu'))"


def test_a_cuda_build_made_by_the_tests_is_recognised_by_a_cli_process(tmp_path):
    """The tests build the cuda variant for TORCH_CUDA_ARCH_LIST=9.0; a user's process (default arch
    list) must still find it for CPU work instead of compiling the kernels again."""
    if build.find_nvcc() is None:
        pytest.skip("no nvcc: no cuda build is ever taken")
    root = tmp_path / "ops"
    made = _python(_FAKE_TEST_BUILD, _cli_environment(ASR_OPS_BUILD_DIR=str(root), TORCH_CUDA_ARCH_LIST="9.0"))
    assert Path(made).parent == root
    assert _python(_CLI_CHOICE, _cli_environment(ASR_OPS_BUILD_DIR=str(root))) == "('cuda', '9.0') cuda"


def test_a_stale_cuda_build_is_not_taken_for_cpu_work(tmp_path):
    """A cuda build older than the sources would be recompiled by nvcc on load: a CPU-only request
    must take the quick CPU-only build instead."""
    if build.find_nvcc() is None:
        pytest.skip("no nvcc: no cuda build is ever taken")
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC_DIR, csrc, ignore=shutil.ignore_patterns("tests"))
    env = _cli_environment(ASR_OPS_BUILD_DIR=str(tmp_path / "ops"), ASR_CSRC_DIR=str(csrc))
    _python(_FAKE_TEST_BUILD, env)
    assert _python(_CLI_CHOICE, env) == f"('cuda', '{build.DEFAULT_CUDA_ARCH_LIST}') cuda"
    with open(csrc / "prnn_kernels.cuh", "a") as header:
        header.write("// edited after the build\n")
    assert _python(_CLI_CHOICE, env) == "None cpu"


def test_ops_build_variant_cpu_builds_the_cpu_variant(tmp_path, extension):
    """`asr ops build --variant cpu` with a current cuda build in the cache (and ASR_OPS_VARIANT=cuda)
    still builds and loads the CPU-only variant. The toolkit is a stub whose nvcc fails, so that
    taking the cuda variant would fail at once instead of compiling for minutes."""
    root = tmp_path / "ops"
    cpu_build = build.build_directory("cpu", None)
    if cpu_build.is_dir():  # this module's build, copied: ninja finds it up to date
        shutil.copytree(cpu_build, root / "cpu", symlinks=True)
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime_api.h").write_text("#error not a real toolkit\n")
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho 'stub nvcc' >&2\nexit 1\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    env = _cli_environment(ASR_OPS_BUILD_DIR=str(root), CUDA_HOME=str(toolkit), ASR_OPS_VARIANT="cuda")
    cuda_dir = _python(_FAKE_TEST_BUILD, env)
    assert json.loads((Path(cuda_dir) / build.BUILD_STAMP).read_text())["variant"] == "cuda"
    result = subprocess.run([sys.executable, "-m", "asr.cli", "ops", "build", "--variant", "cpu"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ok: cpu extension" in result.stdout and "CUDA kernels: no" in result.stdout, result.stdout


def test_ops_build_says_when_the_other_variant_is_already_loaded(extension, capsys):
    other = "cuda" if extension.variant == "cpu" else "cpu"
    assert cli.main(["ops", "build", "--variant", other]) == 2
    err = capsys.readouterr().err
    assert f"error: the {extension.variant} build of the extension" in err and "already loaded in this process" in err
    assert build.loaded() is extension


def test_no_cuda_runtime_notice_is_silenced():
    """Without a GPU driver, cpp_extension logs "No CUDA runtime is found" at import; once asr.ops
    is imported that notice no longer reaches the user's log (other cpp_extension warnings do)."""
    code = ("import asr.ops.build; from torch.utils import cpp_extension; "
            "cpp_extension.logger.warning('No CUDA runtime is found, using CUDA_HOME=%r', 'x'); "
            "cpp_extension.logger.warning('another cpp_extension warning')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "No CUDA runtime" not in result.stderr
    assert "another cpp_extension warning" in result.stderr
