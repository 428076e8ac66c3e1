"""Shared fixtures: tiny audio files and tiny corpora in LibriSpeech's layout, made in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


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
    return _tone


@pytest.fixture(scope="session")
def write_corpus():
    """write_corpus(root, split, {utt_id: (seconds, transcript)}) -> split directory.

    Writes a 16 kHz FLAC per utterance (its frequency varies by utterance) and one trans.txt per
    chapter, exactly as LibriSpeech publishes them. `seconds=None` writes no audio for that id;
    `transcript=None` writes no transcript line for it.
    """

    def write(root: Path, split: str, utterances: dict[str, tuple[float | None, str | None]]) -> Path:
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

    return write
