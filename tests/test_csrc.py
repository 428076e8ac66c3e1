"""csrc/: the tile planner on CPU, the nvcc compile + link guard, the C test program on a GPU, and
the GPU microbenchmarks (csrc/microbench: host logic on CPU, compile + ptxas checks, no-GPU exit).

The compile test is what keeps a kernel that does not compile from landing: nvcc builds every
csrc/prnn_*.cu plus the planner into a shared library and the C test program links against it.
By default it builds one architecture (sm_90) to keep CI short; PRNN_TEST_CUDA_ARCH_LIST="all"
builds TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), any other value is used as the list itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
DEFAULT_TEST_ARCH_LIST = "9.0"
DEFAULT_FULL_ARCH_LIST = "8.0;9.0+PTX"
NO_GPU_EXIT = 77  # prnn_test's exit status when no GPU is usable
COMPILE_TIMEOUT_S = 600
GPU_TEST_TIMEOUT_S = 300
EMULATION_TIMEOUT_S = 600  # thousands of OS threads meeting at barriers: ~1 minute on 2 cores


def find_nvcc() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def find_cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def gencode_flags(arch_list: str) -> list[str]:
    """'8.0;9.0+PTX' -> nvcc -gencode flags (machine code for each, PTX where +PTX is given)."""
    flags = []
    for item in re.split(r"[;\s,]+", arch_list.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        number = item.removesuffix("+PTX").replace(".", "")
        if not number.isdigit():
            raise ValueError(f"bad CUDA arch {item!r} in {arch_list!r}")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def requested_arch_list() -> str:
    requested = os.environ.get("PRNN_TEST_CUDA_ARCH_LIST", DEFAULT_TEST_ARCH_LIST)
    if requested == "all":
        return os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_FULL_ARCH_LIST)
    return requested


def run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_gencode_flags_parse_torch_style_lists():
    assert gencode_flags("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    with pytest.raises(ValueError):
        gencode_flags("sm_90")


def test_planner_on_a100_h100_h200_l4(tmp_path):
    cxx = find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "prnn_planner_test"
    build = run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
         str(CSRC / "prnn_planner.cpp"), str(CSRC / "tests" / "prnn_planner_test.cpp"), "-o", str(exe)],
        timeout=COMPILE_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stderr
    result = run([str(exe)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = re.search(r"planner test: (\d+) plans checked, (\d+) refusals checked, 0 failures", result.stdout)
    assert summary, result.stdout
    assert int(summary.group(1)) > 1000 and int(summary.group(2)) > 0
    assert "H100 refusal: hidden 4096 fp32" in result.stdout


@pytest.mark.slow
def test_fp32_kernels_emulated_on_cpu_threads(tmp_path):
    """The kernel template itself, compiled by g++ with a thread-per-CUDA-thread shim, against a CPU
    loop (indexing, staging, reductions, positions, epilogues; not the GPU's memory ordering)."""
    cxx = find_cxx()
    nvcc = find_nvcc()
    if cxx is None or nvcc is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers")
    exe = tmp_path / "prnn_emulation_test"
    build = run(
        [cxx, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-pthread", "-DPRNN_HOST_EMULATION", f"-I{CSRC}",
         f"-I{nvcc.parent.parent / 'include'}", str(CSRC / "prnn_planner.cpp"),
         str(CSRC / "tests" / "prnn_emulation_test.cpp"), "-o", str(exe)],
        timeout=COMPILE_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stderr
    result = run([str(exe)], timeout=EMULATION_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "emulation test: 0 failures" in result.stdout


def test_v2_kernel_emulated_on_cpu_threads(tmp_path):
    """Kernel v2 on CPU threads: fragment layouts against the PTX tables, emulated mma.sync bit for bit
    against a naive GEMM, the planner on A100/H100/H200/L4 (ring and cluster modes), the whole kernel
    (bf16, fp16, 1xTF32, 3xTF32; forward and backward; ragged; ring mode and cluster mode, whose
    blocks push into each other's shared memory with st.async counted by mbarriers) against a float64
    oracle (also whole grids of real devices' plans: H100 H=1152 bf16 as one 15-block cluster, L4 and
    A100 in ring mode), the exchange protocol of both modes (ring: a memory that delays stores and serves stale
    loads; cluster: pushes that land late and in any order, waits that fail spuriously, each push
    checked to land in its own phase) bitwise equal to plain memory over many seeds, and a block that
    never publishes timing out with a record naming it (ring mode) or saying it cannot (cluster mode)."""
    cxx = find_cxx()
    nvcc = find_nvcc()
    if cxx is None or nvcc is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers")
    exe = tmp_path / "prnn_v2_emulation_test"
    build = run(
        [cxx, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-pthread", "-DPRNN_HOST_EMULATION",
         f"-I{CSRC}", f"-I{nvcc.parent.parent / 'include'}", str(CSRC / "prnn_planner.cpp"),
         str(CSRC / "tests" / "prnn_v2_emulation_test.cpp"), "-o", str(exe)],
        timeout=COMPILE_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stderr
    result = run([str(exe)], timeout=EMULATION_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "v2 emulation test: 0 failures" in result.stdout
    # Every kernel case and every protocol run printed a verdict (a case that silently did not run fails):
    # 7 in ring mode, 5 in cluster mode (sm_90's DSMEM exchange), each plan in the mode it names, and 3
    # whole grids of real devices' plans.
    # A real grid is skipped only where the machine allows fewer tasks than it has threads, and says so.
    skipped = re.findall(r"^skip (real .*): \d+ threads, this machine allows \d+ tasks$", result.stdout, re.M)
    for name in skipped:
        warnings.warn(f"v2 emulation: {name} not run (too few tasks allowed on this machine)")
    assert len(re.findall(r"^ok   .*tolerance", result.stdout, re.M)) == 15 - len(skipped), result.stdout
    # The headline shape's own plan, whole: one cluster of 15 blocks of 480 threads on an H100.
    expected = {"real H100 cluster": r"\[v2 cluster .*15 blocks \(15/direction = one cluster.* x 480 threads",
                "real L4 ring": r"\[v2 ring .*36 blocks", "real A100 ring": r"\[v2 ring .*32 blocks"}
    for name, plan in expected.items():
        assert any(s.startswith(name) for s in skipped) or re.search(rf"^ok   {name} .*{plan}", result.stdout, re.M), \
            result.stdout
    assert len(re.findall(r"^ok   cluster .*tolerance .*\[v2 cluster ", result.stdout, re.M)) == 5, result.stdout
    assert len(re.findall(r"^ok   protocol .*\(ring mode\).*: 0 failed, 0 differ", result.stdout, re.M)) == 2, result.stdout
    assert len(re.findall(r"^ok   protocol .*\(cluster mode\).*: 0 failed, 0 differ", result.stdout, re.M)) == 1, result.stdout
    assert len(re.findall(r"^ok   timeout .*status 2 after", result.stdout, re.M)) == 2, result.stdout
    # The shape cluster mode is for: H=1152 bf16 with two directions at N=4 is one 15-block cluster per direction.
    assert re.search(r"^planner v2: H100 H=1152 N=4 D=2 bf16: v2 cluster .*\(15/direction = one cluster", result.stdout, re.M), result.stdout


# The register count every v2 plan assumes (prnn_planner.h: kKernelMaxRegsPerThread).
V2_PLANNED_REGISTERS = 128


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_v2_instantiations_fit_their_registers_without_spills(tmp_path, arch):
    """ptxas on every v2 instantiation (both passes, every dtype/precision/register-step template):
    no local memory (spills or stack) and no more registers than the planner assumes."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    number = arch[3:]
    flags = [f"-gencode=arch=compute_{number},code={arch}", "-std=c++17", "-O3", "-Xcompiler=-fPIC", f"-I{CSRC}", "-Xptxas=-v"]
    kernels = {}
    for name in ("prnn_v2_forward.cu", "prnn_v2_backward.cu"):
        res = run([str(nvcc), *flags, "-c", str(CSRC / name), "-o", str(tmp_path / (name + ".o"))], timeout=COMPILE_TIMEOUT_S)
        assert res.returncode == 0, res.stderr
        kernels.update(_ptxas_kernels(res.stderr))
    v2 = {k: v for k, v in kernels.items() if "persistent_rnn_v2_kernel" in k}
    # 2 passes x (bf16, fp16) x 2 register-step templates + fp32 1xTF32 x 2 + 3xTF32 x 1
    assert len(v2) == 2 * (2 * 2 + 2 + 1), sorted(v2)
    for name, info in v2.items():
        assert info.get("local") == (0, 0, 0), f"{arch} {name}: local memory {info.get('local')}"
        assert 0 < info["registers"] <= V2_PLANNED_REGISTERS, f"{arch} {name}: {info['registers']} registers"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """libprnn.so (kernels + C API + planner) and prnn_test linked against it."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    out = tmp_path_factory.mktemp("prnn_build")
    arch = gencode_flags(requested_arch_list())
    common = ["-std=c++17", "-O3", "-Xcompiler=-fPIC,-Wall", "-Xptxas=-warn-spills,-warn-lmem-usage", f"-I{CSRC}"]
    sources = sorted(CSRC.glob("prnn_*.cu")) + [CSRC / "prnn_planner.cpp"]

    def compile_one(src: Path) -> tuple[Path, subprocess.CompletedProcess]:
        obj = out / (src.name + ".o")
        flags = arch if src.suffix == ".cu" else []
        return obj, run([str(nvcc), *common, *flags, "-c", str(src), "-o", str(obj)], timeout=COMPILE_TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, sources))
    for (obj, res), src in zip(results, sources):
        assert res.returncode == 0, f"{src.name}:\n{res.stderr}"
        assert "warning" not in res.stderr.lower(), f"{src.name}:\n{res.stderr}"
    lib = out / "libprnn.so"
    link = run([str(nvcc), "-shared", "-cudart=shared", *arch, "-o", str(lib), *[str(o) for o, _ in results]],
               timeout=COMPILE_TIMEOUT_S)
    assert link.returncode == 0, link.stderr
    cuda_lib = nvcc.parent.parent / "lib64"
    exe = out / "prnn_test"
    prog = run(
        [str(nvcc), "-std=c++17", "-O2", f"-I{CSRC}", str(CSRC / "tests" / "prnn_test.cpp"), f"-L{out}", "-lprnn",
         "-cudart=shared", f"-Xlinker=-rpath,{out}", f"-Xlinker=-rpath,{cuda_lib}", "-o", str(exe)],
        timeout=COMPILE_TIMEOUT_S,
    )
    assert prog.returncode == 0, prog.stderr
    assert "warning" not in prog.stderr.lower(), prog.stderr
    return {"lib": lib, "exe": exe}


def test_kernels_compile_and_c_test_links(built):
    assert built["lib"].stat().st_size > 0
    nm = shutil.which("nm")
    if nm:
        symbols = run([nm, "-D", "--defined-only", str(built["lib"])], timeout=60).stdout
        for name in ("prnnForward", "prnnBackwardData", "prnnCheckSupport", "prnnForwardWorkspaceSize",
                     "prnnBackwardDataWorkspaceSize", "prnnMeasureBarrier", "prnnStatusString",
                     "prnnLastErrorMessage", "prnnWorkspaceStatus", "prnnWorkspaceStatusAsync",
                     "prnnStatusFromRecord", "prnnDescribePlan"):
            assert re.search(rf"\bT {name}$", symbols, re.M), f"{name} not exported (extern \"C\")"
    # With every GPU hidden the program must say so and exit with its no-GPU status.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = run([str(built["exe"])], timeout=60, env=env)
    assert result.returncode == NO_GPU_EXIT, result.stdout + result.stderr
    assert "prnn_test: no GPU" in result.stdout


@pytest.mark.cuda
def test_c_program_on_gpu(built):
    result = run([str(built["exe"])], timeout=GPU_TEST_TIMEOUT_S)
    if result.returncode == NO_GPU_EXIT:
        pytest.skip("no GPU: " + result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prnn_test: 0 failures" in result.stdout


# ---- csrc/microbench: the GPU latency microbenchmarks (scripts/gpu_check.sh runs them first) ------------
MICROBENCH = CSRC / "microbench" / "microbench.cu"
MICROBENCH_KERNELS = {"l2_chase_kernel", "pingpong_kernel", "all_to_all_kernel", "cluster_kernel",
                      "cluster_tx_kernel", "cluster_occupancy_probe"}
CLUSTER_PTX = ("barrier.cluster.arrive", "barrier.cluster.wait", "mapa", "ld.relaxed.cluster", "st.relaxed.cluster",
               "st.async.shared::cluster.mbarrier::complete_tx::bytes", "mbarrier.arrive.expect_tx",
               "mbarrier.try_wait.parity", "fence.mbarrier_init")
MICROBENCH_STATUSES = {"ok", "not_applicable", "refused", "timeout", "error"}
MICROBENCH_FIGURES = {"l2_round_trip", "handoff_two_blocks", "handoff_all_to_all", "dsmem_handoff_two_blocks",
                      "dsmem_all_to_all", "cluster_barrier_exchange", "dsmem_tx_exchange", "max_active_clusters"}


def test_microbench_host_logic(tmp_path):
    """Statistics, grid sizes, partners, co-residency refusal, the chase cycle and the JSON writer, on
    the CPU; the sample document it writes must parse and carry the hand-computed quantiles."""
    cxx = find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "microbench_host_test"
    build = run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
                 str(CSRC / "tests" / "microbench_host_test.cpp"), "-o", str(exe)], timeout=COMPILE_TIMEOUT_S)
    assert build.returncode == 0, build.stderr
    sample = tmp_path / "sample.json"
    result = run([str(exe), str(sample)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "microbench host test: 0 failures" in result.stdout
    figures = {f["name"]: f for f in json.loads(sample.read_text())["figures"]}
    ok = figures["l2_round_trip"]
    assert (ok["status"], ok["repeats"], ok["median"], ok["p10"], ok["p90"]) == ("ok", 10, 5.5, 1.9, 9.1)
    assert ok["params"]["load"] == 'ld.global.cg "quoted"' and ok["samples"] == list(range(1, 11))
    na = figures["dsmem_all_to_all"]
    assert na["status"] == "not_applicable" and "compute capability 9.0" in na["reason"]
    assert na["repeats"] == 0 and na["median"] is None and na["samples"] == []
    assert figures["handoff_all_to_all"]["status"] == "timeout" and "waited more than" in \
        figures["handoff_all_to_all"]["reason"]


def _ptxas_kernels(stderr: str) -> dict[str, dict]:
    """ptxas -v output -> {entry function: {"local": (stack, spill stores, spill loads), "registers": n}}."""
    kernels, current = {}, None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current]["local"] = tuple(int(x) for x in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


@pytest.fixture(scope="module", params=["sm_80", "sm_90a"])
def microbench_build(request, tmp_path_factory):
    """The microbenchmark program for one architecture (ptxas -v output kept) and its PTX."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    arch = request.param
    number = arch[3:]
    out = tmp_path_factory.mktemp(f"microbench_{arch}")
    exe = out / "microbench"
    build = run([str(nvcc), "-std=c++17", "-O3", f"-I{CSRC}", f"-gencode=arch=compute_{number},code={arch}",
                 "-Xptxas=-v", "-Xcompiler=-Wall", str(MICROBENCH), str(CSRC / "prnn_planner.cpp"), "-o", str(exe)],
                timeout=COMPILE_TIMEOUT_S)
    assert build.returncode == 0, build.stderr
    ptx = run([str(nvcc), "-std=c++17", "-O3", f"-I{CSRC}", f"-arch=compute_{number}", "-ptx", str(MICROBENCH),
               "-o", str(out / "microbench.ptx")], timeout=COMPILE_TIMEOUT_S)
    assert ptx.returncode == 0, ptx.stderr
    return {"arch": arch, "exe": exe, "stderr": build.stderr, "ptx": (out / "microbench.ptx").read_text()}


def test_microbench_compiles_without_local_memory(microbench_build):
    """Every kernel of the program, for sm_80 and sm_90a: no warnings, no stack frame, no spills; the
    cluster kernel holds its cluster code (barrier.cluster, mapa, relaxed.cluster accesses) in the
    sm_90a build only (for sm_80 it is an empty stub the host recognises)."""
    build = microbench_build
    assert "warning" not in build["stderr"].lower(), build["stderr"]
    kernels = _ptxas_kernels(build["stderr"])
    found = {short for short in MICROBENCH_KERNELS for name in kernels if short in name}
    assert found == MICROBENCH_KERNELS, sorted(kernels)
    assert len(kernels) == len(MICROBENCH_KERNELS), sorted(kernels)
    for name, info in kernels.items():
        assert info.get("local") == (0, 0, 0), f"{build['arch']} {name}: local memory {info.get('local')}"
        assert info.get("registers", 0) > 0, f"{build['arch']} {name}: no register count"
    for instruction in CLUSTER_PTX:
        assert (instruction in build["ptx"]) == (build["arch"] == "sm_90a"), f"{build['arch']}: {instruction}"
    for instruction in ("ld.global.cg.u32", "ld.relaxed.gpu.global.b64", "st.relaxed.gpu.global.b64", "%globaltimer",
                        "%smid"):
        assert instruction in build["ptx"], f"{build['arch']}: {instruction} missing"


def test_microbench_without_gpu_exits_77_and_writes_nothing(microbench_build, tmp_path):
    out = tmp_path / "microbench.json"
    result = run([str(microbench_build["exe"]), str(out)], timeout=60, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == NO_GPU_EXIT, result.stdout + result.stderr
    assert "microbench: no GPU" in result.stdout
    assert not out.exists()


MICROBENCH_BAD_ARGUMENTS = [
    ([], "OUT.json (the output path) is missing"),
    (["out.json", "--repeats", "0"], "--repeats must be an integer in [1, 1000], got '0'"),
    (["out.json", "--timeout-ms", "soon"], "--timeout-ms must be an integer in [1, 600000], got 'soon'"),
    (["out.json", "--repeats"], "--repeats needs a value"),
    (["out.json", "--fast"], "unknown option '--fast'"),
    (["a.json", "b.json"], "one output path, got 'a.json' and 'b.json'"),
]


def test_microbench_bad_arguments_are_named(microbench_build, tmp_path):
    """Refused before any GPU is looked for: exit 2, the argument and the reason, the usage line."""
    for argv, message in MICROBENCH_BAD_ARGUMENTS:
        result = subprocess.run([str(microbench_build["exe"]), *argv], capture_output=True, text=True, timeout=60,
                                cwd=tmp_path)
        assert result.returncode == 2, (argv, result.stdout + result.stderr)
        assert message in result.stderr and "usage: microbench OUT.json" in result.stderr, (argv, result.stderr)
    assert not any(tmp_path.iterdir())


@pytest.mark.cuda
def test_microbench_on_gpu(microbench_build, tmp_path):
    """On a GPU of the build's architecture: a JSON with every figure, each ok / not applicable /
    refused with a reason, none timed out; clusters measured on sm_90, not applicable on sm_80."""
    out = tmp_path / "microbench.json"
    result = run([str(microbench_build["exe"]), str(out), "--quick"], timeout=GPU_TEST_TIMEOUT_S)
    if result.returncode == NO_GPU_EXIT:
        pytest.skip("no GPU: " + result.stdout.strip())
    report = json.loads(out.read_text())
    cc = report["device"]["compute_capability"]
    major = int(cc.split(".")[0])
    if not (cc == "9.0" if microbench_build["arch"] == "sm_90a" else major == 8):  # machine code runs there only
        pytest.skip(f"built for {microbench_build['arch']}, the device is compute capability {cc}")
    assert result.returncode == 0, result.stdout + result.stderr
    figures = report["figures"]
    assert {f["name"] for f in figures} == MICROBENCH_FIGURES
    for f in figures:
        assert f["status"] in MICROBENCH_STATUSES - {"timeout", "error"}, f
        assert f["status"] == "ok" or f["reason"], f
        if f["status"] == "ok":
            assert f["median"] > 0 and f["p10"] <= f["median"] <= f["p90"], f
    cluster = [f for f in figures if f["name"].startswith(("dsmem", "cluster", "max_active"))]
    assert all((f["status"] == "not_applicable") == (major < 9) for f in cluster), cluster
