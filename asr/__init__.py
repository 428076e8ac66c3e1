"""asr: Deep Speech 2-style CTC speech recognition built around a persistent-RNN CUDA operator.

    import asr
    r = asr.Recognizer.load("runs/tiny/best.ckpt", decoder="beam")
    r.transcribe("a.flac").text
"""

__version__ = "0.1.0"

_LAZY = {"Recognizer", "DecodingOptions", "Transcript", "Word"}  # from asr.inference, imported on first use


def __getattr__(name: str):
    # lazily, so that `import asr` (and `asr --help`) does not import torch
    if name in _LAZY:
        import asr.inference

        return getattr(asr.inference, name)
    raise AttributeError(f"module 'asr' has no attribute {name!r}")
