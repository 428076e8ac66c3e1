"""Inference: checkpoint -> features -> network -> decoder, batched or streaming; the Python API.

    recognizer.py   Recognizer (load, transcribe, batched network passes), Transcript, Word
    options.py      DecodingOptions and its command-line arguments (declared once)
    decoders.py     greedy / beam+LM decoders for a checkpoint, and where its word LM comes from
    tuning.py       the one beam tuner (LM weight x word score on a dev split)
    confidence.py   word and utterance confidence from the CTC posteriors
"""

from asr.inference.options import DecodingOptions
from asr.inference.recognizer import Recognizer, Transcript, Word

__all__ = ["DecodingOptions", "Recognizer", "Transcript", "Word"]
