"""DDP through Lightning: the tiny recipe as 2 CPU processes (gloo) ends with the weights of 1 process
that sees the same global batches.

The data module gives rank r the batches r, r+2, r+4, ... of the epoch's batch list, so one DDP step
of 2 ranks covers batches (2k, 2k+1). One process with accumulate_grad_batches=2 takes its step over
the same two batches, with the same averaged gradient. BatchNorm normalises per rank under CPU DDP
(SyncBatchNorm needs a GPU), which is what the single process does per micro-batch too, so the
trained parameters must agree (BatchNorm running statistics are per rank, and are not compared).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr.data.datamodule import DurationBatchSampler

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "synth" / "tiny.yaml"
WORDS = "THE CAT SAT ON A MAT WITH HER DOG AND RAN TO THE OLD RED BARN BY NIGHT".split()
MAX_BATCH_SECONDS = 4.0
TRAIN_DURATIONS = [0.8 + 0.1 * (i % 5) for i in range(28)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(corpus: Path, run_dir: Path, *extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    args = [sys.executable, "-m", "asr.cli", "train", "--config", str(RECIPE), "--data.root", str(corpus),
            "--trainer.default_root_dir", str(run_dir), "--model.net.conv_channels", "[4, 4]",
            "--model.net.rnn_layers", "2", "--model.net.rnn_hidden", "16", "--model.warmup_steps", "2",
            "--data.num_workers", "0", "--data.max_batch_seconds", str(MAX_BATCH_SECONDS),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_epochs", "1", "--evaluate", "false", "--trainer.accelerator", "cpu", *extra]
    done = subprocess.run(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, write_corpus):
    root = tmp_path / "corpus"
    write_corpus(root, "train", {f"100-1-{i:04d}": (d, " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(3)))
                                 for i, d in enumerate(TRAIN_DURATIONS)})
    write_corpus(root, "dev", {f"200-1-{i:04d}": (1.0, " ".join(WORDS[i:i + 2])) for i in range(4)})
    batches = DurationBatchSampler(TRAIN_DURATIONS, MAX_BATCH_SECONDS, shuffle=True, seed=0).batches(0)
    assert len(batches) % 2 == 0 and len(batches) >= 4, "the test needs an even number of batches (no re-splitting)"

    _train(root, tmp_path / "one", "--trainer.devices", "1", "--trainer.accumulate_grad_batches", "2")
    _train(root, tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")

    one = torch.load(tmp_path / "one" / "last.ckpt", map_location="cpu", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.ckpt", map_location="cpu", weights_only=True)
    assert one["global_step"] == two["global_step"] == len(batches) // 2
    parameter_names = [name for name in one["state_dict"]
                       if name.startswith("net.") and not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(parameter_names) > 10
    for name in parameter_names:
        torch.testing.assert_close(two["state_dict"][name], one["state_dict"][name], rtol=1e-4, atol=1e-6,
                                   msg=f"{name} differs between 2 DDP processes and 1 process")
    import json

    assert json.loads((tmp_path / "two" / "report.json").read_text())["device"].startswith("2 x CPU")
    assert json.loads((tmp_path / "one" / "report.json").read_text())["device"].startswith("1 x CPU")


@pytest.mark.slow
def test_two_gloo_processes_follow_one_time_budget(tmp_path, write_corpus):
    """--budget_minutes under DDP: rank 0's plan is broadcast (a collective every rank joins at the same step),
    and both ranks stop at the planned step. Here both ranks' own plans would agree anyway (the budget is
    spent); this checks that the broadcast runs under gloo and the plan reaches the checkpoint and report."""
    import json

    root = tmp_path / "corpus"
    write_corpus(root, "train", {f"100-1-{i:04d}": (d, " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(3)))
                                 for i, d in enumerate(TRAIN_DURATIONS)})
    write_corpus(root, "dev", {f"200-1-{i:04d}": (1.0, " ".join(WORDS[i:i + 2])) for i in range(4)})
    # a budget spent before the first plan (35 steps): the plan is "stop now", taken by both ranks at once
    _train(root, tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "20",
           "--budget_minutes", "0.01")
    checkpoint = torch.load(tmp_path / "two" / "last.ckpt", map_location="cpu", weights_only=True)
    plans = checkpoint["asr"]["stats"]["budget"]["plans"]
    assert plans and plans[-1]["planned_steps"] == checkpoint["global_step"] == plans[0]["at_step"]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["train"]["budget"]["planned_steps"] == plans[-1]["planned_steps"]
