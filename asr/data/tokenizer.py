"""Tokenizers for CTC: characters, or SentencePiece (unigram/BPE) trained on a manifest's transcripts.

Index 0 is always the CTC blank. Both round-trip LibriSpeech-normalised text exactly:
decode(encode(text)) == text.
"""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path
from typing import Protocol

from asr.data.text import ALPHABET
from asr.errors import UserError

BLANK = "<blank>"
CHAR_SPACE = "|"  # the word delimiter token of the character tokenizer


class Tokenizer(Protocol):
    blank_id: int
    tokens: list[str]
    word_delimiter: str | None

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def state_dict(self) -> dict: ...


class CharTokenizer:
    """<blank>, "|" (space), apostrophe and A-Z: 29 tokens."""

    blank_id = 0
    word_delimiter = CHAR_SPACE

    def __init__(self):
        self.tokens = [BLANK, CHAR_SPACE, *ALPHABET[-1:], *ALPHABET[:-1]]
        self._index = {t: i for i, t in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[CHAR_SPACE if ch == " " else ch] for ch in text]
        except KeyError as err:
            raise UserError(f"text {text!r}: character {err.args[0]!r} is not in the character vocabulary "
                            "(transcripts must be LibriSpeech-normalised)") from None

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.tokens[i] for i in ids if i != self.blank_id)
        return " ".join(text.replace(CHAR_SPACE, " ").split())

    def state_dict(self) -> dict:
        return {"type": "char", "tokens": list(self.tokens)}


class SentencePieceTokenizer:
    """SentencePiece pieces shifted by one, so that id 0 is the CTC blank."""

    blank_id = 0
    word_delimiter = None

    def __init__(self, model_proto: bytes, source: str = "SentencePiece model"):
        """`source` names where the bytes came from (a file, a checkpoint) in the error a corrupt model gives."""
        import sentencepiece as spm

        if not model_proto:  # sentencepiece accepts it and yields a model with no pieces
            raise UserError(f"{source}: not a SentencePiece model (0 bytes)")
        self._proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, TypeError, ValueError):  # the C++ parser's message names only its own source line
            raise UserError(f"{source}: not a SentencePiece model (its {len(model_proto)} bytes do not parse as one)") from None
        if self._sp.get_piece_size() == 0:
            raise UserError(f"{source}: not a SentencePiece model (it has no pieces)")
        self.tokens = [BLANK] + [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load a serialised model; UserError naming the file if it cannot be read or is not a model."""
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise UserError(f"{path}: cannot read SentencePiece model ({err.strerror or err})") from None
        return cls(data, source=str(path))

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, model_type: str = "unigram") -> "SentencePieceTokenizer":
        import sentencepiece as spm

        if model_type not in ("unigram", "bpe"):
            raise UserError(f"model_type {model_type!r}: expected 'unigram' or 'bpe'")
        texts = [t for t in texts if t]
        if not texts:
            raise UserError("cannot train a SentencePiece model on no transcripts")
        with tempfile.TemporaryDirectory() as tmp:
            corpus = os.path.join(tmp, "text.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                f.write("\n".join(texts) + "\n")
            import io

            model = io.BytesIO()
            spm.SentencePieceTrainer.train(
                input=corpus, model_writer=model, vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, normalization_rule_name="identity", unk_id=0, bos_id=-1,
                eos_id=-1, pad_id=-1, hard_vocab_limit=False, required_chars=ALPHABET,
                num_threads=1, minloglevel=2, split_digits=False,
            )
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def model_proto(self) -> bytes:
        """The serialised SentencePiece model."""
        return self._proto

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text, out_type=int)
        if self._sp.unk_id() in ids:  # an unknown piece would not decode back to the text
            known = {ch for i in range(self._sp.get_piece_size()) if not self._sp.is_unknown(i)
                     for ch in self._sp.id_to_piece(i)}
            unknown = "".join(sorted(set(text) - known - {" "}))
            raise UserError(f"text {text!r}: characters {unknown!r} are not in the SentencePiece vocabulary "
                            "(transcripts must be LibriSpeech-normalised)")
        return [i + 1 for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i - 1 for i in ids if i != self.blank_id])

    def state_dict(self) -> dict:
        return {"type": "sentencepiece", "model": base64.b64encode(self._proto).decode("ascii"),
                "tokens": list(self.tokens)}


def tokenizer_from_state(state: dict) -> Tokenizer:
    kind = state.get("type")
    if kind == "char":
        tok = CharTokenizer()
    elif kind == "sentencepiece":
        try:
            proto = base64.b64decode(state["model"], validate=True)
        except (KeyError, TypeError, ValueError):  # binascii.Error is a ValueError
            raise UserError("saved tokenizer state: its SentencePiece model is missing or not base64") from None
        tok = SentencePieceTokenizer(proto, source="saved tokenizer state")
    else:
        raise UserError(f"unknown tokenizer type {kind!r} in saved state")
    if "tokens" in state and list(state["tokens"]) != tok.tokens:
        raise UserError("saved tokenizer's vocabulary does not match the tokens it was saved with")
    return tok


def build_tokenizer(kind: str, texts: list[str], vocab_size: int = 256, model_type: str = "unigram") -> Tokenizer:
    if kind == "char":
        return CharTokenizer()
    if kind in ("sentencepiece", "spm", "unigram", "bpe"):
        return SentencePieceTokenizer.train(texts, vocab_size, "bpe" if kind == "bpe" else model_type)
    raise UserError(f"tokenizer {kind!r}: expected 'char' or 'sentencepiece'")
