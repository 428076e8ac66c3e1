"""`asr bench rnn`: the recurrent op's backends side by side, per timestep and in TFLOP/s.

    asr bench rnn                                   # full sweep on the GPU (persistent, cudnn, reference)
    asr bench rnn --device cpu                      # on the CPU: a small set (C++ op vs torch.nn.RNN), ~1 min
    asr bench rnn --hidden 1152 --batch 4,64 --dtype float32,float16 --out benchmarks/results/rnn_h100.json

Every configuration times all requested backends in the same process, one after another, on the same
tensors, so the speedup over cuDNN (torch.nn.RNN's kernel) is measured in the same run. On CUDA each
backend's call is captured in a CUDA graph and GRAPH_REPLAYS replays are timed with CUDA events
(median, p10, p90; `timing` says how, and falls back to timing eager calls with events where a
backend cannot be captured); each row also records the persistent kernel's plan (v1 or v2 and its
tiling) and, for fwd, the error against float64 on the same inputs. This CUDA timing path has not
yet run on a GPU. "fwd" is the forward pass;
"fwdbwd" is forward plus backward (gradients wrt u, w_hh and h0). FLOPs: the forward recurrence is
2*N*H^2 per step per direction; forward+backward counts three times that (forward, backward-data,
dW). The cudnn backend also spends one input GEMM on u @ I (see asr/ops/cudnn.py); it is timed as
part of cuDNN. Every cuDNN row names the algorithm PyTorch requests from cuDNN for it
(`cudnn_algo_forward`, `cudnn_algo_backward` for fwdbwd, `cudnn_algo_reason`), by PyTorch's own
heuristic as restated in asr/bench/cudnn_algo.py (e.g. PERSIST_STATIC: float16, one direction, H <=
1024 in multiples of 128, N a multiple of 8 below 96 at H=1024, on sm_80+ with >= 98 SMs; hence
H=1024 in the sweep, whose N=8..64 rows are cuDNN at its persistent best).
Results: JSON, and a PNG plot when matplotlib is installed.

On the CPU the backends are other things: "cudnn" is torch.nn.RNN's native CPU loop and
"persistent" the extension's C++ loop, and tables, plots and the JSON label them so (`label`).
The full sweep would take hours there, so without explicit sizes a CPU run measures CPU_DEFAULT.
The JSON is rewritten (atomically) after every configuration, with "complete": false until the
sweep ends, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from asr.bench import cudnn_algo, invocation
from asr.errors import UserError
from asr.fileio import atomic_write_text

HIDDEN_SIZES = (512, 1024, 1152, 1760, 2048, 2560)  # 1024: cuDNN's PERSIST_STATIC rows (float16)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
TIME_STEPS = 200
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("persistent", "persistent_v2", "persistent_v2_ring", "persistent_v2_cluster", "cudnn", "reference")
# Backends that are the persistent op with one kernel variant forced (PRNN_VARIANT and PRNN_V2_MODE, read
# per call by the C API): "persistent" runs whatever PRNN_VARIANT says (v1 by default); persistent_v2 lets
# the planner pick v2's exchange mode (its row's plan says which), the other two force ring / cluster mode.
VARIANT_BACKENDS = {"persistent_v2": {"PRNN_VARIANT": "v2"},
                    "persistent_v2_ring": {"PRNN_VARIANT": "v2", "PRNN_V2_MODE": "ring"},
                    "persistent_v2_cluster": {"PRNN_VARIANT": "v2", "PRNN_V2_MODE": "cluster"}}
MODES = ("fwd", "fwdbwd")
QUICK = dict(hidden=(256,), batch=(1, 4, 16), time_steps=50, dtype=("float32",))  # --quick
CPU_DEFAULT = QUICK  # a CPU run without explicit sizes: minutes, not the hours of the GPU sweep
CPU_LABELS = {"cudnn": "torch.nn.RNN (cpu)", "persistent": "persistent (C++ cpu loop)", "reference": "reference (cpu)",
              "persistent_v2": "persistent v2 (a CUDA kernel: not on cpu)",
              "persistent_v2_ring": "persistent v2, ring mode (a CUDA kernel: not on cpu)",
              "persistent_v2_cluster": "persistent v2, cluster mode (a CUDA kernel: not on cpu)"}
TARGET_SECONDS_PER_CONFIG = 0.15  # timed repetitions stop after about this long (after warm-up)
MIN_REPEATS = 5
MAX_REPEATS = 50
WARMUP_RUNS = 2
RESULTS_DIR = Path("benchmarks/results")


@dataclass(frozen=True)
class Measurement:
    backend: str
    mode: str  # "fwd" or "fwdbwd"
    dtype: str
    hidden: int
    batch: int
    time_steps: int
    directions: int
    us_per_step: float | None  # median wall time / time_steps, microseconds
    tflops: float | None  # achieved, by the FLOP model in the module docstring
    repeats: int  # timed runs behind the median
    speedup_over_cudnn: float | None = None  # cudnn time / this time, same run (on the CPU: torch.nn.RNN's)
    error: str | None = None  # why this backend could not run the configuration
    label: str | None = None  # what the backend is on this device, for tables and plots (None: the backend)
    plan: str | None = None  # the persistent kernel's variant and tiling (prnnDescribePlan), CUDA only
    max_error: float | None = None  # fwd: max |y - y_float64| / max(1, max |y_float64|), same inputs
    p10_us_per_step: float | None = None  # CUDA: 10th / 90th percentile of the timed replays
    p90_us_per_step: float | None = None
    timing: str | None = None  # how the time was taken
    cudnn_algo_forward: str | None = None  # cuDNN rows on CUDA: the algorithm PyTorch requests (bench/cudnn_algo.py)
    cudnn_algo_backward: str | None = None  # fwdbwd: the backward pass's (may differ from the forward's)
    cudnn_algo_reason: str | None = None  # the branch of PyTorch's heuristic that decided


def backend_label(backend: str, device_type: str) -> str:
    """On the CPU "cudnn" is torch.nn.RNN's CPU loop, not cuDNN: say what ran."""
    return CPU_LABELS.get(backend, backend) if device_type == "cpu" else backend


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(item) for item in text.split(",") if item)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--backends", type=_csv(str), default=None,
                        help="comma list of " + ",".join(BACKENDS) + " (default: all; on the CPU all but persistent_v2)")
    parser.add_argument("--hidden", type=_csv(int), default=None,
                        help="comma list (default 512,1024,1152,1760,2048,2560)")
    parser.add_argument("--batch", type=_csv(int), default=None, help="comma list (default 1,2,4,8,16,32,64)")
    parser.add_argument("--time-steps", type=int, default=None, help=f"T (default {TIME_STEPS})")
    parser.add_argument("--dtype", type=_csv(str), default=None, help="comma list of float32,float16,bfloat16")
    parser.add_argument("--modes", type=_csv(str), default=MODES, help="comma list of fwd,fwdbwd")
    parser.add_argument("--directions", type=int, choices=(1, 2), default=1)
    parser.add_argument("--activation", default="relu", choices=("relu", "tanh"))
    parser.add_argument("--quick", action="store_true",
                        help="hidden 256, batch 1,4,16, T=50, float32 (explicit options still win; the CPU default)")
    parser.add_argument("--max-repeats", type=int, default=MAX_REPEATS)
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="stop measuring after this long; the configurations left are listed as not run")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/rnn_<device>.json); the PNG goes beside it")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _flops(mode: str, batch: int, hidden: int, time_steps: int, directions: int) -> float:
    forward = 2.0 * batch * hidden * hidden * time_steps * directions
    return forward if mode == "fwd" else 3.0 * forward


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


GRAPH_REPLAYS = 50  # CUDA: timed replays of the captured graph per configuration


def _time_cuda(step, device) -> tuple[float, float, float, int, str]:
    """CUDA: (median, p10, p90 seconds, replays, method). The step is captured in a CUDA graph once
    (after warm-up on a side stream) and each replay is timed with CUDA events, so neither launch
    overhead nor host timing enters; where capture fails (a backend that cannot be captured), each
    eager call is timed with events instead and the method says so."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS + 1):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    method = f"cuda graph, {GRAPH_REPLAYS} replays timed with cuda events"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    except RuntimeError as err:
        torch.cuda.synchronize(device)
        method = f"eager, {GRAPH_REPLAYS} calls timed with cuda events (capture failed: {str(err).splitlines()[0][:120]})"
        run = step
    run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(GRAPH_REPLAYS)]
    for start, stop in events:
        start.record()
        run()
        stop.record()
    torch.cuda.synchronize(device)
    seconds = sorted(start.elapsed_time(stop) / 1e3 for start, stop in events)
    pick = lambda q: seconds[min(len(seconds) - 1, int(q * len(seconds)))]  # noqa: E731
    return statistics.median(seconds), pick(0.1), pick(0.9), len(seconds), method


def _time_runs(step, device, max_repeats: int) -> tuple[float, int]:
    """Median seconds of `step()` over adaptive repetitions (after warm-up)."""
    for _ in range(WARMUP_RUNS):
        step()
    _sync(device)
    times = []
    budget_start = time.perf_counter()
    while len(times) < max_repeats:
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if len(times) >= MIN_REPEATS and time.perf_counter() - budget_start > TARGET_SECONDS_PER_CONFIG:
            break
    return statistics.median(times), len(times)


def measure(backend, mode, dtype_name, hidden, batch, time_steps, directions, activation, device, max_repeats):
    """One backend on one configuration. Variant backends set their environment for the measurement only."""
    import os

    variant = VARIANT_BACKENDS.get(backend)
    if variant is not None and device.type != "cuda":
        return Measurement(backend, mode, dtype_name, hidden, batch, time_steps, directions, None, None, 0,
                           error="kernel v2 is a CUDA kernel", label=backend_label(backend, device.type))
    names = ("PRNN_VARIANT", "PRNN_V2_MODE")
    previous = {name: os.environ.get(name) for name in names}
    if variant is not None:
        for name in names:
            if name in variant:
                os.environ[name] = variant[name]
            else:
                os.environ.pop(name, None)
    try:
        return _measure(backend, "persistent" if variant is not None else backend, mode, dtype_name, hidden, batch,
                        time_steps, directions, activation, device, max_repeats)
    finally:
        if variant is not None:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _plan_text(op_backend, dtype, hidden, batch, time_steps, directions, activation, device) -> str | None:
    if op_backend != "persistent" or device.type != "cuda":
        return None
    try:
        from asr.ops import custom_op

        return custom_op.ops().plan_description(time_steps, batch, directions, hidden, activation, dtype,
                                                device.index or 0, False)
    except (RuntimeError, AttributeError) as err:
        return f"unknown: {str(err).splitlines()[0][:200]}"


def cudnn_compile_version() -> int | None:
    """The cuDNN PyTorch was built with, as cuDNN's integer (91900 = 9.19.0): the version its bf16
    RNN rule checks. Falls back to the runtime version; None without cuDNN."""
    import torch

    try:
        major, minor, patch = torch._C._cudnn.getCompileVersion()
        return major * 10000 + minor * 100 + patch if major >= 9 else major * 1000 + minor * 100 + patch
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return torch.backends.cudnn.version()


def cudnn_algo_fields(mode, dtype_name, hidden, batch, time_steps, directions, activation, device) -> dict:
    """The Measurement fields naming PyTorch's cuDNN algorithm for a cudnn row on CUDA ({} elsewhere).
    asr/ops/cudnn.py feeds u as a (T, N, D*H) layer input of one layer, unpacked (the bench has no
    lengths)."""
    import torch

    if device.type != "cuda":
        return {}
    version = cudnn_compile_version()
    if version is None:
        return dict(cudnn_algo_forward=cudnn_algo.NOT_CUDNN, cudnn_algo_reason="PyTorch has no cuDNN")
    props = torch.cuda.get_device_properties(device)
    choice = cudnn_algo.pytorch_rnn_algo(
        dtype=dtype_name, batch=batch, hidden=hidden, input_size=directions * hidden, layers=1,
        bidirectional=directions == 2, compute_capability=(props.major, props.minor),
        sm_count=props.multi_processor_count, cudnn_version=version, seq_length=time_steps,
        mode="rnn_relu" if activation == "relu" else "rnn_tanh", cudnn_enabled=torch.backends.cudnn.enabled)
    return dict(cudnn_algo_forward=choice.forward, cudnn_algo_backward=choice.backward if mode == "fwdbwd" else None,
                cudnn_algo_reason=choice.reason)


def algo_label(m: Measurement) -> str:
    """The table's short name of a row's cuDNN algorithm ("-" where none applies)."""
    if m.cudnn_algo_forward is None:
        return "-"
    choice = cudnn_algo.AlgoChoice(m.cudnn_algo_forward, m.cudnn_algo_backward or m.cudnn_algo_forward, "")
    return choice.short("forward" if m.cudnn_algo_backward is None else "both")


def _measure(backend, op_backend, mode, dtype_name, hidden, batch, time_steps, directions, activation, device,
             max_repeats):
    import torch

    from asr.ops import recurrence

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (time_steps, batch, directions, hidden) if directions == 2 else (time_steps, batch, hidden)
    w_shape = (directions, hidden, hidden) if directions == 2 else (hidden, hidden)
    u = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    w = (torch.randn(w_shape, generator=generator) * (0.5 / math.sqrt(hidden))).to(device=device, dtype=dtype)
    base = dict(backend=backend, mode=mode, dtype=dtype_name, hidden=hidden, batch=batch, time_steps=time_steps,
                directions=directions, label=backend_label(backend, device.type),
                plan=_plan_text(op_backend, dtype, hidden, batch, time_steps, directions, activation, device))
    if op_backend == "cudnn":
        base.update(cudnn_algo_fields(mode, dtype_name, hidden, batch, time_steps, directions, activation, device))
    backend = op_backend
    if mode == "fwd":
        def step():
            with torch.no_grad():
                recurrence(u, w, None, None, activation, backend)
    else:
        u.requires_grad_()
        w.requires_grad_()
        dy = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

        def step():
            y, _ = recurrence(u, w, None, None, activation, backend)
            torch.autograd.grad(y, (u, w), dy)
    p10 = p90 = None
    try:
        if device.type == "cuda":
            seconds, p10, p90, repeats, timing = _time_cuda(step, device)
        else:
            seconds, repeats = _time_runs(step, device, max_repeats)
            timing = "wall clock, median"
    except (UserError, RuntimeError) as err:
        return Measurement(**base, us_per_step=None, tflops=None, repeats=0, error=str(err).splitlines()[0][:300])
    flops = _flops(mode, batch, hidden, time_steps, directions)
    error = None
    if mode == "fwd":
        with torch.no_grad():
            y, _ = recurrence(u, w, None, None, activation, backend)
            y64, _ = recurrence(u.double(), w.double(), None, None, activation, "reference")
            error = float((y.double() - y64).abs().max() / y64.abs().max().clamp(min=1.0))
    per_step = lambda t: None if t is None else t / time_steps * 1e6  # noqa: E731
    return Measurement(**base, us_per_step=seconds / time_steps * 1e6, tflops=flops / seconds / 1e12, repeats=repeats,
                       max_error=error, p10_us_per_step=per_step(p10), p90_us_per_step=per_step(p90), timing=timing)


def _with_speedups(measurements: list[Measurement]) -> list[Measurement]:
    def key(m):
        return (m.mode, m.dtype, m.hidden, m.batch)

    cudnn = {key(m): m.us_per_step for m in measurements if m.backend == "cudnn" and m.us_per_step}
    out = []
    for m in measurements:
        base = cudnn.get(key(m))
        speedup = base / m.us_per_step if base and m.us_per_step else None
        out.append(Measurement(**{**asdict(m), "speedup_over_cudnn": speedup}))
    return out


def print_table(measurements: list[Measurement], file=None) -> None:
    file = file or sys.stdout  # looked up per call: a default argument would pin the stdout of import time
    labels = [m.label or m.backend for m in measurements]
    width = max([len("backend"), *map(len, labels)]) + 2
    baseline = "x nn.RNN" if any(m.label == CPU_LABELS["cudnn"] for m in measurements) else "x cuDNN"
    algos = any(m.cudnn_algo_forward for m in measurements)  # a column only where cuDNN rows ran on CUDA
    algo_head = "  cuDNN algo (PyTorch's choice)" if algos else ""
    print(f"{'backend':<{width}}{'mode':<7}{'dtype':<9}{'H':>6}{'N':>4}{'us/step':>11}{'TFLOP/s':>9}{baseline:>9}"
          f"{algo_head}", file=file)
    for m, label in zip(measurements, labels):
        algo = f"  {algo_label(m)}" if algos else ""
        if m.error:
            print(f"{label:<{width}}{m.mode:<7}{m.dtype:<9}{m.hidden:>6}{m.batch:>4}  n/a: {m.error[:70]}{algo}",
                  file=file)
            continue
        speedup = f"{m.speedup_over_cudnn:.2f}" if m.speedup_over_cudnn else "-"
        print(f"{label:<{width}}{m.mode:<7}{m.dtype:<9}{m.hidden:>6}{m.batch:>4}{m.us_per_step:>11.1f}"
              f"{m.tflops:>9.3f}{speedup:>9}{algo}", file=file)


def plot(measurements: list[Measurement], path: Path, title: str) -> str | None:
    """PNG of TFLOP/s vs batch, one panel per (dtype, mode); returns a message if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG"
    dtypes = sorted({m.dtype for m in measurements}, key=DTYPES.index if all(
        m.dtype in DTYPES for m in measurements) else str)
    modes = [mode for mode in MODES if any(m.mode == mode for m in measurements)]
    hiddens = sorted({m.hidden for m in measurements})
    styles = {"persistent": "-", "persistent_v2": "-.", "persistent_v2_ring": (0, (3, 1, 1, 1)),
              "persistent_v2_cluster": (0, (1, 1)), "cudnn": "--", "reference": ":"}
    figure, axes = plt.subplots(len(dtypes), len(modes), figsize=(6 * len(modes), 4 * len(dtypes)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, dtype in enumerate(dtypes):
        for col, mode in enumerate(modes):
            axis = axes[row][col]
            for ci, hidden in enumerate(hiddens):
                for backend, style in styles.items():
                    points = sorted((m.batch, m.tflops) for m in measurements if m.tflops and m.dtype == dtype and
                                    m.mode == mode and m.hidden == hidden and m.backend == backend)
                    if points:
                        label = next(m.label or m.backend for m in measurements if m.backend == backend)
                        axis.plot(*zip(*points), style, marker="o", markersize=3, color=colors[ci % len(colors)],
                                  label=f"{label} H={hidden}")
            axis.set_xscale("log", base=2)
            axis.set_xlabel("batch")
            axis.set_ylabel("TFLOP/s")
            axis.set_title(f"{dtype}, {'forward' if mode == 'fwd' else 'forward+backward'}")
            axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def problem_set(args, device_type: str) -> dict:
    """Sizes to measure: explicit options, else --quick's (also a CPU run's default), else the GPU sweep."""
    small = QUICK if args.quick else CPU_DEFAULT if device_type == "cpu" else {}
    return dict(
        hidden=args.hidden or small.get("hidden", HIDDEN_SIZES),
        batch=args.batch or small.get("batch", BATCH_SIZES),
        time_steps=args.time_steps or small.get("time_steps", TIME_STEPS),
        dtype=args.dtype or small.get("dtype", DTYPES if device_type == "cuda" else ("float32",)),
    )


def run_sweep(args, on_progress=None) -> dict:
    """Measures every configuration; on_progress(report) after each one, with the report so far
    ("complete": false), so that the caller can save it."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    sizes = problem_set(args, device.type)
    hiddens, batches, time_steps, dtypes = sizes["hidden"], sizes["batch"], sizes["time_steps"], sizes["dtype"]
    if args.backends is None:  # kernel v2 is a CUDA kernel: a CPU run leaves it out unless asked
        args.backends = BACKENDS if device.type == "cuda" else tuple(b for b in BACKENDS if b not in VARIANT_BACKENDS)
    for name, values, allowed in (("--backends", args.backends, BACKENDS), ("--dtype", dtypes, DTYPES),
                                  ("--modes", args.modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise UserError(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if min(hiddens + batches) < 1 or time_steps < 1:
        raise UserError("--hidden, --batch and --time-steps must be positive")
    name = device_name(device)
    configs = len(dtypes) * len(args.modes) * len(hiddens) * len(batches)
    print(f"asr bench rnn: {name}, T={time_steps}, D={args.directions}, {args.activation}, "
          f"backends {','.join(backend_label(b, device.type) for b in args.backends)}; {configs} configurations "
          f"(H {','.join(map(str, hiddens))}; N {','.join(map(str, batches))}; {','.join(dtypes)})", flush=True)
    if device.type == "cpu" and not (args.hidden or args.batch or args.time_steps or args.dtype or args.quick):
        print("  (the CPU default is the small --quick set; --hidden/--batch/--time-steps/--dtype choose others)",
              flush=True)
    measurements = []
    started = time.perf_counter()
    from asr.ops import build

    def report(complete: bool) -> dict:
        ext = build.loaded()
        return dict(
            command=invocation(),
            device=name,
            device_type=device.type,
            torch=torch.__version__,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_compile_version=cudnn_compile_version() if device.type == "cuda" else None,
            cudnn_algo_logic=cudnn_algo.PYTORCH_LOGIC if device.type == "cuda" else None,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            extension=None if ext is None else dict(variant=ext.variant, arch_list=ext.arch_list),
            activation=args.activation,
            directions=args.directions,
            time_steps=time_steps,
            flop_model="forward: 2*N*H^2 per step per direction; fwdbwd: 3x forward (forward, backward-data, dW)",
            seconds=time.perf_counter() - started,
            complete=complete,
            results=[asdict(m) for m in _with_speedups(measurements)],
        )

    for dtype in dtypes:
        for mode in args.modes:
            for hidden in hiddens:
                for batch in batches:
                    for backend in args.backends:
                        if args.budget_seconds is not None and time.perf_counter() - started > args.budget_seconds:
                            algo = cudnn_algo_fields(mode, dtype, hidden, batch, time_steps, args.directions,
                                                     args.activation, device) if backend == "cudnn" else {}
                            measurements.append(Measurement(backend, mode, dtype, hidden, batch, time_steps,
                                                            args.directions, None, None, 0,
                                                            error=f"not run: --budget-seconds {args.budget_seconds:g} spent",
                                                            label=backend_label(backend, device.type), **algo))
                            continue
                        measurements.append(measure(backend, mode, dtype, hidden, batch, time_steps, args.directions,
                                                    args.activation, device, args.max_repeats))
                    done = measurements[-len(args.backends):]
                    print("  " + f"{dtype} {mode} H={hidden} N={batch}: " + ", ".join(
                        f"{m.label} {m.us_per_step:.1f} us/step" if m.us_per_step else f"{m.label} n/a"
                        for m in done), flush=True)
                    if on_progress is not None:
                        on_progress(report(complete=False))
    return report(complete=True)


def run(args: argparse.Namespace) -> int:
    written: dict = {}

    def save(report: dict) -> None:
        out = args.out or RESULTS_DIR / f"rnn_{_slug(report['device'])}.json"
        atomic_write_text(out, json.dumps(report, indent=1) + "\n")
        written.update(path=out, count=len(report["results"]))

    try:
        report = run_sweep(args, on_progress=save)
    except KeyboardInterrupt:
        if written:
            print(f"interrupted: {written['path']} keeps the {written['count']} measurements made so far "
                  f"(\"complete\": false)", file=sys.stderr)
        raise
    save(report)
    out = written["path"]
    measurements = [Measurement(**r) for r in report["results"]]
    print_table(measurements)
    print(f"wrote {out} ({report['seconds']:.0f} s of measurements)")
    if not args.no_plot:
        png = out.with_suffix(".png")
        skipped = plot(measurements, png, f"{report['device']}: recurrence, T={report['time_steps']}")
        print(skipped or f"wrote {png}")
    return 0
