"""Evaluation: scoring, the evaluate() loop with skipped audio, decoders, and the command."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.data.features import FeatureConfig
from asr.data.manifest import Utterance, write_manifest
from asr.data.tokenizer import CharTokenizer
from asr.decode import GreedyDecoder
from asr.errors import UserError
from asr.evaluate import BEAM_NAME, arpa_vocabulary, build_decoders, evaluate, format_markdown, score
from asr.lm import build_arpa

SAMPLE_RATE = 16000
FEATURES = FeatureConfig(n_mels=8)


class ScriptedModel:
    """Stand-in with the InferenceModel contract: it "recognises" the text scripted for each input
    length (in feature frames), spelling it as a confident CTC path."""

    def __init__(self, scripts: dict[int, str]):
        self.tokenizer = CharTokenizer()
        self.feature_config = FEATURES
        self.frame_shift_seconds = FEATURES.hop_ms / 1000
        self.device = torch.device("cpu")
        self.scripts = scripts
        self.calls = 0

    def log_probs(self, features, feature_lengths):
        self.calls += 1
        N, T, _ = features.shape
        V = self.tokenizer.vocab_size
        out = torch.full((N, T, V), -12.0)
        out[:, :, 0] = 0.0  # blank everywhere, then the script's tokens
        for n, length in enumerate(feature_lengths.tolist()):
            for k, token in enumerate(self.tokenizer.encode(self.scripts[length])):
                out[n, 2 * k, 0], out[n, 2 * k, token] = -12.0, 0.0
        return out.log_softmax(-1), feature_lengths.clone()


def write_audio(path, seconds):
    rng = np.random.default_rng(int(seconds * 1000))
    sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32), SAMPLE_RATE)
    return FEATURES.num_frames(int(seconds * SAMPLE_RATE))


@pytest.fixture
def corpus(tmp_path):
    """Four utterances with known recognition results; one more whose audio is missing."""
    cases = [  # (seconds, reference, what the scripted model outputs)
        (0.50, "THE CAT SAT", "THE CAT SAT"),  # correct
        (0.60, "THE DOG RAN HOME", "THE DOG RAN"),  # 1 deletion
        (0.70, "A BIRD", "A WORD IN"),  # 1 substitution, 1 insertion
        (0.80, "HELLO", "YELLOW FELLOW"),  # 1 substitution, 1 insertion
    ]
    utterances, scripts = [], {}
    for k, (seconds, reference, output) in enumerate(cases):
        path = tmp_path / f"u{k}.wav"
        scripts[write_audio(path, seconds)] = output
        utterances.append(Utterance(f"u{k}", str(path), seconds, reference, "s1"))
    utterances.append(Utterance("gone", str(tmp_path / "gone.flac"), 0.9, "NOT THERE", "s1"))
    return utterances, scripts


def test_score_counts_edits_and_ranks_worst():
    result = score(["A B C", "D E", "f-g"], ["A X C D", "D", "F G"], ["u1", "u2", "u3"])
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 1, 1)
    assert result["reference_words"] == 7  # "f-g" normalises to "F G"
    assert result["wer"] == pytest.approx(3 / 7)
    assert [u.id for u in result["worst"]] == ["u1", "u2"]  # 2 errors, then 1; u3 is correct
    assert result["worst"][0].word_errors == 2
    assert result["cer"] == pytest.approx((1 + 2 + 2) / (5 + 3 + 3))  # B->X, " D" inserted, " E" deleted


def test_evaluate_scores_skips_missing_audio_and_times(corpus):
    utterances, scripts = corpus
    model = ScriptedModel(scripts)
    result = evaluate(model, utterances, {"greedy": GreedyDecoder(model.tokenizer)}, max_batch_seconds=1.5)
    s = result.scores["greedy"]
    assert result.utterances == s.utterances == 4
    assert [i for i, _ in result.skipped] == ["gone"] and "no such file" in result.skipped[0][1]
    assert (s.substitutions, s.deletions, s.insertions, s.reference_words) == (2, 1, 2, 10)
    assert s.wer == pytest.approx(5 / 10)
    # most errors first, ties by error rate: u3 (2 errors, 1 word), u2 (2 of 2), u1 (1 of 4)
    assert [u.id for u in s.worst] == ["u3", "u2", "u1"]
    assert s.worst[0].reference == "HELLO" and s.worst[0].hypothesis == "YELLOW FELLOW"
    assert result.audio_seconds == pytest.approx(0.5 + 0.6 + 0.7 + 0.8)
    assert s.rtf > 0 and math.isfinite(s.rtf)
    assert model.calls >= 2  # 1.5 s of padded audio per batch: more than one batch
    as_dict = result.to_dict()
    json.dumps(as_dict)
    assert as_dict["decoders"]["greedy"]["wer"] == pytest.approx(0.5)


def test_evaluate_bad_input(corpus, tmp_path):
    utterances, scripts = corpus
    model = ScriptedModel(scripts)
    with pytest.raises(UserError, match="no utterances"):
        evaluate(model, [], {"greedy": GreedyDecoder(model.tokenizer)})
    with pytest.raises(UserError, match="all 1"):
        evaluate(model, utterances[-1:], {"greedy": GreedyDecoder(model.tokenizer)})


def test_beam_decoder_in_evaluation_uses_lm_vocabulary(corpus, tmp_path):
    utterances, scripts = corpus
    model = ScriptedModel(scripts)
    lm = build_arpa(["THE CAT SAT", "THE DOG RAN HOME", "A BIRD", "HELLO"], tmp_path / "lm.arpa")
    assert sorted(arpa_vocabulary(lm)) == ["A", "BIRD", "CAT", "DOG", "HELLO", "HOME", "RAN", "SAT", "THE"]
    decoders = build_decoders(model.tokenizer, "both", lm)
    assert set(decoders) == {"greedy", BEAM_NAME}
    result = evaluate(model, utterances[:2], decoders)
    assert result.scores[BEAM_NAME].wer == pytest.approx(1 / 7)  # the deletion in u2 stays
    assert "| greedy |" in format_markdown({"test": result})
    with pytest.raises(UserError, match="language model"):
        build_decoders(model.tokenizer, "beam", None)
