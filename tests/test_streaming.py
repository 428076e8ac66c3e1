"""Streaming (asr.inference.streaming) with a unidirectional + lookahead model trained here: chunks of
100-640 ms give the offline network's output on the same audio; the command streams a file and stdin."""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.errors import UserError
from asr.inference import Recognizer
from asr.inference.streaming import StreamingFeatures, StreamingRecognizer

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def streaming(trained_run):
    from asr.data.librispeech import load_split
    from asr.inference.decoders import _data_section_of_run_config

    checkpoint = trained_run("streaming") / "last.ckpt"
    root = _data_section_of_run_config(checkpoint)["root"]
    return checkpoint, load_split(root, "test-clean")


def _offline(recognizer: Recognizer, wave: torch.Tensor) -> torch.Tensor:
    features = recognizer.features(wave)  # (T, F)
    log_probs, lengths = recognizer.model.log_probs(features[None], torch.tensor([features.shape[0]]))
    return log_probs[0, : int(lengths[0])]  # (T', V)


def test_features_of_a_stream_are_the_offline_features(streaming):
    checkpoint, utterances = streaming
    recognizer = Recognizer.load(checkpoint)
    assert recognizer.model.feature_config.normalization == "global"  # computed on the training set, saved
    wave = torch.from_numpy(sf.read(utterances[0].path, dtype="float32")[0])
    stream = StreamingFeatures(recognizer.logmel)
    pieces = [stream.accept(wave[i : i + 1601]) for i in range(0, wave.numel(), 1601)] + [stream.finish()]
    torch.testing.assert_close(torch.cat(pieces), recognizer.features(wave), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_ms", [100, 160, 250, 640])
def test_streaming_equals_offline(streaming, chunk_ms):
    checkpoint, utterances = streaming
    recognizer = Recognizer.load(checkpoint)
    stream = StreamingRecognizer(recognizer)
    piece = chunk_ms * SAMPLE_RATE // 1000
    texts = []
    for utt in utterances:
        wave = torch.from_numpy(sf.read(utt.path, dtype="float32")[0])
        stream.reset()
        partials = [stream.accept(wave[i : i + piece]) for i in range(0, wave.numel(), piece)]
        result = stream.finish()
        offline = _offline(recognizer, wave)
        streamed = stream.stream_log_probs()
        assert streamed.shape == offline.shape
        # float32 sums taken in other groupings differ in the last bits; the decoded results are equal
        torch.testing.assert_close(streamed, offline, rtol=0, atol=1e-4)
        expected = recognizer.transcribe(wave)
        assert result.text == expected.text
        assert [(w.word, w.start, w.end) for w in result.words] == [(w.word, w.start, w.end) for w in expected.words]
        assert partials[-1] == "" or expected.text.startswith(partials[-1].rsplit(" ", 1)[0])
        texts.append(result.text)
    assert all(texts)  # the model recognises something in every utterance


def test_command_streams_a_file_and_stdin(streaming, capsys, monkeypatch, tmp_path):
    from asr.cli import main

    checkpoint, utterances = streaming
    expected = Recognizer.load(checkpoint).transcribe(utterances[0].path)
    assert expected.text
    assert main(["transcribe", str(checkpoint), "--stream", utterances[0].path]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[3] for line in out.splitlines()] == expected.text.split()
    assert "partial" in err and "algorithmic latency" in err
    wave = sf.read(utterances[0].path, dtype="int16")[0]

    class Stdin:
        buffer = io.BytesIO(wave.astype("<i2").tobytes())

    monkeypatch.setattr("sys.stdin", Stdin())
    assert main(["transcribe", str(checkpoint), "--stream", "-", "--stream-chunk-ms", "100", "--json"]) == 0
    item = json.loads(capsys.readouterr().out)
    assert item["text"] == expected.text and item["duration"] == pytest.approx(expected.duration, abs=1e-3)


def test_a_bidirectional_model_cannot_stream(trained_run, capsys):
    from asr.cli import main

    checkpoint = trained_run("bidirectional") / "last.ckpt"
    capsys.readouterr()  # what the fixture printed if it trained the model just now
    with pytest.raises(UserError, match="unidirectional"):
        StreamingRecognizer(Recognizer.load(checkpoint))
    assert main(["transcribe", str(checkpoint), "--stream", "x.wav"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unidirectional" in err and str(checkpoint) in err
