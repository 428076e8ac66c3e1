"""Checkpoints: written atomically, by optimizer steps, by wall time, and on a stop signal."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from asr.errors import UserError
from asr.fileio import atomic_write
from asr.ops import check_status
from asr.training.resume import ResumableCSVLogger

DEFAULT_CHECKPOINT_MINUTES = 5.0  # last.ckpt at least this often, whatever the step count
# Signals that stop training at the next optimizer step with a checkpoint: what timeout, systemd,
# docker and SLURM send (SIGTERM; SLURM's --signal=USR1@secs warning), and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, file-size limit, permissions)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through asr.fileio.atomic_write (fsynced): all or nothing.

    (Lightning's own save goes through a temporary file under /tmp and a move, which is a copy,
    not an atomic rename, when /tmp is another filesystem.) A failed write leaves the previous
    checkpoint as it was and stops training with one line that says so.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        # A persistent-kernel launch that failed on the GPU is reported after its call returned
        # (asr.ops.check_status): wait for those reports, so that no checkpoint holds its outputs.
        check_status(wait=True)
        path = Path(path)
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f), fsync=True, remove_stale=True)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            kept = "the previous checkpoint is intact" if path.exists() else "there was no previous checkpoint"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointWriteError(f"{path}: cannot write the checkpoint ({reason}); {kept}; free disk space "
                                       "and resume with --ckpt_path last") from None


class TrainingStopped(Exception):
    """Raised out of fit() after a stop signal's checkpoint is written (caught by main)."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")


class TrainingControl(Callback):
    """Writes last.ckpt every `every_n_steps` optimizer steps and every `every_minutes` of training,
    and on SIGTERM, SIGUSR1 or Ctrl-C writes it at the next optimizer step and stops training.

    Checkpoints are written only right after an optimizer step (never inside a gradient-accumulation
    window, whose partial gradients a checkpoint does not hold), so resuming from any of them gives
    bitwise the weights of an uninterrupted run. Under DDP the ranks agree on every decision (one
    small all-reduce per step) because saving is collective. A second Ctrl-C stops at once.
    """

    def __init__(self, path: Path, every_n_steps: int, every_minutes: float):
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.every_seconds = every_minutes * 60.0
        self.signum: int | None = None  # the stop signal received, if any
        self._handlers: dict[int, Any] = {}
        self._last_save = time.monotonic()
        self._step_seen = 0
        self._saved_at_step = -1  # global step of this callback's last write
        self._trainer = None

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # pressed twice: the user wants out now
        first = self.signum is None
        self.signum = signum
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer else None
        if first and signum != signal.SIGINT and hasattr(launcher, "kill"):
            launcher.kill(signum)  # DDP children started by this process (a terminal sends SIGINT to all)
        if first:
            print(f"asr train: {signal.Signals(signum).name} received: writing {self.path} at the next "
                  "optimizer step, then stopping", file=sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed here, after Lightning's own SIGTERM handler (which would exit without a checkpoint).
        self._trainer = trainer
        self._last_save = time.monotonic()
        self._step_seen = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger):
                    logger.keep_rows_before(trainer.global_step)  # 0 for a new run: an old file's rows go
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._handlers = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        # The final weights: ModelCheckpoint writes last.ckpt only when best.ckpt improves, so without this
        # a finished run's last.ckpt could be the one of the last periodic save, steps behind.
        if trainer.global_step != self._saved_at_step:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step_seen:
            return  # no optimizer step in this batch (accumulating, or an empty batch)
        self._step_seen = step
        by_steps = self.every_n_steps > 0 and step % self.every_n_steps == 0
        by_time = time.monotonic() - self._last_save >= self.every_seconds
        signum = self.signum or 0
        if trainer.world_size > 1:
            flags = torch.tensor([float(by_time), float(signum)], device=pl_module.device)
            flags = trainer.strategy.reduce(flags, reduce_op="max")
            by_time, signum = bool(flags[0]), int(flags[1])
        if by_steps or by_time or signum:
            trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: resumable
            self._last_save = time.monotonic()
            self._saved_at_step = step
        if signum:
            raise TrainingStopped(signum, step, self.path)
