"""One progress bar for the whole project: live on a terminal, a line every 30 s in logs."""

from __future__ import annotations

import sys


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, disable=not enabled, mininterval=0.2 if interactive else 30.0,
                dynamic_ncols=interactive, **kwargs)
