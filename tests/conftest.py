"""Shared fixtures: tiny audio files and tiny corpora in LibriSpeech's layout, made in tmp_path; a scripted
stand-in model and a tiny real checkpoint; the tiny recipe shrunk to seconds; and, around every test,
the process-wide state (torch threads and backend flags, signal handlers, cwd, environment) put back
as it was.

Test modules get these helpers as fixtures, never by importing conftest or another test module."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "synth" / "tiny.yaml"
WORDS = "THE CAT SAT ON A MAT WITH HER DOG AND RAN TO THE OLD RED BARN BY NIGHT".split()
# A network small enough for a CPU test: one narrow layer after two narrow convolutions.
SHRINK = ("--model.net.conv_channels", "[4, 4]", "--model.net.rnn_layers", "1", "--model.net.rnn_hidden", "16",
          "--model.warmup_steps", "2", "--data.num_workers", "0", "--data.max_batch_seconds", "4",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.log_every_n_steps", "1")
SAMPLE_RATE = 16000


# --- process-wide state, restored around every test ---------------------------------------------------

RESTORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _fp32_precision_nodes() -> tuple:
    """torch's per-backend fp32_precision settings (the API that replaced allow_tf32 and the matmul precision;
    none on a torch that predates it). They hold more than the legacy getters show: a test that sets
    allow_tf32 after set_float32_matmul_precision leaves them inconsistent, and the legacy getters raise."""
    nodes = []
    for name in ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                 "mkldnn.rnn"):  # parents before children
        node = torch.backends
        try:
            for part in filter(None, name.split(".")):
                node = getattr(node, part)
            node.fp32_precision
        except (AttributeError, RuntimeError):
            continue
        nodes.append(node)
    return tuple(nodes)


FP32_PRECISION_NODES = _fp32_precision_nodes()
LEGACY_FLAGS = (  # (get, set) of what the legacy API shows; a getter raises when the new-API state is inconsistent
    (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    (lambda: torch.backends.cuda.matmul.allow_tf32, lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    (lambda: torch.backends.cudnn.allow_tf32, lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
)


def _legacy(get):
    try:
        return get()
    except RuntimeError:
        return None


def _torch_state() -> tuple:
    return (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
            tuple(node.fp32_precision for node in FP32_PRECISION_NODES),
            tuple(_legacy(get) for get, _ in LEGACY_FLAGS))


def _restore_torch_state(state: tuple) -> None:
    threads, benchmark, deterministic, precisions, legacy = state
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = deterministic
    # The legacy matmul precision first (it also sets hidden state that only the legacy API reaches), then the
    # per-backend settings exactly, then whatever legacy flag still reads differently.
    (get_precision, set_precision), *flags = LEGACY_FLAGS
    if legacy[0] is not None and _legacy(get_precision) != legacy[0]:
        set_precision(legacy[0])
    for node, value in zip(FP32_PRECISION_NODES, precisions):
        if node.fp32_precision != value:
            node.fp32_precision = value
    for (get, set_), value in zip(flags, legacy[1:]):
        if value is not None and _legacy(get) != value:
            set_(value)


PYTEST_OWN = "PYTEST_CURRENT_TEST"  # pytest sets it for each phase of a test itself


def _restore_environment(saved: dict[str, str]) -> None:
    for key in [key for key in os.environ if key not in saved and key != PYTEST_OWN]:
        del os.environ[key]
    for key, value in saved.items():
        if key != PYTEST_OWN and os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def restore_process_state():
    """After every test, puts back torch's threads and precision/cuDNN flags, 3 signal handlers, cwd and os.environ."""
    torch_state = _torch_state()
    handlers = {signum: signal.getsignal(signum) for signum in RESTORED_SIGNALS}
    cwd = os.getcwd()
    environment = os.environ.copy()
    yield
    _restore_torch_state(torch_state)
    for signum, handler in handlers.items():
        if handler is not None and signal.getsignal(signum) is not handler:  # None: not set from Python
            signal.signal(signum, handler)
    try:
        moved = os.getcwd() != cwd
    except FileNotFoundError:  # the test's working directory was removed under it
        moved = True
    if moved:
        os.chdir(cwd)
    _restore_environment(environment)


# --- audio and corpora ----------------------------------------------------------------------------------


def _tone(seconds: float, sample_rate: int = 16000, freq: float = 440.0, amplitude: float = 0.3,
          noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A sine (plus optional white noise), float64, (samples,)."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    wave = amplitude * np.sin(2 * np.pi * freq * t)
    if noise:
        wave = wave + noise * np.random.default_rng(seed).standard_normal(t.shape)
    return wave


@pytest.fixture(scope="session")
def tone():
    """tone(seconds, sample_rate=16000, freq=440.0, amplitude=0.3, noise=0.0, seed=0) -> float64 sine wave."""
    return _tone


def _wav_with_rate(path: Path, rate: int) -> Path:
    """A valid 16 kHz WAV whose header then claims `rate` Hz (and the matching byte rate)."""
    sf.write(path, _tone(0.1, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    raw[24:28] = rate.to_bytes(4, "little")  # fmt chunk: sample rate, then bytes per second
    raw[28:32] = (2 * rate).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture(scope="session")
def wav_with_rate():
    """wav_with_rate(path, rate) -> path: a valid 16 kHz WAV whose header then claims `rate` Hz."""
    return _wav_with_rate


def _write_corpus(root: Path, split: str, utterances: dict[str, tuple[float | None, str | None]]) -> Path:
    base = Path(root) / "LibriSpeech" / split
    lines: dict[Path, list[str]] = {}
    for k, (utt_id, (seconds, text)) in enumerate(sorted(utterances.items())):
        speaker, chapter, _ = utt_id.split("-")
        chapter_dir = base / speaker / chapter
        chapter_dir.mkdir(parents=True, exist_ok=True)
        trans = chapter_dir / f"{speaker}-{chapter}.trans.txt"
        lines.setdefault(trans, [])
        if seconds is not None:
            wave = _tone(seconds, freq=200.0 + 50 * k, noise=0.05, seed=k)
            sf.write(chapter_dir / f"{utt_id}.flac", wave, 16000, format="FLAC", subtype="PCM_16")
        if text is not None:
            lines[trans].append(f"{utt_id} {text}\n")
    for trans, text_lines in lines.items():
        trans.write_text("".join(text_lines), encoding="utf-8")
    return base


@pytest.fixture(scope="session")
def write_corpus():
    """write_corpus(root, split, {utt_id: (seconds, transcript)}) -> split directory.

    Writes a 16 kHz FLAC per utterance (its frequency varies by utterance) and one trans.txt per
    chapter, exactly as LibriSpeech publishes them. `seconds=None` writes no audio for that id;
    `transcript=None` writes no transcript line for it.
    """
    return _write_corpus


def _sentence(k: int) -> str:
    return " ".join(WORDS[(k * 7 + j * 3) % len(WORDS)] for j in range(2 + k % 3))


@pytest.fixture(scope="session")
def sentence():
    """sentence(k) -> a transcript of 2 to 4 words from a small vocabulary, the same for the same k."""
    return _sentence


def _write_tiny_corpus(root: Path) -> Path:
    splits = {"train": (24, 100), "dev": (4, 200), "test-clean": (3, 300), "test-unseen-voice": (3, 400)}
    for split, (count, speaker) in splits.items():
        _write_corpus(root, split, {f"{speaker}-1-{i:04d}": (0.8 + 0.1 * (i % 5), _sentence(speaker + i))
                                    for i in range(count)})
    return root


@pytest.fixture(scope="session")
def write_tiny_corpus():
    """write_tiny_corpus(root) -> root: the splits the tiny recipe trains, tunes and tests on (24/4/3/3 utterances)."""
    return _write_tiny_corpus


# --- a scripted stand-in model, a tiny real checkpoint, and audio for them ------------------------------


@pytest.fixture(scope="session")
def features():
    """The FeatureConfig of the scripted model, of make_checkpoint's network and of write_audio: 8 mel bins."""
    from asr.data.features import FeatureConfig

    return FeatureConfig(n_mels=8)


@pytest.fixture(scope="session")
def scripted_model(features):
    """ScriptedModel(scripts): an InferenceModel stand-in saying scripts[input length in frames]."""
    from asr.data.tokenizer import CharTokenizer

    class ScriptedModel:
        """Stand-in with the InferenceModel contract: it "recognises" the text scripted for each input
        length (in feature frames), spelling it as a confident CTC path."""

        def __init__(self, scripts: dict[int, str]):
            self.tokenizer = CharTokenizer()
            self.feature_config = features
            self.frame_shift_seconds = features.hop_ms / 1000
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

    return ScriptedModel


@pytest.fixture(scope="session")
def write_audio(features):
    """write_audio(path, seconds) -> feature frames: 16 kHz noise (seeded by its length) written to path."""

    def write(path, seconds):
        rng = np.random.default_rng(int(seconds * 1000))
        sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32), SAMPLE_RATE)
        return features.num_frames(int(seconds * SAMPLE_RATE))

    return write


@pytest.fixture(scope="session")
def make_checkpoint(features):
    """make_checkpoint(path, vocabulary_override=None) -> path: a tiny untrained checkpoint load_for_inference reads."""

    def make(path, vocabulary_override=None):
        """A real (untrained, tiny) checkpoint in the project's format, loadable by load_for_inference."""
        from asr.data.tokenizer import CharTokenizer
        from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig
        from asr.model.inference import NETWORK_PREFIX, checkpoint_payload

        tokenizer = CharTokenizer()
        config = DeepSpeechConfig(
            n_mels=features.n_mels, vocab_size=tokenizer.vocab_size, conv_channels=(4,), conv_kernels=((3, 3),),
            conv_strides=((2, 2),), rnn_cell="gru", rnn_layers=1, rnn_hidden=16, bidirectional=False,
        )
        torch.manual_seed(0)
        net = DeepSpeech(config)
        payload = checkpoint_payload(config, tokenizer, features)
        if vocabulary_override is not None:
            payload["vocabulary"] = vocabulary_override
        state = {NETWORK_PREFIX + k: v for k, v in net.state_dict().items()}
        torch.save({"asr": payload, "state_dict": state}, path)
        return path

    return make


# --- `asr train` on the tiny recipe, shrunk to seconds ----------------------------------------------------


@pytest.fixture(scope="session")
def repo_root():
    """The repository's root folder (a child process's cwd and PYTHONPATH)."""
    return REPO


@pytest.fixture(scope="session")
def tiny_recipe():
    """Path of recipes/synth/tiny.yaml, the recipe the training tests shrink."""
    return RECIPE


@pytest.fixture(scope="session")
def shrink_overrides():
    """`asr train` options (a tuple) that shrink the tiny recipe to seconds on a CPU: a narrow network, no workers."""
    return SHRINK


def _train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(RECIPE), "--data.root", str(corpus), "--trainer.default_root_dir", str(run_dir),
            *SHRINK, *extra]


@pytest.fixture(scope="session")
def train_args():
    """train_args(corpus, run_dir, *extra) -> `asr train` arguments: the shrunk tiny recipe on corpus, into run_dir."""
    return _train_args


# --- a small model that recognises, trained in the tests ----------------------------------------------

LETTER_SECONDS = 0.09  # each letter is a tone this long, then a short gap; a space is a longer gap
LETTER_GAP_SECONDS = 0.02
SPACE_SECONDS = 0.12


def _letter_wave(text: str, seed: int = 0) -> np.ndarray:
    """`text` "spoken" as one tone per letter (a frequency of its own, 300 Hz to 6.6 kHz), a little noise."""
    rng = np.random.default_rng(seed)
    pieces = [np.zeros(int(0.1 * SAMPLE_RATE))]
    for ch in text:
        if ch == " ":
            pieces.append(np.zeros(int(SPACE_SECONDS * SAMPLE_RATE)))
            continue
        freq = 300.0 * 1.13 ** (ord(ch) - ord("A"))
        t = np.arange(int(LETTER_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
        pieces += [0.3 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size), np.zeros(int(LETTER_GAP_SECONDS * SAMPLE_RATE))]
    pieces.append(np.zeros(int(0.1 * SAMPLE_RATE)))
    wave = np.concatenate(pieces)
    return wave + 0.003 * rng.standard_normal(wave.shape)


def _write_letter_corpus(root: Path) -> Path:
    """The tiny recipe's splits with letter-tone "speech" (_letter_wave) of the conftest sentences."""
    splits = {"train": (96, 100), "dev": (6, 200), "test-clean": (6, 300), "test-unseen-voice": (3, 400)}
    for split, (count, speaker) in splits.items():
        chapter = Path(root) / "LibriSpeech" / split / str(speaker) / "1"
        chapter.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            utt_id, text = f"{speaker}-1-{i:04d}", _sentence(speaker + i)
            sf.write(chapter / f"{utt_id}.flac", _letter_wave(text, seed=speaker + i), SAMPLE_RATE, format="FLAC",
                     subtype="PCM_16")
            lines.append(f"{utt_id} {text}\n")
        (chapter / f"{speaker}-1.trans.txt").write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def letter_wave():
    """letter_wave(text, seed=0) -> float64 16 kHz wave that the trained_run models recognise as `text`."""
    return _letter_wave


# `asr train` overrides of the tests' trained models (on top of SHRINK): the bidirectional network, and the
# streaming form (unidirectional + lookahead, features normalised with the training set's statistics);
# without the recipe's signal augmentation, which letter tones do not need in half a minute of training
TRAINED_OVERRIDES = {
    # Time stride 3 (the recipe's is 4): the letter tones (110 ms with their gaps) and the confidence
    # tests' blurred letters were laid out for 30 ms output frames. The streaming kind keeps the recipe's.
    "bidirectional": ("--trainer.max_epochs", "10", "--model.lr", "0.005", "--data.augment", "null",
                      "--model.net.conv_strides", "[[2,3],[2,1]]"),
    "streaming": ("--trainer.max_epochs", "10", "--model.lr", "0.005", "--data.augment", "null",
                  "--model.net.bidirectional", "false", "--model.net.lookahead", "2",
                  "--model.feature_normalization", "global"),
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """trained_run(kind="bidirectional"|"streaming") -> run folder (last.ckpt, config.yaml): the shrunk tiny
    recipe trained for about half a minute on letter-tone speech (_letter_wave), which it then mostly
    recognises. Trained once per session and kind."""
    from asr.training.cli import main

    runs: dict[str, Path] = {}

    def run(kind: str = "bidirectional") -> Path:
        if kind not in runs:
            base = tmp_path_factory.mktemp(f"trained-{kind}")
            corpus = _write_letter_corpus(base / "corpus")
            run_dir = base / "run"
            assert main(_train_args(corpus, run_dir, "--evaluate", "false", *TRAINED_OVERRIDES[kind])) == 0
            runs[kind] = run_dir
        return runs[kind]

    return run


@pytest.fixture(scope="session")
def letter_timing():
    """letter_timing(text, index) -> (start, end) samples of text[index]'s tone in letter_wave(text)."""

    def timing(text: str, index: int) -> tuple[int, int]:
        position = int(0.1 * SAMPLE_RATE)
        for ch in text[:index]:
            position += int(SPACE_SECONDS * SAMPLE_RATE) if ch == " " else (
                int(LETTER_SECONDS * SAMPLE_RATE) + int(LETTER_GAP_SECONDS * SAMPLE_RATE))
        return position, position + int(LETTER_SECONDS * SAMPLE_RATE)

    return timing
