"""The strong-scaling model (asr.bench.scaling) on cases whose answer is known in closed form, and
`asr bench scaling` end to end on a small hand-made `asr bench train` result."""

from __future__ import annotations

import json
import math

import pytest

from asr import cli
from asr.bench import scaling
from asr.bench.scaling import MIB, Cluster, Compute, Link

NO_LATENCY = Link(bandwidth=1e9, latency=0.0)


def linear_compute(seconds_per_utterance: float, batches=(1, 2, 4, 8, 16, 32, 64), backward_share=0.5,
                   optimizer=0.0) -> Compute:
    """Step time exactly proportional to the batch (plus a fixed optimizer time)."""
    return Compute(step={b: seconds_per_utterance * b + optimizer for b in batches},
                   backward={b: backward_share * seconds_per_utterance * b for b in batches},
                   optimizer={b: optimizer for b in batches})


def test_ring_cost_is_the_alpha_beta_formula():
    link = Link(bandwidth=2e9, latency=3e-6)
    assert scaling.ring_allreduce_seconds(1e6, 1, link) == 0.0  # nothing to reduce on one rank
    assert scaling.ring_allreduce_seconds(1e6, 2, link) == pytest.approx(1e6 / 2e9 + 2 * 3e-6)
    assert scaling.ring_allreduce_seconds(1e6, 8, link) == pytest.approx(2 * 7 / 8 * 1e6 / 2e9 + 14 * 3e-6)


def test_bandwidth_bound_limit_is_twice_the_bytes_over_bandwidth():
    nbytes = 100 * MIB
    times = [scaling.ring_allreduce_seconds(nbytes, g, NO_LATENCY) for g in (2, 16, 1024, 10**6)]
    assert times == sorted(times)  # more ranks never cost less in a ring
    assert times[-1] == pytest.approx(2 * nbytes / 1e9, rel=1e-5)
    assert all(t < 2 * nbytes / 1e9 for t in times)


def test_cluster_uses_nvlink_within_a_node_and_infiniband_above():
    cluster = Cluster(gpus_per_node=8, intra=Link(300e9, 1e-6), inter=Link(25e9, 5e-6))
    assert cluster.link(8) == cluster.intra and cluster.link(9) == cluster.inter and cluster.link(128) == cluster.inter


def test_ddp_buckets_follow_reverse_parameter_order_and_the_caps():
    # elements; 4 bytes each. Reversed: 0.5 MiB, 0.75 MiB (first bucket closes at >= 1 MiB), 10, 20 (closes at
    # >= 25 MiB), then 3 MiB left over.
    sizes = [int(3 * MIB / 4), int(20 * MIB / 4), int(10 * MIB / 4), int(0.75 * MIB / 4), int(0.5 * MIB / 4)]
    buckets = scaling.ddp_buckets(sizes, 4, 25 * MIB, 1 * MIB)
    assert [b / MIB for b in buckets] == pytest.approx([1.25, 30.0, 3.0])
    assert sum(buckets) == 4 * sum(sizes)


def test_overlap_hides_all_but_the_last_bucket_when_the_backward_is_long():
    cluster = Cluster(intra=NO_LATENCY, inter=NO_LATENCY)
    buckets = [10**6, 10**6]  # each costs exactly 1 ms over 2 ranks (bytes / bandwidth)
    one = scaling.ring_allreduce_seconds(10**6, 2, NO_LATENCY)
    assert one == pytest.approx(1e-3)
    # backward 10 ms: bucket 1 ready at 5 ms, done at 6; bucket 2 ready at 10, done at 11 -> 1 ms exposed
    assert scaling.exposed_allreduce_seconds(buckets, 2, cluster, 10e-3) == pytest.approx(1e-3)
    # backward 1 ms: bucket 1 ready at 0.5, done 1.5; bucket 2 starts at 1.5, done 2.5 -> 1.5 ms exposed
    assert scaling.exposed_allreduce_seconds(buckets, 2, cluster, 1e-3) == pytest.approx(1.5e-3)
    assert scaling.exposed_allreduce_seconds(buckets, 2, cluster, 10e-3, overlap=False) == pytest.approx(2e-3)
    assert scaling.exposed_allreduce_seconds(buckets, 1, cluster, 10e-3) == 0.0


def test_compute_interpolates_and_accumulates_above_the_largest_batch():
    compute = Compute(step={4: 1.0, 8: 1.5}, backward={4: 0.6, 8: 0.9}, optimizer={4: 0.1, 8: 0.1})
    assert scaling.compute_seconds(compute, 6) == pytest.approx((1.25, 0.75))
    assert scaling.compute_seconds(compute, 2) == pytest.approx((1.0, 0.6))  # below: the smallest batch's time
    # 32 utterances = 4 micro-batches of 8: 4 x (1.5 - 0.1) + one optimizer step; overlap with the last backward
    assert scaling.compute_seconds(compute, 32) == pytest.approx((4 * 1.4 + 0.1, 0.9))


def test_one_gpu_has_no_communication_and_perfect_compute_scales_perfectly():
    compute = linear_compute(1e-3)
    points = scaling.scaling_curve(compute, [50 * MIB], [1, 2, 4, 8, 16, 32, 64, 128], 512,
                                   Cluster(intra=Link(1e30, 0.0), inter=Link(1e30, 0.0)))
    assert points[0].allreduce_seconds == points[0].exposed_seconds == 0.0
    assert points[0].speedup == 1.0
    for p in points:
        assert p.speedup == pytest.approx(p.gpus, rel=1e-9) and p.efficiency == pytest.approx(1.0)
    assert scaling.stop_scaling_gpus(points) is None


def test_stop_scaling_g_matches_the_closed_form():
    """Compute c*B/G, no overlap, no latency, comm 2(G-1)/G * S/bw: efficiency = 1 / (1 + 2(G-1) S/(bw c B)).
    With S/bw = cB/64 the efficiency is 1 / (1 + (G-1)/32): 0.508 at G=32, 0.337 at G=64, 0.201 at G=128."""
    global_batch, per_utterance = 512, 1e-3  # c*B = 0.512 s
    nbytes = 1e9 * global_batch * per_utterance / 64
    compute = linear_compute(per_utterance, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
    gpus = [1, 2, 4, 8, 16, 32, 64, 128]
    points = scaling.scaling_curve(compute, [nbytes], gpus, global_batch, Cluster(intra=NO_LATENCY, inter=NO_LATENCY),
                                   overlap=False)
    for p in points:
        assert p.efficiency == pytest.approx(1 / (1 + (p.gpus - 1) / 32), rel=1e-9)
    assert scaling.stop_scaling_gpus(points, 0.5) == 64
    assert scaling.stop_scaling_gpus(points, 0.3) == 128  # 0.337 at G=64, 0.201 at G=128
    assert scaling.stop_scaling_gpus(points, 0.2) is None
    assert scaling.stop_scaling_gpus(points, 0.9) == 8  # 0.914 at G=4, 0.821 at G=8


def test_latency_bound_ring_grows_linearly_with_g_across_nodes():
    cluster = Cluster(gpus_per_node=8, intra=Link(1e30, 1e-6), inter=Link(1e30, 10e-6))
    buckets = [1024] * 3  # tiny buckets: latency only
    for gpus in (16, 64, 128):
        expected = 3 * 2 * (gpus - 1) * 10e-6
        assert scaling.exposed_allreduce_seconds(buckets, gpus, cluster, 0.0) == pytest.approx(expected)
    assert scaling.exposed_allreduce_seconds(buckets, 8, cluster, 0.0) == pytest.approx(3 * 14 * 1e-6)


def _train_json(path, ours_per_utterance, theirs_per_utterance, parameter_sizes):
    rows = []
    for batch in (4, 16, 1, 2, 8, 32, 64):
        row = {"network": "clean100", "precision": "bf16", "batch": batch, "speedup": 1.0}
        for side, per in (("ours", ours_per_utterance), ("torch_rnn", theirs_per_utterance)):
            step = 0.01 + per * batch  # a fixed 10 ms per step (latency-bound small batches) + per utterance
            row[side] = {"label": side, "step_seconds": step, "backward_seconds": 0.6 * step,
                         "optimizer_seconds": 0.002}
        rows.append(row)
    path.write_text(json.dumps({"command": "asr bench train (hand-made)", "device": "test", "timing": "made up",
                                "seconds_per_utterance": 10.0, "rows": rows,
                                "networks": {"clean100": {"parameter_sizes": parameter_sizes}}}))
    return path


def test_bench_scaling_command_writes_both_curves_the_paper_point_and_its_assumptions(tmp_path, capsys):
    train_json = _train_json(tmp_path / "train.json", 1e-3, 4e-3, [3_000_000] * 4)
    out = tmp_path / "scaling.json"
    assert cli.main(["bench", "scaling", "--train-json", str(train_json), "--out", str(out), "--ib-gbs", "10"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["network"] == "clean100" and result["precision"] == "bf16" and result["global_batch"] == 512
    assert result["parameters"] == 12_000_000 and sum(result["buckets_bytes"]) == 48_000_000
    for side in ("ours", "torch_rnn"):
        curve = {p["gpus"]: p for p in result["curves"][side]}
        assert sorted(curve) == [1, 2, 4, 8, 16, 32, 64, 128]
        assert curve[1]["speedup"] == 1.0 and curve[1]["exposed_seconds"] == 0.0
        assert [curve[g]["per_gpu_batch"] for g in (1, 8, 128)] == [512, 64, 4]
        # G=1: 8 micro-batches of 64 through accumulation
        step64 = 0.01 + (1e-3 if side == "ours" else 4e-3) * 64
        assert curve[1]["compute_seconds"] == pytest.approx(8 * (step64 - 0.002) + 0.002)
        assert result["speedup_8_to_128"][side] == pytest.approx(curve[8]["step_seconds"] / curve[128]["step_seconds"])
    # the fixed per-step cost weighs more where the per-utterance cost is small: ours scales worse here
    assert result["speedup_8_to_128"]["ours"] < result["speedup_8_to_128"]["torch_rnn"] < 16
    assert result["paper"]["speedup"] == 16 and "16x from 8 to 128" in printed
    assert any("InfiniBand, 10 GB/s" in line for line in result["assumptions"])
    for line in result["assumptions"]:
        assert line in printed
    assert (tmp_path / "scaling.png").is_file()


def test_bench_scaling_refuses_a_file_without_rows(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(["bench", "scaling", "--train-json", str(bad)]) == 2
    assert "no measured row" in capsys.readouterr().err


def test_a_step_time_that_falls_with_the_batch_is_flagged():
    noisy = Compute(step={4: 1.0, 8: 0.8, 16: 2.0}, backward={4: 0.5, 8: 0.4, 16: 1.0}, optimizer={4: 0.1, 8: 0.1, 16: 0.1})
    clean = linear_compute(1e-3)
    warnings = scaling.measurement_warnings({"ours": noisy, "torch_rnn": clean})
    assert len(warnings) == 1 and warnings[0].startswith("ours:") and "4->8" in warnings[0]


def test_gloo_fit_recovers_alpha_and_bandwidth_from_exact_ring_times():
    from asr.bench.allreduce import fit_link

    truth = Link(bandwidth=0.7e9, latency=400e-6)
    sizes = [4096, 65536, 1048576, 8388608, 67108864]
    link, intercept, _ = fit_link(sizes, [scaling.ring_allreduce_seconds(n, 2, truth) for n in sizes], 2)
    assert link.bandwidth == pytest.approx(truth.bandwidth, rel=1e-9)
    assert link.latency == pytest.approx(truth.latency, rel=1e-6) and intercept == pytest.approx(2 * 400e-6)
