"""The Recognizer (asr.inference): the Python API on a model trained here, batched = one at a time,
long files in chunks on the file's time line, waveforms at other rates, the CLI as a thin user."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.errors import AudioError, UserError
from asr.evaluate import count_edits
from asr.inference import DecodingOptions, Recognizer

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def trained(trained_run):
    run = trained_run("bidirectional")
    from asr.data.librispeech import load_split
    from asr.inference.decoders import _data_section_of_run_config

    root = _data_section_of_run_config(run / "last.ckpt")["root"]
    return run / "last.ckpt", load_split(root, "test-clean")


def _wer(references, hypotheses) -> float:
    counts = count_edits(references, hypotheses)
    return counts.word_edits / counts.reference_words


def _cer(references, hypotheses) -> float:
    counts = count_edits(references, hypotheses)
    return counts.char_edits / counts.reference_chars


def test_python_api_files_list_and_waveform(trained):
    checkpoint, utterances = trained
    import asr

    r = asr.Recognizer.load(checkpoint)
    one = r.transcribe(utterances[0].path)
    assert one.text and one.path == utterances[0].path
    assert one.duration == pytest.approx(utterances[0].duration, abs=1e-3)
    assert one.text == " ".join(w.word for w in one.words)
    assert all(0 <= w.start < w.end <= one.duration + 1e-6 and 0 < w.confidence <= 1 for w in one.words)
    assert 0 < one.confidence <= 1
    many = r.transcribe([u.path for u in utterances])
    assert [t.path for t in many] == [u.path for u in utterances]
    assert many[0].text == one.text
    # the model recognises: most words right (an empty or garbage result fails)
    assert _wer([u.text for u in utterances], [t.text for t in many]) < 0.5
    # a waveform at 8 kHz is resampled to the model's rate
    wave, rate = sf.read(utterances[1].path, dtype="float32")
    import torchaudio.functional as AF

    at_8k = AF.resample(torch.from_numpy(wave), rate, 8000).numpy()
    from_wave = r.transcribe(at_8k, sample_rate=8000)
    assert from_wave.path is None and from_wave.duration == pytest.approx(len(wave) / rate, abs=1e-3)
    assert _wer([utterances[1].text], [from_wave.text]) <= _wer([utterances[1].text], [many[1].text]) + 0.34


def test_batched_equals_one_at_a_time(trained):
    checkpoint, utterances = trained
    paths = [u.path for u in utterances]
    batched = Recognizer.load(checkpoint, max_batch_seconds=60.0).transcribe(paths)
    single = Recognizer.load(checkpoint, max_batch_seconds=0.5).transcribe(paths)  # every file its own batch
    assert all(t.text for t in batched)
    assert [t.text for t in batched] == [t.text for t in single]
    for a, b in zip(batched, single):
        assert [(w.start, w.end) for w in a.words] == [(w.start, w.end) for w in b.words]
        assert [w.confidence for w in a.words] == pytest.approx([w.confidence for w in b.words], abs=1e-4)


def test_a_long_file_is_recognised_in_chunks_on_its_time_line(trained, tmp_path):
    checkpoint, utterances = trained
    waves = [sf.read(u.path, dtype="float32")[0] for u in utterances]
    long = tmp_path / "long.flac"
    sf.write(long, np.concatenate(waves), SAMPLE_RATE)
    options = DecodingOptions(chunk_seconds=2.0)
    batched = Recognizer.load(checkpoint, options=options.with_(max_batch_seconds=30.0)).transcribe(str(long))
    single = Recognizer.load(checkpoint, options=options.with_(max_batch_seconds=2.0)).transcribe(str(long))
    assert batched.text and batched.text == single.text
    assert batched.duration == pytest.approx(sum(len(w) for w in waves) / SAMPLE_RATE, abs=1e-3)
    assert batched.duration > 4 * 2.0  # more than four chunks
    starts = [w.start for w in batched.words]
    assert starts == sorted(starts) and batched.words[-1].end <= batched.duration + 1e-6
    assert starts[-1] > 3 * 2.0  # words from the last chunks are placed late in the file
    # cuts can split a word, so letters, not words, are compared
    assert _cer([" ".join(u.text for u in utterances)], [batched.text]) < 0.25


def test_bad_input_to_the_api(trained, tmp_path):
    checkpoint, utterances = trained
    r = Recognizer.load(checkpoint)
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wav file")
    with pytest.raises(AudioError, match="junk.wav"):
        r.transcribe([utterances[0].path, str(tmp_path / "junk.wav")])
    results = list(r.transcribe_files([str(tmp_path / "junk.wav"), utterances[0].path]))
    assert isinstance(results[0], AudioError) and results[1].text
    with pytest.raises(UserError, match="one channel"):
        r.transcribe(np.zeros((2, 1000), dtype=np.float32))
    with pytest.raises(UserError, match="--beam-size 0"):
        Recognizer.load(checkpoint, beam_size=0)
    with pytest.raises(UserError, match="language model"):
        Recognizer.load(checkpoint, decoder="beam", lm=str(tmp_path / "absent.arpa"))


def test_beam_decoder_through_the_api_and_the_command(trained, tmp_path, capsys):
    from asr.cli import main
    from asr.lm import build_arpa

    checkpoint, utterances = trained
    lm = build_arpa([u.text for u in utterances], tmp_path / "lm.arpa")
    r = Recognizer.load(checkpoint, decoder="beam", lm=str(lm), beam_size=16)
    results = r.transcribe([u.path for u in utterances])
    assert _wer([u.text for u in utterances], [t.text for t in results]) < 0.5
    assert all(0 < w.confidence <= 1 for t in results for w in t.words)
    assert main(["transcribe", str(checkpoint), utterances[0].path, "--decoder", "beam", "--lm", str(lm),
                 "--beam-size", "16", "--json"]) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert item["text"] == results[0].text and item["confidence"] == pytest.approx(results[0].confidence, abs=1e-4)
    assert [w["word"] for w in item["words"]] == item["text"].split()
