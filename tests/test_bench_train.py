"""`asr bench train`'s sweep on the CPU at small sizes: the recipe network, the row order, the time split,
the FLOP model against torch's own FLOP counter, and what a budget leaves unmeasured."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from asr import cli
from asr.bench import train
from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig
from asr.ops import dispatch


def test_clean100_network_is_the_recipes(repo_root):
    recipe = yaml.safe_load((repo_root / "recipes" / "librispeech" / "clean100.yaml").read_text())["model"]["net"]
    preset = train.NETWORKS["clean100"]
    assert set(recipe) == set(preset)
    for key, value in recipe.items():
        expected = tuple(tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value
        assert preset[key] == expected, key


@pytest.mark.parametrize("bidirectional, merge", [(True, "sum"), (False, "sum"), (True, "concat")])
def test_flop_model_matches_torchs_flop_counter(bidirectional, merge):
    """The forward FLOPs of the model against torch.utils.flop_counter on the reference backend (whose
    recurrence is one matmul per step, so the counter sees it)."""
    config = DeepSpeechConfig(conv_channels=(3, 4), conv_kernels=((5, 3), (3, 3)), conv_strides=((2, 2), (2, 1)),
                              rnn_layers=2, rnn_hidden=12, bidirectional=bidirectional, merge_directions=merge,
                              n_mels=16, backend="reference")
    net = DeepSpeech(config).eval()
    N, T = 3, 40
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.randn(N, T, config.n_mels), torch.full((N,), T))
    model = train.step_flops(config, N, T)
    first_conv = 2.0 * 1 * 3 * 5 * 3 * (16 // 2) * (T // 2) * N  # F' = 8, T' = 20 after the first conv
    forward = (model["step"] + first_conv) / 3
    assert forward == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert model["rnn_steps"] == net.output_lengths(torch.tensor([T])).item() == 20


def _run(argv, monkeypatch, tmp_path):
    out = tmp_path / "train.json"
    argv = ["bench", "train", *argv, "--threads", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["asr", *argv])
    monkeypatch.setattr(dispatch, "_decisions", {})  # backend decisions are per process; start this one clean
    assert cli.main(argv) == 0
    return json.loads(out.read_text()), out


def test_sweep_rows_come_in_the_order_asked_with_a_consistent_time_split(tmp_path, monkeypatch):
    result, out = _run(["--networks", "clean100", "--batch", "4,1", "--seconds", "0.2", "--repeats", "2"],
                       monkeypatch, tmp_path)
    assert result["complete"] is True and result["device_type"] == "cpu" and "wall clock" in result["timing"]
    assert [(r["network"], r["batch"]) for r in result["rows"]] == [("clean100", 4), ("clean100", 1)]
    assert result["batch"] == 4 and result["config"]["rnn_hidden"] == 800  # the headline is the first row
    info = result["networks"]["clean100"]
    assert info["parameters"]["ours"] == sum(info["parameter_sizes"]) > 12_000_000
    assert info["max_abs_output_difference"] < 1e-4
    for row in result["rows"]:
        flop = train.step_flops(DeepSpeechConfig(**train.NETWORKS["clean100"]), row["batch"], 20)
        assert row["step_flop"] == flop["step"] and row["rnn_steps"] == 10
        for side in ("ours", "torch_rnn"):
            r = row[side]
            assert r["error"] is None
            assert 0 < r["recurrent_seconds"] < r["forward_seconds"] + r["backward_seconds"] <= r["step_seconds"]
            assert r["rest_seconds"] == pytest.approx(r["step_seconds"] - r["recurrent_seconds"] - r["optimizer_seconds"])
            # the optimizer is part of the non-recurrent time, and the rest of the network is what is left
            assert 0 < r["optimizer_seconds"] < r["step_seconds"] - r["recurrent_seconds"]
            assert r["step_seconds"] in r["step_seconds_all"] and len(r["step_seconds_all"]) == 2
            assert r["utterances_per_second"] == pytest.approx(row["batch"] / r["step_seconds"])
            assert r["step_tflops"] == pytest.approx(flop["step"] / r["step_seconds"] / 1e12)
            assert r["recurrent_tflops"] == pytest.approx(flop[f"{side}_recurrent"] / r["recurrent_seconds"] / 1e12)
        assert row["ours"]["backends"] == ["persistent"] and row["torch_rnn"]["backends"] == []
        assert row["speedup"] == pytest.approx(row["torch_rnn"]["step_seconds"] / row["ours"]["step_seconds"])
    assert out.with_suffix(".png").is_file()


def test_budget_leaves_the_rest_listed_as_not_run(tmp_path, monkeypatch):
    result, _ = _run(["--layers", "1", "--hidden", "8", "--conv-channels", "2", "--batch", "1,2,3", "--seconds", "0.2",
                      "--repeats", "1", "--budget-seconds", "0", "--no-plot"], monkeypatch, tmp_path)
    assert [r["network"] for r in result["rows"]] == ["custom"] * 3
    assert all(r["speedup"] is None and "not run" in r["ours"]["error"] for r in result["rows"])
    assert "speedup" not in result  # no headline without a measured row


def test_gpu_defaults_start_with_the_recipe_network_at_batch_4_and_16():
    import argparse

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    plan = train.sweep_plan(parser.parse_args([]), "cuda")
    assert plan["networks"][0] == train.RECIPE_NETWORK == "clean100" and "ds2" in plan["networks"]
    assert plan["batch"][:2] == (4, 16) and sorted(plan["batch"]) == [1, 2, 4, 8, 16, 32, 64]
    assert set(plan["precision"]) == {"bf16", "fp32"}
    assert train.NETWORKS["ds2"]["rnn_layers"] == 7 and train.NETWORKS["ds2"]["rnn_hidden"] == 1760
    cpu = train.sweep_plan(parser.parse_args([]), "cpu")
    assert cpu["batch"][:2] == (4, 16) and cpu["precision"] == ("fp32",)
