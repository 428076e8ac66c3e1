"""recipes/librispeech/full960.yaml as 2 "nodes" of 1 CPU process each, started the way torchrun starts
them (its environment variables: Lightning's TorchElasticEnvironment), on gloo, shrunk to a tiny network
and the tiny corpus.

"Matches 1 process" means: after the same number of optimizer steps over the same global batches, the
trained parameters are the same (to float rounding). The data module gives rank r the batches r, r+2,
... of the epoch's batch list, so one step of the 2 nodes covers batches (2k, 2k+1); the single process
takes its step over the same two batches with accumulate_grad_batches=2, with the same averaged
gradient. BatchNorm normalises per rank (SyncBatchNorm needs a GPU: the recipe's sync_batchnorm is
turned off here), as the single process does per micro-batch, so running statistics are not compared.
Each rank records the utterance ids of its batches (ShardProbe, a callback given on the command line),
so the test checks that rank r saw exactly its shard: the single process's micro-batches r, r+2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from asr.training.cli import check_launcher, launcher_topology

STEPS = 2  # optimizer steps: 4 batches of the tiny corpus in all

FULL960_ON_CPU = (  # the recipe's data and trainer set for the tiny corpus on a CPU
    "--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.sync_batchnorm", "false",
    "--data.train_splits", "[train]", "--data.dev_split", "dev", "--data.test_splits", "[test-clean]",
    "--trainer.max_steps", str(STEPS), "--checkpoint_every_n_steps", str(STEPS), "--evaluate", "false",
    # 4.5 s batches cut the tiny corpus's 24 utterances into 6 batches: an even count, which 2 ranks share
    # without re-splitting one (an odd count would split the largest, and the runs would differ by design)
    "--data.max_batch_seconds", "4.5",
)


class ShardProbe(Callback):
    """Writes <out>/rank<R>.json: this rank's place in the run and the utterance ids of every batch it trained on."""

    def __init__(self, out: str):
        self.out = out
        self.batches: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(list(batch["ids"]))

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "global_rank": trainer.global_rank, "world_size": trainer.world_size, "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank, "num_nodes": trainer.num_nodes, "batches": self.batches}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(repo_root, corpus, run_dir, probe_dir, shrink, *extra) -> list[str]:
    probe = json.dumps([{"class_path": "test_multinode.ShardProbe", "init_args": {"out": str(probe_dir)}}])
    return [sys.executable, "-m", "asr.cli", "train", "--config", str(repo_root / "recipes/librispeech/full960.yaml"),
            "--data.root", str(corpus), "--trainer.default_root_dir", str(run_dir), *shrink, *FULL960_ON_CPU,
            "--trainer.callbacks", probe, *extra]


def _environment(repo_root, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(repo_root), str(repo_root / "tests")]), OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun_environment(node: int, nodes: int, port: int) -> dict:
    """What torchrun sets for the one process (--nproc-per-node 1) of node `node` of `nodes`."""
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nodes), RANK=str(node),
                LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(node), GROUP_WORLD_SIZE=str(nodes),
                ROLE_RANK=str(node), ROLE_WORLD_SIZE=str(nodes), ROLE_NAME="default",
                TORCHELASTIC_RUN_ID="test-multinode", TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0")


@pytest.mark.slow
def test_two_torchrun_nodes_see_their_shards_and_match_one_process(tmp_path, write_tiny_corpus, repo_root,
                                                                   shrink_overrides):
    corpus = write_tiny_corpus(tmp_path / "corpus")
    (tmp_path / "probe1").mkdir()
    (tmp_path / "probe2").mkdir()
    one = subprocess.Popen(_command(repo_root, corpus, tmp_path / "one", tmp_path / "probe1", shrink_overrides,
                                    "--trainer.devices", "1", "--trainer.num_nodes", "1",
                                    "--trainer.strategy", "auto", "--trainer.accumulate_grad_batches", "2"),
                           cwd=repo_root, env=_environment(repo_root), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    port = _free_port()
    nodes = [subprocess.Popen(_command(repo_root, corpus, tmp_path / "two", tmp_path / "probe2", shrink_overrides,
                                       "--trainer.devices", "1", "--trainer.num_nodes", "2"),
                              cwd=repo_root, env=_environment(repo_root, **_torchrun_environment(node, 2, port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in range(2)]
    outputs = []
    try:
        for proc in [one, *nodes]:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in [one, *nodes]:
            proc.kill()
    for proc, output in zip([one, *nodes], outputs):
        assert proc.returncode == 0, output[-4000:]

    single = json.loads((tmp_path / "probe1" / "rank0.json").read_text())
    assert single["world_size"] == 1 and len(single["batches"]) == 2 * STEPS
    ranks = [json.loads((tmp_path / "probe2" / f"rank{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert (seen["global_rank"], seen["node_rank"], seen["local_rank"]) == (r, r, 0)
        assert seen["world_size"] == 2 and seen["num_nodes"] == 2
        assert seen["batches"] == single["batches"][r::2], f"rank {r} did not train on its shard"
    assert not set(sum(ranks[0]["batches"], [])) & set(sum(ranks[1]["batches"], []))

    first = torch.load(tmp_path / "one" / "last.ckpt", map_location="cpu", weights_only=True)
    second = torch.load(tmp_path / "two" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == second["global_step"] == STEPS
    names = [n for n in first["state_dict"] if n.startswith("net.") and
             not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(names) > 10
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name in names:
        torch.testing.assert_close(second["state_dict"][name], first["state_dict"][name], rtol=1e-4, atol=1e-6,
                                   msg=f"{name} differs between 2 torchrun nodes and 1 process")


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, ("torchrun", 2, 8)),
    ({"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NAME": "asr"},
     ("SLURM", 2, 8)),
    ({"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_NAME": "asr"},
     ("SLURM", 2, 8)),
    ({"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "interactive"}, None),
])
def test_launcher_topology_reads_what_lightning_reads(environ, expected):
    assert launcher_topology(environ) == expected


def test_a_trainer_that_does_not_match_the_launcher_gets_the_options_to_pass():
    from asr.errors import UserError

    torchrun = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    check_launcher(2, 8, torchrun)
    check_launcher(2, "auto", torchrun)
    with pytest.raises(UserError, match="pass --trainer.num_nodes 2 --trainer.devices 8"):
        check_launcher(1, 8, torchrun)  # full960.yaml as it stands, on 2 nodes
    with pytest.raises(UserError, match="started by SLURM as 2 node"):
        check_launcher(2, 4, {"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"})
    check_launcher(1, 8, {})  # no launcher: nothing to check
