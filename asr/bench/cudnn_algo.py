"""Which cuDNN RNN algorithm PyTorch asks for, so that `asr bench rnn` can say what its cuDNN rows ran.

PyTorch does not let a caller choose the algorithm: every call of its cuDNN RNN path picks one from
the problem's shape, dtype and device, separately for the forward and the backward pass. This module
restates that choice as a pure function (no torch import, no GPU), following PYTORCH_LOGIC below.
It is a reading of PyTorch's source, not a query of cuDNN: the bench records what PyTorch requests.

How PyTorch 2.11 decides (aten/src/ATen/native/cudnn/RNN.cpp, `get_algo` and the helpers it calls;
the dispatch in aten/src/ATen/native/RNN.cpp, `use_cudnn`; and CUDAHooks'
`supportsBFloat16RNNWithCuDNN`):

1. The call reaches cuDNN only when cuDNN is enabled and the dtype is float64, float32 or float16,
   or bfloat16 when PyTorch was built against cuDNN >= 9.13 and the device is sm_80 or newer.
   Otherwise ATen's own loop (one GEMM per step) runs and no cuDNN algorithm is involved.
2. LSTM projections and packed (ragged) input always get STANDARD.
3. Anything but float64, on sm_60 or newer, gets PERSIST_STATIC_SMALL_H when H is small:
   forward H <= 384 (relu/tanh) or <= 192 (LSTM/GRU); backward H <= 256 or <= 128.
4. float16 gets PERSIST_STATIC when the problem passes both of:
   common: 1 layer, 1 direction, H <= 1024, H and the input size multiples of 128;
   device: sm_70/72 (not sm_75): N = 8 or a multiple of 16 other than 80 and 112, with
     (T >= 40 and N <= 128) or (T >= 20 and N <= 96) or (T >= 10 and N <= 32);
     sm_80 or newer with at least 98 SMs, not sm_x6: GRU never; LSTM N % 8 == 0 and N <= 128;
     relu/tanh N % 8 == 0, N <= 128 and (N < 96 or H < 896);
     any other device: never.
5. Everything else gets STANDARD.

Read from pytorch/pytorch's main branch at a commit newer than the bf16 change (PR #164411, in 2.10),
not from the v2.11.0 tag itself (the branches above come from PyTorch changes of 2018-2022 plus that
bf16 rule). Not yet compared with what cuDNN does on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

PYTORCH_LOGIC = ("PyTorch 2.11.0 (aten/src/ATen/native/cudnn/RNN.cpp get_algo, native/RNN.cpp use_cudnn, "
                 "CUDAHooks::supportsBFloat16RNNWithCuDNN)")

STANDARD = "CUDNN_RNN_ALGO_STANDARD"
PERSIST_STATIC = "CUDNN_RNN_ALGO_PERSIST_STATIC"
PERSIST_STATIC_SMALL_H = "CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H"
NOT_CUDNN = "not cuDNN (ATen's native RNN loop)"

DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("rnn_relu", "rnn_tanh", "lstm", "gru")
CUDNN_BF16_RNN_MIN_VERSION = 91300  # cuDNN 9.13: the first PyTorch accepts bf16 RNNs from
SMALL_H_MIN_MAJOR = 6               # SMALL_H needs sm_60 or newer
# (forward, backward) largest hidden size for SMALL_H
SMALL_H_LIMITS = {"rnn_relu": (384, 256), "rnn_tanh": (384, 256), "lstm": (192, 128), "gru": (192, 128)}
PERSIST_MAX_HIDDEN = 1024
PERSIST_ALIGN = 128                 # H and the input size must be multiples of this
PERSIST_MIN_SMS = 98                # sm_80+: fewer SMs (A30, smaller parts) never get PERSIST_STATIC
PERSIST_MAX_BATCH = 128
PERSIST_LARGE_BATCH, PERSIST_LARGE_HIDDEN = 96, 896  # relu/tanh: N >= 96 with H >= 896 is slow
VOLTA_BAD_BATCHES = (80, 112)


@dataclass(frozen=True)
class AlgoChoice:
    forward: str   # what PyTorch requests for the forward pass (one of the names above)
    backward: str  # ... and for the backward pass (backward-data and backward-weights use the same)
    reason: str    # one line: the branch of the heuristic that decided, with the numbers

    def short(self, passes: str = "both") -> str:
        """Compact label for tables: "PERSIST_STATIC", or "fwd SMALL_H / bwd STANDARD"."""
        def name(algo: str) -> str:
            return "native" if algo == NOT_CUDNN else algo.removeprefix("CUDNN_RNN_ALGO_")

        if passes == "forward" or self.forward == self.backward:
            return name(self.forward)
        return f"fwd {name(self.forward)} / bwd {name(self.backward)}"


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"pytorch_rnn_algo: {name} must be an integer >= 1, got {value!r}")


def _validate(dtype, batch, hidden, input_size, layers, seq_length, compute_capability, sm_count, cudnn_version,
              mode, proj_size) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"pytorch_rnn_algo: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if mode not in MODES:
        raise ValueError(f"pytorch_rnn_algo: mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name, value in (("batch", batch), ("hidden", hidden), ("input_size", input_size), ("layers", layers),
                        ("seq_length", seq_length), ("sm_count", sm_count)):
        _positive(name, value)
    if (not isinstance(compute_capability, tuple) or len(compute_capability) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in compute_capability)):
        raise ValueError("pytorch_rnn_algo: compute_capability must be a (major, minor) pair of integers >= 0, "
                         f"got {compute_capability!r}")
    if isinstance(cudnn_version, bool) or not isinstance(cudnn_version, int) or cudnn_version < 1000:
        raise ValueError("pytorch_rnn_algo: cudnn_version must be cuDNN's integer version (e.g. 91900 for 9.19.0), "
                         f"got {cudnn_version!r}")
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or not 0 <= proj_size < hidden:
        raise ValueError(f"pytorch_rnn_algo: proj_size must be an integer in [0, hidden), got {proj_size!r}")
    if proj_size and mode != "lstm":
        raise ValueError(f"pytorch_rnn_algo: proj_size is an LSTM option, got proj_size={proj_size} with mode {mode!r}")


def _small_h(mode: str, hidden: int, forward: bool, major: int) -> tuple[bool, str]:
    forward_limit, backward_limit = SMALL_H_LIMITS[mode]
    limit = forward_limit if forward else backward_limit
    if major < SMALL_H_MIN_MAJOR:
        return False, f"SMALL_H needs sm_{SMALL_H_MIN_MAJOR}0+"
    if hidden <= limit:
        which = "forward" if forward else "backward"
        return True, f"hidden {hidden} <= {limit}, the {mode} SMALL_H limit of the {which} pass"
    if hidden > forward_limit:  # the same words for both passes, so that one reason covers them
        return False, f"hidden {hidden} > {forward_limit} (forward) and {backward_limit} (backward): not SMALL_H"
    return False, f"hidden {hidden} > {backward_limit}, the {mode} SMALL_H limit of the backward pass"


def _persist_common(hidden, input_size, layers, bidirectional) -> str | None:
    """None when the shape qualifies for PERSIST_STATIC, else why not."""
    fails = []
    if layers != 1:
        fails.append(f"{layers} layers (needs 1)")
    if bidirectional:
        fails.append("bidirectional (needs 1 direction)")
    if hidden > PERSIST_MAX_HIDDEN:
        fails.append(f"hidden {hidden} > {PERSIST_MAX_HIDDEN}")
    if hidden % PERSIST_ALIGN:
        fails.append(f"hidden {hidden} not a multiple of {PERSIST_ALIGN}")
    if input_size % PERSIST_ALIGN:
        fails.append(f"input size {input_size} not a multiple of {PERSIST_ALIGN}")
    return ", ".join(fails) or None


def _persist_device(mode, batch, hidden, seq_length, major, minor, sm_count) -> str | None:
    """None when the device rule allows PERSIST_STATIC, else why not."""
    cc = f"sm_{major}{minor}"
    if major == 7:
        if minor == 5:
            return f"{cc} (Turing) never gets it"
        batch_ok = (batch % 16 == 0 and batch not in VOLTA_BAD_BATCHES) or batch == 8
        length_ok = ((seq_length >= 40 and batch <= 128) or (seq_length >= 20 and batch <= 96)
                     or (seq_length >= 10 and batch <= 32))
        if not batch_ok:
            return f"{cc}: batch {batch} is not 8 or a multiple of 16 other than 80 and 112"
        if not length_ok:
            return f"{cc}: T {seq_length} too short for batch {batch}"
        return None
    if major >= 8 and sm_count >= PERSIST_MIN_SMS:
        if minor == 6:
            return f"{cc} never gets it"
        if mode == "gru":
            return "GRU never gets it"
        if batch % 8:
            return f"batch {batch} not a multiple of 8"
        if batch > PERSIST_MAX_BATCH:
            return f"batch {batch} > {PERSIST_MAX_BATCH}"
        if mode != "lstm" and batch >= PERSIST_LARGE_BATCH and hidden >= PERSIST_LARGE_HIDDEN:
            return f"batch {batch} >= {PERSIST_LARGE_BATCH} with hidden {hidden} >= {PERSIST_LARGE_HIDDEN}"
        return None
    if major >= 8:
        return f"{cc} with {sm_count} SMs (< {PERSIST_MIN_SMS}) never gets it"
    return f"{cc} never gets it"


def _one_pass(forward, dtype, batch, hidden, input_size, layers, bidirectional, seq_length, major, minor, sm_count,
              mode, proj_size, packed) -> tuple[str, str]:
    if proj_size:
        return STANDARD, f"LSTM with proj_size {proj_size}: projections need STANDARD"
    if packed:
        return STANDARD, "packed (ragged) input: persistent algorithms are never used"
    notes = []
    if dtype != "float64":
        small, why = _small_h(mode, hidden, forward, major)
        if small:
            return PERSIST_STATIC_SMALL_H, why
        notes.append(why)
    else:
        notes.append("float64: no persistent algorithm")
    if dtype != "float16":
        if dtype != "float64":
            notes.append(f"{dtype}: PERSIST_STATIC is for float16 only")
        return STANDARD, "; ".join(notes)
    common = _persist_common(hidden, input_size, layers, bidirectional)
    if common:
        return STANDARD, "; ".join(notes + [f"float16 but not PERSIST_STATIC: {common}"])
    device = _persist_device(mode, batch, hidden, seq_length, major, minor, sm_count)
    if device:
        return STANDARD, "; ".join(notes + [f"float16 shape qualifies for PERSIST_STATIC but {device}"])
    return PERSIST_STATIC, (f"float16, 1 layer, 1 direction, hidden {hidden} and input {input_size} multiples of "
                            f"{PERSIST_ALIGN} (<= {PERSIST_MAX_HIDDEN}), batch {batch} allowed on sm_{major}{minor} "
                            f"with {sm_count} SMs")


def pytorch_rnn_algo(*, dtype: str, batch: int, hidden: int, input_size: int, layers: int = 1,
                     bidirectional: bool = False, compute_capability: tuple[int, int], sm_count: int,
                     cudnn_version: int, seq_length: int, mode: str = "rnn_relu", proj_size: int = 0,
                     packed: bool = False, cudnn_enabled: bool = True) -> AlgoChoice:
    """The algorithm PyTorch (PYTORCH_LOGIC) requests from cuDNN for one RNN call, per pass.

    dtype: "float64" | "float32" | "float16" | "bfloat16"; batch N (the mini-batch: for packed input,
    the first batch size); hidden H; input_size: the layer input's last dimension; seq_length T;
    compute_capability (major, minor) and sm_count of the device; cudnn_version: the cuDNN PyTorch
    was built with, as an integer (91900 = 9.19.0; its bf16 rule is a compile-time check); mode:
    "rnn_relu" | "rnn_tanh" | "lstm" | "gru"; packed: a PackedSequence input; cudnn_enabled:
    torch.backends.cudnn.enabled."""
    _validate(dtype, batch, hidden, input_size, layers, seq_length, compute_capability, sm_count, cudnn_version,
              mode, proj_size)
    major, minor = compute_capability
    if not cudnn_enabled:
        return AlgoChoice(NOT_CUDNN, NOT_CUDNN, "torch.backends.cudnn.enabled is False")
    if dtype == "bfloat16" and not (cudnn_version >= CUDNN_BF16_RNN_MIN_VERSION and major >= 8):
        need = []
        if cudnn_version < CUDNN_BF16_RNN_MIN_VERSION:
            need.append(f"PyTorch built with cuDNN >= 9.13 (this one: {cudnn_version})")
        if major < 8:
            need.append(f"sm_80+ (this device: sm_{major}{minor})")
        return AlgoChoice(NOT_CUDNN, NOT_CUDNN, "bfloat16 RNNs reach cuDNN only with " + " and ".join(need))
    args = (dtype, batch, hidden, input_size, layers, bidirectional, seq_length, major, minor, sm_count, mode,
            proj_size, packed)
    forward, why_forward = _one_pass(True, *args)
    backward, why_backward = _one_pass(False, *args)
    reason = why_forward if (forward, why_forward) == (backward, why_backward) else \
        f"forward: {why_forward} | backward: {why_backward}"
    return AlgoChoice(forward, backward, reason)
