"""ONNX export (asr.export): onnxruntime's log-probabilities equal PyTorch's on ragged batches for every
network form, the clipped ReLU included; `asr export` and `asr transcribe model.onnx` on a model trained here."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from asr.cli import main as asr_main  # noqa: E402
from asr.errors import UserError  # noqa: E402
from asr.export.onnx import build_model  # noqa: E402
from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig, Recurrence  # noqa: E402

TOLERANCE = 1e-4  # the bound on |log-prob difference| for networks at their natural scale
LENGTHS = (157, 40, 3, 101)  # ragged feature frames of the test batch; 3 frames reduce to one output frame

FORMS = {
    "relu-bidirectional-sum": {},
    "tanh": {"rnn_cell": "tanh"},
    "gru": {"rnn_cell": "gru"},
    "concat": {"merge_directions": "concat"},
    "unidirectional-lookahead": {"bidirectional": False, "lookahead": 3},
    "no-batch-norm": {"rnn_batch_norm": False},
}


def _network(seed: int, **form) -> DeepSpeech:
    """A small network with random weights and random BatchNorm statistics (so eval-mode BN is not identity)."""
    torch.manual_seed(seed)
    config = DeepSpeechConfig(n_mels=40, conv_channels=(8, 8), conv_kernels=((11, 11), (11, 5)),
                              conv_strides=((2, 3), (2, 1)), rnn_hidden=24, rnn_layers=2, backend="reference", **form)
    net = DeepSpeech(config)
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


def _batch(n_mels: int = 40, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    features = torch.randn(len(LENGTHS), max(LENGTHS), n_mels, generator=generator)  # (N, T, F)
    features *= (torch.arange(features.shape[1])[None, :] < lengths[:, None])[:, :, None]
    return features, lengths


def _both(net: DeepSpeech):
    """(PyTorch log-probs (N, T', V), lengths), (onnxruntime's) on the ragged batch."""
    features, lengths = _batch(net.config.n_mels)
    with torch.no_grad():
        logits, out_lengths = net(features, lengths)
    expected = logits.log_softmax(-1).transpose(0, 1).numpy()  # (N, T', V)
    session = ort.InferenceSession(build_model(net).SerializeToString(), providers=["CPUExecutionProvider"])
    got, got_lengths = session.run(None, {"features": features.numpy(), "feature_lengths": lengths.numpy()})
    return (expected, out_lengths.numpy()), (got, got_lengths)


@pytest.mark.parametrize("form", list(FORMS))
def test_onnxruntime_equals_pytorch_on_a_ragged_batch(form):
    (expected, lengths), (got, got_lengths) = _both(_network(0, **FORMS[form]))
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got_lengths, lengths)
    assert len(set(lengths.tolist())) == len(LENGTHS)  # ragged: every row has its own length
    for k, n in enumerate(lengths):
        assert np.abs(got[k, :n] - expected[k, :n]).max() <= TOLERANCE, (form, k)
    # the rows really differ (a graph that ignored its inputs would fail here)
    assert np.abs(expected[0, 0] - expected[1, 0]).max() > 1e-3


def test_clipped_relu_ceiling_is_exported():
    """Weights scaled up until the recurrence reaches the ceiling 20: the ONNX RNN's clip must reproduce it.
    Log-probabilities reach hundreds here, so the bound is relative to their size (float32 rounding)."""
    net = _network(0)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    peaks = []
    hook = net.rnns[0].recurrence.register_forward_hook(lambda _m, _i, y: peaks.append(float(y.max())))
    (expected, lengths), (got, _) = _both(net)
    hook.remove()
    assert isinstance(net.rnns[0].recurrence, Recurrence) and peaks and peaks[0] == 20.0  # the clip is exercised
    scale = max(1.0, float(np.abs(expected).max()))
    for k, n in enumerate(lengths):
        assert np.abs(got[k, :n] - expected[k, :n]).max() <= TOLERANCE * scale


def test_export_refuses_other_modules():
    with pytest.raises(UserError, match="DeepSpeech"):
        build_model(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The trained bidirectional test model exported with `asr export` (which checks it with onnxruntime)."""
    run = trained_run("bidirectional")
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    assert asr_main(["export", str(run / "last.ckpt"), "--onnx", str(out)]) == 0
    return run / "last.ckpt", out


def test_asr_export_writes_graph_and_settings(exported, capsys, monkeypatch):
    from asr.model.inference import load_for_inference

    checkpoint, onnx_path = exported
    side = json.loads(onnx_path.with_suffix(".json").read_text())
    model = load_for_inference(checkpoint)
    assert side["vocabulary"] == list(model.tokenizer.tokens) and side["vocabulary"][0] == "<blank>"
    assert side["feature_config"] == json.loads(json.dumps(model.feature_config.to_dict()))
    assert side["model_config"] == json.loads(json.dumps(model.config.to_dict()))
    assert side["frame_shift_seconds"] == pytest.approx(model.frame_shift_seconds)
    # a second export to the same name is refused, nothing replaced
    before = onnx_path.read_bytes()
    assert asr_main(["export", str(checkpoint), "--onnx", str(onnx_path)]) == 2
    assert "exists" in capsys.readouterr().err and onnx_path.read_bytes() == before
    assert asr_main(["export", str(checkpoint), "--onnx", str(onnx_path.with_suffix(".bin"))]) == 2
    assert ".onnx" in capsys.readouterr().err
    # with --overwrite, a graph that fails the check replaces nothing
    import asr.export.onnx as export

    monkeypatch.setattr(export, "graph_difference", lambda model, graph: 0.5)
    settings = onnx_path.with_suffix(".json").read_bytes()
    assert asr_main(["export", str(checkpoint), "--onnx", str(onnx_path), "--overwrite"]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert onnx_path.read_bytes() == before and onnx_path.with_suffix(".json").read_bytes() == settings


def test_recognizer_on_onnx_gives_the_checkpoints_transcripts(exported, trained_run, letter_wave, sentence):
    from asr.inference import Recognizer

    checkpoint, onnx_path = exported
    texts = [sentence(900 + k) for k in range(4)]
    waves = [letter_wave(t, seed=900 + k).astype(np.float32) for k, t in enumerate(texts)]
    from_torch = Recognizer.load(checkpoint).transcribe(waves)
    from_onnx = Recognizer.load(onnx_path).transcribe(waves)
    assert [t.text for t in from_onnx] == [t.text for t in from_torch]
    assert all(t.text for t in from_onnx)  # an empty result fails
    for a, b in zip(from_onnx, from_torch):
        assert [w.confidence for w in a.words] == pytest.approx([w.confidence for w in b.words], abs=1e-4)
    with pytest.raises(UserError, match="CPU"):
        Recognizer.load(onnx_path, device="cuda")


def test_missing_settings_file_is_named(exported, tmp_path):
    _, onnx_path = exported
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(onnx_path.read_bytes())
    from asr.inference.onnx_model import load_onnx

    with pytest.raises(UserError, match="lone.json"):
        load_onnx(lone)


def test_bench_onnx_reports_both_runtimes(exported, letter_wave, sentence, tmp_path):
    import soundfile as sf

    checkpoint, onnx_path = exported
    files = []
    for k in range(3):
        path = tmp_path / f"u{k}.wav"
        sf.write(path, letter_wave(sentence(950 + k), seed=950 + k), 16000)
        files.append(str(path))
    out = tmp_path / "bench.json"
    assert asr_main(["bench", "onnx", str(checkpoint), *files, "--onnx", str(onnx_path), "--repeats", "1",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runtimes"]) == {"pytorch", "onnxruntime"} and result["files_with_different_text"] == 0
    seconds = sum(sf.info(f).frames for f in files) / 16000
    assert result["audio_seconds"] == pytest.approx(seconds, abs=1e-3) and result["files"] == 3
    for runtime in result["runtimes"].values():  # one repeat: each RTF is its one timing over the audio
        assert len(runtime["network_seconds"]) == len(runtime["transcribe_seconds"]) == 1
        assert runtime["network_rtf"] == pytest.approx(runtime["network_seconds"][0] / result["audio_seconds"], rel=1e-3)
        assert runtime["transcribe_rtf"] == pytest.approx(runtime["transcribe_seconds"][0] / result["audio_seconds"],
                                                          rel=1e-3)
    assert result["network_speedup"] == pytest.approx(
        result["runtimes"]["pytorch"]["network_rtf"] / result["runtimes"]["onnxruntime"]["network_rtf"])
    assert asr_main(["bench", "onnx", str(checkpoint), *files, "--repeats", "0"]) == 2
