"""What an exact mid-epoch resume needs besides the checkpoint: a training loader that can skip the
batches already consumed this epoch, and a metrics.csv that keeps the rows logged before the resume."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from asr.data.datamodule import ASRDataModule
from asr.fileio import atomic_write_text

CSV_FLUSH_EVERY_N_STEPS = 10  # metrics.csv rows reach the disk this often (a kill loses at most these)


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

    # Lightning stops a loader's workers at the end of fit through `loader._iterator`
    # (combined_loader._shutdown_workers_and_reset_iterator): here that is the wrapped loader's. Without
    # it, a persistent worker (data.feature_cache_gb) outlived training, and since workers ignore SIGTERM
    # (DataLoader's exit handler sends them that), the process hung at exit.
    @property
    def _iterator(self):
        return getattr(self.loader, "_iterator", None)

    @_iterator.setter
    def _iterator(self, value) -> None:
        self.loader._iterator = value

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
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _row_step(row) < step]
        out = io.StringIO()  # rewritten, never deleted: with no row left it keeps its header
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
