"""Training to a wall-time budget: `asr train --budget_minutes M` measures the step time and buys steps.

A fixed epoch count does not fit a time on machines of different speed (the tiny recipe: 12.5 minutes
on one 2-core machine, 21 on another). With a budget, the run

 1. trains CALIBRATION_STEPS optimizer steps after SKIP_STEPS (the loader's and allocator's start-up),
    during the learning-rate warmup, and measures the seconds per step;
 2. plans the number of steps that fits what is left of the budget, adding the dev pass of every epoch
    (estimated, until one has been measured, as the dev batches' share of an epoch times
    VALIDATION_COST_RATIO, a forward pass being cheaper than forward + backward), capped by the
    recipe's trainer.max_epochs / max_steps;
 3. sets the learning-rate schedule's length to that plan (the module's `schedule_steps`), so the
    cosine/linear decay ends where training ends;
 4. re-plans at the end of every epoch from the rate measured so far, dev passes included;
 5. at the planned step, stops the way early stopping does (trainer.should_stop), so Lightning runs the
    dev pass there and best.ckpt can be the final weights.
The budget counts the fit loop's wall time (training and dev passes; not the setup before it nor the
evaluation after it). Every plan is kept in the module's stats, so it goes into checkpoints (a resumed
run continues from the saved plan with what is left of the budget) and into the report.
How many steps a budget buys depends on the machine's speed: that is the point, and it makes a
budgeted run's length, unlike its batches, not reproducible across machines.
"""

from __future__ import annotations

import sys

from pytorch_lightning.callbacks import Callback

from asr.errors import check_range

SKIP_STEPS = 5  # optimizer steps not timed: the first batches pay for start-up
CALIBRATION_STEPS = 30  # optimizer steps timed before the first plan
VALIDATION_COST_RATIO = 0.4  # a dev batch's time over a training batch's, until a dev pass is measured


class TimeBudget(Callback):
    def __init__(self, minutes: float, calibration_steps: int | None = None, skip_steps: int | None = None):
        check_range("budget_minutes", minutes, low=0.0, low_open=True)
        self.seconds = 60.0 * minutes
        self.calibration_steps = CALIBRATION_STEPS if calibration_steps is None else calibration_steps
        self.skip_steps = SKIP_STEPS if skip_steps is None else skip_steps
        self._mark: tuple[int, float] | None = None  # (global step, module wall seconds) where timing starts
        self._start_step = 0  # global step this process started training at (resumed runs: > 0)
        self._calibrated = False  # this process has measured its own rate
        self._epochs_measured = 0

    # -- state, in the module's stats (and so in checkpoints and the report) --

    @staticmethod
    def _state(pl_module) -> dict:
        return pl_module.stats.setdefault("budget", {"minutes": None, "plans": []})

    def _plan(self, trainer, pl_module, seconds_per_step: float, how: str) -> None:
        state = self._state(pl_module)
        step = trainer.global_step
        left = self.seconds - pl_module._wall_seconds()
        planned = step + max(0, int(left / seconds_per_step + 1e-6))  # 1e-6: 2.6 / 0.1 is 25.999...
        cap = self._cap(trainer)
        if cap is not None and planned > cap:
            planned, how = cap, how + f"; capped by the recipe's {cap} steps"
        if trainer.world_size > 1:  # every rank plans at the same step; all must stop at the same one
            planned, how, seconds_per_step, left = trainer.strategy.broadcast(
                (planned, how, seconds_per_step, left), src=0)
        state["plans"].append({"at_step": step, "planned_steps": planned, "seconds_per_step": seconds_per_step,
                               "seconds_left": left, "how": how})
        pl_module.schedule_steps = planned
        if trainer.is_global_zero:
            print(f"asr train: budget {self.seconds / 60:.1f} min: {seconds_per_step:.3f} s per step ({how}), "
                  f"{max(0.0, left) / 60:.1f} min left at step {step}: training to step {planned}",
                  file=sys.stderr, flush=True)

    @staticmethod
    def _cap(trainer) -> int | None:
        """The steps the recipe's max_epochs / max_steps allow (None: unlimited)."""
        try:
            steps = trainer.estimated_stepping_batches
        except Exception:  # an infinite loader: no cap from epochs
            return None
        return None if steps == float("inf") else int(steps)

    # -- hooks --

    def on_train_start(self, trainer, pl_module) -> None:
        state = self._state(pl_module)
        state["minutes"] = self.seconds / 60
        plans = state["plans"]
        if plans:  # resumed: keep the saved plan until this process has measured its own rate
            pl_module.schedule_steps = plans[-1]["planned_steps"]
        self._mark = None
        self._start_step = trainer.global_step
        self._calibrated = False
        self._epochs_measured = 0
        self._stop_if_due(trainer, pl_module)

    def _stop_if_due(self, trainer, pl_module) -> None:
        planned = getattr(pl_module, "schedule_steps", None)
        if planned is not None and trainer.global_step >= planned and not trainer.should_stop:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._mark is None:
            if step >= self._start_step + self.skip_steps:
                self._mark = (step, pl_module._wall_seconds())
        elif not self._calibrated and step - self._mark[0] >= self.calibration_steps:
            seconds = (pl_module._wall_seconds() - self._mark[1]) / (step - self._mark[0])
            self._plan(trainer, pl_module, seconds * (1 + self._validation_share(trainer)),
                       f"{step - self._mark[0]} steps timed, dev passes estimated")
            self._calibrated = True
        self._stop_if_due(trainer, pl_module)

    @staticmethod
    def _validation_share(trainer) -> float:
        """Estimated dev-pass time over an epoch's training time, from the batch counts."""
        train_batches = trainer.num_training_batches
        dev_batches = sum(trainer.num_val_batches) if trainer.num_val_batches else 0
        if not train_batches or train_batches == float("inf") or trainer.check_val_every_n_epoch is None:
            return 0.0
        return VALIDATION_COST_RATIO * dev_batches / train_batches / trainer.check_val_every_n_epoch

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._mark is None or trainer.should_stop:
            return
        steps = trainer.global_step - self._mark[0]
        if steps < self.calibration_steps:
            return
        self._epochs_measured += 1
        seconds = (pl_module._wall_seconds() - self._mark[1]) / steps  # dev passes included
        self._plan(trainer, pl_module, seconds,
                   f"measured over {steps} steps and {self._epochs_measured} dev pass(es)")
        self._calibrated = True
        self._stop_if_due(trainer, pl_module)


def budget_summary(stats: dict) -> dict | None:
    """The report's budget entry: minutes, the steps the final plan bought and every plan, or None."""
    state = stats.get("budget")
    if not state or not state.get("plans"):
        return None
    final = state["plans"][-1]
    return {"minutes": state.get("minutes"), "planned_steps": final["planned_steps"],
            "seconds_per_step": final["seconds_per_step"], "plans": state["plans"]}
