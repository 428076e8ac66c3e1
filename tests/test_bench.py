"""`asr bench train` and `asr bench rnn` on the CPU at toy sizes: the JSON they write (what
benchmarks/results/ holds) carries the command, the device, agreeing outputs and real timings."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import pytest

from asr import cli
from asr.bench import cudnn_algo, invocation, rnn
from asr.ops import dispatch

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_writes_a_complete_result(tmp_path, monkeypatch):
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--layers", "2", "--hidden", "24", "--conv-channels", "4", "--batch", "2",
            "--seconds", "0.5", "--repeats", "1", "--threads", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["asr", *argv])
    monkeypatch.setattr(dispatch, "_decisions", {})  # backend decisions are per process; start this one clean
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "asr " + " ".join(argv)
    assert result["device"] == "CPU, 1 threads" and result["precision"] == "fp32"
    assert result["config"]["rnn_hidden"] == 24 and result["config"]["rnn_layers"] == 2
    # The torch.nn.RNN twin carries our weights: same network, so the same outputs.
    assert result["max_abs_output_difference"] < 1e-4
    assert result["ours_step_seconds"] > 0 and result["torch_rnn_step_seconds"] > 0
    assert result["speedup"] == pytest.approx(result["torch_rnn_step_seconds"] / result["ours_step_seconds"])
    assert result["ours_backends"] == ["persistent"]  # the C++ CPU op, chosen by auto


def test_bench_train_refuses_mixed_precision_on_cpu(capsys):
    assert cli.main(["bench", "train", "--precision", "bf16"]) != 0
    assert "--precision bf16" in capsys.readouterr().err


def test_bench_rnn_quick_sweep_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "rnn.json"
    argv = ["bench", "rnn", "--device", "cpu", "--backends", "reference,persistent", "--hidden", "16",
            "--batch", "1,2", "--time-steps", "5", "--modes", "fwd", "--max-repeats", "2", "--out", str(out),
            "--no-plot"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/asr", *argv])
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["command"] == "asr " + " ".join(argv)
    assert report["device_type"] == "cpu" and report["time_steps"] == 5
    rows = {(r["backend"], r["batch"]) for r in report["results"]}
    assert rows == {(b, n) for b in ("reference", "persistent") for n in (1, 2)}
    assert all(r["us_per_step"] and r["us_per_step"] > 0 for r in report["results"])
    assert report["complete"] is True


def test_bench_rnn_on_cpu_labels_torch_rnn_for_what_it_is(tmp_path, monkeypatch, capsys):
    """On the CPU the "cudnn" backend is torch.nn.RNN's CPU loop; table and JSON must say so."""
    out = tmp_path / "rnn.json"
    argv = ["bench", "rnn", "--device", "cpu", "--backends", "cudnn,persistent", "--hidden", "8", "--batch", "1",
            "--time-steps", "3", "--modes", "fwd", "--max-repeats", "2", "--out", str(out), "--no-plot"]
    monkeypatch.setattr(sys, "argv", ["asr", *argv])
    assert cli.main(argv) == 0
    labels = {r["backend"]: r["label"] for r in json.loads(out.read_text())["results"]}
    assert labels == {"cudnn": "torch.nn.RNN (cpu)", "persistent": "persistent (C++ cpu loop)"}
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.startswith("backend"))
    rows = [line for line in table if line.startswith(("torch.nn.RNN", "persistent", "cudnn"))]
    assert "x nn.RNN" in header and "cuDNN" not in header
    assert len(rows) == 2 and not any(line.startswith("cudnn") for line in rows), table


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    rnn.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_rnn_defaults_to_a_small_set_on_cpu():
    """The GPU sweep (6 hidden sizes x 7 batches x 3 dtypes at T=200) takes hours on a CPU."""
    cpu = rnn.problem_set(_bench_args(), "cpu")
    assert cpu == dict(rnn.CPU_DEFAULT)
    assert len(cpu["hidden"]) * len(cpu["batch"]) <= 3 and cpu["time_steps"] <= 50
    gpu = rnn.problem_set(_bench_args(), "cuda")
    assert gpu == dict(hidden=rnn.HIDDEN_SIZES, batch=rnn.BATCH_SIZES, time_steps=rnn.TIME_STEPS, dtype=rnn.DTYPES)
    explicit = rnn.problem_set(_bench_args("--hidden", "1152", "--time-steps", "200"), "cpu")
    assert explicit["hidden"] == (1152,) and explicit["time_steps"] == 200  # explicit options win


def test_bench_rnn_interrupted_run_keeps_what_it_measured(tmp_path):
    """Ctrl-C mid-sweep: the JSON on disk holds the configurations measured so far."""
    out = tmp_path / "rnn.json"
    batches = ",".join(str(n) for n in range(1, 301))  # seconds of work: the interrupt lands mid-sweep
    cmd = [sys.executable, "-m", "asr.cli", "bench", "rnn", "--device", "cpu", "--backends", "reference",
           "--hidden", "32", "--batch", batches, "--time-steps", "200", "--modes", "fwd", "--max-repeats", "5",
           "--out", str(out), "--no-plot"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not out.exists():
            assert proc.poll() is None, "the sweep ended without writing anything before it finished"
            assert time.monotonic() < deadline, "nothing written after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert 1 <= len(report["results"]) < 300
    assert all(r["us_per_step"] > 0 for r in report["results"])
    assert "interrupted" in stderr and f"keeps the {len(report['results'])} measurements" in stderr


@pytest.mark.parametrize("argv0, expected", [
    ("/venv/bin/asr", "asr bench rnn --hidden '1 2'"),
    ("/repo/asr/cli.py", "asr bench rnn --hidden '1 2'"),
    ("/usr/bin/python3", "/usr/bin/python3 bench rnn --hidden '1 2'"),
])
def test_invocation_is_retypable(monkeypatch, argv0, expected):
    monkeypatch.setattr(sys, "argv", [argv0, "bench", "rnn", "--hidden", "1 2"])
    assert invocation() == expected


# ---- the cuDNN algorithm PyTorch requests (asr/bench/cudnn_algo.py) --------------------------------
# Expected answers read off PyTorch 2.11's aten/src/ATen/native/cudnn/RNN.cpp (get_algo,
# use_rnn_persist_small_h, use_persist_common_heuristics, use_persist_device_heuristics) and
# native/RNN.cpp (use_cudnn), one case or more per branch.
STD, PS, SMALL, NATIVE = (cudnn_algo.STANDARD, cudnn_algo.PERSIST_STATIC, cudnn_algo.PERSIST_STATIC_SMALL_H,
                          cudnn_algo.NOT_CUDNN)
H100, A100, A30, V100, T4, P100, M40 = (((9, 0), 132), ((8, 0), 108), ((8, 0), 56), ((7, 0), 80), ((7, 5), 40),
                                        ((6, 0), 56), ((5, 2), 24))
SM86_BIG, SM89_L4, SM89_4090 = ((8, 6), 112), ((8, 9), 58), ((8, 9), 128)
ALGO_CASES = [
    # (id, overrides of BASE_CASE, expected forward, expected backward, words the reason must contain)
    ("cudnn disabled", dict(cudnn_enabled=False), NATIVE, NATIVE, "enabled is False"),
    ("bf16 before cuDNN 9.13", dict(dtype="bfloat16", cudnn_version=91200), NATIVE, NATIVE, "9.13"),
    ("bf16 on sm_70", dict(dtype="bfloat16", device=V100), NATIVE, NATIVE, "sm_80+"),
    ("bf16 on cuDNN reaches STANDARD", dict(dtype="bfloat16", hidden=1152, input_size=1152), STD, STD,
     "float16 only"),
    ("bf16 small H", dict(dtype="bfloat16", hidden=256, input_size=256), SMALL, SMALL, "SMALL_H limit"),
    ("LSTM projections", dict(mode="lstm", hidden=128, input_size=128, proj_size=64), STD, STD, "proj_size 64"),
    ("packed input", dict(hidden=256, input_size=256, packed=True), STD, STD, "packed"),
    ("float64 small H", dict(dtype="float64", hidden=128, input_size=128), STD, STD, "float64"),
    ("relu H=384: forward only", dict(dtype="float32", hidden=384, input_size=384), SMALL, STD, "backward pass"),
    ("tanh H=256: both", dict(dtype="float32", hidden=256, input_size=256, mode="rnn_tanh"), SMALL, SMALL, "limit"),
    ("LSTM H=192: forward only", dict(dtype="float32", mode="lstm", hidden=192, input_size=192), SMALL, STD, "192"),
    ("LSTM H=128: both", dict(dtype="float32", mode="lstm", hidden=128, input_size=128), SMALL, SMALL, "128"),
    ("GRU H=128 fp16: both", dict(mode="gru", hidden=128, input_size=128), SMALL, SMALL, "gru"),
    ("no SMALL_H before sm_60", dict(hidden=256, input_size=256, device=M40), STD, STD, "sm_60+"),
    ("fp16 H=1024 N=8 H100", dict(batch=8), PS, PS, "multiples of 128"),
    ("fp16 H=1024 N=16 H100", dict(batch=16), PS, PS, "batch 16"),
    ("fp16 H=1024 N=32 H100", dict(batch=32), PS, PS, "batch 32"),
    ("fp16 H=1024 N=64 H100", dict(), PS, PS, "sm_90 with 132 SMs"),
    ("fp16 H=1024 N=64 A100", dict(device=A100), PS, PS, "sm_80"),
    ("fp16 H=1024 N=64 RTX 4090 (sm_89, 128 SMs)", dict(device=SM89_4090), PS, PS, "sm_89"),
    ("fp16 H=1024 N=96: large batch and H", dict(batch=96), STD, STD, "batch 96 >= 96"),
    ("fp16 H=768 N=96: H below 896", dict(batch=96, hidden=768, input_size=768), PS, PS, "hidden 768"),
    ("fp16 H=512 N=128", dict(batch=128, hidden=512, input_size=512), PS, PS, "batch 128"),
    ("fp16 N=136 > 128", dict(batch=136, hidden=512, input_size=512), STD, STD, "136 > 128"),
    ("fp16 N=12 not a multiple of 8", dict(batch=12), STD, STD, "not a multiple of 8"),
    ("fp16 H=1152 > 1024", dict(hidden=1152, input_size=1152), STD, STD, "1152 > 1024"),
    ("fp16 H=1000 not a multiple of 128", dict(hidden=1000, input_size=1024), STD, STD, "hidden 1000 not"),
    ("fp16 input 1000", dict(input_size=1000), STD, STD, "input size 1000"),
    ("fp16 two directions", dict(bidirectional=True, input_size=2048), STD, STD, "bidirectional"),
    ("fp16 two layers", dict(layers=2), STD, STD, "2 layers"),
    ("A30: too few SMs", dict(device=A30), STD, STD, "56 SMs (< 98)"),
    ("L4: too few SMs", dict(device=SM89_L4), STD, STD, "58 SMs"),
    ("sm_86 never", dict(device=SM86_BIG), STD, STD, "sm_86 never"),
    ("GRU never persistent", dict(mode="gru"), STD, STD, "GRU never"),
    ("LSTM N=96 H=1024 allowed", dict(mode="lstm", batch=96), PS, PS, "batch 96"),
    ("LSTM N=12", dict(mode="lstm", batch=12), STD, STD, "not a multiple of 8"),
    ("V100 N=64 T=200", dict(device=V100), PS, PS, "sm_70"),
    ("V100 N=80 excluded", dict(device=V100, batch=80), STD, STD, "other than 80 and 112"),
    ("V100 N=24 not 8 nor 16k", dict(device=V100, batch=24), STD, STD, "batch 24"),
    ("V100 N=8 T=10", dict(device=V100, batch=8, seq_length=10), PS, PS, "sm_70"),
    ("V100 N=64 T=15 too short", dict(device=V100, seq_length=15), STD, STD, "T 15 too short"),
    ("V100 N=96 T=20", dict(device=V100, batch=96, seq_length=20), PS, PS, "sm_70"),
    ("V100 N=128 T=30 too short", dict(device=V100, batch=128, seq_length=30), STD, STD, "T 30"),
    ("V100 N=128 T=40", dict(device=V100, batch=128, seq_length=40), PS, PS, "sm_70"),
    ("Turing never", dict(device=T4), STD, STD, "Turing"),
    ("Pascal never", dict(device=P100), STD, STD, "sm_60 never"),
]
BASE_CASE = dict(dtype="float16", batch=64, hidden=1024, input_size=1024, layers=1, bidirectional=False, device=H100,
                 cudnn_version=91900, seq_length=200, mode="rnn_relu", proj_size=0, packed=False, cudnn_enabled=True)


@pytest.mark.parametrize("case, overrides, forward, backward, words", ALGO_CASES, ids=[c[0] for c in ALGO_CASES])
def test_cudnn_algo_follows_pytorch_heuristic(case, overrides, forward, backward, words):
    args = {**BASE_CASE, **overrides}
    cc, sms = args.pop("device")
    choice = cudnn_algo.pytorch_rnn_algo(**args, compute_capability=cc, sm_count=sms)
    assert (choice.forward, choice.backward) == (forward, backward), choice.reason
    assert words in choice.reason, choice.reason


def test_cudnn_algo_cases_cover_every_outcome():
    outcomes = {(c[2], c[3]) for c in ALGO_CASES}
    assert {(NATIVE, NATIVE), (STD, STD), (PS, PS), (SMALL, SMALL), (SMALL, STD)} <= outcomes


@pytest.mark.parametrize("override, words", [
    (dict(dtype="float8"), "dtype must be one of"),
    (dict(mode="elman"), "mode must be one of"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(hidden=2.5), "hidden must be an integer >= 1"),
    (dict(seq_length=True), "seq_length must be an integer >= 1"),
    (dict(compute_capability="9.0"), "compute_capability must be a (major, minor) pair"),
    (dict(sm_count=-1), "sm_count must be an integer >= 1"),
    (dict(cudnn_version=9), "cudnn_version must be cuDNN's integer version"),
    (dict(proj_size=64), "proj_size is an LSTM option"),
    (dict(mode="lstm", proj_size=1024), "proj_size must be an integer in [0, hidden)"),
])
def test_cudnn_algo_bad_input_names_the_argument(override, words):
    args = {**BASE_CASE, "compute_capability": (9, 0), "sm_count": 132}
    args.pop("device")
    with pytest.raises(ValueError, match=re.escape(words)):
        cudnn_algo.pytorch_rnn_algo(**{**args, **override})


def test_algo_short_labels():
    same = cudnn_algo.AlgoChoice(PS, PS, "")
    split = cudnn_algo.AlgoChoice(SMALL, STD, "")
    assert same.short() == "PERSIST_STATIC" and split.short() == "fwd PERSIST_STATIC_SMALL_H / bwd STANDARD"
    assert split.short("forward") == "PERSIST_STATIC_SMALL_H"
    assert cudnn_algo.AlgoChoice(NATIVE, NATIVE, "").short() == "native"


def test_bench_cudnn_rows_name_the_algorithm(monkeypatch, capsys):
    """A cuDNN row on an H100 (device properties faked, nothing touches CUDA): fields, JSON, table."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(major=9, minor=0, multi_processor_count=132))
    monkeypatch.setattr(rnn, "cudnn_compile_version", lambda: 91900)
    device = torch.device("cuda", 0)
    fwd = rnn.cudnn_algo_fields("fwd", "float16", 1024, 64, 200, 1, "relu", device)
    assert fwd == dict(cudnn_algo_forward=PS, cudnn_algo_backward=None, cudnn_algo_reason=fwd["cudnn_algo_reason"])
    both = rnn.cudnn_algo_fields("fwdbwd", "float32", 384, 4, 200, 1, "relu", device)
    assert (both["cudnn_algo_forward"], both["cudnn_algo_backward"]) == (SMALL, STD)
    two_dirs = rnn.cudnn_algo_fields("fwd", "float16", 1024, 64, 200, 2, "relu", device)  # input is (T, N, 2H)
    assert two_dirs["cudnn_algo_forward"] == STD and "bidirectional" in two_dirs["cudnn_algo_reason"]
    assert rnn.cudnn_algo_fields("fwd", "float16", 1024, 64, 200, 1, "relu", torch.device("cpu")) == {}

    rows = [rnn.Measurement("cudnn", "fwd", "float16", 1024, 64, 200, 1, 10.0, 1.0, 5, **fwd),
            rnn.Measurement("cudnn", "fwdbwd", "float32", 384, 4, 200, 1, 20.0, 1.0, 5, **both),
            rnn.Measurement("persistent", "fwd", "float16", 1024, 64, 200, 1, 5.0, 2.0, 5)]
    restored = [rnn.Measurement(**json.loads(json.dumps(asdict(m)))) for m in rows]  # what the JSON keeps
    assert restored == rows
    rnn.print_table(restored)
    table = capsys.readouterr().out.splitlines()
    assert "cuDNN algo" in table[0]
    assert table[1].endswith("  PERSIST_STATIC")
    assert table[2].endswith("  fwd PERSIST_STATIC_SMALL_H / bwd STANDARD")
    assert table[3].endswith("  -")


def test_default_gpu_sweep_has_cudnn_persistent_rows():
    """float16, one direction, H=1024, N=8..64: PyTorch requests PERSIST_STATIC there on an H100."""
    sizes = rnn.problem_set(_bench_args(), "cuda")
    assert 1024 in sizes["hidden"] and "float16" in sizes["dtype"]
    persistent = [n for n in sizes["batch"] if cudnn_algo.pytorch_rnn_algo(
        dtype="float16", batch=n, hidden=1024, input_size=1024, compute_capability=(9, 0), sm_count=132,
        cudnn_version=91900, seq_length=sizes["time_steps"]).forward == PS]
    assert persistent == [8, 16, 32, 64]
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert re.search(r"--hidden 1024 --batch 8,16,32,64 --dtype float16 --directions 1", script)
