"""`asr bench train` and `asr bench rnn` on the CPU at toy sizes: the JSON they write (what
benchmarks/results/ holds) carries the command, the device, agreeing outputs and real timings."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asr import cli
from asr.bench import invocation, rnn
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
    """The GPU sweep (5 hidden sizes x 7 batches x 3 dtypes at T=200) takes hours on a CPU."""
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
