"""`asr train` on the tiny recipe, shrunk to seconds: run folder contents, atomic checkpoints, exact
resume after a kill, non-finite losses skipped and counted, vocabulary checks on load."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from asr.errors import UserError
from asr.model.inference import CHECKPOINT_KEY, load_for_inference
from asr.training.checkpoints import AtomicCheckpointIO, CheckpointWriteError
from asr.training.cli import main
from asr.training.module import SpeechRecognizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synth" / "tiny.yaml"


@pytest.fixture
def corpus(tmp_path, write_tiny_corpus):
    """The tiny recipe's splits, written under tmp_path."""
    return write_tiny_corpus(tmp_path / "corpus")


def test_tiny_recipe_trains_evaluates_and_reports(corpus, tmp_path, capsys, train_args):
    run_dir = tmp_path / "run"
    (corpus / "lm_text.txt").write_text("the cat sat on a hat\nher dog ran by night\n", encoding="utf-8")
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "2")) == 0
    for name in ("config.yaml", "best.ckpt", "last.ckpt", "report.json", "report.md", "lm.arpa"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob(".*tmp*")) == [], "no temporary checkpoint may be left behind"
    import json

    report = json.loads((run_dir / "report.json").read_text())
    assert report["train"]["epochs"] == 2 and report["train"]["steps"] > 0
    assert report["train"]["rnn_op_seconds"] > 0 and report["train"]["audio_hours"] > 0
    assert report["parameters"] > 0 and report["backend"].startswith("auto -> ")
    for split in ("test-clean", "test-unseen-voice"):
        for decoder in ("greedy", "beam+lm"):
            scores = report["eval"][split][decoder]
            assert scores["utterances"] == 3 and scores["reference_words"] > 0 and scores["wer"] >= 0
    assert "test-unseen-voice" in capsys.readouterr().out  # the Markdown report is printed
    assert report["decoding"]["tuned_on"] == "dev" and report["decoding"]["lm_weight"] > 0
    assert report["language_model"]["source"].endswith("lm_text.txt") and report["language_model"]["sentences"] == 2
    assert "HAT" in (run_dir / "lm.arpa").read_text()  # the LM text, normalised, not the transcripts

    config = (run_dir / "config.yaml").read_text()
    assert "rnn_hidden: 16" in config and str(corpus) in config  # the resolved config, overrides included

    model = load_for_inference(run_dir / "best.ckpt")
    recipe = yaml.safe_load(RECIPE.read_text())["model"]["net"]
    stride = math.prod(st for _, st in recipe["conv_strides"])  # (frequency, time) per conv
    assert model.tokenizer.tokens[0] == "<blank>" and model.frame_shift_seconds == pytest.approx(0.01 * stride)

    def out_frames(frames: int) -> int:  # each conv pads k//2 frames on both sides in time
        for (_, kt), (_, st) in zip(recipe["conv_kernels"], recipe["conv_strides"]):
            frames = (frames + 2 * (kt // 2) - kt) // st + 1
        return frames

    log_probs, lengths = model.log_probs(torch.randn(2, 90, 80), torch.tensor([90, 60]))
    assert log_probs.shape == (2, out_frames(90), model.tokenizer.vocab_size)
    assert lengths.tolist() == [out_frames(90), out_frames(60)] and out_frames(60) < out_frames(90)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, out_frames(90)))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(CheckpointWriteError, match="disk full.*the previous checkpoint is intact"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}, "the previous checkpoint must survive a failed write"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.tmp-999999"
    stale.write_bytes(b"half a checkpoint from a process that was killed")
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 3}


def _train_subprocess(train_args, repo: Path, corpus: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "asr.cli", "train",
            *train_args(corpus, run_dir, "--trainer.max_epochs", "2", "--checkpoint_every_n_steps", "3",
                        "--evaluate", "false", *extra)]
    return subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _network_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("net.")}, state["global_step"]


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(corpus, tmp_path, train_args, repo_root):
    """Kill training right after its first mid-epoch checkpoint, resume from last.ckpt, and end
    with exactly the weights of a run that was never interrupted."""
    straight = _train_subprocess(train_args, repo_root, corpus, tmp_path / "straight")
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    expected, total_steps = _network_state(tmp_path / "straight" / "last.ckpt")
    assert total_steps > 6, "the run must be long enough to be killed mid-epoch"

    killed_dir = tmp_path / "killed"
    killed = _train_subprocess(train_args, repo_root, corpus, killed_dir)
    last = killed_dir / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    _, step_at_kill = _network_state(last)
    assert 0 < step_at_kill < total_steps

    resumed = _train_subprocess(train_args, repo_root, corpus, killed_dir, "--ckpt_path", "last")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    final, steps = _network_state(last)
    assert steps == total_steps
    for name, value in expected.items():
        assert torch.equal(final[name], value), f"{name} differs after resume"


def test_nonfinite_batches_are_skipped_and_counted(corpus, tmp_path, monkeypatch, train_args):
    real_loss = SpeechRecognizer._ctc_loss
    calls = {"train": 0}

    def sometimes_nan(self, batch):
        loss, log_probs = real_loss(self, batch)
        if self.training:
            calls["train"] += 1
            if calls["train"] in (2, 3):  # two bad batches in a row, then good ones
                loss = loss * float("nan")
        return loss, log_probs

    monkeypatch.setattr(SpeechRecognizer, "_ctc_loss", sometimes_nan)
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false",
                           "--model.max_nonfinite_in_a_row", "3")) == 0
    import json

    report = json.loads((run_dir / "report.json").read_text())
    assert report["train"]["nonfinite_batches_skipped"] == 2
    state = torch.load(run_dir / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v.float()).all() for v in state.values()), "a skipped batch must not touch weights or BatchNorm statistics"


def test_training_stops_after_k_nonfinite_batches_in_a_row(corpus, tmp_path, monkeypatch, train_args):
    real_loss = SpeechRecognizer._ctc_loss

    def always_nan(self, batch):
        loss, log_probs = real_loss(self, batch)
        return (loss * float("inf") if self.training else loss), log_probs

    monkeypatch.setattr(SpeechRecognizer, "_ctc_loss", always_nan)
    with pytest.raises(UserError, match="3 batches in a row"):
        main(train_args(corpus, tmp_path / "run", "--trainer.max_epochs", "1", "--evaluate", "false",
                        "--model.max_nonfinite_in_a_row", "3"))


def test_vocabulary_mismatch_is_refused(corpus, tmp_path, train_args):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "1", "--evaluate", "false")) == 0
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)

    altered = dict(checkpoint)
    altered[CHECKPOINT_KEY] = dict(checkpoint[CHECKPOINT_KEY], vocabulary=checkpoint[CHECKPOINT_KEY]["vocabulary"][:-1])
    torch.save(altered, tmp_path / "altered.ckpt")
    with pytest.raises(UserError, match="vocabulary mismatch"):
        load_for_inference(tmp_path / "altered.ckpt")

    # Resuming training from a checkpoint whose vocabulary is not the data module's tokenizer.
    vocabulary = list(checkpoint[CHECKPOINT_KEY]["vocabulary"])
    vocabulary[1], vocabulary[2] = vocabulary[2], vocabulary[1]
    swapped = dict(checkpoint)
    swapped[CHECKPOINT_KEY] = dict(checkpoint[CHECKPOINT_KEY], vocabulary=vocabulary)
    torch.save(swapped, tmp_path / "swapped.ckpt")
    with pytest.raises(UserError, match="vocabulary mismatch"):
        main(train_args(corpus, run_dir, "--trainer.max_epochs", "2", "--evaluate", "false",
                        "--ckpt_path", str(tmp_path / "swapped.ckpt")))

    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_for_inference(tmp_path / "junk.ckpt")
    with pytest.raises(UserError, match="not found"):
        load_for_inference(tmp_path / "missing.ckpt")


def test_dev_subset_for_beam_tuning_is_even_and_deterministic():
    from asr.inference.tuning import spread_subset

    items = list(range(10))
    assert spread_subset(items, None) == items
    assert spread_subset(items, 20) == items
    assert spread_subset(items, 5) == [0, 2, 4, 6, 8]
    assert spread_subset(items, 3) == [0, 3, 6]
    with pytest.raises(UserError, match="tune_utterances"):
        spread_subset(items, 0)
