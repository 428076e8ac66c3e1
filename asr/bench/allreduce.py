"""`asr bench allreduce`: the scaling model's all-reduce cost checked against gloo on this machine.

    asr bench allreduce                                   # 1 and 2 gloo processes, clean100's gradient buckets
    asr bench allreduce --processes 2 --network ds2 --json benchmarks/results/allreduce-gloo-<device>-<date>.json

For each process count G (torch.distributed, gloo, on 127.0.0.1; one torch thread per process):
 1. calibration: all-reduce of float32 tensors of a few sizes (--calibration-bytes, none of them a
    bucket size), median of --repeats timed calls each (sizes interleaved round by round), every call
    started together after a barrier;
    alpha (seconds per ring step) and bandwidth come from a least-squares line through those times, read
    through the ring model t = 2 (G-1)/G * bytes / bandwidth + 2 (G-1) * alpha;
 2. the network's gradient buckets (DDP's bucketing, as `asr bench scaling` models it): each bucket's
    all-reduce timed the same way, and the model's prediction for it from step 1's alpha and bandwidth;
    the error is (measured - predicted) / measured, per bucket and for the sum.
With G = 1 there is nothing to reduce: the model says 0 (DDP does not run), and the time gloo takes to
"reduce" over one process is reported as measured. A GPU all-reduce (NVLink, InfiniBand) cannot be
measured here; this checks the form of the model (latency + bytes / bandwidth per bucket) on the one
transport this machine has, not the link figures `asr bench scaling` assumes for GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

from asr.bench import invocation

DEFAULT_CALIBRATION_BYTES = (4096, 65536, 1048576, 8388608, 67108864)  # 4 KiB .. 64 MiB, log-spaced, past the buckets
DEFAULT_REPEATS = 15
WARMUP_CALLS = 3
TOLERANCE = 0.25  # stated before measuring: the model is "right" here when the buckets' sum is within 25%


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_allreduces(sizes: list[int], repeats: int) -> list[float]:
    """Median seconds of one all-reduce of each size in `sizes` (float32; collective: every rank calls
    it). The sizes are interleaved, round after round, so that the calibration messages and the
    buckets are timed under the same conditions of the machine rather than minutes apart."""
    import torch
    import torch.distributed as dist

    tensors = [torch.ones(max(1, n // 4), dtype=torch.float32) for n in sizes]
    times = [[] for _ in sizes]
    for i in range(WARMUP_CALLS + repeats):
        for k, tensor in enumerate(tensors):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            elapsed = time.perf_counter() - start
            if i >= WARMUP_CALLS:
                times[k].append(elapsed)
    # every rank's call ends when the slowest rank's does: the collective's time is the max over ranks
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return [statistics.median(row) for row in slowest.tolist()]


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seconds = _time_allreduces(sizes, repeats)
        if rank == 0:
            Path(out).write_text(json.dumps(seconds), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def measure(world: int, sizes: list[int], repeats: int) -> list[float]:
    """Median all-reduce seconds of each size over `world` gloo processes on this machine."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        mp.spawn(_worker, args=(world, _free_port(), sizes, repeats, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text(encoding="utf-8"))


def fit_link(sizes: list[int], seconds: list[float], world: int):
    """alpha-beta from a least-squares line t = a + b * bytes, read through the ring model."""
    from asr.bench.scaling import Link

    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sum((x - mean_x) ** 2 for x in sizes)
    intercept = mean_y - slope * mean_x
    steps = 2 * (world - 1)
    return Link(bandwidth=(steps / world) / slope, latency=max(intercept, 0.0) / steps), intercept, slope


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", default="1,2", help="comma list of gloo process counts (default 1,2)")
    parser.add_argument("--network", default="clean100", help="whose gradient buckets (clean100, ds2)")
    parser.add_argument("--calibration-bytes", default=",".join(map(str, DEFAULT_CALIBRATION_BYTES)),
                        help="comma list of message sizes the alpha/beta fit uses")
    parser.add_argument("--bucket-mib", type=float, default=None, help="DDP bucket cap (default scaling's 25)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--json", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from asr.bench import scaling, train
    from asr.errors import UserError
    from asr.fileio import atomic_write_text
    from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig

    try:
        worlds = [int(v) for v in args.processes.split(",") if v]
        calibration = [int(v) for v in args.calibration_bytes.split(",") if v]
    except ValueError as err:
        raise UserError(f"--processes / --calibration-bytes: {err}") from None
    if not worlds or min(worlds) < 1 or max(worlds) > (os.cpu_count() or 1) * 4:
        raise UserError("--processes: between 1 and 4 per CPU core")
    if len(calibration) < 2 or min(calibration) < 4 or args.repeats < 1:
        raise UserError("--calibration-bytes needs at least two sizes of at least 4 bytes; --repeats at least 1")
    if args.network not in train.NETWORKS:
        raise UserError(f"--network {args.network}: choose from {', '.join(train.NETWORKS)}")
    net = DeepSpeech(DeepSpeechConfig(**train.NETWORKS[args.network]))
    sizes = [p.numel() for p in net.parameters()]
    bucket_mib = args.bucket_mib or scaling.DEFAULT_BUCKET_MIB
    buckets = scaling.ddp_buckets(sizes, scaling.GRADIENT_BYTES, bucket_mib * scaling.MIB)
    result = {"command": invocation(), "device": f"CPU ({platform.processor() or platform.machine()}, "
                                                  f"{os.cpu_count()} cores), gloo over 127.0.0.1",
              "torch": torch.__version__, "network": args.network, "parameters": sum(sizes),
              "buckets_bytes": buckets, "calibration_bytes": calibration, "repeats": args.repeats,
              "tolerance": TOLERANCE, "model": "t = 2(G-1)/G * bytes / bandwidth + 2(G-1) * alpha per bucket",
              "processes": []}
    print(f"asr bench allreduce: {result['device']}; {args.network} ({sum(sizes):,} parameters) in "
          f"{len(buckets)} buckets ({', '.join(f'{b / scaling.MIB:.2f}' for b in buckets)} MiB)", flush=True)
    for world in worlds:
        measured = measure(world, calibration + buckets, args.repeats)
        cal, bucket_seconds = measured[:len(calibration)], measured[len(calibration):]
        entry = {"processes": world, "calibration_seconds": cal, "bucket_seconds": bucket_seconds,
                 "measured_total_seconds": sum(bucket_seconds)}
        if world == 1:
            entry.update(predicted_total_seconds=0.0, note="one process: the model has no all-reduce (DDP does "
                                                           "not run); gloo's own time is what was measured")
            print(f"  1 process: the buckets take {1000 * sum(bucket_seconds):.3f} ms in gloo; the model says 0 "
                  "(no all-reduce with one process)")
        else:
            link, intercept, slope = fit_link(calibration, cal, world)
            predicted = [scaling.ring_allreduce_seconds(b, world, link) for b in buckets]
            errors = [(m - p) / m for m, p in zip(bucket_seconds, predicted)]
            total_error = (sum(bucket_seconds) - sum(predicted)) / sum(bucket_seconds)
            entry.update(fit={"alpha_seconds": link.latency, "bandwidth_bytes_per_second": link.bandwidth,
                              "intercept_seconds": intercept, "seconds_per_byte": slope},
                         predicted_bucket_seconds=predicted, bucket_errors=errors,
                         predicted_total_seconds=sum(predicted), total_error=total_error,
                         within_tolerance=abs(total_error) <= TOLERANCE)
            print(f"  {world} processes: fit alpha {1e6 * link.latency:.1f} us per step, bandwidth "
                  f"{link.bandwidth / 1e9:.3f} GB/s (from {len(calibration)} sizes, "
                  f"{min(calibration)}..{max(calibration)} bytes)")
            for b, m, p, e in zip(buckets, bucket_seconds, predicted, errors):
                print(f"    bucket {b / scaling.MIB:7.2f} MiB: measured {1000 * m:8.2f} ms, model {1000 * p:8.2f} ms, "
                      f"error {100 * e:+.1f}%")
            print(f"    all buckets: measured {1000 * sum(bucket_seconds):.2f} ms, model {1000 * sum(predicted):.2f} ms, "
                  f"error {100 * total_error:+.1f}% ({'within' if entry['within_tolerance'] else 'outside'} the "
                  f"stated {100 * TOLERANCE:.0f}%)")
        result["processes"].append(entry)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asr bench allreduce", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
