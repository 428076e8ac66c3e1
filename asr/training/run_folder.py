"""The run folder: what a run leaves in it, the lock that keeps a second trainer out, the saved config."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pytorch_lightning.cli import SaveConfigCallback

from asr.errors import UserError

RUNS_DIR = "runs"
CONFIG_FILE = "config.yaml"
BEST_CHECKPOINT = "best"  # file stem in the run folder
LAST_CHECKPOINT = "last"
LM_FILE = "lm.arpa"
LOCK_FILE = ".lock"  # held (flock) by the `asr train` writing the run folder; released when it exits
# What a run leaves in its folder: a new run refuses a folder that holds any of them.
RUN_ARTEFACTS = (CONFIG_FILE, f"{BEST_CHECKPOINT}.ckpt", f"{LAST_CHECKPOINT}.ckpt", "report.json", "report.md",
                 LM_FILE, "csv", "tensorboard")


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


def is_first_process() -> bool:
    """False in the other processes of a distributed run (Lightning's DDP children, torchrun, SLURM
    tasks), which must neither lock nor judge the run folder that the first process has claimed."""
    return all(int(os.environ.get(var) or 0) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
