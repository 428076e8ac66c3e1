"""`asr train`: the LightningCLI that builds the module, data and trainer from a recipe, and main()."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as L
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from asr.errors import UserError, check_range
from asr.model.inference import read_checkpoint
from asr.training.checkpoints import (
    DEFAULT_CHECKPOINT_MINUTES,
    AtomicCheckpointIO,
    TrainingControl,
    TrainingStopped,
)
from asr.training.budget import TimeBudget
from asr.training.finish import finish_run, training_report
from asr.training.module import SpeechRecognizer
from asr.training.resume import CSV_FLUSH_EVERY_N_STEPS, ResumableCSVLogger, TrainingDataModule
from asr.training.run_folder import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    RUNS_DIR,
    RunFolderConfig,
    claim_run_folder,
    is_first_process,
)
from asr.training.timing import OpTiming


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.n_mels", "model.net.n_mels")
        parser.link_arguments("data.vocab_size", "model.net.vocab_size", apply_on="instantiate")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this checkpoint; 'last' means the run folder's last.ckpt if it exists")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=100,
                            help="write last.ckpt every this many optimizer steps (and after every epoch)")
        parser.add_argument("--checkpoint_every_minutes", type=float, default=DEFAULT_CHECKPOINT_MINUTES,
                            help="write last.ckpt at least this often (minutes of training), whatever the step count")
        parser.add_argument("--budget_minutes", type=float | None, default=None,
                            help="train for about this many minutes of wall time: the step time is measured "
                                 "and the steps (and the LR schedule) planned to fit, trainer.max_epochs/max_steps "
                                 "being the cap (asr.training.budget)")
        parser.add_argument("--time_op", type=bool, default=True,
                            help="time the recurrent op during training (its seconds and TFLOP/s go in the report)")
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
        check_launcher(trainer_config.get("num_nodes"), trainer_config.get("devices"))
        check_range("checkpoint_every_n_steps", self.config.get("checkpoint_every_n_steps"), low=1)
        check_range("checkpoint_every_minutes", self.config.get("checkpoint_every_minutes"), low=0.0, low_open=True)
        check_range("beam_size", self.config.get("beam_size"), low=1)
        if self.config.get("budget_minutes") is not None:
            check_range("budget_minutes", self.config.get("budget_minutes"), low=0.0, low_open=True)
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
                         if is_first_process() else None)
        kwargs["default_root_dir"] = str(run_dir)
        callbacks = [
            ModelCheckpoint(dirpath=run_dir, filename=BEST_CHECKPOINT, monitor="dev_wer", mode="min", save_top_k=1,
                            save_last=True, enable_version_counter=False, auto_insert_metric_name=False),
            TrainingControl(run_dir / f"{LAST_CHECKPOINT}.ckpt", self.config.get("checkpoint_every_n_steps"),
                            self.config.get("checkpoint_every_minutes")),
        ]
        if self.config.get("time_op", True):
            callbacks.append(OpTiming())
        if self.config.get("budget_minutes") is not None:
            callbacks.append(TimeBudget(self.config.get("budget_minutes")))
        trainer_config = self.config.get("trainer", {})
        if trainer_config.get("enable_progress_bar", True) is not False:
            callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50))
        trainer_init = self.config_init.get("trainer") or {}
        configured = trainer_init.get("callbacks") or []
        kwargs["callbacks"] = list(configured) + callbacks
        if trainer_config.get("logger", True) is not False:
            kwargs["logger"] = [TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""),
                                ResumableCSVLogger(save_dir=run_dir, name="csv", version="",
                                                   flush_logs_every_n_steps=CSV_FLUSH_EVERY_N_STEPS)]
        plugins = trainer_init.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
            plugins = list(plugins) + [AtomicCheckpointIO()]
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def launcher_topology(environ=None) -> tuple[str, int, int] | None:
    """(launcher, nodes, processes per node) when torchrun or SLURM's srun started this process, read from
    the environment Lightning reads (TorchElasticEnvironment, SLURMEnvironment); None otherwise (one process,
    or Lightning's own launcher, which spawns the devices of one node itself)."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_NTASKS") and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # Lightning checks SLURM first
        nodes = int(env.get("SLURM_NNODES") or 1)
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        return "SLURM", nodes, int(per_node) if per_node.isdigit() else int(env["SLURM_NTASKS"]) // nodes
    if env.get("TORCHELASTIC_RUN_ID") and env.get("WORLD_SIZE") and env.get("LOCAL_WORLD_SIZE"):
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return "torchrun", int(env["WORLD_SIZE"]) // per_node, per_node
    return None


def check_launcher(num_nodes, devices, environ=None) -> None:
    """Under torchrun or srun the processes exist already, and Lightning needs trainer.num_nodes x
    trainer.devices to be exactly them: say so in one line, with the options to pass, instead of its traceback."""
    topology = launcher_topology(environ)
    if topology is None:
        return
    launcher, nodes, per_node = topology
    num_nodes = 1 if num_nodes is None else int(num_nodes)
    try:
        devices = int(devices)
    except (TypeError, ValueError):
        devices = None  # "auto", a list of GPUs: Lightning judges those
    if num_nodes != nodes or (devices is not None and devices != per_node):
        raise UserError(f"started by {launcher} as {nodes} node(s) x {per_node} process(es), but the trainer is set "
                        f"for {num_nodes} x {devices if devices is not None else 'auto'}: pass --trainer.num_nodes "
                        f"{nodes} --trainer.devices {per_node}")


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
