"""Test hygiene: conftest.py's autouse fixture `restore_process_state` puts back, after every test, the
process-wide state a test changed. The first test below changes all of it and records what it was; the
second, which pytest runs after it (a module's tests run in file order), finds it as it was. Without the
fixture the second test fails."""

from __future__ import annotations

import os
import signal

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
ADDED = "ASR_TEST_HYGIENE_ADDED"
BEFORE: dict = {}  # filled by the first test, checked by the second


def _environment() -> dict[str, str]:
    """os.environ without the variable pytest itself sets for each phase of each test."""
    return {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}


def _handler(signum, frame):
    pass


def _precision_settings() -> dict:
    settings = {"matmul precision": torch.get_float32_matmul_precision(),
                "cuda matmul allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn allow_tf32": torch.backends.cudnn.allow_tf32,
                "cudnn benchmark": torch.backends.cudnn.benchmark,
                "cudnn deterministic": torch.backends.cudnn.deterministic}
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        settings["cuda matmul fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
        settings["mkldnn matmul fp32_precision"] = torch.backends.mkldnn.matmul.fp32_precision
    return settings


def test_a_test_changes_process_wide_state(tmp_path):
    BEFORE.update(threads=torch.get_num_threads(), precision=_precision_settings(), cwd=os.getcwd(),
                  handlers={signum: signal.getsignal(signum) for signum in SIGNALS}, environ=_environment())
    assert ADDED not in os.environ
    removed = next(key for key in sorted(_environment()) if key != "PATH")

    torch.set_num_threads(1 if BEFORE["threads"] != 1 else 2)
    # what `asr train` does, then the legacy flags on top (which leaves the new-API settings inconsistent)
    torch.set_float32_matmul_precision("medium" if BEFORE["precision"]["matmul precision"] != "medium" else "high")
    torch.backends.cuda.matmul.allow_tf32 = not BEFORE["precision"]["cuda matmul allow_tf32"]
    torch.backends.cudnn.allow_tf32 = not BEFORE["precision"]["cudnn allow_tf32"]
    torch.backends.cudnn.benchmark = not BEFORE["precision"]["cudnn benchmark"]
    torch.backends.cudnn.deterministic = not BEFORE["precision"]["cudnn deterministic"]
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    os.chdir(tmp_path)
    os.environ[ADDED] = "1"
    os.environ["PATH"] = os.environ["PATH"] + os.pathsep + str(tmp_path)
    del os.environ[removed]

    # Everything really changed, so that the next test would see it if nothing put it back.
    assert torch.get_num_threads() != BEFORE["threads"]
    assert torch.backends.cuda.matmul.allow_tf32 != BEFORE["precision"]["cuda matmul allow_tf32"]
    assert torch.backends.cudnn.allow_tf32 != BEFORE["precision"]["cudnn allow_tf32"]
    assert torch.backends.cudnn.benchmark != BEFORE["precision"]["cudnn benchmark"]
    assert torch.backends.cudnn.deterministic != BEFORE["precision"]["cudnn deterministic"]
    assert all(signal.getsignal(signum) is _handler for signum in SIGNALS)
    assert os.getcwd() != BEFORE["cwd"]
    assert _environment() != BEFORE["environ"]


def test_the_next_test_finds_it_as_it_was():
    assert BEFORE, "runs after test_a_test_changes_process_wide_state"
    assert torch.get_num_threads() == BEFORE["threads"]
    assert _precision_settings() == BEFORE["precision"]  # raises if the matmul settings were left inconsistent
    assert {signum: signal.getsignal(signum) for signum in SIGNALS} == BEFORE["handlers"]
    assert os.getcwd() == BEFORE["cwd"]
    assert _environment() == BEFORE["environ"]  # the added key gone, the changed and the removed ones back
