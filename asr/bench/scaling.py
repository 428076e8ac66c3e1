"""`asr bench scaling`: strong scaling of data-parallel training, modelled from a measured training step.

    asr bench scaling --train-json benchmarks/results/train-step-<device>-<date>.json
    asr bench scaling --train-json T.json --network ds2 --precision fp32 --global-batch 512 --gpus 1,8,64,128 \
        --nvlink-gbs 350 --ib-gbs 25 --ib-latency-us 8 --out scaling.json

A fixed global batch B (default 512 utterances, as Deep Speech 2) is split over G GPUs, each taking
b = ceil(B / G) utterances per step. For each G, and for each of the two networks that `asr bench
train` measured (ours on asr.ops, and torch.nn.RNN / cuDNN), the model is

    step(G) = compute(b) + exposed_allreduce(G)        speedup(G) = step(1) / step(G)
                                                      efficiency(G) = speedup(G) / G

compute(b) is the measured step time at per-GPU batch b (forward + backward + optimizer, from the
`asr bench train` JSON). Between measured batches it is interpolated linearly in b; above the largest
measured batch b_max it is gradient accumulation of b / b_max micro-batches (per utterance): (b /
b_max) * (step(b_max) - optimizer(b_max)) + optimizer(b_max); below the smallest measured batch it is
that batch's step time (a smaller batch is assumed no faster).

exposed_allreduce(G) is the part of the gradient all-reduce that the backward pass does not hide:
 - Gradients (4 bytes per parameter: DDP reduces fp32 gradients under bf16-mixed too) are packed into
   DDP's buckets in reverse parameter order: the first bucket closes at 1 MiB, the others at 25 MiB
   (torch DDP's defaults), a bucket closing when it reaches the cap.
 - Each bucket is a ring all-reduce, alpha-beta: 2 (G-1)/G * bytes / bandwidth + 2 (G-1) * latency.
   Within one node (G <= gpus per node, default 8) the ring runs over NVLink; above one node it is one
   flat ring over all G GPUs, and every step of it is paced by the inter-node InfiniBand hop.
 - Overlap: gradient bytes become ready at a constant rate during backward (bucket k is ready when
   the backward has produced the bytes of buckets 1..k); the buckets are reduced one after another
   on one communication stream, each starting when it is ready and the previous one is done; what
   runs past the end of the backward is exposed. Communication does not slow the computation down.
   Under accumulation only the last micro-batch's backward overlaps (DDP's no_sync on the others).
 - G = 1 has no all-reduce (a single process does not run DDP).

The model says where scaling stops, not where it must: "stops scaling" is the first G in the sweep
whose parallel efficiency falls below --efficiency-floor (default 0.5). The paper's figure (Diamos et
al., Persistent RNNs, ICML 2016: 16x from 8 to 128 GPUs) is drawn on the speedup-over-8-GPUs axes.
Every assumption is printed with the table and stored in the JSON. Link defaults are assumptions, not
measurements (H100-class NVLink, one 400 Gb/s InfiniBand NIC per GPU): pass your cluster's figures
(nccl-tests' all_reduce_perf "busbw" and small-message time give bandwidth and latency).
The cost model is checked against gloo on this machine by `asr bench allreduce`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1024 * 1024
GB = 1e9
DEFAULT_GLOBAL_BATCH = 512  # utterances per optimizer step (Deep Speech 2)
DEFAULT_GPUS = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_BUCKET_MIB = 25.0  # torch DDP bucket_cap_mb
DEFAULT_FIRST_BUCKET_MIB = 1.0  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
GRADIENT_BYTES = 4  # fp32 gradients
NVLINK_GBS = 350.0  # GB/s ring bus bandwidth within a node (assumed: H100-class NVLink)
NVLINK_LATENCY_US = 2.0  # per ring step
IB_GBS = 50.0  # GB/s per GPU across nodes (assumed: one 400 Gb/s NIC per GPU)
IB_LATENCY_US = 5.0  # per ring step
EFFICIENCY_FLOOR = 0.5
PAPER = {"from_gpus": 8, "to_gpus": 128, "speedup": 16.0,
         "source": "Diamos et al., Persistent RNNs, ICML 2016: 16x from 8 to 128 GPUs"}
SIDES = ("ours", "torch_rnn")


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s: the ring's bus bandwidth
    latency: float  # seconds per ring step


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    intra: Link = Link(NVLINK_GBS * GB, NVLINK_LATENCY_US * 1e-6)  # within a node
    inter: Link = Link(IB_GBS * GB, IB_LATENCY_US * 1e-6)  # across nodes

    def link(self, gpus: int) -> Link:
        return self.intra if gpus <= self.gpus_per_node else self.inter


@dataclass(frozen=True)
class Compute:
    """One network's measured steps: per-GPU batch -> seconds."""
    step: dict[int, float]  # forward + backward + optimizer
    backward: dict[int, float]
    optimizer: dict[int, float]


def ring_allreduce_seconds(nbytes: float, gpus: int, link: Link) -> float:
    """Alpha-beta cost of one ring all-reduce of `nbytes` over `gpus` ranks."""
    if gpus <= 1:
        return 0.0
    return 2.0 * (gpus - 1) / gpus * nbytes / link.bandwidth + 2.0 * (gpus - 1) * link.latency


def ddp_buckets(parameter_sizes: list[int], bytes_per_element: int = GRADIENT_BYTES,
                bucket_bytes: float = DEFAULT_BUCKET_MIB * MIB,
                first_bucket_bytes: float = DEFAULT_FIRST_BUCKET_MIB * MIB) -> list[int]:
    """Bucket sizes in bytes, in the order DDP reduces them: parameters in reverse order (the output
    layer's gradients are ready first), a bucket closing once it reaches its cap."""
    buckets, current = [], 0
    for size in reversed(parameter_sizes):
        current += size * bytes_per_element
        cap = first_bucket_bytes if not buckets else bucket_bytes
        if current >= cap:
            buckets.append(current)
            current = 0
    if current:
        buckets.append(current)
    return buckets


def exposed_allreduce_seconds(bucket_bytes: list[int], gpus: int, cluster: Cluster, backward_seconds: float,
                              overlap: bool = True) -> float:
    """All-reduce time left after the backward pass (the module docstring's overlap model)."""
    if gpus <= 1 or not bucket_bytes:
        return 0.0
    link = cluster.link(gpus)
    costs = [ring_allreduce_seconds(b, gpus, link) for b in bucket_bytes]
    if not overlap:
        return sum(costs)
    total, produced, end = float(sum(bucket_bytes)), 0.0, 0.0
    for nbytes, cost in zip(bucket_bytes, costs):
        produced += nbytes
        ready = backward_seconds * produced / total
        end = max(ready, end) + cost
    return max(0.0, end - backward_seconds)


def _interpolate(table: dict[int, float], batch: float) -> float:
    points = sorted(table)
    if batch <= points[0]:
        return table[points[0]]
    for lo, hi in zip(points, points[1:]):
        if batch <= hi:
            return table[lo] + (table[hi] - table[lo]) * (batch - lo) / (hi - lo)
    return table[points[-1]]


def compute_seconds(compute: Compute, batch: int) -> tuple[float, float]:
    """(step seconds, seconds of the backward that the all-reduce can hide) at per-GPU `batch`."""
    largest = max(compute.step)
    if batch > largest:  # gradient accumulation of batch / largest micro-batches, one optimizer step
        optimizer = compute.optimizer[largest]
        return batch / largest * (compute.step[largest] - optimizer) + optimizer, compute.backward[largest]
    return _interpolate(compute.step, batch), _interpolate(compute.backward, batch)


@dataclass(frozen=True)
class Point:
    gpus: int
    per_gpu_batch: int
    compute_seconds: float
    allreduce_seconds: float  # the whole all-reduce of all buckets, unhidden
    exposed_seconds: float  # the part the backward pass does not hide
    step_seconds: float
    speedup: float  # over one GPU
    speedup_over_8: float | None  # over 8 GPUs (the paper's baseline), when 8 is in the sweep
    efficiency: float


def scaling_curve(compute: Compute, bucket_bytes: list[int], gpus_list: list[int], global_batch: int,
                  cluster: Cluster, overlap: bool = True) -> list[Point]:
    steps = {}
    for gpus in sorted(set(gpus_list) | {1}):
        batch = math.ceil(global_batch / gpus)
        step, backward = compute_seconds(compute, batch)
        link = cluster.link(gpus)
        whole = sum(ring_allreduce_seconds(b, gpus, link) for b in bucket_bytes)
        exposed = exposed_allreduce_seconds(bucket_bytes, gpus, cluster, backward, overlap)
        steps[gpus] = (batch, step, whole, exposed, step + exposed)
    base = PAPER["from_gpus"]
    points = []
    for gpus in gpus_list:
        batch, step, whole, exposed, total = steps[gpus]
        speedup = steps[1][4] / total
        over_8 = steps[base][4] / total if base in steps else None
        points.append(Point(gpus, batch, step, whole, exposed, total, speedup, over_8, speedup / gpus))
    return points


def stop_scaling_gpus(points: list[Point], floor: float = EFFICIENCY_FLOOR) -> int | None:
    """The first G of the sweep whose parallel efficiency is below `floor` (None: it never is)."""
    return next((p.gpus for p in sorted(points, key=lambda p: p.gpus) if p.efficiency < floor), None)


# --- reading `asr bench train` results ---------------------------------------------------------------


def read_compute(train: dict, network: str, precision: str) -> dict[str, Compute]:
    from asr.errors import UserError

    rows = [r for r in train.get("rows", []) if r.get("network") == network and r.get("precision") == precision]
    out = {}
    for side in SIDES:
        measured = [r for r in rows if r.get(side, {}).get("step_seconds")]
        if not measured:
            raise UserError(f"the train JSON has no measured {side} rows for network {network!r} in {precision}")
        out[side] = Compute(step={r["batch"]: r[side]["step_seconds"] for r in measured},
                            backward={r["batch"]: r[side]["backward_seconds"] for r in measured},
                            optimizer={r["batch"]: r[side]["optimizer_seconds"] for r in measured})
    return out


def measurement_warnings(computes: dict[str, Compute]) -> list[str]:
    """Where the measured step time falls as the batch grows (a noisy or contended measurement): the model
    then shows superlinear speedups that are artefacts of the input, not of scaling."""
    warnings = []
    for side, compute in computes.items():
        batches = sorted(compute.step)
        falls = [f"{a}->{b}" for a, b in zip(batches, batches[1:]) if compute.step[b] < compute.step[a]]
        if falls:
            warnings.append(f"{side}: the measured step time falls from batch {', '.join(falls)}: a noisy measurement; "
                            "speedups built on it (efficiency above 1) are artefacts")
    return warnings


def _csv_int(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-json", type=Path, required=True, help="the JSON `asr bench train --json` wrote")
    parser.add_argument("--network", default=None, help="network of the train JSON (default: its first row's)")
    parser.add_argument("--precision", default=None, help="precision of the train JSON (default: its first row's)")
    parser.add_argument("--global-batch", type=int, default=DEFAULT_GLOBAL_BATCH, help="utterances per step (512)")
    parser.add_argument("--gpus", type=_csv_int, default=DEFAULT_GPUS, help="comma list of G (1,2,4,...,128)")
    parser.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE)
    parser.add_argument("--nvlink-gbs", type=float, default=NVLINK_GBS, help="GB/s ring bandwidth within a node")
    parser.add_argument("--nvlink-latency-us", type=float, default=NVLINK_LATENCY_US, help="us per ring step, in a node")
    parser.add_argument("--ib-gbs", type=float, default=IB_GBS, help="GB/s per GPU across nodes")
    parser.add_argument("--ib-latency-us", type=float, default=IB_LATENCY_US, help="us per ring step across nodes")
    parser.add_argument("--bucket-mib", type=float, default=DEFAULT_BUCKET_MIB, help="DDP bucket_cap_mb (25)")
    parser.add_argument("--first-bucket-mib", type=float, default=DEFAULT_FIRST_BUCKET_MIB, help="DDP's first bucket (1)")
    parser.add_argument("--no-overlap", action="store_true", help="all-reduce after the backward, nothing hidden")
    parser.add_argument("--efficiency-floor", type=float, default=EFFICIENCY_FLOOR,
                        help="scaling stops at the first G below this parallel efficiency (0.5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; the PNG goes beside it")
    parser.add_argument("--no-plot", action="store_true")


def assumptions(args, cluster: Cluster, train: dict, network: str, precision: str, parameters: int,
                buckets: list[int]) -> list[str]:
    measured = sorted({r["batch"] for r in train["rows"] if r.get("network") == network and
                       r.get("precision") == precision and r.get("ours", {}).get("step_seconds")})
    return [
        f"compute: measured by `{train.get('command', 'asr bench train')}` on {train.get('device')} "
        f"({train.get('timing')}); {network}, {precision}, {train.get('seconds_per_utterance')} s utterances; "
        f"per-GPU batches measured: {','.join(map(str, measured))}",
        "compute between measured batches: linear in the batch; above the largest: gradient accumulation per "
        "utterance ((b/b_max) x (step - optimizer) + optimizer); below the smallest: the smallest batch's time",
        f"global batch {args.global_batch} utterances, per-GPU batch ceil({args.global_batch}/G); "
        "speedup = step time on 1 GPU / step time on G GPUs (time per optimizer step of the global batch)",
        f"gradients: {parameters:,} parameters x {GRADIENT_BYTES} bytes (fp32), DDP buckets of {args.bucket_mib:g} "
        f"MiB (first {args.first_bucket_mib:g} MiB) in reverse parameter order: {len(buckets)} buckets, "
        f"{', '.join(f'{b / MIB:.2f}' for b in buckets)} MiB",
        "ring all-reduce per bucket: 2(G-1)/G x bytes / bandwidth + 2(G-1) x latency",
        f"G <= {cluster.gpus_per_node} (one node): NVLink {cluster.intra.bandwidth / GB:g} GB/s, "
        f"{cluster.intra.latency * 1e6:g} us per ring step; G > {cluster.gpus_per_node}: one flat ring paced by "
        f"InfiniBand, {cluster.inter.bandwidth / GB:g} GB/s per GPU, {cluster.inter.latency * 1e6:g} us per step "
        "(assumed link figures, not measured)",
        "overlap: none (--no-overlap)" if args.no_overlap else
        "overlap: gradient bytes ready at a constant rate through the backward, buckets reduced in order on one "
        "stream, what runs past the backward is exposed; no slowdown of compute by communication; under "
        "accumulation only the last micro-batch's backward overlaps",
        "G = 1: no all-reduce",
        f"stops scaling: the first G whose parallel efficiency is below {args.efficiency_floor:g}",
        f"paper: {PAPER['source']} (plotted as speedup over 8 GPUs)",
    ]


def run_model(args: argparse.Namespace) -> dict:
    from asr.errors import UserError

    try:
        train = json.loads(args.train_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"--train-json {args.train_json}: cannot read it ({err})") from None
    first = next((r for r in train.get("rows", []) if r.get("speedup")), None)
    if first is None:
        raise UserError(f"--train-json {args.train_json}: no measured row (is it a file `asr bench train --json` wrote?)")
    network, precision = args.network or first["network"], args.precision or first["precision"]
    if network not in train.get("networks", {}):
        raise UserError(f"--network {network}: the train JSON measured {', '.join(train.get('networks', {}))}")
    if args.global_batch < 1 or args.gpus_per_node < 1:
        raise UserError("--global-batch and --gpus-per-node must be positive")
    for name in ("nvlink_gbs", "ib_gbs", "bucket_mib", "first_bucket_mib"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    computes = read_compute(train, network, precision)
    info = train["networks"][network]
    cluster = Cluster(args.gpus_per_node, Link(args.nvlink_gbs * GB, args.nvlink_latency_us * 1e-6),
                      Link(args.ib_gbs * GB, args.ib_latency_us * 1e-6))
    buckets = ddp_buckets(info["parameter_sizes"], GRADIENT_BYTES, args.bucket_mib * MIB, args.first_bucket_mib * MIB)
    gpus = sorted(set(args.gpus))
    labels = {side: next(r[side]["label"] for r in train["rows"] if r.get(side, {}).get("label")) for side in SIDES}
    curves = {side: scaling_curve(computes[side], buckets, gpus, args.global_batch, cluster, not args.no_overlap)
              for side in SIDES}
    result = {
        "command": _invocation(), "train_json": str(args.train_json), "network": network, "precision": precision,
        "device": train.get("device"), "global_batch": args.global_batch, "gpus": gpus,
        "parameters": sum(info["parameter_sizes"]), "buckets_bytes": buckets,
        "cluster": asdict(cluster), "overlap": not args.no_overlap, "efficiency_floor": args.efficiency_floor,
        "assumptions": assumptions(args, cluster, train, network, precision, sum(info["parameter_sizes"]), buckets),
        "paper": PAPER, "labels": labels, "warnings": measurement_warnings(computes),
        "curves": {side: [asdict(p) for p in curves[side]] for side in SIDES},
        "stops_scaling_at": {side: stop_scaling_gpus(curves[side], args.efficiency_floor) for side in SIDES},
    }
    by_gpus = {side: {p.gpus: p for p in curves[side]} for side in SIDES}
    result["speedup_8_to_128"] = {side: by_gpus[side][8].step_seconds / by_gpus[side][128].step_seconds
                                  if 8 in by_gpus[side] and 128 in by_gpus[side] else None for side in SIDES}
    return result


def _invocation() -> str:
    from asr.bench import invocation

    return invocation()


def print_result(result: dict, file=None) -> None:
    file = file or sys.stdout
    labels = result["labels"]
    print(f"asr bench scaling: {result['network']} {result['precision']}, global batch {result['global_batch']}, "
          f"compute measured on {result['device']}", file=file)
    print("assumptions:", file=file)
    for line in result["assumptions"]:
        print(f"  - {line}", file=file)
    head = " | ".join(f"{labels[s][:22]:<22} {'step ms':>9} {'comm ms':>8} {'exposed':>8} {'speedup':>8} "
                      f"{'over 8':>7} {'eff':>5}" for s in SIDES)
    print(f"\n{'G':>4} {'b/GPU':>6} | {head}", file=file)
    curves = {s: {p["gpus"]: p for p in result["curves"][s]} for s in SIDES}
    for gpus in result["gpus"]:
        cells = []
        for side in SIDES:
            p = curves[side][gpus]
            over = f"{p['speedup_over_8']:.2f}" if p["speedup_over_8"] else "-"
            cells.append(f"{'':<22} {1000 * p['step_seconds']:>9.2f} {1000 * p['allreduce_seconds']:>8.2f} "
                         f"{1000 * p['exposed_seconds']:>8.2f} {p['speedup']:>8.2f} {over:>7} {p['efficiency']:>5.2f}")
        print(f"{gpus:>4} {curves['ours'][gpus]['per_gpu_batch']:>6} | " + " | ".join(cells), file=file)
    for side in SIDES:
        stop = result["stops_scaling_at"][side]
        s8 = result["speedup_8_to_128"][side]
        print(f"{labels[side]}: stops scaling (efficiency < {result['efficiency_floor']:g}) at "
              f"{'G = ' + str(stop) if stop else 'no G of the sweep'}; 8 -> 128 GPUs: "
              f"{f'{s8:.1f}x' if s8 else 'not in the sweep'} (paper: {PAPER['speedup']:g}x)", file=file)
    for line in result.get("warnings", []):
        print(f"warning: {line}", file=file)
    print("step ms: compute + exposed all-reduce; comm ms: the whole all-reduce; exposed: the part the backward "
          "does not hide; speedup over 1 GPU, over 8 GPUs; eff: parallel efficiency (speedup / G)", file=file)


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"ours": ("-", "C0"), "torch_rnn": ("--", "C1")}
    for side, (style, color) in styles.items():
        points = result["curves"][side]
        gpus = [p["gpus"] for p in points]
        label = result["labels"][side]
        over = [(p["gpus"], p["speedup_over_8"]) for p in points if p["speedup_over_8"] and p["gpus"] >= 8]
        if over:
            left.plot(*zip(*over), style, marker="o", color=color, label=label)
        right.plot(gpus, [p["efficiency"] for p in points], style, marker="o", color=color, label=label)
    ideal = [g for g in result["gpus"] if g >= 8]
    if ideal:
        left.plot(ideal, [g / 8 for g in ideal], ":", color="gray", label="linear")
    left.plot([PAPER["to_gpus"]], [PAPER["speedup"]], "*", markersize=14, color="C3",
              label="Persistent RNNs paper: 16x, 8 -> 128 GPUs")
    left.set_xlabel("GPUs")
    left.set_ylabel("speedup over 8 GPUs")
    right.axhline(result["efficiency_floor"], color="gray", linestyle=":", label="efficiency floor")
    right.set_xlabel("GPUs")
    right.set_ylabel("parallel efficiency (speedup over 1 GPU / G)")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    left.set_yscale("log", base=2)
    figure.suptitle(f"modelled strong scaling, global batch {result['global_batch']}: {result['network']} "
                    f"{result['precision']}, compute measured on {result['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def run(args: argparse.Namespace) -> int:
    from asr.fileio import atomic_write_text

    result = run_model(args)
    print_result(result)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        if not args.no_plot:
            png = args.out.with_suffix(".png")
            print(plot(result, png) or f"wrote {png}")
    return 0
