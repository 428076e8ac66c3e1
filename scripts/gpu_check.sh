#!/usr/bin/env bash
# scripts/gpu_check.sh OUTDIR [CORPUS] - everything a lent GPU must verify about the recurrent op and
# the network on it, in one command (about 8 minutes on an H100):
#   1. environment (GPU, driver, torch, nvcc)            -> OUTDIR/env.txt
#   1b. latency microbenchmarks (csrc/microbench, built with nvcc here): L2 round trip, hand-off between
#      two blocks and across all blocks in kernel v2's word format, DSMEM hand-offs, kernel v2's
#      cluster-mode exchange (st.async + mbarrier) and cluster occupancy on sm_90
#                                                         -> OUTDIR/microbench.json, microbench.log
#   2. JIT build of csrc/ (CUDA variant)                 -> OUTDIR/build.log
#   3. the op and network tests: `cuda`-marked ones and the quick CPU op tests, against the CUDA build
#                                                        -> OUTDIR/pytest.log, OUTDIR/pytest.xml
#   3b. kernel v2 (PRNN_VARIANT=v2): prnn_test's matrix and the cuda op tests again, then the op tests
#       with ring mode forced (PRNN_V2_MODE=ring; auto picks cluster mode for most small shapes on sm_90)
#                                                        -> OUTDIR/pytest_v2{,_ring}.log, .xml
#   4. the grid-barrier microbenchmark on its own        -> OUTDIR/barrier.json
#   5. `asr bench rnn`: issue 11's target configurations, v1 and v2 beside cuDNN
#                                                        -> OUTDIR/bench_targets*.json
#   6. `asr bench train` on the GPU: the training step of the recipe networks (clean100's, DS2's),
#      persistent op vs cuDNN's RNN, bf16 and fp32, per-GPU batch sweep (4 and 16 first), then
#      `asr bench scaling` from it                        -> OUTDIR/bench_train_sweep.json, scaling.json
#   7. with CORPUS (a rendered `asr data synth` folder): the tiny recipe trained on the GPU in
#      bf16-mixed for a few epochs, evaluated, report   -> OUTDIR/train/report.{json,md}
#   8. `asr bench rnn` full sweep in the time left       -> OUTDIR/bench_rnn.json (+ .png)
#   9. a short table, printed last                       -> OUTDIR/summary.json
# Runs from a plain copy of the repository with the machine's own python3 (torch, ninja, nvcc; the
# package need not be installed and jiwer/soundfile need not exist): PYTHONPATH=. and `python3 -m`.
# Exit status: 0 when the build and every test (v1 and v2) passed, 1 otherwise (the table is printed either way).
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [CORPUS]}
CORPUS=${2:-}
[ -n "$CORPUS" ] && CORPUS=$(cd "$CORPUS" && pwd)
PY=${PYTHON:-python3}
BUDGET_SECONDS=${GPU_CHECK_BUDGET_SECONDS:-480}   # whole script, leaves margin under 9 minutes
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export ASR_OPS_VARIANT=cuda                       # every load in this check uses the CUDA build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
START=$SECONDS
left() { echo $(( BUDGET_SECONDS - (SECONDS - START) )); }
# a stage's timeout: its own limit, or what is left of the budget (less a margin for the summary)
cap() { local want=$1 rest=$(( $(left) - 30 )); [ "$rest" -lt "$want" ] && want=$rest; [ "$want" -lt 10 ] && want=10; echo "$want"; }
stage() { echo; echo "=== [$(( SECONDS - START )) s] $*"; }
status_build=skipped status_tests=skipped status_v2=skipped status_barrier=skipped status_bench=skipped status_train=skipped
status_micro=skipped

stage "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1
  "$PY" -c 'from asr.ops import build; print("nvcc", build.find_nvcc())' 2>&1
  nvcc --version 2>&1 | tail -2
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
} | tee "$OUT/env.txt"

stage "latency microbenchmarks (csrc/microbench)"
# Machine code for sm_80 and sm_90a (clusters), PTX for anything newer (the cluster figures then say
# "not applicable"); built outside OUTDIR so that no binary lands among the results.
MICRO_NVCC=$("$PY" -c 'from asr.ops import build; print(build.find_nvcc() or "")' 2>/dev/null || true)
[ -n "$MICRO_NVCC" ] || MICRO_NVCC=$(command -v nvcc || true)
MICRO_DIR=$(mktemp -d)
if [ -z "$MICRO_NVCC" ]; then
  echo "no nvcc found: microbenchmarks not built" | tee "$OUT/microbench.log"
  status_micro="failed (no nvcc)"
elif ! timeout "$(cap 150)" "$MICRO_NVCC" -std=c++17 -O3 -I csrc --threads 0 \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=compute_80 \
    csrc/microbench/microbench.cu csrc/prnn_planner.cpp -o "$MICRO_DIR/microbench" >"$OUT/microbench_build.log" 2>&1; then
  status_micro="failed (build)"
  tail -20 "$OUT/microbench_build.log"
else
  timeout "$(cap 90)" "$MICRO_DIR/microbench" "$OUT/microbench.json" >"$OUT/microbench.log" 2>&1
  case $? in
    0) status_micro=passed ;;
    77) status_micro="failed (no GPU)" ;;
    124) status_micro="failed (killed after its time limit)" ;;
    *) status_micro="failed (a timeout or an error: see microbench.json)" ;;
  esac
  cat "$OUT/microbench.log"
fi
rm -rf "$MICRO_DIR"

stage "build (CUDA variant, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if timeout 300 "$PY" -m asr.cli ops build --variant cuda --verbose >"$OUT/build.log" 2>&1; then
  status_build=passed
else
  status_build=failed
fi
tail -3 "$OUT/build.log"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA GPU is visible to torch: the cuda tests would only skip, so the check fails"
  status_build="${status_build}, but no GPU"
fi

if [ "${status_build%%,*}" = passed ]; then
  stage "tests (cuda-marked and quick CPU op tests, against the CUDA build)"
  test_seconds=$(( $(left) - 200 )); [ "$test_seconds" -gt 220 ] && test_seconds=220; [ "$test_seconds" -lt 60 ] && test_seconds=60
  if timeout "$test_seconds" "$PY" -m pytest -p no:cacheprovider -q -rs -m "cuda or not slow" \
      --junitxml="$OUT/pytest.xml" tests/test_ops_cuda.py tests/test_model_cuda.py tests/test_ops_extension.py \
      tests/test_ops_reference.py tests/test_ops_faults.py tests/test_csrc.py::test_c_program_on_gpu \
      >"$OUT/pytest.log" 2>&1; then
    status_tests=passed
  else
    status_tests=failed
  fi
  tail -15 "$OUT/pytest.log"

  stage "kernel v2 (PRNN_VARIANT=v2): prnn_test's matrix and the cuda op tests"
  if PRNN_VARIANT=v2 timeout "$(cap 150)" "$PY" -m pytest -p no:cacheprovider -q -rs -m "cuda" \
      --junitxml="$OUT/pytest_v2.xml" tests/test_csrc.py::test_c_program_on_gpu tests/test_ops_cuda.py \
      >"$OUT/pytest_v2.log" 2>&1; then
    status_v2=passed
  else
    status_v2=failed
  fi
  tail -15 "$OUT/pytest_v2.log"

  # Auto picks cluster mode for most of these shapes on sm_90: ring mode forced once more (PRNN_V2_MODE).
  stage "kernel v2, ring mode forced (PRNN_V2_MODE=ring): the cuda op tests"
  if PRNN_VARIANT=v2 PRNN_V2_MODE=ring timeout "$(cap 100)" "$PY" -m pytest -p no:cacheprovider -q -rs -m "cuda" \
      --junitxml="$OUT/pytest_v2_ring.xml" tests/test_ops_cuda.py >"$OUT/pytest_v2_ring.log" 2>&1; then
    :
  else
    status_v2=failed
  fi
  tail -5 "$OUT/pytest_v2_ring.log"

  stage "grid-barrier microbenchmark"
  if timeout 60 "$PY" - "$OUT/barrier.json" >"$OUT/barrier.log" 2>&1 <<'EOF'
import json, sys
import torch
from asr.ops import build, custom_op
build.load("cuda")
ops = custom_op.ops()
props = torch.cuda.get_device_properties(0)
rows = []
for blocks in (0, props.multi_processor_count // 2, props.multi_processor_count):
    us = ops.measure_barrier(0, blocks, 5000)
    rows.append({"blocks": blocks if blocks > 0 else "planner default", "microseconds": us})
    print(f"blocks {rows[-1]['blocks']}: {us:.2f} us per grid barrier")
json.dump({"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count, "results": rows},
          open(sys.argv[1], "w"), indent=1)
EOF
  then status_barrier=passed; else status_barrier=failed; fi
  cat "$OUT/barrier.log"

  stage "benchmark: target configurations"
  status_bench=passed
  timeout "$(cap 120)" "$PY" -m asr.cli bench rnn --hidden 1152 --batch 4,64 --dtype bfloat16,float32 --directions 1 \
      --backends persistent,persistent_v2,persistent_v2_ring,cudnn --out "$OUT/bench_targets.json" --no-plot \
      >"$OUT/bench_targets.log" 2>&1 || status_bench=failed
  tail -4 "$OUT/bench_targets.log"
  timeout "$(cap 60)" "$PY" -m asr.cli bench rnn --hidden 1024 --batch 8,16,32,64 --dtype float16 --directions 1 --modes fwd \
      --backends persistent,persistent_v2,cudnn --out "$OUT/bench_targets_fp16.json" --no-plot \
      >"$OUT/bench_targets_fp16.log" 2>&1 || status_bench=failed
  tail -4 "$OUT/bench_targets_fp16.log"

  stage "benchmark: the training step on the GPU (recipe networks, persistent op vs cuDNN RNN) and the scaling model"
  timeout "$(cap 150)" "$PY" -m asr.cli bench train --device cuda --networks clean100,ds2 --precision bf16,fp32 \
      --seconds 5 --repeats 5 --budget-seconds "$(( $(cap 150) - 40 ))" --json "$OUT/bench_train_sweep.json" \
      >"$OUT/bench_train_sweep.log" 2>&1 || status_bench=failed
  tail -6 "$OUT/bench_train_sweep.log"
  timeout 60 "$PY" -m asr.cli bench scaling --train-json "$OUT/bench_train_sweep.json" --out "$OUT/scaling.json" \
      >"$OUT/scaling.log" 2>&1 || status_bench=failed
  tail -20 "$OUT/scaling.log"

  if [ -n "$CORPUS" ]; then
    stage "training: recipes/synth/tiny.yaml on the GPU, bf16-mixed, corpus $CORPUS"
    if timeout 150 "$PY" -m asr.cli train --config recipes/synth/tiny.yaml --data.root "$CORPUS" \
        --trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.max_epochs "${GPU_CHECK_EPOCHS:-5}" \
        --data.num_workers 6 --trainer.default_root_dir "$OUT/train" >"$OUT/train.log" 2>&1; then
      status_train=passed
    else
      status_train=failed
    fi
    tail -32 "$OUT/train.log"
  fi

  sweep_seconds=$(( $(left) - 40 ))
  if [ "$sweep_seconds" -gt 30 ]; then
    stage "benchmark: full sweep (budget ${sweep_seconds} s)"
    timeout $(( sweep_seconds + 60 )) "$PY" -m asr.cli bench rnn --budget-seconds "$sweep_seconds" \
        --out "$OUT/bench_rnn.json" >"$OUT/bench_rnn.log" 2>&1 || status_bench=failed
    tail -3 "$OUT/bench_rnn.log"
  else
    echo "no time left for the full sweep"
  fi
fi

stage "summary"
"$PY" - "$OUT" "$status_build" "$status_tests" "$status_barrier" "$status_bench" "$status_train" "$(( SECONDS - START ))" "$status_v2" "$status_micro" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
out, build, tests, barrier, bench, train, seconds, v2, micro = (Path(sys.argv[1]), *sys.argv[2:7], int(sys.argv[7]),
                                                                 *sys.argv[8:10])
summary = {"build": build, "tests": tests, "v2_tests": v2, "microbench": micro, "barrier": barrier, "bench": bench,
           "train": train, "seconds": seconds}
if (out / "microbench.json").is_file():
    summary["microbench_figures"] = [{k: f.get(k) for k in ("name", "label", "status", "median", "p10", "p90", "unit",
                                                            "reason")}
                                     for f in json.loads((out / "microbench.json").read_text())["figures"]]
if (out / "pytest.xml").is_file():
    suite = ET.parse(out / "pytest.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    summary["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
if (out / "barrier.json").is_file():
    summary["barrier_us"] = {str(r["blocks"]): round(r["microseconds"], 2)
                             for r in json.loads((out / "barrier.json").read_text())["results"]}
targets = []
for name in ("bench_targets.json", "bench_targets_fp16.json"):
    if (out / name).is_file():
        report = json.loads((out / name).read_text())
        summary["device"] = report["device"]
        targets += [r for r in report["results"] if r["backend"].startswith("persistent")]
summary["targets"] = targets
summary["train_step"] = []
for path in sorted(out.glob("bench_train_*.json")):
    r = json.loads(path.read_text())
    summary["train_step"].append({k: r.get(k) for k in ("precision", "batch", "ours_step_seconds",
                                  "torch_rnn_step_seconds", "speedup", "ours_backends")} | {"hidden": r["config"]["rnn_hidden"]})
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"device: {summary.get('device', '?')}   wall time: {seconds} s")
print(f"build: {build}   tests: {tests} {summary.get('pytest', '')}   v2 tests: {v2}   barrier: {barrier}   "
      f"bench: {bench}   train: {train}")
print(f"microbenchmarks: {micro}")
for f in summary.get("microbench_figures", []):
    value = (f"{f['median']:.3g} {f['unit']} [p10 {f['p10']:.3g}, p90 {f['p90']:.3g}]" if f["status"] == "ok"
             else f"{f['status']}: {(f['reason'] or '')[:70]}")
    print(f"  {f['name']:<26}{f['label']:<34}{value}")
for blocks, us in summary.get("barrier_us", {}).items():
    print(f"grid barrier, {blocks} blocks: {us} us")


def goal(r):  # issue 11's targets (H100/H200, ratios from the same run)
    if not r["backend"].startswith("persistent_v2"):
        return ""
    if r["dtype"] == "bfloat16" and r["hidden"] == 1152:
        return "<= 1.0 us and >= 10x" if r["batch"] == 4 else "<= 2.5 us and >= 3x" if r["batch"] == 64 else ""
    if r["dtype"] == "float16" and r["hidden"] == 1024:
        return ">= 1.5x"
    if r["dtype"] == "float32" and r["hidden"] == 1152 and r["batch"] == 4 and r["mode"] == "fwd":
        return "<= 1.5 us, error within 2x of fp32 torch"
    return ""


print(f"{'backend':<22}{'dtype':<9}{'mode':<7}{'H':>6}{'N':>4}{'us/step':>10}{'TFLOP/s':>9}{'x cuDNN':>9}{'error':>10}   target")
for r in targets:
    head = f"{r['backend']:<22}{r['dtype']:<9}{r['mode']:<7}{r['hidden']:>6}{r['batch']:>4}"
    if r["us_per_step"] is None:
        print(f"{head}  n/a: {r['error'][:60]}")
        continue
    speedup = r["speedup_over_cudnn"]
    err = r.get("max_error")
    print(f"{head}{r['us_per_step']:>10.2f}{r['tflops']:>9.3f}{(f'{speedup:.2f}' if speedup else '-'):>9}"
          f"{(f'{err:.1e}' if err is not None else '-'):>10}   {goal(r)}")
for r in summary["train_step"]:
    print(f"train step {r['precision']:<5} batch {r['batch']:>3} hidden {r['hidden']:>5}: ours "
          f"{1000 * r['ours_step_seconds']:.1f} ms ({','.join(r['ours_backends'] or [])}), cuDNN RNN "
          f"{1000 * r['torch_rnn_step_seconds']:.1f} ms, {r['speedup']:.2f}x")
EOF
[ "$status_build" = passed ] && [ "$status_tests" = passed ] && [ "$status_v2" = passed ]
