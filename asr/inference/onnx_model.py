"""An exported network (model.onnx + model.json, asr.export.onnx) run by onnxruntime, as an acoustic model.

    model = load_onnx("model.onnx")                  # reads model.json beside it
    log_probs, lengths = model.log_probs(features, feature_lengths)   # as InferenceModel's

It fulfils the recognizer's AcousticModel contract, so `Recognizer.load("model.onnx")` and
`asr transcribe model.onnx FILE` work as with a checkpoint, on the CPU, without torch's network code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from asr.errors import UserError


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running an .onnx model needs onnxruntime: pip install 'asr[onnx]' (or pip install onnxruntime)") from None
    return onnxruntime


def read_sidecar(onnx_path: str | os.PathLike) -> dict:
    """The settings written beside an exported graph, or UserError naming what is wrong."""
    from asr.export.onnx import SIDECAR_FORMAT, sidecar_path

    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise UserError(f"{onnx_path}: its settings file {path} is missing (asr export writes both; keep them together)")
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{path}: not an asr export settings file of format {SIDECAR_FORMAT}")
    missing = [k for k in ("model_config", "feature_config", "tokenizer", "vocabulary", "frame_shift_seconds") if k not in side]
    if missing:
        raise UserError(f"{path}: incomplete settings (no {', '.join(missing)})")
    return side


class OnnxAcousticModel:
    """An onnxruntime session over an exported graph, with the tokenizer and features it was trained with."""

    device = torch.device("cpu")

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        from asr.data.features import FeatureConfig
        from asr.data.tokenizer import tokenizer_from_state
        from asr.model.deepspeech import DeepSpeechConfig
        from asr.model.inference import check_vocabulary

        _onnxruntime()  # a clear error before anything else if it is missing
        path = Path(onnx_path)
        if not path.is_file():
            raise UserError(f"{path}: ONNX model not found")
        side = read_sidecar(path)
        try:
            self.config = DeepSpeechConfig.from_dict(side["model_config"])
            self.feature_config = FeatureConfig(**side["feature_config"])
            self.tokenizer = tokenizer_from_state(side["tokenizer"])
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
        except Exception as err:  # settings this version cannot read
            raise UserError(f"{path}: its settings cannot be read by this version ({err})") from None
        check_vocabulary(str(path), side["vocabulary"], self.tokenizer, self.config.vocab_size)
        self.frame_shift_seconds = float(side["frame_shift_seconds"])
        self.data_config = dict(side.get("data") or {})
        self.session = make_session(str(path), threads, source=str(path))
        self.path = path

    def parameter_count(self) -> int:
        return 0  # the weights live in the graph

    def log_probs(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (N, T, F), feature_lengths (N,) -> log-probabilities (N, T', V) float32, lengths (N,) int64."""
        return run_session(self.session, features, feature_lengths)


def make_session(graph: str | bytes, threads: int | None = None, source: str = "ONNX graph"):
    """An onnxruntime CPU session over a graph file (its path) or its serialized bytes."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    # torch computes the features between runs: threads spinning for work would take its cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a bad file
        raise UserError(f"{source}: onnxruntime cannot load it ({str(err).splitlines()[0][:160]})") from None


def run_session(session, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exported graph's log-probabilities (N, T', V) and output lengths (N,) for a feature batch."""
    log_probs, lengths = session.run(None, {
        "features": features.detach().float().cpu().contiguous().numpy(),
        "feature_lengths": feature_lengths.detach().cpu().long().numpy(),
    })
    return torch.from_numpy(log_probs), torch.from_numpy(lengths)


def load_onnx(onnx_path: str | os.PathLike, threads: int | None = None) -> OnnxAcousticModel:
    return OnnxAcousticModel(onnx_path, threads)
