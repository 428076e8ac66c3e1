"""The bad-input suite: every case is a real file or a real argument given to the `asr` command, as
a user would give it. Each ends with exit status 2 (1 where other inputs of the same command still
succeed), one line on stderr naming the file or argument and the reason, no traceback, and nothing
written or deleted.

Classes: audio, manifests, checkpoints, configs, CLI, other files and options. Per-module details
(decoder internals, header parsing, download protocol) are tested in the modules' own test files.
"""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.cli import main


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time: what a refused command must not change."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _run(argv: list[str], capsys, cwd: Path) -> tuple[int, str, str]:
    before = _tree(cwd)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err, before != _tree(cwd)


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def refused(argv: list[str], capsys, cwd: Path, *reason: str, prog: str | None = None) -> str:
    """Run `asr argv`: status 2, one line naming the input and the reason, nothing written or deleted."""
    rc, _, err, changed = _run(argv, capsys, cwd)
    assert rc == 2, err
    line = _one_error_line(err, prog or "asr " + _command_path(argv))
    for fragment in reason:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not changed, f"`asr {' '.join(argv)}` changed files under {cwd} although it was refused"
    return line


def _command_path(argv: list[str]) -> str:
    from asr.cli import _resolve

    path, _ = _resolve(argv)
    return " ".join(path)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def checkpoint(workdir, make_checkpoint):
    return make_checkpoint(workdir / "model.ckpt")


# --- audio: `asr transcribe CKPT GOOD BAD` transcribes the good file and names the bad one ------------


def _file(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _write_float_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    data = samples if channels == 1 else np.stack([samples] * channels, axis=1)
    sf.write(path, data.astype(np.float32), rate, subtype="FLOAT")
    return path


def _truncated_wav(path: Path) -> Path:
    _write_float_wav(path, 0.1 * np.ones(16000, dtype=np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_AUDIO = {
    "empty": (lambda d: _file(d / "empty.wav", b""), "empty file (0 bytes)"),
    "zero samples": (lambda d: _write_float_wav(d / "zero.wav", np.zeros(0)), "no audio samples"),
    "truncated": (lambda d: _truncated_wav(d / "cut.wav"), "truncated"),
    "random bytes": (lambda d: _file(d / "noise.flac", np.random.default_rng(0).bytes(4000)),
                     "cannot decode audio"),
    "text named mp3": (lambda d: _file(d / "notes.mp3", "these are my notes\n" * 20),
                       "not a readable audio file"),
    "directory": (lambda d: _folder(d / "folder.wav"), "not a regular file"),
    "missing": (lambda d: d / "absent.wav", "no such file"),
    "nan samples": (lambda d: _write_float_wav(d / "nan.wav", np.full(8000, np.nan)), "NaN or infinite"),
    "inf samples": (lambda d: _write_float_wav(d / "inf.wav", np.full(8000, np.inf)), "NaN or infinite"),
    "1 Hz header": (None, "implausible sample rate 1 Hz"),
}


@pytest.mark.parametrize("case", list(BAD_AUDIO))
def test_bad_audio_is_named_and_the_good_file_still_transcribed(case, workdir, checkpoint, capsys, wav_with_rate,
                                                                write_audio):
    make, reason = BAD_AUDIO[case]
    bad = wav_with_rate(workdir / "one_hz.wav", 1) if make is None else make(workdir)
    good = workdir / "good.wav"
    write_audio(good, 0.5)
    rc, out, err, changed = _run(["transcribe", str(checkpoint), str(good), str(bad)], capsys, workdir)
    assert rc == 1, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and str(bad) in errors[0] and reason in errors[0], err
    assert err.splitlines()[-1] == "asr transcribe: 1 of 2 file(s) failed"
    assert out.startswith(f"{good}\t") and str(bad) not in out
    assert not changed


@pytest.mark.parametrize("rate,channels", [(8000, 1), (48000, 2)])
def test_other_rates_and_stereo_are_read(rate, channels, workdir, checkpoint, capsys, tone):
    path = _write_float_wav(workdir / f"tone_{rate}.wav", tone(1.0, rate, 440.0), rate, channels)
    rc, out, err, _ = _run(["transcribe", str(checkpoint), str(path), "--json"], capsys, workdir)
    assert rc == 0, err
    import json

    [item] = json.loads(out)
    assert item["path"] == str(path) and item["duration"] == pytest.approx(1.0, abs=1e-3)


def test_a_file_name_that_is_not_utf8_is_read_and_printed(workdir, checkpoint, capsys):
    path = Path(os.fsdecode(os.fsencode(str(workdir)) + b"/caf\xe9.wav"))  # Latin-1 e-acute: not UTF-8
    sf.write(os.fsencode(path), 0.1 * np.ones(8000, dtype=np.float32), 16000)
    rc, out, err, _ = _run(["transcribe", str(checkpoint), str(path), str(workdir / "absent.wav")], capsys, workdir)
    assert rc == 1, err
    assert out.startswith(f"{workdir}/caf\\xe9.wav\t")  # the byte shown escaped, not a UnicodeEncodeError


@pytest.mark.slow
def test_an_hour_of_silence_is_transcribed_in_bounded_time_and_memory(workdir, checkpoint, repo_root):
    """In a child process, so that its peak memory is its own (ru_maxrss of the child)."""
    path = workdir / "silence.flac"
    sf.write(path, np.zeros(3600 * 16000, dtype=np.int16), 16000, format="FLAC", subtype="PCM_16")
    env = dict(os.environ, PYTHONPATH=str(repo_root) + os.pathsep + str(repo_root / "tests"), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "asr.cli", "transcribe", str(checkpoint), str(path), "--json"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)  # a hang guard only
    assert proc.returncode == 0, proc.stderr
    import json

    [item] = json.loads(proc.stdout)
    assert item["duration"] == pytest.approx(3600.0)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    # 230 MB of float32 samples plus torch: the old 1 Hz bug took 2.9 GB for a few bytes of file
    assert peak_gib < 2.0, f"peak RSS {peak_gib:.2f} GiB"


# --- manifests: `asr evaluate --manifest FILE` ----------------------------------------------------------


def _manifest_lines(workdir: Path, write_audio) -> dict[str, tuple[bytes, str]]:
    audio = workdir / "u.wav"
    write_audio(audio, 0.5)
    good = f'{{"id": "a", "path": "{audio}", "duration": 0.5, "text": "HELLO", "speaker": "s"}}'
    return {  # name: (file contents, what the error must say)
        "malformed line": (f"{good}\n{{not json\n".encode(), "m.jsonl:2:"),
        "missing field": (f'{good}\n{{"id": "b", "path": "{audio}", "text": "HI", "speaker": "s"}}\n'.encode(),
                          "m.jsonl:2:"),
        "wrong type": (f'{{"id": "a", "path": "{audio}", "duration": "long", "text": "HI", "speaker": "s"}}\n'.encode(),
                       "m.jsonl:1:"),
        "empty": (b"", "m.jsonl"),
        "duplicate id": (f"{good}\n{good}\n".encode(), "m.jsonl:2:"),
        "latin-1 text": (good.replace("HELLO", "CAF\u00c9").encode("latin-1") + b"\n", "m.jsonl:1:"),
    }


@pytest.mark.parametrize("case", ["malformed line", "missing field", "wrong type", "empty", "duplicate id",
                                  "latin-1 text"])
def test_bad_manifest_is_one_line_with_file_and_line(case, workdir, checkpoint, capsys, write_audio):
    contents, where = _manifest_lines(workdir, write_audio)[case]
    (workdir / "m.jsonl").write_bytes(contents)
    refused(["evaluate", "--checkpoint", str(checkpoint), "--manifest", "m.jsonl", "--decoder", "greedy"],
            capsys, workdir, where)


def test_manifest_with_non_ascii_text_and_a_missing_audio_file(workdir, checkpoint, capsys, write_audio):
    """Accented text is normalised as LibriSpeech transcripts are; a missing audio file is skipped and counted."""
    audio = workdir / "u.wav"
    write_audio(audio, 0.5)
    (workdir / "m.jsonl").write_text(
        f'{{"id": "a", "path": "{audio}", "duration": 0.5, "text": "Caf\u00e9 \u00fcber", "speaker": "s"}}\n'
        f'{{"id": "b", "path": "{workdir / "gone.wav"}", "duration": 0.5, "text": "GONE", "speaker": "s"}}\n',
        encoding="utf-8")
    rc, out, err, _ = _run(["evaluate", "--checkpoint", str(checkpoint), "--manifest", "m.jsonl", "--decoder",
                            "greedy", "--out", "eval"], capsys, workdir)
    assert rc == 0, err
    import json

    result = json.loads((workdir / "eval" / "evaluation.json").read_text())
    [split] = result["splits"].values()
    assert split["utterances"] == 1 and [u["id"] for u in split["skipped"]] == ["b"]
    assert "1 utterance(s) skipped" in err


# --- checkpoints: `asr transcribe CKPT FILE` --------------------------------------------------------------


class _RunsCode:
    """A pickle that would create a file if loading executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _other_shape(workdir: Path, make_checkpoint) -> Path:
    path = make_checkpoint(workdir / "other.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["asr"]["model_config"]["rnn_hidden"] = 32  # the saved weights are for 16
    torch.save(ckpt, path)
    return path


def _truncated(workdir: Path, make_checkpoint) -> Path:
    data = make_checkpoint(workdir / "whole.ckpt").read_bytes()
    (workdir / "whole.ckpt").unlink()
    (workdir / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return workdir / "cut.ckpt"


def _plain_dict(workdir: Path, _) -> Path:
    torch.save({"weights": torch.zeros(2)}, workdir / "p.ckpt")
    return workdir / "p.ckpt"


BAD_CHECKPOINTS = {  # name: (make(folder, make_checkpoint) -> path, what the error must say)
    "random bytes": (lambda d, _: _file(d / "r.ckpt", np.random.default_rng(1).bytes(5000)),
                     "not a readable checkpoint"),
    "zero bytes": (lambda d, _: _file(d / "z.ckpt", b""), "empty file"),
    "text file": (lambda d, _: _file(d / "t.ckpt", "epoch=3 step=100\n"),
                  "not a readable checkpoint"),
    "truncated": (_truncated, "not a readable checkpoint"),
    "directory": (lambda d, _: _folder(d / "dir.ckpt"), "not a checkpoint file"),
    "missing": (lambda d, _: d / "absent.ckpt", "checkpoint not found"),
    "another vocabulary": (lambda d, make_checkpoint: make_checkpoint(d / "v.ckpt",
                                                                      vocabulary_override=["<blank>", "A"]),
                           "vocabulary mismatch"),
    "another network shape": (_other_shape, "weights do not fit the saved network config"),
    "a plain dict": (_plain_dict,
                     "not a checkpoint of this project"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_it(case, workdir, capsys, make_checkpoint, write_audio):
    make, reason = BAD_CHECKPOINTS[case]
    path = make(workdir, make_checkpoint)
    write_audio(workdir / "a.wav", 0.3)
    line = refused(["transcribe", str(path), "a.wav"], capsys, workdir, reason)
    assert str(path) in line


def test_loading_a_checkpoint_never_runs_its_code(workdir, capsys, write_audio):
    marker = workdir / "code-ran"
    with open(workdir / "evil.ckpt", "wb") as f:
        pickle.dump({"asr": _RunsCode(marker), "state_dict": {}}, f)
    write_audio(workdir / "a.wav", 0.3)
    refused(["transcribe", "evil.ckpt", "a.wav"], capsys, workdir, "evil.ckpt: not a readable checkpoint")
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_blames_the_device_not_the_file(workdir, checkpoint, capsys, write_audio):
    write_audio(workdir / "a.wav", 0.3)
    refused(["transcribe", str(checkpoint), "a.wav", "--device", "cuda"], capsys, workdir,
            "--device cuda: no CUDA GPU")
    refused(["transcribe", str(checkpoint), "a.wav", "--device", "tpu9"], capsys, workdir, "--device tpu9")


# --- configs: `asr train` ---------------------------------------------------------------------------------


@pytest.fixture
def corpus(workdir, write_corpus):
    """A corpus already indexed, so that a refused run has no reason to write anything."""
    from asr.data.librispeech import prepare_splits

    root = workdir / "corpus"
    splits = {"train": 100, "dev": 200, "test-clean": 300, "test-unseen-voice": 400}
    for split, speaker in splits.items():
        write_corpus(root, split, {f"{speaker}-1-{i:04d}": (0.6, "THE CAT SAT") for i in range(3)})
    prepare_splits(root, list(splits), workers=1, progress=False)
    return root


@pytest.fixture
def train_argv(tiny_recipe, shrink_overrides):
    """train_argv(corpus, *extra) -> argv of `asr train`: the shrunk tiny recipe into ./run, no evaluation."""

    def argv(corpus: Path, *extra: str) -> list[str]:
        return ["train", "--config", str(tiny_recipe), "--data.root", str(corpus), "--trainer.default_root_dir", "run",
                *shrink_overrides, "--evaluate", "false", *extra]

    return argv


BAD_CONFIGS = {
    "unknown key": (["--model.hiden", "3"], "--model.hiden"),
    "wrong type": (["--model.lr", "fast"], "model.lr", "Expected a <class 'float'>. Got value: fast"),
    "negative lr": (["--model.lr", "-0.01"], "model.lr -0.01: must be > 0.0"),
    "zero epochs": (["--trainer.max_epochs", "0"], "trainer.max_epochs 0: must be at least 1"),
    "negative epochs": (["--trainer.max_epochs", "-3"], "trainer.max_epochs -3"),
    "zero accumulation": (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches 0"),
    "zero layers": (["--model.net.rnn_layers", "0"], "rnn_layers 0: must be >= 1"),
    "zero checkpoint interval": (["--checkpoint_every_n_steps", "0"], "checkpoint_every_n_steps 0"),
    "nan checkpoint minutes": (["--checkpoint_every_minutes", "nan"], "checkpoint_every_minutes", "nan"),
    "zero beam": (["--beam_size", "0"], "beam_size 0"),
    "bad optimizer": (["--model.optimizer", "adamax"], "model.optimizer 'adamax'"),
    "missing data root": (["--data.root", "nowhere"], "nowhere"),
    "missing checkpoint to resume": (["--ckpt_path", "nothing.ckpt"], "nothing.ckpt: checkpoint not found"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_training_config_is_one_line_and_makes_no_run_folder(case, corpus, workdir, capsys, train_argv):
    extra, *reason = BAD_CONFIGS[case]
    argv = train_argv(corpus, *extra)
    if case == "missing data root":
        argv[argv.index("--data.root") + 1] = "nowhere"
    refused(argv, capsys, workdir, *reason)
    assert not (workdir / "run").exists()


def test_a_config_file_with_an_unknown_key(corpus, workdir, capsys, train_argv):
    (workdir / "mine.yaml").write_text("model:\n  rnn_hiddn: 64\n")
    refused(train_argv(corpus, "--config", "mine.yaml"), capsys, workdir, "rnn_hiddn")
    refused(train_argv(corpus, "--config", "absent.yaml"), capsys, workdir, "absent.yaml")


# --- CLI --------------------------------------------------------------------------------------------------


def test_unknown_commands(workdir, capsys):
    for argv in (["frobnicate"], ["data", "frobnicate"], ["ops", "rebuild"]):
        rc, _, err, _ = _run(argv, capsys, workdir)
        assert rc == 2 and err.startswith(f"asr: unknown command {' '.join(argv)!r}"), err


@pytest.mark.parametrize("group", [["data"], ["data", "prepare"], ["ops"], ["bench"], ["lm"]])
def test_every_group_has_help(group, workdir, capsys):
    from asr.cli import COMMANDS

    rc, out, err, _ = _run([*group, "--help"], capsys, workdir)
    assert rc == 0, err
    members = [" ".join(path) for path in COMMANDS if list(path[: len(group)]) == group]
    assert members and all(member in out for member in members)
    rc, _, err, _ = _run(group, capsys, workdir)  # the command itself is missing
    assert rc == 2 and all(member in err for member in members)


@pytest.mark.parametrize("argv,missing", [
    (["transcribe"], "checkpoint"),
    (["transcribe", "model.ckpt"], "FILE"),
    (["evaluate"], "--checkpoint"),
    (["lm", "build", "text.txt"], "out"),
    (["data", "prepare", "librispeech"], "--root"),
])
def test_missing_required_argument_is_one_line(argv, missing, workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    line = _one_error_line(capsys.readouterr().err, "asr " + _command_path(argv))
    assert "required" in line and missing in line


# --- other files and options ------------------------------------------------------------------------------


def test_decoder_options(workdir, checkpoint, capsys, write_audio):
    write_audio(workdir / "a.wav", 0.3)
    base = ["transcribe", str(checkpoint), "a.wav"]
    refused(base + ["--decoder", "beam", "--beam-size", "0"], capsys, workdir, "--beam-size 0: must be >= 1")
    refused(base + ["--chunk-seconds", "nan"], capsys, workdir, "--chunk-seconds nan")
    refused(base + ["--chunk-seconds", "inf"], capsys, workdir, "--chunk-seconds inf")
    refused(base + ["--lm-weight", "2"], capsys, workdir, "--lm-weight: only used by the beam decoder")
    refused(base + ["--decoder", "beam", "--lm-weight", "nan", "--lm", "x.arpa"], capsys, workdir, "--lm-weight nan")


def test_evaluate_out_that_is_a_file_is_refused_before_evaluating(workdir, checkpoint, capsys, write_audio):
    write_audio(workdir / "a.wav", 0.3)
    (workdir / "m.jsonl").write_text(f'{{"id": "a", "path": "{workdir / "a.wav"}", "duration": 0.3, '
                                     f'"text": "HI", "speaker": "s"}}\n', encoding="utf-8")
    (workdir / "results").write_text("my own notes\n")
    refused(["evaluate", "--checkpoint", str(checkpoint), "--manifest", "m.jsonl", "--decoder", "greedy",
             "--out", "results"], capsys, workdir, "--out results", "not a folder")
    assert (workdir / "results").read_text() == "my own notes\n"


def test_lm_build_inputs_and_outputs(workdir, capsys, write_audio):
    write_audio(workdir / "random.wav", 0.3)
    (workdir / "t.txt").write_text("HELLO WORLD\n")
    (workdir / "keep.txt").write_text("not a language model\n")
    refused(["lm", "build", "random.wav", "o.arpa"], capsys, workdir, "random.wav")
    refused(["lm", "build", "t.txt", str(workdir)], capsys, workdir, str(workdir))
    refused(["lm", "build", "t.txt", "keep.txt"], capsys, workdir, "keep.txt")
    refused(["lm", "build", "absent.txt", "o.arpa"], capsys, workdir, "absent.txt")


def test_synth_never_deletes_what_it_did_not_make(workdir, capsys):
    keep = workdir / "data" / "LibriSpeech" / "train-clean-100" / "1" / "1" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("keep")
    refused(["data", "synth", "--out", "data", "--hours", "0.01"], capsys, workdir,
            "--out data: holds files that `asr data synth` did not make (LibriSpeech)", "choose a new or empty folder")
    assert keep.read_text() == "keep"
    (workdir / "a-file").write_text("x")
    refused(["data", "synth", "--out", "a-file", "--hours", "0.01"], capsys, workdir, "--out a-file", "not a folder")
    refused(["data", "synth", "--out", "new", "--hours", "nan"], capsys, workdir, "--hours nan")


def test_synth_refuses_to_replace_another_corpus_without_force(workdir, capsys):
    """A corpus made by synth (its owner file and a complete-corpus record), asked for with other options."""
    import json

    from asr.data.synth import CORPUS_FILE, CORPUS_VERSION, OWNER_FILE

    corpus = workdir / "data" / "synth"
    (corpus / "LibriSpeech" / "train").mkdir(parents=True)
    (corpus / OWNER_FILE).write_text("made by asr data synth\n")
    (corpus / CORPUS_FILE).write_text(json.dumps({"version": CORPUS_VERSION, "hours_requested": 9.0, "seed": 0,
                                                  "held_out_speakers": [1401, 2032], "utterances": 0}))
    refused(["data", "synth", "--out", "data/synth", "--hours", "1"], capsys, workdir,
            "holds another corpus", "--hours 9.0", "pass --force to replace it")


def test_data_summary_of_a_missing_root(workdir, capsys):
    refused(["data", "summary", "--root", "nowhere"], capsys, workdir, "nowhere", "no such directory")
