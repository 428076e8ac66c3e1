"""Decoding options: one frozen dataclass, and its command-line arguments declared once.

`asr evaluate`, `asr transcribe` and the end of training (asr.training.finish) all decode with a
`DecodingOptions`; the two commands get their arguments from `add_decoding_arguments` and turn them
into options with `decoding_options(args)`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from asr.decode import DEFAULT_BEAM_SIZE, DEFAULT_LM_WEIGHT, DEFAULT_WORD_SCORE
from asr.errors import UserError, check_range

DECODERS = ("greedy", "beam", "both")  # "both": evaluation scores greedy and beam+LM side by side
BEAM_NAME = "beam+lm"  # the beam decoder's name in results and reports
DEFAULT_MAX_BATCH_SECONDS = 120.0  # padded audio per acoustic-model batch
DEFAULT_CHUNK_SECONDS = 30.0  # longest piece of a long file recognised at once
MIN_CHUNK_SECONDS = 1.0
# beam-only options: refused with the greedy decoder, where they would be silently ignored
BEAM_OPTIONS = ("lm", "beam_size", "lm_weight", "word_score")


@dataclass(frozen=True)
class DecodingOptions:
    decoder: str = "greedy"  # one of DECODERS
    beam_size: int = DEFAULT_BEAM_SIZE  # hypotheses kept per frame
    lm: str | None = None  # ARPA word LM; None: the run folder's lm.arpa, else one built from the training splits
    lm_weight: float = DEFAULT_LM_WEIGHT  # weight of the LM's log-probability
    word_score: float = DEFAULT_WORD_SCORE  # added per word
    device: str = "cpu"  # where the network runs: cpu, cuda, cuda:1
    max_batch_seconds: float = DEFAULT_MAX_BATCH_SECONDS  # padded audio per network batch
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS  # long audio is cut into pieces at most this long

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise UserError(f"--decoder {self.decoder!r}: expected one of {', '.join(DECODERS)}")
        check_range("--beam-size", self.beam_size, low=1)
        check_range("--lm-weight", self.lm_weight)
        check_range("--word-score", self.word_score)
        check_range("--max-batch-seconds", self.max_batch_seconds, low=0.0, low_open=True)
        check_range("--chunk-seconds", self.chunk_seconds, low=MIN_CHUNK_SECONDS)
        if self.lm is not None and not Path(self.lm).is_file():
            raise UserError(f"{self.lm}: language model file not found")

    @property
    def beam(self) -> bool:
        return self.decoder in ("beam", "both")

    def with_(self, **changes) -> "DecodingOptions":
        return replace(self, **changes)


def add_decoding_arguments(parser: argparse.ArgumentParser, decoders: tuple[str, ...] = ("greedy", "beam"),
                           default: str = "greedy", chunking: bool = True) -> None:
    """The decoding options as command-line arguments. Beam options default to None so that giving one
    with the greedy decoder can be refused (decoding_options)."""
    defaults = DecodingOptions()
    parser.add_argument("--decoder", choices=decoders, default=default,
                        help="default %(default)s; beam needs --lm or a checkpoint whose run folder has or records one")
    parser.add_argument("--lm", default=None,
                        help="ARPA word LM for beam search (default: the run folder's lm.arpa, else one built from "
                             "the run's training splits)")
    parser.add_argument("--beam-size", type=int, default=None, help=f"beam only (default {defaults.beam_size})")
    parser.add_argument("--lm-weight", type=float, default=None, help=f"beam only (default {defaults.lm_weight})")
    parser.add_argument("--word-score", type=float, default=None, help=f"beam only (default {defaults.word_score})")
    parser.add_argument("--max-batch-seconds", type=float, default=defaults.max_batch_seconds,
                        help="padded audio per network batch (default %(default)s)")
    if chunking:
        parser.add_argument("--chunk-seconds", type=float, default=defaults.chunk_seconds,
                            help="longest piece of a long file recognised at once (default %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (default %(default)s)")


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    """DecodingOptions from add_decoding_arguments' arguments: beam options with the greedy decoder are
    refused, values are range-checked (UserError naming the argument), the LM file must exist."""
    given = [f"--{name.replace('_', '-')}" for name in BEAM_OPTIONS if getattr(args, name, None) is not None]
    if given and args.decoder not in ("beam", "both"):
        raise UserError(f"{', '.join(given)}: only used by the beam decoder; add --decoder beam or leave "
                        f"{'them' if len(given) > 1 else 'it'} out")
    defaults = DecodingOptions()
    values = {name: getattr(args, name) for name in ("beam_size", "lm_weight", "word_score")
              if getattr(args, name, None) is not None}
    return DecodingOptions(decoder=args.decoder, lm=args.lm, device=args.device,
                           max_batch_seconds=args.max_batch_seconds,
                           chunk_seconds=getattr(args, "chunk_seconds", defaults.chunk_seconds), **values)
