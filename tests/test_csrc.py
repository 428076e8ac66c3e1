"""csrc/: the tile planner on CPU, the nvcc compile + link guard, and the C test program on a GPU.

The compile test is what keeps a kernel that does not compile from landing: nvcc builds every
csrc/prnn_*.cu plus the planner into a shared library and the C test program links against it.
By default it builds one architecture (sm_90) to keep CI short; PRNN_TEST_CUDA_ARCH_LIST="all"
builds TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), any other value is used as the list itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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
    against a naive GEMM, the planner on A100/H100/H200/L4, the whole kernel (bf16, fp16, 1xTF32,
    3xTF32; forward and backward; ragged) against a float64 oracle, the exchange protocol under a
    memory that delays stores and serves stale loads (bitwise equal to plain memory over many seeds),
    and a block that never publishes timing out with a record naming it."""
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
    # Every kernel case and both protocol runs printed a verdict (a case that silently did not run fails).
    assert len(re.findall(r"^ok   .*tolerance", result.stdout, re.M)) == 7, result.stdout
    assert len(re.findall(r"^ok   protocol .*: 0 failed, 0 differ", result.stdout, re.M)) == 2, result.stdout
    assert re.search(r"^ok   timeout .*status 2 after", result.stdout, re.M), result.stdout


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
        current = None
        for line in res.stderr.splitlines():
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
