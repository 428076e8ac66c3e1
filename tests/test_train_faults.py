"""Training under faults: stop signals (SIGTERM to the process group, SLURM's SIGUSR1, Ctrl-C), a
disk that fills while a checkpoint is written, two trainers on one run folder, a re-run over a
finished run, checkpoints by wall time, and non-finite steps under gradient accumulation.

The standard is the kill -9 test's in test_train.py: a resumed run ends with bitwise the weights of a
run that was never interrupted."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asr.errors import UserError
from asr.training.checkpoints import AtomicCheckpointIO
from asr.training.cli import main
from asr.training.module import SpeechRecognizer

STEPS_BETWEEN_CHECKPOINTS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, write_tiny_corpus):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def start(train_args, repo_root):
    """start(corpus, run_dir, *extra, file_size_limit=None) -> an `asr train` child process in a session of its own."""

    def command(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "asr.cli", "train",
                *train_args(corpus, run_dir, "--trainer.max_epochs", "2", "--evaluate", "false",
                            "--checkpoint_every_n_steps", str(STEPS_BETWEEN_CHECKPOINTS), *extra)]

    def start(corpus: Path, run_dir: Path, *extra: str, file_size_limit: int | None = None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")

        def limits():
            if file_size_limit is not None:  # a real limit: write() fails with EFBIG past it
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        # its own session, so that a signal can go to the whole process group, DataLoader workers included
        return subprocess.Popen(command(corpus, run_dir, *extra), cwd=repo_root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=limits)

    return start


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _network(checkpoint: Path) -> tuple[dict[str, torch.Tensor], int]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("net.")}, state["global_step"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared: {proc.poll()}"


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory, start):
    """Final weights and step count of the run that every interrupted run must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = start(corpus, run_dir, "--data.num_workers", "1")
    out = _finish(proc)
    assert proc.returncode == 0, out
    weights, steps = _network(run_dir / "last.ckpt")
    assert steps > 2 * STEPS_BETWEEN_CHECKPOINTS, "the run must be long enough to be stopped mid-epoch"
    return weights, steps


def _stop(start, corpus: Path, run_dir: Path, signum: int, to_group: bool) -> tuple[int, str]:
    """Start a run, signal it once its first checkpoint exists, return (checkpoint step, output)."""
    proc = start(corpus, run_dir, "--data.num_workers", "1")
    _wait_for(run_dir / "last.ckpt", proc)
    sent = time.monotonic()
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out = _finish(proc, timeout=120)
    stopped_within = time.monotonic() - sent
    assert proc.returncode == 128 + signum, out
    assert "Traceback" not in out, out
    match = re.search(rf"stopped by {signal.Signals(signum).name} at step (\d+): (\S+) written", out)
    assert match, out
    step = int(match[1])
    assert Path(match[2]) == run_dir / "last.ckpt"
    assert _network(run_dir / "last.ckpt")[1] == step, "the checkpoint is the one written at the signal"
    assert stopped_within < 60, f"took {stopped_within:.0f} s to stop"  # a hang guard, not a speed test
    return step, out


def _resume_and_compare(start, corpus: Path, run_dir: Path, uninterrupted) -> None:
    expected, total_steps = uninterrupted
    proc = start(corpus, run_dir, "--data.num_workers", "1", "--ckpt_path", "last")
    out = _finish(proc)
    assert proc.returncode == 0, out
    final, steps = _network(run_dir / "last.ckpt")
    assert steps == total_steps
    for name, value in expected.items():
        assert torch.equal(final[name], value), f"{name} differs after the resume"


@pytest.mark.slow
@pytest.mark.parametrize("signum,to_group", [
    (signal.SIGTERM, True),  # what timeout, systemd, docker and SLURM do: the whole group, workers too
    (signal.SIGUSR1, False),  # SLURM's warning before the time limit (sbatch --signal=USR1@90)
    (signal.SIGINT, False),  # Ctrl-C
], ids=["sigterm-group", "sigusr1", "sigint"])
def test_a_stop_signal_checkpoints_and_the_resume_is_exact(corpus, tmp_path, uninterrupted, start, signum, to_group):
    run_dir = tmp_path / "run"
    step, _ = _stop(start, corpus, run_dir, signum, to_group)
    assert 0 < step < uninterrupted[1]
    _resume_and_compare(start, corpus, run_dir, uninterrupted)


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(corpus, tmp_path, uninterrupted, start):
    run_dir = tmp_path / "run"
    _stop(start, corpus, run_dir, signal.SIGTERM, to_group=False)
    checkpoint = run_dir / "last.ckpt"
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    # Every later checkpoint is about as large as this one: a limit just below it makes the next write fail.
    proc = start(corpus, run_dir, "--ckpt_path", "last", file_size_limit=checkpoint.stat().st_size - 1)
    out = _finish(proc)
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    last_line = out.strip().splitlines()[-1]
    assert last_line.startswith("asr train: error: ") and str(checkpoint) in last_line, out
    assert "cannot write the checkpoint" in last_line and "previous checkpoint is intact" in last_line
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    assert not list(run_dir.glob(".last.ckpt.tmp-*")), "the failed write's temporary file is removed"
    _resume_and_compare(start, corpus, run_dir, uninterrupted)


@pytest.mark.slow
def test_a_second_trainer_on_a_running_folder_is_refused(corpus, tmp_path, start, train_args):
    run_dir = tmp_path / "run"
    proc = start(corpus, run_dir, "--trainer.max_epochs", "50")
    try:
        _wait_for(run_dir / "last.ckpt", proc)
        snapshot = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        for extra in ([], ["--ckpt_path", "last"]):
            with pytest.raises(UserError, match=rf"another `asr train` \(pid {proc.pid}\) is writing this run folder"):
                main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false", *extra))
        assert proc.poll() is None, "the first trainer runs on"
        changed = [p for p, mtime in snapshot.items() if p.exists() and p.stat().st_mtime_ns != mtime]
        assert not [p for p in changed if p.name in ("config.yaml", "hparams.yaml")], "the refused run wrote"
    finally:
        proc.kill()
        proc.communicate()
    # The lock dies with its process, however it dies: the folder can be resumed now.
    from asr.training.run_folder import claim_run_folder

    claim_run_folder(run_dir, resuming=True).close()


def test_a_finished_run_is_not_overwritten_and_a_resume_keeps_its_metrics(corpus, tmp_path, capsys, train_args):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false")) == 0
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    metrics = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert len(metrics) > 2

    with pytest.raises(UserError, match="holds a run already .*resume it with --ckpt_path last, or train into "
                                        "another folder with --trainer.default_root_dir"):
        main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false"))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files, "a refused run changed files"

    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "2", "--evaluate", "false",
                           "--ckpt_path", "last")) == 0
    resumed = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = resumed[0].split(",")
    assert resumed[1:len(metrics)] == [_reorder(line, metrics[0], header) for line in metrics[1:]], \
        "the first run's rows must survive the resume"
    steps = [float(dict(zip(header, line.split(",")))["step"]) for line in resumed[1:]]
    assert len(resumed) > len(metrics) and max(steps) > max(steps[: len(metrics) - 1])


def _reorder(line: str, old_header: str, new_header: list[str]) -> str:
    row = dict(zip(old_header.split(","), line.split(",")))
    return ",".join(row.get(key, "") for key in new_header)


def test_checkpoints_by_wall_time(corpus, tmp_path, monkeypatch, train_args):
    saved: list[tuple[str, int]] = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        saved.append((Path(path).name, checkpoint["global_step"]))
        return real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    run_dir = tmp_path / "run"
    # No step-count checkpoint would come (1000 steps); a checkpoint every ~0 minutes comes every step.
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false",
                           "--checkpoint_every_n_steps", "1000", "--checkpoint_every_minutes", "1e-9")) == 0
    steps = [step for name, step in saved if name == "last.ckpt"]
    total = torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"]
    assert total > 3 and set(range(1, total + 1)) <= set(steps), saved

    saved.clear()
    run_dir = tmp_path / "run2"
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false",
                           "--checkpoint_every_n_steps", "1000")) == 0
    assert len([1 for name, _ in saved if name == "last.ckpt"]) <= 2, "only the epoch-end saves are left"


def test_a_missing_last_checkpoint_is_announced(corpus, tmp_path, capsys, train_args):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false", "--ckpt_path", "last",
                           "--trainer.limit_train_batches", "2")) == 0
    err = capsys.readouterr().err
    assert f"--ckpt_path last: {run_dir / 'last.ckpt'} does not exist, so there is nothing to resume" in err
    assert "training starts at step 0" in err


def test_a_skipped_step_under_gradient_accumulation_leaves_everything_as_before_it(corpus, tmp_path, monkeypatch,
                                                                                   train_args):
    """With accumulate_grad_batches=2, a non-finite loss in the second micro-batch of an optimizer step
    skips the step: weights, optimizer state and BatchNorm statistics are those from before its first
    micro-batch (not merely from before the bad one)."""
    real_step, real_end, real_loss = (SpeechRecognizer.training_step, SpeechRecognizer.on_train_batch_end,
                                      SpeechRecognizer._ctc_loss)
    seen = {"calls": 0, "losses": 0}
    bad_micro_batch = 4  # optimizer step 2 = micro-batches 3 and 4

    def snapshot(module):
        optimizer = module.trainer.optimizers[0].state_dict()["state"]
        return ({k: v.clone() for k, v in module.net.state_dict().items()},
                {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in optimizer.items()})

    def training_step(self, batch, batch_idx):
        seen["calls"] += 1
        if seen["calls"] == bad_micro_batch - 1:
            seen["before"] = snapshot(self)
        return real_step(self, batch, batch_idx)

    def loss(self, batch):
        value, log_probs = real_loss(self, batch)
        if self.training:
            seen["losses"] += 1
            if seen["losses"] == bad_micro_batch:
                value = value * float("nan")
        return value, log_probs

    def on_train_batch_end(self, outputs, batch, batch_idx):
        real_end(self, outputs, batch, batch_idx)
        if seen["calls"] == bad_micro_batch:
            seen["after"] = snapshot(self)

    monkeypatch.setattr(SpeechRecognizer, "training_step", training_step)
    monkeypatch.setattr(SpeechRecognizer, "_ctc_loss", loss)
    monkeypatch.setattr(SpeechRecognizer, "on_train_batch_end", on_train_batch_end)
    assert main(train_args(corpus, tmp_path / "run", "--trainer.max_epochs", "1", "--evaluate", "false",
                           "--trainer.accumulate_grad_batches", "2", "--trainer.limit_train_batches", "6")) == 0
    (weights_before, optimizer_before), (weights_after, optimizer_after) = seen["before"], seen["after"]
    assert any("running_mean" in k for k in weights_before), "the network must have BatchNorm statistics"
    for name, value in weights_before.items():
        assert torch.equal(weights_after[name], value), f"{name} changed in a skipped step"
    assert optimizer_before.keys() == optimizer_after.keys() and optimizer_before, "AdamW has state after step 1"
    for index, state in optimizer_before.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(optimizer_after[index][key]), torch.as_tensor(value)), (index, key)
