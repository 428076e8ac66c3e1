"""The recurrent op of the Deep Speech layers: h_t = act(u_t + h_{t-1} @ w_hh.T).

    from asr.ops import recurrence
    y, h_last = recurrence(u, w_hh, h0=None, lengths=None, activation="relu", backend="auto")
    check_status(wait=True)   # raise a failed persistent launch not reported yet (see dispatch)

Imports with torch alone; nothing here touches CUDA or compiles anything at import time.
"""

from asr.ops.dispatch import BACKENDS, PersistentKernelError, check_status, recurrence
from asr.ops.reference import ACTIVATIONS, CLIP_CEILING

__all__ = ["ACTIVATIONS", "BACKENDS", "CLIP_CEILING", "PersistentKernelError", "check_status", "recurrence"]
