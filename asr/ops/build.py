"""Build and load the recurrent-op extension (csrc/) with torch.utils.cpp_extension, and the
`asr ops build` command that does it ahead of time.

Two variants of one extension, both defining the ops of namespace `asr_prnn`:
  cuda  csrc/torch_binding.cpp + csrc/prnn_planner.cpp + csrc/prnn_*.cu, compiled with nvcc for the
        architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"); has the CPU implementation too.
  cpu   csrc/torch_binding.cpp alone with -DPRNN_CPU_ONLY: a plain C++ compile, no nvcc.
Whether nvcc exists decides what can be built; whether a GPU is visible never matters. Builds are
cached under build/ops/ (ASR_OPS_BUILD_DIR overrides): cpu/ and one cuda-<hash>/ per arch list,
rebuilt only when sources or flags change. Each finished build leaves a stamp (BUILD_STAMP: a key
over the sources, headers, flags, arch list and torch version) so that a later process can tell,
without compiling, whether a cached build is current.
Only one variant can live in a process (both register the same op names): the first load wins,
and the cuda variant also serves every CPU request. A CPU request takes a current cuda build of
any arch list (its CPU implementation is the same; the tests build for one architecture, the CLI
defaults to two), else the CPU-only build; it never waits for nvcc.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from asr.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC_DIR = Path(os.environ.get("ASR_CSRC_DIR", REPO_ROOT / "csrc"))
BUILD_ROOT = Path(os.environ.get("ASR_OPS_BUILD_DIR", REPO_ROOT / "build" / "ops"))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # A100 and H100/H200 SASS, plus PTX for newer GPUs
VARIANT_ENV = "ASR_OPS_VARIANT"  # force "cpu" or "cuda" for every load
VARIANTS = ("cpu", "cuda")
HOST_FLAGS = ["-O3", "-std=c++17"]
CUDA_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
BUILD_STAMP = "asr-build.json"  # in each build directory: {"key", "variant", "arch_list"}

log = logging.getLogger(__name__)


def _without_cuda_runtime_notice(record: logging.LogRecord) -> bool:
    """cpp_extension warns at import when no GPU driver is present ("No CUDA runtime is found"),
    which is the normal state of a build machine: we set CUDA_HOME ourselves from the nvcc found,
    so the notice only alarms readers of every CPU training log."""
    return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_without_cuda_runtime_notice)


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class LoadedExtension:
    variant: str  # "cpu" or "cuda"
    library: str  # path of the loaded shared library
    arch_list: str | None  # TORCH_CUDA_ARCH_LIST it was built for (cuda variant only)
    seconds: float  # wall time of the load, including any compile


_lock = threading.Lock()
_loaded: LoadedExtension | None = None
_failures: dict[str, str] = {}  # variant -> why it could not be loaded in this process


def find_cuda_home() -> Path | None:
    """A CUDA toolkit with bin/nvcc and headers: CUDA_HOME / CUDA_PATH, then the one nvcc on PATH
    belongs to, then /usr/local/cuda. (An nvcc on PATH may be a wrapper script outside the toolkit.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home)
    return None


def find_nvcc() -> str | None:
    home = find_cuda_home()
    return str(home / "bin" / "nvcc") if home else None


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def sources(variant: str) -> list[Path]:
    binding = CSRC_DIR / "torch_binding.cpp"
    if variant == "cpu":
        return [binding]
    return [binding, CSRC_DIR / "prnn_planner.cpp", *sorted(CSRC_DIR.glob("prnn_*.cu"))]


def build_directory(variant: str, arch_list: str | None) -> Path:
    if variant == "cpu":
        return BUILD_ROOT / "cpu"
    tag = hashlib.sha1(arch_list.encode()).hexdigest()[:8]  # one cached build per arch list
    return BUILD_ROOT / f"cuda-{tag}"


def _extension_name(variant: str) -> str:
    return f"asr_prnn_{variant}"


def _inputs(variant: str) -> list[Path]:
    """Every file a build of `variant` reads from csrc/: its sources and the headers they include."""
    headers = sorted(p for pattern in ("*.h", "*.cuh") for p in CSRC_DIR.glob(pattern))
    return [*sources(variant), *headers]


def build_key(variant: str, arch_list: str | None) -> str:
    """What a build's result depends on; equal keys mean a cached build needs no compile."""
    import torch

    digest = hashlib.sha256()
    flags = [variant, arch_list or "", *HOST_FLAGS, *CUDA_FLAGS, torch.__version__]
    digest.update(json.dumps(flags).encode())
    for path in _inputs(variant):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()


def record_build(directory: Path, variant: str, arch_list: str | None) -> None:
    """Stamp a finished build so that later processes recognise it (see cached_build)."""
    stamp = dict(key=build_key(variant, arch_list), variant=variant, arch_list=arch_list)
    (directory / BUILD_STAMP).write_text(json.dumps(stamp) + "\n")


def _is_current(directory: Path) -> dict | None:
    """The stamp of a build in `directory` that is current (same key, library newer than every
    input, which is what keeps ninja from recompiling it), else None."""
    try:
        stamp = json.loads((directory / BUILD_STAMP).read_text())
        variant, arch_list = stamp["variant"], stamp["arch_list"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    libraries = list(directory.glob(f"{_extension_name(variant)}*.so"))  # cpp_extension adds _v1... on rebuilds
    if variant not in VARIANTS or not libraries or stamp.get("key") != build_key(variant, arch_list):
        return None
    newest_input = max((p.stat().st_mtime for p in _inputs(variant) if p.is_file()), default=0.0)
    if max(p.stat().st_mtime for p in libraries) < newest_input:
        return None
    return stamp


def cached_build() -> tuple[str, str | None] | None:
    """(variant, arch list) of a current cuda build in the cache, without compiling: the one for
    TORCH_CUDA_ARCH_LIST first, else the most recent of any arch list. None without nvcc."""
    if find_nvcc() is None:
        return None
    preferred = build_directory("cuda", cuda_arch_list())
    others = sorted(BUILD_ROOT.glob("cuda-*"), key=lambda d: d.stat().st_mtime, reverse=True) if BUILD_ROOT.is_dir() else []
    for directory in [preferred, *[d for d in others if d != preferred]]:
        stamp = _is_current(directory)
        if stamp is not None and stamp["variant"] == "cuda" and directory == build_directory("cuda", stamp["arch_list"]):
            return "cuda", stamp["arch_list"]
    return None


def loaded() -> LoadedExtension | None:
    return _loaded


def cached_variant() -> str | None:
    """A variant whose library is already built, and current, in the cache (cuda only), without compiling."""
    found = cached_build()
    return found[0] if found else None


def variant_for(device_type: str) -> str:
    """The variant to load for tensors on `device_type`: CUDA tensors need the cuda variant; CPU
    tensors take what is loaded, else a cuda build that is already cached, else the quick CPU-only
    build (a CPU-only machine never waits for the kernels to compile)."""
    forced = os.environ.get(VARIANT_ENV)
    if forced:
        return default_variant()
    if device_type == "cuda":
        return "cuda"
    if _loaded is not None:
        return _loaded.variant
    return cached_variant() or "cpu"


def default_variant() -> str:
    forced = os.environ.get(VARIANT_ENV)
    if forced:
        if forced not in VARIANTS:
            raise UserError(f"{VARIANT_ENV}={forced!r}: must be one of {VARIANTS}")
        return forced
    return "cuda" if find_nvcc() is not None else "cpu"


def _compile_and_load(variant: str, verbose: bool, arch_list: str | None = None) -> LoadedExtension:
    """Build (if needed) and load `variant`; arch_list: the cuda build's (default cuda_arch_list())."""
    from torch.utils import cpp_extension

    missing = [str(p) for p in sources(variant) if not p.is_file()]
    if missing:
        raise ExtensionUnavailable(f"missing sources: {', '.join(missing)}")
    extra_cflags = list(HOST_FLAGS)
    if variant == "cuda":
        if find_nvcc() is None:
            raise ExtensionUnavailable("the cuda variant needs nvcc, and none was found (CUDA_HOME, PATH, /usr/local/cuda)")
        if not any(p.suffix == ".cu" for p in sources(variant)):
            raise ExtensionUnavailable(f"no csrc/prnn_*.cu kernels found under {CSRC_DIR}")
        arch_list = arch_list or cuda_arch_list()
    else:
        arch_list = None
        extra_cflags.append("-DPRNN_CPU_ONLY")
    directory = build_directory(variant, arch_list)
    directory.mkdir(parents=True, exist_ok=True)
    # cpp_extension reads the arch list from the environment; set it explicitly so that it never
    # falls back to probing the visible GPUs.
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    if variant == "cuda":
        # cpp_extension settles CUDA_HOME at import; point it at the toolkit found above.
        cpp_extension.CUDA_HOME = str(find_cuda_home())
    start = time.perf_counter()
    try:
        library = cpp_extension.load(
            name=_extension_name(variant),
            sources=[str(p) for p in sources(variant)],
            extra_cflags=extra_cflags,
            extra_cuda_cflags=CUDA_FLAGS if variant == "cuda" else None,
            extra_include_paths=[str(CSRC_DIR)],
            build_directory=str(directory),
            with_cuda=variant == "cuda",
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as err:  # compiler errors arrive as RuntimeError/OSError with the log in the text
        raise ExtensionUnavailable(f"building the {variant} extension in {directory} failed: {err}") from err
    finally:
        if arch_list is not None:
            if saved is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    seconds = time.perf_counter() - start
    record_build(directory, variant, arch_list)
    return LoadedExtension(variant, str(library or directory), arch_list, seconds)


def load(variant: str | None = None, verbose: bool = False, exact: bool = False) -> LoadedExtension:
    """Load (building first if needed) the extension and register its Python parts.

    variant: "cuda" (needs the CUDA kernels), "cpu" (any build will do, the cuda variant has the
    CPU implementation too: see variant_for), or None (ASR_OPS_VARIANT, else cuda when nvcc
    exists, else cpu).
    exact: load exactly `variant` (`asr ops build --variant`), ignoring ASR_OPS_VARIANT and cached
    cuda builds; fails if the other variant is already loaded in this process.
    Raises ExtensionUnavailable with the reason when that cannot be done in this process.
    """
    global _loaded
    wanted = variant or default_variant()
    arch_list = None
    if exact:
        if wanted not in VARIANTS:
            raise ExtensionUnavailable(f"unknown variant {wanted!r}: choose from {VARIANTS}")
    elif wanted == "cpu":
        wanted = variant_for("cpu")  # a CPU request takes what is loaded, forced or already built
        found = cached_build() if wanted == "cuda" and _loaded is None else None
        arch_list = found[1] if found else None
    with _lock:
        if _loaded is not None:
            if exact and _loaded.variant != wanted:
                raise ExtensionUnavailable(
                    f"the {_loaded.variant} build of the extension ({_loaded.library}) is already loaded in this "
                    f"process, and the {wanted} build cannot be loaded beside it (both define the asr_prnn ops); "
                    f"build it in a fresh process: asr ops build --variant {wanted}")
            if wanted == "cuda" and _loaded.variant != "cuda":
                raise ExtensionUnavailable(
                    "the CPU-only build of the extension is already loaded in this process; the CUDA build cannot "
                    "be loaded beside it (run `asr ops build` first, or set ASR_OPS_VARIANT=cuda)")
            return _loaded
        if wanted in _failures:
            raise ExtensionUnavailable(_failures[wanted])
        try:
            _loaded = _compile_and_load(wanted, verbose, arch_list)
        except ExtensionUnavailable as err:
            _failures[wanted] = str(err)
            raise
        from asr.ops import custom_op

        custom_op.register_python_parts()
        log.info("loaded the %s recurrent-op extension from %s in %.1f s", _loaded.variant, _loaded.library,
                 _loaded.seconds)
        return _loaded


# --- `asr ops build` -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="cuda (kernels + binding, needs nvcc) or cpu (binding alone); "
                             "default: cuda when nvcc is found, else cpu")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def run(args: argparse.Namespace) -> int:
    variant = args.variant or default_variant()
    if variant == "cuda":
        print(f"building the cuda extension for TORCH_CUDA_ARCH_LIST={cuda_arch_list()!r} with {find_nvcc()}")
    else:
        print("building the CPU-only extension (no nvcc)" if find_nvcc() is None else "building the CPU-only extension")
    try:
        ext = load(variant, verbose=args.verbose, exact=True)
    except ExtensionUnavailable as err:
        raise UserError(str(err)) from err
    from asr.ops import custom_op

    ops = custom_op.ops()
    registered = [name for name in custom_op.TENSOR_OPS + custom_op.QUERY_OPS if hasattr(ops, name)]
    print(f"ok: {ext.variant} extension {ext.library} ({ext.seconds:.1f} s); "
          f"ops registered: {', '.join(registered)}; "
          f"CUDA kernels: {'yes' if ops.cuda_available() else 'no'}")
    return 0
