"""`asr bench train` and `asr bench rnn` on the CPU at toy sizes: the JSON they write (what
benchmarks/results/ holds) carries the command, the device, agreeing outputs and real timings."""

import json
import sys

import pytest

from asr import cli
from asr.bench import invocation
from asr.ops import dispatch


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


@pytest.mark.parametrize("argv0, expected", [
    ("/venv/bin/asr", "asr bench rnn --hidden '1 2'"),
    ("/repo/asr/cli.py", "asr bench rnn --hidden '1 2'"),
    ("/usr/bin/python3", "/usr/bin/python3 bench rnn --hidden '1 2'"),
])
def test_invocation_is_retypable(monkeypatch, argv0, expected):
    monkeypatch.setattr(sys, "argv", [argv0, "bench", "rnn", "--hidden", "1 2"])
    assert invocation() == expected
