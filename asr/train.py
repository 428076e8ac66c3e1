"""Training: the LightningModule around the Deep Speech network, and `asr train` (LightningCLI).

    asr train --config recipes/synth/tiny.yaml [--trainer.max_epochs 3] [--model.lr 5e-4] [--ckpt_path last]

The run folder is `trainer.default_root_dir` (runs/<recipe name> when the recipe leaves it unset). It
receives config.yaml (the resolved config), best.ckpt (best dev WER), last.ckpt (every
`checkpoint_every_n_steps` steps and every epoch), TensorBoard and CSV logs, lm.arpa, and at the end
report.json + report.md: accuracy on the test splits (greedy and beam+LM) next to training speed.

Checkpoints are written to a temporary file in the same folder and renamed over the old one, so a
kill at any moment leaves the previous checkpoint intact. `--ckpt_path last` resumes from the run
folder's last.ckpt exactly where it stopped, mid-epoch included: the batch order is a function of
(seed, epoch) and the training loader records how many batches of the epoch were consumed.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
import torch.nn.functional as F
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from asr.data.datamodule import ASRDataModule
from asr.data.synth import LM_TEXT_FILE  # a corpus's text-only LM corpus, beside LibriSpeech/
from asr.errors import UserError, check_range
from asr.fileio import atomic_write_text
from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig
from asr.model.inference import CHECKPOINT_KEY, InferenceModel, check_vocabulary, checkpoint_payload, read_checkpoint
from asr.model.timing import OpTimer

RUNS_DIR = "runs"
CONFIG_FILE = "config.yaml"
BEST_CHECKPOINT = "best"  # file stem in the run folder
LAST_CHECKPOINT = "last"
LM_FILE = "lm.arpa"
LM_ORDER = 3
BEAM_LM_WEIGHTS = (1.0, 2.0, 3.0, 4.0, 6.0)  # tried on the dev split after training
BEAM_WORD_SCORES = (-3.0, -2.0, -1.0, 0.0)
REPORTED_SCORES = ("wer", "cer", "substitutions", "deletions", "insertions", "reference_words", "rtf")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")  # decay after warmup
LOCK_FILE = ".lock"  # held (flock) by the `asr train` writing the run folder; released when it exits
DEFAULT_CHECKPOINT_MINUTES = 5.0  # last.ckpt at least this often, whatever the step count
CSV_FLUSH_EVERY_N_STEPS = 10  # metrics.csv rows reach the disk this often (a kill loses at most these)
# What a run leaves in its folder: a new run refuses a folder that holds any of them.
RUN_ARTEFACTS = (CONFIG_FILE, f"{BEST_CHECKPOINT}.ckpt", f"{LAST_CHECKPOINT}.ckpt", "report.json", "report.md",
                 LM_FILE, "csv", "tensorboard")
# Signals that stop training at the next optimizer step with a checkpoint: what timeout, systemd,
# docker and SLURM send (SIGTERM; SLURM's --signal=USR1@secs warning), and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# --- checkpoints and data order --------------------------------------------------------------------


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, file-size limit, permissions)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the target, fsync, then os.replace: all or nothing.

    (Lightning's own save goes through a temporary file under /tmp and a move, which is a copy,
    not an atomic rename, when /tmp is another filesystem.) A failed write leaves the previous
    checkpoint as it was and stops training with one line that says so.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
            if stale != tmp:
                stale.unlink(missing_ok=True)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            kept = "the previous checkpoint is intact" if path.exists() else "there was no previous checkpoint"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointWriteError(f"{path}: cannot write the checkpoint ({reason}); {kept}; free disk space "
                                       "and resume with --ckpt_path last") from None
        finally:
            if tmp.exists():
                tmp.unlink()


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
        if signum:
            raise TrainingStopped(signum, step, self.path)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume: Lightning's writer deletes an existing file;
    this one keeps it, and at the start of training keeps the rows logged before the step training
    resumes from (the rows after it are logged again as those steps are redone)."""

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    def keep_rows_before(self, step: int) -> None:
        self.experiment.keep_rows_before(step)


class _KeepingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        pass  # never delete: the rows are trimmed by keep_rows_before

    def keep_rows_before(self, step: int) -> None:
        import csv
        import io

        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _row_step(row) < step]
        if not rows:
            path.unlink()
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, out.getvalue())
        self.metrics_keys = header  # later rows are appended under this header (widened if new keys come)


def _row_step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return float("inf")


def claim_run_folder(run_dir: Path, resuming: bool):
    """Lock the run folder for this process (an open file; the lock ends with the process, however
    it ends) and refuse a new run in a folder that holds another run's files. Returns the lock."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"trainer.default_root_dir {run_dir}: exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UserError(f"{run_dir}: another `asr train` (pid {holder}) is writing this run folder; wait for it to "
                        "end, or train into another folder with --trainer.default_root_dir DIR") from None
    if not resuming:
        present = [name for name in RUN_ARTEFACTS if (run_dir / name).exists()]
        if present:
            lock.close()
            raise UserError(f"{run_dir}: holds a run already ({', '.join(present)}); resume it with --ckpt_path last, "
                            "or train into another folder with --trainer.default_root_dir DIR")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


class ResumableLoader:
    """A training DataLoader that Lightning can checkpoint: it counts the batches it has handed out
    this epoch, and on restore tells the batch sampler to skip them (same epoch, same order)."""

    def __init__(self, loader):
        self.loader = loader
        self.batch_sampler = loader.batch_sampler  # Lightning calls batch_sampler.sampler.set_epoch
        self.consumed = 0
        self._resumed_at = 0  # batches to skip in the next iteration (set on restore)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.consumed, self._resumed_at = self._resumed_at, 0
        for batch in self.loader:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": int(getattr(self.batch_sampler, "epoch", 0)), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.set_epoch(state["epoch"])
        self.batch_sampler.fast_forward(state["consumed"])
        self._resumed_at = state["consumed"]


class TrainingDataModule(ASRDataModule):
    """ASRDataModule whose training loader can resume mid-epoch."""

    def train_dataloader(self):
        return ResumableLoader(super().train_dataloader())


# --- the LightningModule -----------------------------------------------------------------------------



class SpeechRecognizer(L.LightningModule):
    """CTC training of a DeepSpeech network; dev WER/CER (greedy) after every epoch."""

    def __init__(
        self,
        vocab_size: int = 29,
        n_mels: int = 80,
        conv_channels: list[int] = [32, 32],  # noqa: B006
        conv_kernels: list[list[int]] = [[21, 11], [11, 11]],  # noqa: B006  (frequency, time)
        conv_strides: list[list[int]] = [[2, 2], [2, 1]],  # noqa: B006  (frequency, time)
        rnn_cell: str = "relu",
        rnn_layers: int = 3,
        rnn_hidden: int = 256,
        bidirectional: bool = True,
        merge_directions: str = "sum",
        rnn_batch_norm: bool = True,
        lookahead: int = 0,
        backend: str = "auto",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        momentum: float = 0.9,
        warmup_steps: int = 200,
        schedule: str = "cosine",
        final_lr_ratio: float = 0.05,
        max_nonfinite_in_a_row: int = 10,
        time_op: bool = True,
    ):
        """
        Args:
            vocab_size: output classes including the blank (linked from the data module).
            n_mels: input feature channels (linked from the data module).
            rnn_cell: relu (clipped, Deep Speech 2), tanh, or gru.
            backend: asr.ops backend of the relu/tanh recurrence (auto, persistent, cudnn, reference).
            optimizer: adamw, or sgd (Nesterov momentum).
            warmup_steps: linear warmup from 0 to lr over this many optimizer steps.
            schedule: decay after warmup down to lr * final_lr_ratio at the last step: cosine, linear, constant.
            max_nonfinite_in_a_row: stop training after this many consecutive batches with a non-finite
                loss or gradient (each is skipped and counted).
            time_op: time the recurrent op's calls for the report.
        """
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise UserError(f"model.optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
        if schedule not in SCHEDULES:
            raise UserError(f"model.schedule {schedule!r}: expected one of {SCHEDULES}")
        check_range("model.lr", lr, low=0.0, low_open=True)
        check_range("model.weight_decay", weight_decay, low=0.0)
        check_range("model.momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_range("model.warmup_steps", warmup_steps, low=0)
        check_range("model.final_lr_ratio", final_lr_ratio, low=0.0, high=1.0)
        check_range("model.max_nonfinite_in_a_row", max_nonfinite_in_a_row, low=1)
        check_range("model.rnn_layers", rnn_layers, low=1)
        check_range("model.rnn_hidden", rnn_hidden, low=1)
        check_range("model.lookahead", lookahead, low=0)
        self.config = DeepSpeechConfig(
            n_mels=n_mels, vocab_size=vocab_size, conv_channels=tuple(conv_channels),
            conv_kernels=tuple(tuple(k) for k in conv_kernels), conv_strides=tuple(tuple(s) for s in conv_strides),
            rnn_cell=rnn_cell, rnn_layers=rnn_layers, rnn_hidden=rnn_hidden, bidirectional=bidirectional,
            merge_directions=merge_directions, rnn_batch_norm=rnn_batch_norm, lookahead=lookahead, backend=backend,
        )
        self.net = DeepSpeech(self.config)
        self.op_timer = OpTimer()
        self.op_timer.enabled = time_op
        for layer in self.net.rnns:
            layer.op_timer = self.op_timer
        self.tokenizer = None  # from the data module in setup()
        self.feature_config = None
        self.data_config: dict = {}
        # Training statistics for the report; kept in checkpoints so a resumed run reports the whole run.
        self.stats = {"wall_seconds": 0.0, "audio_seconds": 0.0, "utterances": 0, "nonfinite_batches_skipped": 0}
        self._nonfinite_in_a_row = 0
        self._bn_snapshot: list[torch.Tensor] | None = None  # taken at an optimizer step's first micro-batch
        self._fit_started = None
        self._dev_counts: list[torch.Tensor] = []

    # -- data and checkpoint plumbing --

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            self.tokenizer = dm.tokenizer
            self.feature_config = dm.feature_config
            self.data_config = {"root": str(dm.root), "train_splits": list(dm.train_splits)}
            check_vocabulary("data module", dm.tokenizer.tokens, dm.tokenizer, self.config.vocab_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is None:
            raise UserError("cannot save a checkpoint without a tokenizer (train through a data module)")
        payload = checkpoint_payload(self.config, self.tokenizer, self.feature_config)
        payload["data"] = self.data_config
        payload["stats"] = dict(self.stats, wall_seconds=self._wall_seconds())
        checkpoint[CHECKPOINT_KEY] = payload

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        payload = checkpoint.get(CHECKPOINT_KEY)
        if payload is None:
            raise UserError("checkpoint to resume from is not a checkpoint of this project")
        if self.tokenizer is not None:
            check_vocabulary("checkpoint to resume from", payload["vocabulary"], self.tokenizer,
                             self.config.vocab_size)
        self.stats.update(payload.get("stats", {}))

    def inference_model(self) -> InferenceModel:
        return InferenceModel.from_module(self.net, self.tokenizer, self.feature_config)

    # -- optimisation --

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.dim() == 1 else decay).append(p)  # no weight decay on biases and norms
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        warmup = hp.warmup_steps
        total_steps: dict[str, int] = {}

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.schedule == "constant" or step == warmup:
                return 1.0
            # Asked lazily: estimated_stepping_batches sets up the training loader, which must happen
            # after a checkpoint's loader state is restored, not here in configure_optimizers.
            if "n" not in total_steps:
                total_steps["n"] = max(1, int(self.trainer.estimated_stepping_batches))
            total = total_steps["n"]
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if hp.schedule == "cosine" else 1 - progress
            return hp.final_lr_ratio + (1 - hp.final_lr_ratio) * shape

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _ctc_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits, out_lengths = self.net(batch["features"], batch["feature_lengths"])  # (T', N, V)
        log_probs = logits.float().log_softmax(dim=-1)
        loss = F.ctc_loss(log_probs, batch["targets"], out_lengths.to(log_probs.device), batch["target_lengths"],
                          blank=0, reduction="mean", zero_infinity=True)
        return loss, log_probs

    def _batch_norm_buffers(self) -> list[torch.Tensor]:
        return [b for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # every utterance of the batch failed to load
            return None
        # BatchNorm's running statistics change in the forward pass; keep a copy from the first
        # micro-batch of the optimizer step, so a skipped non-finite step leaves them as they were
        # before all of its micro-batches (gradient accumulation), not just the last one.
        if self._bn_snapshot is None:
            self._bn_snapshot = [b.clone() for b in self._batch_norm_buffers()]
        loss, _ = self._ctc_loss(batch)
        self.stats["audio_seconds"] += float(sum(batch["durations"]))
        self.stats["utterances"] += len(batch["durations"])
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(batch["durations"]))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the step when any gradient is NaN/inf. After DDP's all-reduce every rank sees the
        same gradients, so every rank takes the same decision without extra communication."""
        snapshot, self._bn_snapshot = self._bn_snapshot, None  # the next micro-batch starts a new step
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.log("grad_norm", norm, batch_size=1)
        if torch.isfinite(norm):
            self._nonfinite_in_a_row = 0
            return
        if str(self.trainer.precision).startswith("16"):
            return  # fp16's gradient scaler skips the step and lowers its scale itself
        for p in self.parameters():
            p.grad = None  # optimizers skip parameters without a gradient
        for buffer, saved in zip(self._batch_norm_buffers(), snapshot or []):
            buffer.copy_(saved)
        self.stats["nonfinite_batches_skipped"] += 1
        self._nonfinite_in_a_row += 1
        limit = self.hparams.max_nonfinite_in_a_row
        print(f"warning: step {self.global_step}: non-finite loss or gradient, batch skipped "
              f"({self._nonfinite_in_a_row} in a row, stopping at {limit})", file=sys.stderr)
        if self._nonfinite_in_a_row >= limit:
            raise UserError(
                f"training stopped: {self._nonfinite_in_a_row} batches in a row had a non-finite loss or gradient "
                f"(step {self.global_step}); lower model.lr, enable gradient clipping, or check the data"
            )

    # -- validation --

    def on_validation_epoch_start(self) -> None:
        self._dev_counts = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch:
            return
        import jiwer

        from asr.decode import GreedyDecoder

        loss, log_probs = self._ctc_loss(batch)
        out_lengths = self.net.output_lengths(batch["feature_lengths"].cpu())
        hyps = GreedyDecoder(self.tokenizer).decode(log_probs.transpose(0, 1).detach().float().cpu(), out_lengths)
        refs = batch["texts"]
        kept = [(r, h.text) for r, h in zip(refs, hyps) if r.strip()]
        words = jiwer.process_words([r for r, _ in kept], [h for _, h in kept])
        chars = jiwer.process_characters([r for r, _ in kept], [h for _, h in kept])
        word_errors = words.substitutions + words.deletions + words.insertions
        char_errors = chars.substitutions + chars.deletions + chars.insertions
        word_total = words.hits + words.substitutions + words.deletions
        char_total = chars.hits + chars.substitutions + chars.deletions
        n = len(refs)
        self._dev_counts.append(torch.tensor([word_errors, word_total, char_errors, char_total,
                                              float(loss) * n, n], dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        counts = torch.stack(self._dev_counts).sum(0) if self._dev_counts else torch.zeros(6, dtype=torch.float64)
        counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        word_errors, word_total, char_errors, char_total, loss_sum, n = counts.tolist()
        if n == 0:
            return
        self.log("dev_wer", word_errors / max(word_total, 1), prog_bar=True, sync_dist=False)
        self.log("dev_cer", char_errors / max(char_total, 1), prog_bar=True, sync_dist=False)
        self.log("dev_loss", loss_sum / n, sync_dist=False)
        self._dev_counts = []

    # -- wall time --

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()

    def _wall_seconds(self) -> float:
        if self._fit_started is None:
            return self.stats["wall_seconds"]
        return self.stats["wall_seconds"] + time.perf_counter() - self._fit_started

    def on_train_epoch_end(self) -> None:
        self.op_timer.seconds()  # folds CUDA events into seconds: one synchronisation per epoch, not per step

    def on_train_end(self) -> None:
        self.stats["wall_seconds"] = self._wall_seconds()
        self._fit_started = None


# --- the CLI -----------------------------------------------------------------------------------------


class RunFolderConfig(SaveConfigCallback):
    """Saves the resolved config as <run folder>/config.yaml (not in a logger's version folder)."""

    def __init__(self, *args, **kwargs):
        kwargs["save_to_log_dir"] = False
        kwargs["overwrite"] = True
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage) -> None:
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / CONFIG_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.n_mels", "model.n_mels")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this checkpoint; 'last' means the run folder's last.ckpt if it exists")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=100,
                            help="write last.ckpt every this many optimizer steps (and after every epoch)")
        parser.add_argument("--checkpoint_every_minutes", type=float, default=DEFAULT_CHECKPOINT_MINUTES,
                            help="write last.ckpt at least this often (minutes of training), whatever the step count")
        parser.add_argument("--evaluate", type=bool, default=True,
                            help="after training: evaluate the test splits (greedy, beam+LM) and write the report")
        parser.add_argument("--beam_size", type=int, default=50, help="beam of the beam+LM decoder in the report")
        parser.add_argument("--tune_utterances", type=int | None, default=None,
                            help="pick the LM weight and word score on at most this many dev utterances, "
                                 "evenly spread over the split (default: the whole dev split)")

    def run_dir(self) -> Path:
        trainer_config = self.config.get("trainer", {})
        root = trainer_config.get("default_root_dir")
        if root:
            return Path(root)
        configs = self.config.get("config") or []
        name = Path(str(configs[-1])).stem if configs else "run"
        return Path(RUNS_DIR) / name

    def check_options(self) -> None:
        """UserError, in one line, for values Lightning would reject with a traceback (or accept wrongly)."""
        trainer_config = self.config.get("trainer", {})
        for name, minimum in (("max_epochs", 1), ("max_steps", 1)):
            value = trainer_config.get(name)
            if value is not None and value != -1 and value < minimum:
                raise UserError(f"trainer.{name} {value}: must be at least {minimum}, or -1 for no limit")
        for name in ("accumulate_grad_batches", "log_every_n_steps", "check_val_every_n_epoch"):
            value = trainer_config.get(name)
            if value is not None:
                check_range(f"trainer.{name}", value, low=1)
        if trainer_config.get("gradient_clip_val") is not None:
            check_range("trainer.gradient_clip_val", trainer_config["gradient_clip_val"], low=0.0)
        check_range("checkpoint_every_n_steps", self.config.get("checkpoint_every_n_steps"), low=1)
        check_range("checkpoint_every_minutes", self.config.get("checkpoint_every_minutes"), low=0.0, low_open=True)
        check_range("beam_size", self.config.get("beam_size"), low=1)
        if self.config.get("tune_utterances") is not None:
            check_range("tune_utterances", self.config.get("tune_utterances"), low=1)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        self.check_options()
        run_dir = self.run_dir()
        resume_from = self.config.get("ckpt_path")
        if resume_from not in (None, "last"):
            read_checkpoint(resume_from)  # UserError now, in one line, if it is not a checkpoint of ours
        # Claimed before the Trainer exists, so that nothing is written into a folder that is refused.
        self.run_lock = (claim_run_folder(run_dir, resuming=self.config.get("ckpt_path") is not None)
                         if _is_first_process() else None)
        kwargs["default_root_dir"] = str(run_dir)
        callbacks = [
            ModelCheckpoint(dirpath=run_dir, filename=BEST_CHECKPOINT, monitor="dev_wer", mode="min", save_top_k=1,
                            save_last=True, enable_version_counter=False, auto_insert_metric_name=False),
            TrainingControl(run_dir / f"{LAST_CHECKPOINT}.ckpt", self.config.get("checkpoint_every_n_steps"),
                            self.config.get("checkpoint_every_minutes")),
        ]
        trainer_config = self.config.get("trainer", {})
        if trainer_config.get("enable_progress_bar", True) is not False:
            callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50))
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        kwargs["callbacks"] = list(configured) + callbacks
        if trainer_config.get("logger", True) is not False:
            kwargs["logger"] = [TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""),
                                ResumableCSVLogger(save_dir=run_dir, name="csv", version="",
                                                   flush_logs_every_n_steps=CSV_FLUSH_EVERY_N_STEPS)]
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
            plugins = list(plugins) + [AtomicCheckpointIO()]
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def _resume_path(ckpt_path: str | None, run_dir: Path, announce: bool = True) -> str | None:
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = run_dir / f"{LAST_CHECKPOINT}.ckpt"
        if last.is_file():
            read_checkpoint(last)
            return str(last)
        if announce:  # a job script that always passes --ckpt_path last starts its first run this way
            print(f"asr train: --ckpt_path last: {last} does not exist, so there is nothing to resume; "
                  "training starts at step 0", file=sys.stderr, flush=True)
        return None
    return ckpt_path  # checked by TrainCLI.instantiate_trainer


def _is_first_process() -> bool:
    """False in the other processes of a distributed run (Lightning's DDP children, torchrun, SLURM
    tasks), which must neither lock nor judge the run folder that the first process has claimed."""
    return all(int(os.environ.get(var) or 0) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _device_name(trainer: L.Trainer) -> str:
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(root)}"
    import platform

    return f"{trainer.world_size} x CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _backend_name(model: SpeechRecognizer) -> str:
    """The requested backend and what it resolved to, e.g. "auto -> persistent"."""
    if model.config.rnn_cell == "gru":
        return "torch.nn.GRU"
    from asr.ops.dispatch import backends_used

    used = backends_used()
    return f"{model.config.backend} -> {', '.join(used)}" if used else model.config.backend


def training_report(trainer: L.Trainer, model: SpeechRecognizer, run_dir: Path) -> dict:
    """The report's run, device and training sections (the eval section is added by finish_run)."""
    stats = dict(model.stats)
    audio_seconds = torch.tensor([stats["audio_seconds"], float(stats["utterances"])], dtype=torch.float64)
    op_seconds = model.op_timer.seconds()
    op = torch.tensor([op_seconds, model.op_timer.flops], dtype=torch.float64)
    if trainer.world_size > 1:
        audio_seconds = trainer.strategy.reduce(audio_seconds.to(model.device), reduce_op="sum").cpu()
        op = trainer.strategy.reduce(op.to(model.device), reduce_op="sum").cpu()
    wall = stats["wall_seconds"]
    audio_hours = float(audio_seconds[0]) / 3600
    op_seconds, op_flops = float(op[0]), float(op[1])
    return {
        "run": run_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(trainer),
        "backend": _backend_name(model),
        "parameters": sum(p.numel() for p in model.net.parameters()),
        "config": str(run_dir / CONFIG_FILE),
        "model": {"rnn_cell": model.config.rnn_cell, "rnn_layers": model.config.rnn_layers,
                  "rnn_hidden": model.config.rnn_hidden, "bidirectional": model.config.bidirectional,
                  "vocab_size": model.config.vocab_size, "time_stride": model.config.time_stride},
        "train": {
            "wall_seconds": wall,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "audio_hours": audio_hours,
            "audio_hours_per_wall_hour": audio_hours / (wall / 3600) if wall > 0 else None,
            "utterances_per_second": float(audio_seconds[1]) / wall if wall > 0 else None,
            "rnn_op_seconds": op_seconds,  # summed over ranks
            "rnn_op_tflops": op_flops / op_seconds / 1e12 if op_seconds > 0 else None,
            "nonfinite_batches_skipped": stats["nonfinite_batches_skipped"],
        },
    }


def language_model_texts(datamodule: ASRDataModule) -> tuple[list[str], str]:
    """The word LM's training text: the corpus's text-only LM file (<root>/lm_text.txt, which holds
    the training sentences and other text, never an evaluation sentence) where there is one, like
    LibriSpeech's LM corpus; otherwise the training transcripts."""
    from asr.data.text import normalize_text

    lm_file = Path(datamodule.root) / LM_TEXT_FILE
    if lm_file.is_file():
        lines = [normalize_text(line) for line in lm_file.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        if lines:
            return lines, str(lm_file)
    return [u.text for u in datamodule.train_utterances], "training transcripts"


def spread_subset(items: list, limit: int | None) -> list:
    """At most `limit` of `items`, evenly spaced (deterministic); all of them when limit is None."""
    if limit is None or len(items) <= limit:
        return list(items)
    if limit < 1:
        raise UserError(f"--tune_utterances {limit}: must be at least 1")
    return [items[i * len(items) // limit] for i in range(limit)]


def tune_beam_on_dev(model, datamodule: ASRDataModule, lm_path, lexicon: list[str], beam_size: int,
                     report: dict, max_utterances: int | None = None) -> tuple[float, float]:
    """The LM weight and word score with the lowest beam+LM WER on the dev split (never a test split),
    or on `max_utterances` of it spread evenly (the tuning decodes dev once per candidate).
    The acoustic model runs once; every candidate decodes the same log-probabilities."""
    from asr.decode import BeamLMDecoder
    from asr.evaluate import evaluate

    dev = datamodule.test_utterances(datamodule.dev_split)
    dev = spread_subset(sorted(dev, key=lambda u: u.id), max_utterances)
    candidates = {f"{w}/{s}": (w, s) for w in BEAM_LM_WEIGHTS for s in BEAM_WORD_SCORES}
    decoders = {name: BeamLMDecoder(model.tokenizer, lm_path, lexicon, beam_size=beam_size, lm_weight=w, word_score=s)
                for name, (w, s) in candidates.items()}
    result = evaluate(model, dev, decoders, max_batch_seconds=datamodule.max_batch_seconds)
    wers = {name: scores.wer for name, scores in result.scores.items()}
    best = min(wers, key=lambda name: (wers[name], name))
    report["decoding"] = {"beam_size": beam_size, "lm_order": LM_ORDER, "lm_weight": candidates[best][0],
                          "word_score": candidates[best][1], "tuned_on": datamodule.dev_split,
                          "tuned_on_utterances": len(dev),
                          "dev_wer": wers[best], "dev_wer_by_weight/score": wers}
    return candidates[best]


def finish_run(report: dict, run_dir: Path, datamodule: ASRDataModule, beam_size: int,
               device: torch.device = torch.device("cpu"), trained: SpeechRecognizer | None = None,
               tune_utterances: int | None = None) -> dict:
    """Build the word LM from the training transcripts, evaluate the best checkpoint on every test
    split with greedy and beam+LM decoding, and write report.json + report.md."""
    from asr.evaluate import build_decoders, evaluate
    from asr.lm import build_arpa
    from asr.model.inference import load_for_inference
    from asr.report import write_report

    best = run_dir / f"{BEST_CHECKPOINT}.ckpt"
    last = run_dir / f"{LAST_CHECKPOINT}.ckpt"
    checkpoint = best if best.is_file() else last
    if checkpoint.is_file():
        model = load_for_inference(checkpoint, map_location=device)
        report["evaluated_checkpoint"] = str(checkpoint)
    elif trained is not None:  # checkpointing was switched off: evaluate the weights in memory
        model = trained.inference_model()
        report["evaluated_checkpoint"] = None
    else:
        raise UserError(f"{run_dir}: no checkpoint to evaluate")
    texts, lm_source = language_model_texts(datamodule)
    lm_path = build_arpa(texts, run_dir / LM_FILE, order=LM_ORDER)
    lexicon = sorted({w for t in texts for w in t.split()})
    report["language_model"] = {"source": lm_source, "sentences": len(texts), "words": len(lexicon),
                                "order": LM_ORDER}
    lm_weight, word_score = tune_beam_on_dev(model, datamodule, lm_path, lexicon, beam_size, report,
                                             tune_utterances)
    decoders = build_decoders(model.tokenizer, "both", lm_path=lm_path, lexicon=lexicon, beam_size=beam_size,
                              lm_weight=lm_weight, word_score=word_score)
    report["eval"] = {}
    for split in datamodule.test_splits:
        utterances = datamodule.test_utterances(split)
        result = evaluate(model, utterances, decoders, max_batch_seconds=datamodule.max_batch_seconds)
        per_decoder = result.to_dict().get("decoders", {})
        report["eval"][split] = {name: {key: scores.get(key) for key in REPORTED_SCORES} | {"utterances": result.utterances}
                                 for name, scores in per_decoder.items()}
    write_report(run_dir, report)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_float32_matmul_precision("high")
    logging.getLogger("lightning_fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0"
    # `asr train ...` passes its own arguments; sys.argv stays whole for Lightning's DDP relaunch.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # the run folder is ours to judge (claim_run_folder); its .lock makes Lightning think it is not empty
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    from jsonargparse import ArgumentError
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        cli = TrainCLI(
            SpeechRecognizer,
            TrainingDataModule,
            run=False,
            args=argv,
            save_config_callback=RunFolderConfig,
            trainer_defaults={"use_distributed_sampler": False, "num_sanity_val_steps": 0},
            parser_kwargs={"prog": "asr train", "default_env": False, "exit_on_error": False},
        )
    except ArgumentError as err:  # one line, not the 70-line usage above it
        raise UserError(f"{_first_line(err)} (`asr train --help` lists the options)") from None
    except MisconfigurationException as err:
        raise UserError(_first_line(err)) from None
    run_dir = Path(cli.trainer.default_root_dir)
    try:
        ckpt_path = _resume_path(cli.config.get("ckpt_path"), run_dir, announce=cli.run_lock is not None)
        return _fit_and_report(cli, run_dir, ckpt_path)
    finally:
        if cli.run_lock is not None:
            cli.run_lock.close()


def _first_line(err: Exception) -> str:
    """The message on one line: jsonargparse puts the key on the first line and the reason below it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3])[:400] if lines else type(err).__name__


def _fit_and_report(cli: TrainCLI, run_dir: Path, ckpt_path: str | None) -> int:
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except TrainingStopped as stop:
        print(f"asr train: {stop}: {stop.checkpoint} written; run the same command with --ckpt_path last "
              "to resume", file=sys.stderr)
        return 128 + stop.signum
    if cli.trainer.interrupted:
        return 130
    report = training_report(cli.trainer, cli.model, run_dir)
    if not cli.trainer.is_global_zero:
        return 0
    if cli.config.get("evaluate", True):
        report = finish_run(report, run_dir, cli.datamodule, cli.config.get("beam_size") or 50, cli.model.device,
                            trained=cli.model, tune_utterances=cli.config.get("tune_utterances"))
    else:
        from asr.report import write_report

        write_report(run_dir, report)
    markdown = run_dir / "report.md"
    if markdown.is_file():
        print(markdown.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
