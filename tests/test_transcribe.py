"""Transcription: chunking of long audio, word times on the file's time line, bad files."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.errors import AudioError
from asr.inference import DecodingOptions, Recognizer, Transcript
from asr.inference.recognizer import chunk_bounds

SAMPLE_RATE = 16000


def test_chunks_cover_the_wave_and_cut_in_silence():
    rng = np.random.default_rng(0)
    wave = torch.from_numpy(rng.standard_normal(25 * SAMPLE_RATE).astype(np.float32))
    wave[int(9.0 * SAMPLE_RATE) : int(9.3 * SAMPLE_RATE)] = 0.0  # a pause inside the first chunk's cut zone
    bounds = chunk_bounds(wave, SAMPLE_RATE, chunk_seconds=10.0)
    assert bounds[0][0] == 0 and bounds[-1][1] == wave.numel()
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap, no gap
    assert all(end - start <= 10 * SAMPLE_RATE for start, end in bounds)
    assert 9.0 * SAMPLE_RATE <= bounds[0][1] <= 9.3 * SAMPLE_RATE  # cut in the pause
    assert len(bounds) == 3
    short = torch.zeros(SAMPLE_RATE)
    assert chunk_bounds(short, SAMPLE_RATE, 10.0) == [(0, SAMPLE_RATE)]


@pytest.fixture
def chunk_model(scripted_model):
    """A scripted model that recognises "CAT" at the start of every input, whatever its length."""

    class ChunkModel(scripted_model):
        """Recognises "CAT" at the start of every input, whatever its length."""

        def __init__(self):
            super().__init__({})

        def log_probs(self, features, feature_lengths):
            self.scripts = {int(n): "CAT" for n in feature_lengths.tolist()}
            return super().log_probs(features, feature_lengths)

    return ChunkModel()


def test_long_audio_is_recognised_in_chunks_with_file_times(chunk_model):
    model = chunk_model
    wave = torch.zeros(int(7.5 * SAMPLE_RATE))
    result = Recognizer(model, options=DecodingOptions(chunk_seconds=3.0)).transcribe(wave)
    text, words = result.text, result.words
    # silence everywhere: cuts at the 80% point of the search window or later; every chunk says CAT
    bounds = chunk_bounds(wave, SAMPLE_RATE, 3.0)
    assert text == " ".join(["CAT"] * len(bounds))
    starts = [w.start for w in words]
    assert starts == pytest.approx([b[0] / SAMPLE_RATE for b in bounds])
    # "CAT" is spelled on frames 0, 2, 4 of each chunk: it ends 5 frames (50 ms) after it starts
    assert all(w.end - w.start == pytest.approx(0.05) for w in words)


def test_bad_files_are_reported_and_others_transcribed(tmp_path, scripted_model, write_audio):
    frames_of = write_audio(tmp_path / "good.wav", 0.5)
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wav file")
    model = scripted_model({frames_of: "HELLO WORLD"})
    paths = [str(tmp_path / "junk.wav"), str(tmp_path / "good.wav"), str(tmp_path / "absent.flac")]
    results = list(Recognizer(model).transcribe_files(paths))
    assert isinstance(results[0], AudioError) and isinstance(results[2], AudioError)
    assert isinstance(results[1], Transcript) and results[1].text == "HELLO WORLD"
    assert [w.word for w in results[1].words] == ["HELLO", "WORLD"]
    assert results[1].words[0].start == 0.0 and results[1].words[1].start == pytest.approx(0.12)  # frame 12
    assert results[1].duration == pytest.approx(0.5)


def test_command_text_json_and_exit_status(tmp_path, capsys, make_checkpoint, write_audio):
    from asr.cli import main

    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    write_audio(tmp_path / "a.wav", 0.4)
    sf.write(str(tmp_path / "b.flac"), np.zeros(8000, dtype=np.float32), SAMPLE_RATE)
    (tmp_path / "bad.mp3").write_bytes(b"")

    assert main(["transcribe", str(ckpt), str(tmp_path / "a.wav"), str(tmp_path / "b.flac"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [item["path"] for item in out] == [str(tmp_path / "a.wav"), str(tmp_path / "b.flac")]
    for item in out:
        assert set(item) == {"path", "text", "duration", "confidence", "words"}
        assert item["text"] == " ".join(w["word"] for w in item["words"])
        assert all(0 <= w["start"] <= w["end"] <= item["duration"] + 1e-6 for w in item["words"])

    rc = main(["transcribe", str(ckpt), str(tmp_path / "bad.mp3"), str(tmp_path / "a.wav")])
    captured = capsys.readouterr()
    assert rc == 1
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "bad.mp3" in errors[0] and "empty" in errors[0]
    assert captured.out.startswith(str(tmp_path / "a.wav") + "\t")  # the good file is still transcribed

    assert main(["transcribe", str(ckpt), str(tmp_path / "a.wav"), "--chunk-seconds", "0.1"]) == 2
    assert "--chunk-seconds" in capsys.readouterr().err


def test_command_with_beam_search(tmp_path, capsys, make_checkpoint, write_audio):
    from asr.cli import main
    from asr.lm import build_arpa

    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    write_audio(tmp_path / "a.wav", 0.6)
    lm = build_arpa(["HELLO WORLD", "HELLO THERE"], tmp_path / "lms" / "hello.arpa")
    assert main(["transcribe", str(ckpt), str(tmp_path / "a.wav"), "--decoder", "beam", "--lm", str(lm), "--json"]) == 0
    [item] = json.loads(capsys.readouterr().out)
    assert set(item["text"].split()) <= {"HELLO", "WORLD", "THERE"}  # only lexicon words
    assert main(["transcribe", str(ckpt), str(tmp_path / "a.wav"), "--decoder", "beam"]) == 2  # no LM, none recorded
    assert "language model" in capsys.readouterr().err
    # the LM that training leaves in the run folder is used without --lm
    build_arpa(["GOOD MORNING"], tmp_path / "lm.arpa")
    assert main(["transcribe", str(ckpt), str(tmp_path / "a.wav"), "--decoder", "beam"]) == 0
    assert set(capsys.readouterr().out.split()) <= {"GOOD", "MORNING"}
