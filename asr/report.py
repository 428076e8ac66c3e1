"""Run reports: speed and accuracy side by side.

`write_report(run_dir, report)` writes report.json (the dict as given) and report.md (formatted)
into a run folder; `asr report RUN...` prints several runs as one table, a column per run.

The report dict (written by training):
    {"run", "created", "device", "backend", "parameters", "config",
     "train": {"wall_seconds", "epochs", "steps", "audio_hours", "audio_hours_per_wall_hour",
               "utterances_per_second", "rnn_op_seconds", "rnn_op_tflops", "nonfinite_batches_skipped",
               "budget": {"minutes", "planned_steps", "seconds_per_step", "plans"} or None},
     "evaluation_seconds",
     "eval": {split: {decoder: {"wer", "cer", "substitutions", "deletions", "insertions",
                                "reference_words", "utterances", "rtf"}}}}
Any key may be missing or malformed: it shows as "—", never as an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from asr.errors import UserError
from asr.fileio import atomic_write_text

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
MISSING = "—"


def _get(mapping, *keys):
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
    value = _number(x)
    return MISSING if value is None else format(value * scale, spec)


def _text(x) -> str:
    return MISSING if x is None or x == "" else str(x).replace("|", "\\|").replace("\n", " ")


def _duration(x) -> str:
    seconds = _number(x)
    if seconds is None:
        return MISSING
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _int(x) -> str:
    value = _number(x)
    return MISSING if value is None else f"{int(value):,}"


def _budget(budget) -> str:
    """`12.0 min -> 1,234 steps at 0.512 s/step`, or "—" for a run without a budget."""
    if not isinstance(budget, dict):
        return MISSING
    return (f"{_fmt(budget.get('minutes'), '.1f')} min -> {_int(budget.get('planned_steps'))} steps at "
            f"{_fmt(budget.get('seconds_per_step'), '.3f')} s/step")


# rows of the speed section: (label, formatter of the report)
SPEED_ROWS = [
    ("device", lambda r: _text(_get(r, "device"))),
    ("op backend", lambda r: _text(_get(r, "backend"))),
    ("parameters", lambda r: _int(_get(r, "parameters"))),
    ("training wall time", lambda r: _duration(_get(r, "train", "wall_seconds"))),
    ("time budget", lambda r: _budget(_get(r, "train", "budget"))),
    ("evaluation wall time", lambda r: _duration(_get(r, "evaluation_seconds"))),
    ("epochs / steps", lambda r: f"{_int(_get(r, 'train', 'epochs'))} / {_int(_get(r, 'train', 'steps'))}"),
    ("audio hours processed", lambda r: _fmt(_get(r, "train", "audio_hours"), ".2f")),
    ("audio hours per wall hour", lambda r: _fmt(_get(r, "train", "audio_hours_per_wall_hour"), ".1f")),
    ("utterances / s", lambda r: _fmt(_get(r, "train", "utterances_per_second"), ".1f")),
    ("recurrent op time", lambda r: _duration(_get(r, "train", "rnn_op_seconds"))),
    ("recurrent op TFLOP/s", lambda r: _fmt(_get(r, "train", "rnn_op_tflops"), ".3f")),
    ("non-finite batches skipped", lambda r: _int(_get(r, "train", "nonfinite_batches_skipped"))),
]


def _eval_entries(report: dict) -> list[tuple[str, str, dict]]:
    entries = []
    evaluation = _get(report, "eval")
    if isinstance(evaluation, dict):
        for split, decoders in evaluation.items():
            if isinstance(decoders, dict):
                for decoder, scores in decoders.items():
                    entries.append((str(split), str(decoder), scores if isinstance(scores, dict) else {}))
    return entries


def format_report(report: dict) -> str:
    """One run as Markdown: a speed table and an accuracy table."""
    if not isinstance(report, dict):
        report = {}
    lines = [f"# Run {_text(_get(report, 'run'))}", ""]
    lines += [f"created {_text(_get(report, 'created'))} · config `{_text(_get(report, 'config'))}`", ""]
    lines += ["## Speed", "", "| | |", "|---|---:|"]
    lines += [f"| {label} | {row(report)} |" for label, row in SPEED_ROWS]
    lines += ["", "## Accuracy", ""]
    entries = _eval_entries(report)
    if not entries:
        lines.append("No evaluation recorded.")
    else:
        lines += ["| split | decoder | WER % | CER % | sub | del | ins | ref words | utterances | RTF |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for split, decoder, s in entries:
            lines.append(
                f"| {_text(split)} | {_text(decoder)} | {_fmt(s.get('wer'), '.2f', 100)} | {_fmt(s.get('cer'), '.2f', 100)} | "
                f"{_int(s.get('substitutions'))} | {_int(s.get('deletions'))} | {_int(s.get('insertions'))} | "
                f"{_int(s.get('reference_words'))} | {_int(s.get('utterances'))} | {_fmt(s.get('rtf'), '.3f')} |"
            )
        decoding, lm = _get(report, "decoding"), _get(report, "language_model")
        if isinstance(decoding, dict) and isinstance(lm, dict):
            lines += ["", f"beam+lm: beam {_text(decoding.get('beam_size'))}, {_text(lm.get('order'))}-gram word LM "
                          f"from {_text(lm.get('source'))} ({_int(lm.get('sentences'))} sentences, "
                          f"{_int(lm.get('words'))} words); LM weight {_text(decoding.get('lm_weight'))}, word score "
                          f"{_text(decoding.get('word_score'))}, picked on {_text(decoding.get('tuned_on'))} "
                          f"({_int(decoding.get('tuned_on_utterances'))} utterances)"]
    return "\n".join(lines) + "\n"


def format_comparison(reports: list[dict]) -> str:
    """Several runs side by side: a column per run, speed rows then WER/CER per split and decoder."""
    names = [_text(_get(r, "run")) for r in reports]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(reports)]
    for label, row in SPEED_ROWS:
        lines.append(f"| {label} | " + " | ".join(row(r) for r in reports) + " |")
    keys: dict[tuple[str, str], None] = {}
    for r in reports:
        for split, decoder, _ in _eval_entries(r):
            keys[(split, decoder)] = None
    for metric, label in (("wer", "WER %"), ("cer", "CER %")):
        for split, decoder in keys:
            cells = [_fmt(_get(r, "eval", split, decoder, metric), ".2f", 100) for r in reports]
            lines.append(f"| {label} {_text(split)} {_text(decoder)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.md into run_dir (atomically each); returns their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = (run_dir / REPORT_JSON, run_dir / REPORT_MARKDOWN)
    contents = (json.dumps(report, indent=2, default=str) + "\n", format_report(report))
    for path, content in zip(paths, contents):
        atomic_write_text(path, content)
    return paths


def read_report(run: str | os.PathLike) -> dict:
    """A run folder's report.json (or the file itself); UserError if missing or not JSON."""
    path = Path(run)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise UserError(f"{run}: no {REPORT_JSON} (has the run finished?)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable report ({err})") from None
    if not isinstance(report, dict):
        raise UserError(f"{path}: not a report (expected a JSON object)")
    report.setdefault("run", Path(run).name if Path(run).is_dir() else path.parent.name)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their report.json)")


def run(args: argparse.Namespace) -> int:
    reports, failures = [], 0
    for run_path in args.runs:
        try:
            reports.append(read_report(run_path))
        except UserError as err:
            failures += 1
            print(f"asr report: error: {err}", file=sys.stderr)
    if not reports:
        raise UserError("no readable report among the runs given")
    print(format_report(reports[0]) if len(reports) == 1 else format_comparison(reports), end="")
    return 1 if failures else 0
