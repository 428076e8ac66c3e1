"""Greedy and beam+LM CTC decoding on hand-made log-probabilities."""

import pytest
import torch

from asr.decode import BeamLMDecoder, GreedyDecoder, Hypothesis, WordTiming, lexicon_words, spell
from asr.errors import UserError
from asr.lm import build_arpa


class CharTokens:
    """Stand-in with the tokenizer contract: blank 0, "|" between words."""

    tokens = ["<blank>", "|", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    word_delimiter = "|"

    def encode(self, text):
        return [self.tokens.index(c) for c in text.replace(" ", "|")]

    def decode(self, ids):
        return " ".join("".join(self.tokens[i] for i in ids).replace("|", " ").split())


class PieceTokens:
    """Stand-in SentencePiece-like tokenizer: "▁" starts a word, no delimiter token."""

    tokens = ["<blank>", "<unk>", "▁THE", "▁C", "▁B", "AT", "▁", "S"]
    word_delimiter = None

    def encode(self, text):
        ids = []
        for word in text.split():
            rest = "▁" + word
            while rest:
                match = max((p for p in self.tokens[2:] if rest.startswith(p)), key=len, default=None)
                if match is None:
                    ids.append(1)
                    break
                ids.append(self.tokens.index(match))
                rest = rest[len(match) :]
        return ids

    def decode(self, ids):
        return "".join(self.tokens[i] for i in ids).replace("▁", " ").strip()


def frames(tokenizer, spec, floor=1e-3):
    """(1, T, V) log-probs: spec is a list of frames, each a token string (probability ~1) or a
    dict token -> probability; the rest of each frame's mass is spread evenly."""
    V = len(tokenizer.tokens)
    rows = []
    for frame in spec:
        frame = {frame: 1.0} if isinstance(frame, str) else frame
        probs = torch.full((V,), floor)
        for token, p in frame.items():
            probs[tokenizer.tokens.index(token)] = p
        rows.append(probs / probs.sum())
    return torch.stack(rows).log().unsqueeze(0)  # (1, T, V)


def test_greedy_collapses_repeats_and_times_words():
    tok = CharTokens()
    #        0    1    2         3    4    5    6    7    8        9    10   11
    spec = ["C", "C", "<blank>", "A", "T", "|", "|", "A", "<blank>", "A", "T", "<blank>"]
    [hyp] = GreedyDecoder(tok).decode(frames(tok, spec), torch.tensor([len(spec)]))
    assert hyp.text == "CAT AAT"  # a blank between two A's keeps both
    assert hyp.words == [WordTiming("CAT", 0, 5), WordTiming("AAT", 7, 11)]


def test_greedy_respects_lengths_in_a_padded_batch():
    tok = CharTokens()
    a = frames(tok, ["H", "I", "|", "Y", "O"])
    b = frames(tok, ["O", "K", "<blank>", "<blank>", "<blank>"])
    batch = torch.cat([a, b])  # (2, 5, V)
    hyps = GreedyDecoder(tok).decode(batch, torch.tensor([5, 2]))
    assert [h.text for h in hyps] == ["HI YO", "OK"]
    assert hyps[1].words == [WordTiming("OK", 0, 2)]
    # length 0 and all-blank give an empty hypothesis
    assert GreedyDecoder(tok).decode(b, torch.tensor([0]))[0] == Hypothesis("", [])


def test_greedy_with_word_pieces():
    tok = PieceTokens()
    spec = ["▁THE", "<blank>", "▁C", "AT", "AT", "S", "<blank>", "▁B", "AT"]
    [hyp] = GreedyDecoder(tok).decode(frames(tok, spec), torch.tensor([len(spec)]))
    assert hyp.text == "THE CATS BAT"
    assert [(w.word, w.start_frame, w.end_frame) for w in hyp.words] == [("THE", 0, 1), ("CATS", 2, 6), ("BAT", 7, 9)]


def test_spell_and_lexicon_words():
    assert spell(CharTokens(), "CAT") == ["C", "A", "T"]
    assert spell(CharTokens(), "DON'T") == ["D", "O", "N", "'", "T"]
    assert spell(PieceTokens(), "CATS") == ["▁C", "AT", "S"]
    assert spell(PieceTokens(), "DOG") is None  # needs <unk>
    from asr.data.tokenizer import CharTokenizer

    assert spell(CharTokenizer(), "R2D2") is None  # digits are not in the character vocabulary
    assert lexicon_words(["THE CAT", "A CAT  SAT", ""]) == ["A", "CAT", "SAT", "THE"]


LM_TEXTS = ["THE CAT SAT", "THE CAT SAW A BAT", "A CAT", "THE CAT"] * 3 + ["A BAT SAT"]


def _ambiguous_the_cat(tok):
    # "THE ?AT" where the acoustics slightly prefer B over C
    return ["T", "H", "E", "|", {"B": 0.55, "C": 0.44}, "A", "T", "<blank>"]


def test_beam_without_lm_follows_acoustics_and_lexicon(tmp_path):
    tok = CharTokens()
    decoder = BeamLMDecoder(tok, None, lexicon_words(LM_TEXTS), beam_size=20)
    spec = _ambiguous_the_cat(tok)
    [hyp] = decoder.decode(frames(tok, spec), torch.tensor([len(spec)]))
    assert hyp.text == "THE BAT"
    assert [w.word for w in hyp.words] == ["THE", "BAT"]
    assert hyp.words[0].start_frame == 0 and hyp.words[1].start_frame == 4
    assert hyp.words[1].end_frame == 7


def test_beam_with_lm_fixes_what_acoustics_get_wrong(tmp_path):
    tok = CharTokens()
    lm = build_arpa(LM_TEXTS, tmp_path / "lm.arpa")
    decoder = BeamLMDecoder(tok, lm, lexicon_words(LM_TEXTS), beam_size=20, lm_weight=2.0)
    spec = _ambiguous_the_cat(tok)
    [hyp] = decoder.decode(frames(tok, spec), torch.tensor([len(spec)]))
    assert hyp.text == "THE CAT"  # "THE CAT" is far likelier under the LM than "THE BAT"
    # greedy on the same input keeps the acoustic choice
    assert GreedyDecoder(tok).decode(frames(tok, spec), torch.tensor([len(spec)]))[0].text == "THE BAT"


def test_beam_only_outputs_lexicon_words(tmp_path):
    tok = CharTokens()
    lm = build_arpa(LM_TEXTS, tmp_path / "lm.arpa")
    decoder = BeamLMDecoder(tok, lm, lexicon_words(LM_TEXTS))
    spec = ["C", "A", "X", "|", "S", "A", "T"]  # "CAX" is not a word; "X" is only mildly certain
    log_probs = frames(tok, spec, floor=0.02)
    assert GreedyDecoder(tok).decode(log_probs, torch.tensor([7]))[0].text == "CAX SAT"
    [hyp] = decoder.decode(log_probs, torch.tensor([7]))
    assert all(word in lexicon_words(LM_TEXTS) for word in hyp.text.split())
    assert hyp.text.endswith("SAT")


def test_beam_matches_greedy_on_confident_input_in_a_batch(tmp_path):
    tok = CharTokens()
    lm = build_arpa(LM_TEXTS, tmp_path / "lm.arpa")
    decoder = BeamLMDecoder(tok, lm, lexicon_words(LM_TEXTS))
    a = frames(tok, ["A", "<blank>", "|", "B", "A", "T", "|", "S", "A", "T"])
    b = frames(tok, ["C", "A", "T", "<blank>", "<blank>", "<blank>", "<blank>", "<blank>", "<blank>", "<blank>"])
    batch, lengths = torch.cat([a, b]), torch.tensor([10, 4])
    beam, greedy = decoder.decode(batch, lengths), GreedyDecoder(tok).decode(batch, lengths)
    assert [h.text for h in beam] == [h.text for h in greedy] == ["A BAT SAT", "CAT"]
    for b_hyp, g_hyp in zip(beam, greedy):
        for bw, gw in zip(b_hyp.words, g_hyp.words):
            assert bw.word == gw.word and bw.start_frame == gw.start_frame
            assert abs(bw.end_frame - gw.end_frame) <= 1


def test_beam_with_word_pieces(tmp_path):
    tok = PieceTokens()
    texts = ["THE CAT", "THE CATS", "THE BAT"]
    lm = build_arpa(texts, tmp_path / "lm.arpa")
    decoder = BeamLMDecoder(tok, lm, lexicon_words(texts))
    spec = ["▁THE", "<blank>", "▁C", "AT", "S", "<blank>", "▁THE", "▁B", "AT"]
    [hyp] = decoder.decode(frames(tok, spec), torch.tensor([len(spec)]))
    assert hyp.text == "THE CATS THE BAT"
    assert [(w.word, w.start_frame) for w in hyp.words] == [("THE", 0), ("CATS", 2), ("THE", 6), ("BAT", 7)]


def test_beam_bad_input(tmp_path):
    tok = CharTokens()
    with pytest.raises(UserError, match="not found"):
        BeamLMDecoder(tok, tmp_path / "missing.arpa", ["CAT"])
    with pytest.raises(UserError, match="lexicon"):
        BeamLMDecoder(tok, None, ["", "<unk>"])
    decoder = BeamLMDecoder(tok, None, ["CAT"])
    with pytest.raises(UserError, match="classes"):
        decoder.decode(torch.zeros(1, 3, 5).log_softmax(-1), torch.tensor([3]))


def test_beam_times_words_the_model_ran_together(tmp_path):
    # no "|" between the words: the decoder still splits them (the lexicon has no "THECAT") and
    # each word's frames come from where the decoder completed it
    tok = CharTokens()
    lm = build_arpa(LM_TEXTS, tmp_path / "lm.arpa")
    decoder = BeamLMDecoder(tok, lm, lexicon_words(LM_TEXTS))
    spec = ["T", "H", "E", "<blank>", "C", "A", "T"]
    [hyp] = decoder.decode(frames(tok, spec), torch.tensor([len(spec)]))
    assert hyp.words == [WordTiming("THE", 0, 3), WordTiming("CAT", 4, 7)]


SENTENCES = ["THE LAW WILL NEVER MAKE MEN FREE", "IT IS MEN WHO HAVE GOT TO MAKE THE LAW FREE", "DON'T DRIVE AT THE LIMIT"]


def _spelled(tokenizer, text):
    """A confident CTC path for text: each token on one frame, a blank after it. (1, T, V)"""
    spec = []
    for token in tokenizer.encode(text):
        spec += [tokenizer.tokens[token], "<blank>"]
    return frames(tokenizer, spec), len(spec)


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_real_tokenizers_round_trip_through_both_decoders(tmp_path, kind):
    from asr.data.tokenizer import CharTokenizer, SentencePieceTokenizer

    tok = CharTokenizer() if kind == "char" else SentencePieceTokenizer.train(SENTENCES * 4, vocab_size=40)
    lm = build_arpa(SENTENCES, tmp_path / "lm.arpa")
    beam = BeamLMDecoder(tok, lm, lexicon_words(SENTENCES))
    assert beam.lexicon_size == len(lexicon_words(SENTENCES))
    for text in SENTENCES:
        log_probs, T = _spelled(tok, text)
        [greedy_hyp] = GreedyDecoder(tok).decode(log_probs, torch.tensor([T]))
        [beam_hyp] = beam.decode(log_probs, torch.tensor([T]))
        assert greedy_hyp.text == beam_hyp.text == text
        assert [w.start_frame for w in beam_hyp.words] == [w.start_frame for w in greedy_hyp.words]
        # words are in order and do not overlap
        for a, b in zip(greedy_hyp.words, greedy_hyp.words[1:]):
            assert a.start_frame < a.end_frame <= b.start_frame
