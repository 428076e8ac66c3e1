"""The Deep Speech 2 network: 2D convolutions over (frequency, time), recurrent layers, a linear output.

    features (N, T, F) -> conv front end -> (T', N, C*F') -> recurrent layers -> (T', N, V) logits

Every relu/tanh recurrent layer splits as Deep Speech does: the input projection for all timesteps is
one GEMM here, and only the recurrence h_t = act(u_t + h_{t-1} W_hh^T) runs in `asr.ops.recurrence`,
so a faster backend of that op drops in without touching this file. GRU layers use torch.nn.GRU until
the op covers gated cells. Padded frames are kept at zero after every block, so a sequence's output
does not depend on what it was batched with (batch statistics of BatchNorm aside during training).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from asr.errors import UserError, check_range
from asr.ops import CLIP_CEILING, recurrence

CELLS = ("relu", "tanh", "gru")  # relu is Deep Speech 2's clipped ReLU, min(max(x, 0), 20)
MERGES = ("sum", "concat")  # how the two directions of a bidirectional layer are combined
CELL_ACTIVATION = {"relu": "clipped_relu", "tanh": "tanh"}  # cell name -> asr.ops activation


@dataclass(frozen=True)
class DeepSpeechConfig:
    n_mels: int = 80  # input feature channels
    vocab_size: int = 29  # output classes, blank (0) included
    conv_channels: tuple[int, ...] = (32, 32)  # one Conv2d per entry
    conv_kernels: tuple[tuple[int, int], ...] = ((21, 11), (11, 11))  # (frequency, time) per conv
    conv_strides: tuple[tuple[int, int], ...] = ((2, 2), (2, 1))  # (frequency, time) per conv
    rnn_cell: str = "relu"  # one of CELLS
    rnn_layers: int = 3
    rnn_hidden: int = 256  # units per direction
    bidirectional: bool = True
    merge_directions: str = "sum"  # one of MERGES
    rnn_batch_norm: bool = True  # sequence-wise BatchNorm on each recurrent layer's input
    lookahead: int = 0  # future frames of the row convolution after the last layer (unidirectional only)
    backend: str = "auto"  # asr.ops backend of the relu/tanh recurrence

    def __post_init__(self):
        if self.rnn_cell not in CELLS:
            raise UserError(f"rnn_cell {self.rnn_cell!r}: expected one of {CELLS}")
        if self.merge_directions not in MERGES:
            raise UserError(f"merge_directions {self.merge_directions!r}: expected one of {MERGES}")
        if not (len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_strides)) or not self.conv_channels:
            raise UserError("conv_channels, conv_kernels and conv_strides must be non-empty and of equal length")
        for name, low in (("rnn_layers", 1), ("rnn_hidden", 1), ("n_mels", 1), ("vocab_size", 2), ("lookahead", 0)):
            check_range(name, getattr(self, name), low=low)
        if self.lookahead and self.bidirectional:
            raise UserError(f"lookahead {self.lookahead}: only a unidirectional model uses it (set bidirectional false)")

    @property
    def time_stride(self) -> int:
        """Input frames per output frame."""
        stride = 1
        for _, st in self.conv_strides:
            stride *= st
        return stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeepSpeechConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("conv_channels",):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("conv_kernels", "conv_strides"):
            if key in d:
                d[key] = tuple(tuple(pair) for pair in d[key])
        return cls(**d)


def clipped_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0.0, CLIP_CEILING)


def time_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(N,) lengths -> (N, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class ConvFrontEnd(nn.Module):
    """Conv2d + BatchNorm + clipped ReLU blocks over (frequency, time), zeroing frames past each length."""

    def __init__(self, config: DeepSpeechConfig):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.paddings = []
        self.strides = []
        self.kernels = []
        in_channels, freq = 1, config.n_mels
        for channels, kernel, stride in zip(config.conv_channels, config.conv_kernels, config.conv_strides):
            padding = (kernel[0] // 2, kernel[1] // 2)
            self.blocks.append(nn.ModuleDict({
                "conv": nn.Conv2d(in_channels, channels, kernel, stride, padding, bias=False),
                "norm": nn.BatchNorm2d(channels),
            }))
            self.paddings.append(padding)
            self.strides.append(stride)
            self.kernels.append(kernel)
            freq = (freq + 2 * padding[0] - kernel[0]) // stride[0] + 1
            in_channels = channels
            if freq < 1:
                raise UserError(f"conv front end reduces {config.n_mels} mel channels to nothing; use smaller kernels/strides")
        self.output_size = in_channels * freq

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for (_, kt), (_, st), (_, pt) in zip(self.kernels, self.strides, self.paddings):
            lengths = torch.div(lengths + 2 * pt - kt, st, rounding_mode="floor") + 1
        return lengths.clamp(min=0)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.transpose(1, 2).unsqueeze(1)  # (N, T, F) -> (N, 1, F, T)
        for block, (_, kt), (_, st), (_, pt) in zip(self.blocks, self.kernels, self.strides, self.paddings):
            lengths = torch.div(lengths + 2 * pt - kt, st, rounding_mode="floor") + 1
            x = clipped_relu(block["norm"](block["conv"](x)))  # (N, C, F', T')
            mask = time_mask(lengths.to(x.device), x.shape[-1])  # (N, T')
            x = x * mask[:, None, None, :].to(x.dtype)
        N, C, Fr, T = x.shape
        x = x.reshape(N, C * Fr, T).permute(2, 0, 1)  # (N, C*F', T') -> (T', N, C*F')
        return x, lengths


class SequenceBatchNorm(nn.Module):
    """BatchNorm1d over the valid frames of a padded (T, N, C) batch; padded frames stay zero.

    Statistics come from real frames only, so the amount of padding does not shift them. The inner
    BatchNorm1d is a child module, so `SyncBatchNorm.convert_sync_batchnorm` can replace it for DDP.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[mask] = self.norm(x[mask])  # (M, C) over the M valid frames
        return out


class RecurrentLayer(nn.Module):
    """One (bi)directional recurrent layer on a padded (T, N, C) batch with per-sequence lengths."""

    def __init__(self, input_size: int, config: DeepSpeechConfig):
        super().__init__()
        self.cell = config.rnn_cell
        self.hidden = config.rnn_hidden
        self.directions = 2 if config.bidirectional else 1
        self.merge = config.merge_directions
        self.backend = config.backend
        self.norm = SequenceBatchNorm(input_size) if config.rnn_batch_norm else None
        H, D = self.hidden, self.directions
        if self.cell == "gru":
            self.gru = nn.GRU(input_size, H, bidirectional=D == 2)
        else:
            # The projection's bias is b_ih + b_hh of torch.nn.RNN (the op folds b_hh into u).
            self.input_projection = nn.Linear(input_size, D * H)
            self.w_hh = nn.Parameter(torch.empty(D, H, H))
            bound = 1.0 / H**0.5  # torch.nn.RNN's initialisation
            nn.init.uniform_(self.w_hh, -bound, bound)
            nn.init.uniform_(self.input_projection.weight, -bound, bound)
            nn.init.uniform_(self.input_projection.bias, -bound, bound)
        self.output_size = H * (D if self.merge == "concat" else 1)
        if self.cell != "gru":
            self.recurrence = Recurrence(CELL_ACTIVATION[self.cell], self.backend)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (T, N, C), lengths (N,) int64 on the CPU, mask (T, N) bool on x's device -> (T, N, output_size)."""
        if self.norm is not None:
            x = self.norm(x, mask)
        T, N, _ = x.shape
        H, D = self.hidden, self.directions
        if self.cell == "gru":
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            y, _ = self.gru(packed)
            y, _ = pad_packed_sequence(y, total_length=T)  # (T, N, D*H)
            y = y.view(T, N, D, H)  # (T, N, D, H)
        else:
            u = self.input_projection(x).view(T, N, D, H)  # one GEMM for all timesteps: (T, N, D, H)
            # Under autocast the projection yields bf16/fp16 while the parameter stays fp32; the op takes one dtype.
            w_hh = self.w_hh if self.w_hh.dtype == u.dtype else self.w_hh.to(u.dtype)
            y = self.recurrence(u, w_hh, lengths)  # (T, N, D, H)
        if self.merge == "sum":
            return y.sum(dim=2)  # (T, N, H)
        return y.reshape(T, N, D * H)  # (T, N, D*H)


class Recurrence(nn.Module):
    """The recurrent op (asr.ops.recurrence) as a module without parameters: what training's op
    timing hooks onto (asr.training.timing), so the network itself knows nothing of timing."""

    def __init__(self, activation: str, backend: str):
        super().__init__()
        self.activation = activation
        self.backend = backend

    def forward(self, u: torch.Tensor, w_hh: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """u (T, N, D, H), w_hh (D, H, H), lengths (N,) -> y (T, N, D, H)."""
        if u.shape[2] == 1:  # the one-direction form of the op
            y, _ = recurrence(u[:, :, 0], w_hh[0], lengths=lengths, activation=self.activation, backend=self.backend)
            return y.unsqueeze(2)
        y, _ = recurrence(u, w_hh, lengths=lengths, activation=self.activation, backend=self.backend)
        return y


class Lookahead(nn.Module):
    """Deep Speech 2's row convolution: each unit sees `context` future frames of itself (streaming-friendly)."""

    def __init__(self, channels: int, context: int):
        super().__init__()
        self.context = context
        self.conv = nn.Conv1d(channels, channels, context + 1, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = F.pad(x.permute(1, 2, 0), (0, self.context))  # (T, N, C) -> (N, C, T + context)
        y = self.conv(y).permute(2, 0, 1)  # (N, C, T) -> (T, N, C)
        return clipped_relu(y) * mask[:, :, None].to(y.dtype)


class DeepSpeech(nn.Module):
    def __init__(self, config: DeepSpeechConfig):
        super().__init__()
        self.config = config
        self.front_end = ConvFrontEnd(config)
        self.rnns = nn.ModuleList()
        size = self.front_end.output_size
        for _ in range(config.rnn_layers):
            layer = RecurrentLayer(size, config)
            self.rnns.append(layer)
            size = layer.output_size
        self.lookahead = Lookahead(size, config.lookahead) if config.lookahead else None
        self.output_norm = SequenceBatchNorm(size)
        self.output = nn.Linear(size, config.vocab_size)

    def output_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        return self.front_end.output_lengths(feature_lengths)

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (N, T, F), feature_lengths (N,) -> logits (T', N, V), output lengths (N,) int64 on the CPU."""
        x, lengths = self.front_end(features, feature_lengths.cpu())
        lengths = lengths.clamp(max=x.shape[0])
        mask = time_mask(lengths, x.shape[0]).t().to(x.device)  # (T', N)
        for layer in self.rnns:
            x = layer(x, lengths, mask)
        if self.lookahead is not None:
            x = self.lookahead(x, mask)
        logits = self.output(self.output_norm(x, mask))  # (T', N, V)
        return logits, lengths
