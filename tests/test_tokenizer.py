"""Character and SentencePiece tokenizers: exact round trip, blank 0, saved state."""

import base64
import json
import pickle
import random

import pytest

from asr.data.text import normalize_text
from asr.data.tokenizer import (
    BLANK, CharTokenizer, SentencePieceTokenizer, build_tokenizer, tokenizer_from_state,
)
from asr.errors import UserError

WORDS = ("THE QUICK BROWN FOX JUMPS OVER A LAZY DOG DON'T JAMES' 'TIS HELLO WORLD SPEECH "
         "RECOGNITION IS HARD BUT WE'LL TRY AGAIN TOMORROW MORNING IT'S FINE").split()
TRAIN_TEXTS = [" ".join(random.Random(i).choice(WORDS) for _ in range(3 + i % 8)) for i in range(300)]
# Words never seen in training, every letter and the apostrophe, odd spacing-free edge cases.
UNSEEN = [
    "ZYZZYVA QUIXOTIC'S JUKEBOX",
    normalize_text("Pack my box with five dozen liquor jugs — isn’t it?"),
    "A", "I'M", "X Y Z", "'TIS", "O'CLOCK",
]


def test_char_tokenizer_vocabulary():
    tok = CharTokenizer()
    assert tok.blank_id == 0 and tok.tokens[0] == BLANK
    assert tok.vocab_size == len(tok.tokens) == 29
    assert tok.word_delimiter == "|" and tok.tokens[1] == "|"
    assert set(tok.tokens[2:]) == set("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")


@pytest.mark.parametrize("text", TRAIN_TEXTS[:20] + UNSEEN)
def test_char_round_trip(text):
    tok = CharTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text) and 0 not in ids
    assert tok.decode(ids) == text
    assert [tok.tokens[i] for i in ids] == ["|" if c == " " else c for c in text]


@pytest.mark.parametrize("text", ["hello", "CAFÉ", "ROOM 101", "A.B", "TAB\tHERE"])
def test_char_unknown_character_is_a_user_error(text):
    with pytest.raises(UserError, match="not in the character vocabulary"):
        CharTokenizer().encode(text)


def test_char_decode_skips_blanks_and_trims_delimiters():
    tok = CharTokenizer()
    ids = [1] + tok.encode("AB") + [0, 1, 1] + tok.encode("C") + [1]
    assert tok.decode(ids) == "AB C"


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def sp(request):
    return SentencePieceTokenizer.train(TRAIN_TEXTS, vocab_size=60, model_type=request.param)


def test_sentencepiece_vocabulary(sp):
    assert sp.blank_id == 0 and sp.tokens[0] == BLANK and BLANK not in sp.tokens[1:]
    assert sp.vocab_size == len(sp.tokens) > 29
    assert sp.word_delimiter is None
    assert any(t.startswith("▁") for t in sp.tokens)
    assert any(len(t.lstrip("▁")) > 1 for t in sp.tokens), "learned multi-letter pieces"


@pytest.mark.parametrize("which", ["train", "unseen"])
def test_sentencepiece_round_trip(sp, which):
    for text in TRAIN_TEXTS if which == "train" else UNSEEN:
        ids = sp.encode(text)
        assert ids and 0 not in ids and all(0 < i < sp.vocab_size for i in ids)
        assert sp.decode(ids) == text


def test_sentencepiece_decode_ignores_blanks(sp):
    ids = sp.encode("HELLO WORLD")
    assert sp.decode([0, *ids[:1], 0, *ids[1:], 0]) == "HELLO WORLD"


@pytest.mark.parametrize("text", ["hello", "CAFÉ", "ROOM 101"])
def test_sentencepiece_unknown_character_is_a_user_error(sp, text):
    with pytest.raises(UserError, match="not in the SentencePiece vocabulary"):
        sp.encode(text)


def test_sentencepiece_state_round_trip(sp):
    state = json.loads(json.dumps(sp.state_dict()))  # JSON-serialisable, as stored in checkpoints
    restored = tokenizer_from_state(pickle.loads(pickle.dumps(state)))
    assert isinstance(restored, SentencePieceTokenizer)
    assert restored.tokens == sp.tokens
    for text in TRAIN_TEXTS[:20] + UNSEEN:
        assert restored.encode(text) == sp.encode(text)


def test_char_state_round_trip():
    state = json.loads(json.dumps(CharTokenizer().state_dict()))
    restored = tokenizer_from_state(state)
    assert isinstance(restored, CharTokenizer) and restored.tokens == CharTokenizer().tokens


def test_state_errors(sp):
    with pytest.raises(UserError, match="unknown tokenizer type"):
        tokenizer_from_state({"type": "wordpiece"})
    state = sp.state_dict()
    state["tokens"] = state["tokens"][:-1]
    with pytest.raises(UserError, match="does not match"):
        tokenizer_from_state(state)


def test_build_tokenizer():
    assert isinstance(build_tokenizer("char", []), CharTokenizer)
    bpe = build_tokenizer("bpe", TRAIN_TEXTS, vocab_size=50)
    assert isinstance(bpe, SentencePieceTokenizer) and bpe.decode(bpe.encode(TRAIN_TEXTS[0])) == TRAIN_TEXTS[0]
    with pytest.raises(UserError, match="tokenizer 'words'"):
        build_tokenizer("words", TRAIN_TEXTS)
    with pytest.raises(UserError, match="model_type"):
        SentencePieceTokenizer.train(TRAIN_TEXTS, 50, "wordpiece")
    with pytest.raises(UserError, match="no transcripts"):
        SentencePieceTokenizer.train(["", ""], 50)


def test_training_is_deterministic():
    a = SentencePieceTokenizer.train(TRAIN_TEXTS, 60, "unigram")
    b = SentencePieceTokenizer.train(TRAIN_TEXTS, 60, "unigram")
    assert a.tokens == b.tokens  # (the model bytes differ: they record the temporary training file's path)
    assert [a.encode(t) for t in TRAIN_TEXTS + UNSEEN] == [b.encode(t) for t in TRAIN_TEXTS + UNSEEN]


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8, b"\n\x05hello"], ids=["0 bytes", "random bytes", "truncated"])
def test_corrupt_model_file_is_a_user_error_naming_it(tmp_path, content):
    path = tmp_path / "tokenizers" / "unigram-60.model"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        SentencePieceTokenizer.from_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a SentencePiece model (") and "\n" not in message


def test_model_file_round_trip_and_missing_file(tmp_path, sp):
    path = tmp_path / "sp.model"
    path.write_bytes(sp.model_proto)
    assert SentencePieceTokenizer.from_file(path).tokens == sp.tokens
    with pytest.raises(UserError, match=f"{tmp_path / 'nope.model'}: cannot read SentencePiece model"):
        SentencePieceTokenizer.from_file(tmp_path / "nope.model")


@pytest.mark.parametrize("model", ["!!not base64!!", base64.b64encode(b"garbage" * 10).decode(), None])
def test_corrupt_saved_state_is_a_user_error(model):
    state = {"type": "sentencepiece", "tokens": [BLANK]}
    if model is not None:
        state["model"] = model
    with pytest.raises(UserError, match="^saved tokenizer state: "):
        tokenizer_from_state(state)
