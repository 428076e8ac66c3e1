"""A trained network with the tokenizer and features it was trained with, ready to score audio.

    model = load_for_inference("runs/tiny/best.ckpt")
    log_probs, out_lengths = model.log_probs(features, feature_lengths)  # (N, T', V), (N,)

A training checkpoint carries, besides Lightning's state, an `asr` entry (`checkpoint_payload`) with
everything needed to rebuild the network without Lightning or the training config: the network's
config, the tokenizer's state, the feature config and the vocabulary it was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from asr.data.features import FeatureConfig
from asr.data.tokenizer import Tokenizer, tokenizer_from_state
from asr.errors import UserError
from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig

CHECKPOINT_KEY = "asr"  # our entry in a Lightning checkpoint dict
CHECKPOINT_FORMAT = 1
NETWORK_PREFIX = "net."  # the LightningModule holds the DeepSpeech network as `self.net`


def checkpoint_payload(config: DeepSpeechConfig, tokenizer: Tokenizer, feature_config: FeatureConfig) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": config.to_dict(),
        "tokenizer": tokenizer.state_dict(),
        "feature_config": feature_config.to_dict(),
        "vocabulary": list(tokenizer.tokens),
    }


def check_vocabulary(source: str, saved_vocabulary: list[str], tokenizer: Tokenizer, output_size: int) -> None:
    """UserError unless the network's output layer, the saved vocabulary and the tokenizer agree."""
    if list(saved_vocabulary) != list(tokenizer.tokens) or tokenizer.vocab_size != output_size:
        raise UserError(
            f"{source}: vocabulary mismatch: the network outputs {output_size} classes and was trained on "
            f"{len(saved_vocabulary)} tokens ({_preview(saved_vocabulary)}), but the tokenizer has "
            f"{tokenizer.vocab_size} ({_preview(tokenizer.tokens)})"
        )


def _preview(tokens) -> str:
    tokens = list(tokens)
    return " ".join(tokens[:8]) + (" ..." if len(tokens) > 8 else "")


class InferenceModel:
    """A DeepSpeech network in eval mode plus its tokenizer and feature config."""

    def __init__(self, net: DeepSpeech, tokenizer: Tokenizer, feature_config: FeatureConfig):
        self.net = net
        self.tokenizer = tokenizer
        self.feature_config = feature_config
        self.config = net.config
        self.data_config: dict = {}  # {"root", "train_splits"} where known (evaluation rebuilds the LM from it)
        # seconds per output frame: the feature hop times the conv front end's time stride
        self.frame_shift_seconds = feature_config.hop_ms / 1000.0 * net.config.time_stride

    @classmethod
    def from_module(cls, net: DeepSpeech, tokenizer: Tokenizer, feature_config: FeatureConfig) -> "InferenceModel":
        """Wrap a network being trained (evaluation during/after training); it is not copied."""
        check_vocabulary("network", tokenizer.tokens, tokenizer, net.output.out_features)
        return cls(net, tokenizer, feature_config)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def log_probs(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (N, T, F), feature_lengths (N,) -> log-probabilities (N, T', V) float32 on the CPU,
        output lengths (N,) int64."""
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode():
                logits, out_lengths = self.net(features.to(self.device), feature_lengths)  # (T', N, V)
                log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)  # (N, T', V)
        finally:
            self.net.train(was_training)
        return log_probs.cpu().contiguous(), out_lengths.cpu()


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict, or UserError if the file is missing, unreadable or not one of ours."""
    path = Path(path)
    check_device(map_location)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise UserError(f"{path}: not a checkpoint file (a {'folder' if path.is_dir() else 'special file'})")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: not a readable checkpoint (empty file, 0 bytes)")
    try:
        # weights_only: tensors and plain containers only, so loading a file never runs its code
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch reports bad files as many types: UnpicklingError, KeyError, IndexError...
        raise UserError(f"{path}: not a readable checkpoint ({_reason(err)})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise UserError(f"{path}: not a checkpoint of this project (no '{CHECKPOINT_KEY}' entry)")
    payload = checkpoint[CHECKPOINT_KEY]
    if not isinstance(payload, dict) or not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"{path}: not a checkpoint of this project (malformed '{CHECKPOINT_KEY}' entry)")
    missing = [key for key in ("model_config", "tokenizer", "feature_config", "vocabulary") if key not in payload]
    if payload.get("format") == CHECKPOINT_FORMAT and missing:
        raise UserError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: checkpoint format {payload.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    return checkpoint


def check_device(device) -> None:
    """UserError naming --device unless it names a device this machine has."""
    if not isinstance(device, (str, torch.device)):
        return  # a map_location function or dict: the caller knows what it does
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"--device {device}: not a device name ({_reason(err)}); use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is usable on this machine (torch.cuda.is_available() "
                            "is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "meta"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:120] if text else type(err).__name__)


def load_for_inference(checkpoint_path: str | os.PathLike, map_location="cpu") -> InferenceModel:
    checkpoint = read_checkpoint(checkpoint_path, map_location)
    payload = checkpoint[CHECKPOINT_KEY]
    try:
        config = DeepSpeechConfig.from_dict(payload["model_config"])
        tokenizer = tokenizer_from_state(payload["tokenizer"])
        feature_config = FeatureConfig(**payload["feature_config"])
    except UserError as err:
        raise UserError(f"{checkpoint_path}: {err}") from None
    except Exception as err:  # a config this version cannot read: unknown or missing fields, wrong types
        raise UserError(f"{checkpoint_path}: its saved configuration cannot be read by this version ({_reason(err)})") from None
    check_vocabulary(str(checkpoint_path), payload["vocabulary"], tokenizer, config.vocab_size)
    net = DeepSpeech(config)
    state = {k[len(NETWORK_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(NETWORK_PREFIX)}
    output_weight = state.get("output.weight")
    if output_weight is not None and output_weight.shape[0] != tokenizer.vocab_size:
        check_vocabulary(str(checkpoint_path), payload["vocabulary"], tokenizer, output_weight.shape[0])
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{checkpoint_path}: weights do not fit the saved network config ({str(err).splitlines()[0]})") from None
    net.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    model = InferenceModel(net, tokenizer, feature_config)
    model.data_config = dict(payload.get("data") or {})  # {"root", "train_splits"}: what it was trained on
    return model
