"""asr: Deep Speech 2-style CTC speech recognition built around a persistent-RNN CUDA operator."""

__version__ = "0.1.0"
