"""Run reports: written as JSON + Markdown, compared side by side, robust to missing keys."""

import json

from asr.report import format_comparison, format_report, read_report, write_report

FULL = {
    "run": "tiny",
    "created": "2025-01-01T12:00:00",
    "device": "cpu (2 cores)",
    "backend": "reference",
    "parameters": 1234567,
    "config": "runs/tiny/config.yaml",
    "train": {
        "wall_seconds": 754.4, "epochs": 12, "steps": 3400, "audio_hours": 20.5,
        "audio_hours_per_wall_hour": 97.8, "utterances_per_second": 11.25,
        "rnn_op_seconds": 300.0, "rnn_op_tflops": 0.0123, "nonfinite_batches_skipped": 0,
    },
    "eval": {
        "test-clean": {
            "greedy": {"wer": 0.3012, "cer": 0.0876, "substitutions": 100, "deletions": 20, "insertions": 10,
                       "reference_words": 431, "utterances": 50, "rtf": 0.021},
            "beam+lm": {"wer": 0.1834, "cer": 0.0701, "substitutions": 60, "deletions": 12, "insertions": 7,
                        "reference_words": 431, "utterances": 50, "rtf": 0.035},
        },
    },
}


def test_write_report_writes_both_files(tmp_path):
    json_path, md_path = write_report(tmp_path / "run", FULL)
    assert json.loads(json_path.read_text()) == FULL
    md = md_path.read_text()
    assert "# Run tiny" in md
    assert "| training wall time | 12m 34s |" in md
    assert "| audio hours per wall hour | 97.8 |" in md
    assert "| parameters | 1,234,567 |" in md
    assert "| recurrent op TFLOP/s | 0.012 |" in md
    assert "| test-clean | greedy | 30.12 | 8.76 | 100 | 20 | 10 | 431 | 50 | 0.021 |" in md
    assert "| test-clean | beam+lm | 18.34 | 7.01 |" in md


def test_missing_and_malformed_keys_render_as_dashes():
    md = format_report({"train": {"wall_seconds": "soon", "epochs": None}, "eval": {"dev": {"greedy": {"wer": float("nan")}}, "x": 3}})
    assert "| training wall time | — |" in md
    assert "| device | — |" in md
    assert "| dev | greedy | — | — |" in md
    assert "# Run —" in format_report({})
    assert "No evaluation recorded." in format_report({"eval": []})
    assert "| device | — |" in format_report("not a dict")  # type: ignore[arg-type]


def test_comparison_puts_runs_side_by_side():
    other = {"run": "small", "train": {"wall_seconds": 7200}, "eval": {"test-clean": {"greedy": {"wer": 0.12}},
                                                                       "test-other": {"greedy": {"wer": 0.2, "cer": 0.1}}}}
    table = format_comparison([FULL, other])
    lines = table.splitlines()
    assert lines[0] == "| | tiny | small |"
    assert "| training wall time | 12m 34s | 2h 00m 00s |" in lines
    assert "| WER % test-clean greedy | 30.12 | 12.00 |" in lines
    assert "| WER % test-clean beam+lm | 18.34 | — |" in lines
    assert "| CER % test-other greedy | — | 10.00 |" in lines


def test_command_reads_runs_and_reports_missing_ones(tmp_path, capsys):
    from asr.cli import main

    write_report(tmp_path / "a", FULL)
    write_report(tmp_path / "b", {"train": {"wall_seconds": 60}})
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| | tiny | b |"  # a report without "run" is named by its folder
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "empty")]) == 1
    captured = capsys.readouterr()
    assert "# Run tiny" in captured.out and "no report.json" in captured.err
    assert main(["report", str(tmp_path / "empty")]) == 2
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "report.json").write_text("{not json")
    assert main(["report", str(tmp_path / "c")]) == 2
    assert "not a readable report" in capsys.readouterr().err
    assert read_report(tmp_path / "a" / "report.json")["run"] == "tiny"


def test_decoding_setup_is_stated_under_the_accuracy_table():
    report = dict(FULL, decoding={"beam_size": 50, "lm_weight": 2.0, "word_score": -1.0, "tuned_on": "dev",
                                  "tuned_on_utterances": 200},
                  language_model={"order": 3, "source": "data/synth/lm_text.txt", "sentences": 14551, "words": 15568})
    md = format_report(report)
    assert ("beam+lm: beam 50, 3-gram word LM from data/synth/lm_text.txt (14,551 sentences, 15,568 words); "
            "LM weight 2.0, word score -1.0, picked on dev (200 utterances)") in md
    assert "beam+lm: beam" not in format_report(FULL)
