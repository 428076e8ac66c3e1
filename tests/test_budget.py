"""Training to a wall-time budget (asr.training.budget): the steps are planned from the measured step
time, capped by the recipe, the LR schedule ends at the plan, training stops there, and the report and
checkpoints carry the plan. The clock is replaced by one that advances a fixed time per optimizer step,
so the plans are exact and nothing here depends on this machine's speed."""

from __future__ import annotations

import json

import pytest

from asr.training import budget
from asr.training.cli import main
from asr.training.module import SpeechRecognizer

SECONDS_PER_STEP = 0.1  # of the fake clock


@pytest.fixture
def corpus(tmp_path, write_tiny_corpus):
    return write_tiny_corpus(tmp_path / "corpus")


@pytest.fixture
def step_clock(monkeypatch):
    """The module's wall clock reads SECONDS_PER_STEP per optimizer step since this process started."""
    monkeypatch.setattr(SpeechRecognizer, "_wall_seconds",
                        lambda self: SECONDS_PER_STEP * self.trainer.global_step if self._trainer else 0.0)
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", 3)
    monkeypatch.setattr(budget, "SKIP_STEPS", 1)


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def test_budget_buys_the_steps_that_fit_and_the_schedule_ends_there(corpus, tmp_path, train_args, step_clock):
    run_dir = tmp_path / "run"
    # 3 s of budget at 0.1 s per step: 30 steps (several epochs of the tiny corpus); max_epochs far above
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "100", "--budget_minutes", "0.05",
                           "--model.schedule", "linear", "--model.final_lr_ratio", "0.0")) == 0
    report = _report(run_dir)
    plan = report["train"]["budget"]
    assert plan["minutes"] == pytest.approx(0.05)
    assert plan["planned_steps"] == 30 and report["train"]["steps"] == 30
    first, last = plan["plans"][0], plan["plans"][-1]
    assert first["at_step"] == 4 and "estimated" in first["how"]  # 1 skipped + 3 timed
    assert last["seconds_per_step"] == pytest.approx(SECONDS_PER_STEP) and "dev pass" in last["how"]
    assert report["train"]["epochs"] > 1  # several epochs, so the re-plan at an epoch end was exercised
    # the learning rate decayed to 0 at the planned last step (linear schedule, final_lr_ratio 0)
    from asr.model.inference import read_checkpoint

    last = read_checkpoint(run_dir / "last.ckpt")
    assert last["global_step"] == 30
    assert [g["lr"] for g in last["optimizer_states"][0]["param_groups"]] == [0.0, 0.0]
    assert last["asr"]["stats"]["budget"]["plans"] == plan["plans"]  # the plan travels in checkpoints
    assert "time budget" in (run_dir / "report.md").read_text() and "30 steps" in (run_dir / "report.md").read_text()
    # run again with --ckpt_path last (what make demo does): the spent budget trains no further step
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "100", "--budget_minutes", "0.05",
                           "--model.schedule", "linear", "--model.final_lr_ratio", "0.0", "--ckpt_path", "last",
                           "--evaluate", "false")) == 0
    assert read_checkpoint(run_dir / "last.ckpt")["global_step"] == 30


def test_the_recipe_caps_what_a_budget_buys(corpus, tmp_path, train_args, step_clock):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus, run_dir, "--trainer.max_epochs", "2", "--budget_minutes", "600",
                           "--evaluate", "false")) == 0
    from asr.model.inference import read_checkpoint

    stats = read_checkpoint(run_dir / "last.ckpt")["asr"]["stats"]
    plans = stats["budget"]["plans"]
    steps = read_checkpoint(run_dir / "last.ckpt")["global_step"]
    assert all("capped" in p["how"] for p in plans) and plans[-1]["planned_steps"] == steps  # two epochs' steps


def test_budget_minutes_must_be_positive(corpus, tmp_path, train_args):
    from asr.errors import UserError

    with pytest.raises(UserError, match="budget_minutes 0.0: must be > 0"):
        main(train_args(corpus, tmp_path / "run", "--budget_minutes", "0"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
