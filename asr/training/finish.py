"""The end of a training run: the word LM, beam tuning on dev, evaluation of the test splits, report."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as L
import torch

from asr.data.datamodule import ASRDataModule
from asr.data.synth import LM_TEXT_FILE  # a corpus's text-only LM corpus, beside LibriSpeech/
from asr.errors import UserError
from asr.training.module import SpeechRecognizer
from asr.training.run_folder import BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, LM_FILE
from asr.training.timing import OpTiming

LM_ORDER = 3
BEAM_LM_WEIGHTS = (1.0, 2.0, 3.0, 4.0, 6.0)  # tried on the dev split after training
BEAM_WORD_SCORES = (-3.0, -2.0, -1.0, 0.0)
REPORTED_SCORES = ("wer", "cer", "substitutions", "deletions", "insertions", "reference_words", "rtf")


def _device_name(trainer: L.Trainer) -> str:
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(root)}"
    import platform

    return f"{trainer.world_size} x CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _backend_name(model: SpeechRecognizer) -> str:
    """The requested backend and what it resolved to, e.g. "auto -> persistent"."""
    if model.config.rnn_cell == "gru":
        return "torch.nn.GRU"
    from asr.ops.dispatch import backends_used

    used = backends_used()
    return f"{model.config.backend} -> {', '.join(used)}" if used else model.config.backend


def training_report(trainer: L.Trainer, model: SpeechRecognizer, run_dir: Path) -> dict:
    """The report's run, device and training sections (the eval section is added by finish_run)."""
    stats = dict(model.stats)
    audio_seconds = torch.tensor([stats["audio_seconds"], float(stats["utterances"])], dtype=torch.float64)
    timing = next((c for c in trainer.callbacks if isinstance(c, OpTiming)), None)
    op_seconds, op_flops = (timing.seconds(), timing.flops) if timing else (0.0, 0.0)
    op = torch.tensor([op_seconds, op_flops], dtype=torch.float64)
    if trainer.world_size > 1:
        audio_seconds = trainer.strategy.reduce(audio_seconds.to(model.device), reduce_op="sum").cpu()
        op = trainer.strategy.reduce(op.to(model.device), reduce_op="sum").cpu()
    wall = stats["wall_seconds"]
    audio_hours = float(audio_seconds[0]) / 3600
    op_seconds, op_flops = float(op[0]), float(op[1])
    return {
        "run": run_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(trainer),
        "backend": _backend_name(model),
        "parameters": sum(p.numel() for p in model.net.parameters()),
        "config": str(run_dir / CONFIG_FILE),
        "model": {"rnn_cell": model.config.rnn_cell, "rnn_layers": model.config.rnn_layers,
                  "rnn_hidden": model.config.rnn_hidden, "bidirectional": model.config.bidirectional,
                  "vocab_size": model.config.vocab_size, "time_stride": model.config.time_stride},
        "train": {
            "wall_seconds": wall,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "audio_hours": audio_hours,
            "audio_hours_per_wall_hour": audio_hours / (wall / 3600) if wall > 0 else None,
            "utterances_per_second": float(audio_seconds[1]) / wall if wall > 0 else None,
            "rnn_op_seconds": op_seconds,  # summed over ranks
            "rnn_op_tflops": op_flops / op_seconds / 1e12 if op_seconds > 0 else None,
            "nonfinite_batches_skipped": stats["nonfinite_batches_skipped"],
        },
    }


def language_model_texts(datamodule: ASRDataModule) -> tuple[list[str], str]:
    """The word LM's training text: the corpus's text-only LM file (<root>/lm_text.txt, which holds
    the training sentences and other text, never an evaluation sentence) where there is one, like
    LibriSpeech's LM corpus; otherwise the training transcripts."""
    from asr.data.text import normalize_text

    lm_file = Path(datamodule.root) / LM_TEXT_FILE
    if lm_file.is_file():
        lines = [normalize_text(line) for line in lm_file.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        if lines:
            return lines, str(lm_file)
    return [u.text for u in datamodule.train_utterances], "training transcripts"


def spread_subset(items: list, limit: int | None) -> list:
    """At most `limit` of `items`, evenly spaced (deterministic); all of them when limit is None."""
    if limit is None or len(items) <= limit:
        return list(items)
    if limit < 1:
        raise UserError(f"--tune_utterances {limit}: must be at least 1")
    return [items[i * len(items) // limit] for i in range(limit)]


def tune_beam_on_dev(model, datamodule: ASRDataModule, lm_path, lexicon: list[str], beam_size: int,
                     report: dict, max_utterances: int | None = None) -> tuple[float, float]:
    """The LM weight and word score with the lowest beam+LM WER on the dev split (never a test split),
    or on `max_utterances` of it spread evenly (the tuning decodes dev once per candidate).
    The acoustic model runs once; every candidate decodes the same log-probabilities."""
    from asr.decode import BeamLMDecoder
    from asr.evaluate import evaluate

    dev = datamodule.test_utterances(datamodule.dev_split)
    dev = spread_subset(sorted(dev, key=lambda u: u.id), max_utterances)
    candidates = {f"{w}/{s}": (w, s) for w in BEAM_LM_WEIGHTS for s in BEAM_WORD_SCORES}
    decoders = {name: BeamLMDecoder(model.tokenizer, lm_path, lexicon, beam_size=beam_size, lm_weight=w, word_score=s)
                for name, (w, s) in candidates.items()}
    result = evaluate(model, dev, decoders, max_batch_seconds=datamodule.max_batch_seconds)
    wers = {name: scores.wer for name, scores in result.scores.items()}
    best = min(wers, key=lambda name: (wers[name], name))
    report["decoding"] = {"beam_size": beam_size, "lm_order": LM_ORDER, "lm_weight": candidates[best][0],
                          "word_score": candidates[best][1], "tuned_on": datamodule.dev_split,
                          "tuned_on_utterances": len(dev),
                          "dev_wer": wers[best], "dev_wer_by_weight/score": wers}
    return candidates[best]


def finish_run(report: dict, run_dir: Path, datamodule: ASRDataModule, beam_size: int,
               device: torch.device = torch.device("cpu"), trained: SpeechRecognizer | None = None,
               tune_utterances: int | None = None) -> dict:
    """Build the word LM from the training transcripts, evaluate the best checkpoint on every test
    split with greedy and beam+LM decoding, and write report.json + report.md."""
    from asr.evaluate import build_decoders, evaluate
    from asr.lm import build_arpa
    from asr.model.inference import load_for_inference
    from asr.report import write_report

    best = run_dir / f"{BEST_CHECKPOINT}.ckpt"
    last = run_dir / f"{LAST_CHECKPOINT}.ckpt"
    checkpoint = best if best.is_file() else last
    if checkpoint.is_file():
        model = load_for_inference(checkpoint, map_location=device)
        report["evaluated_checkpoint"] = str(checkpoint)
    elif trained is not None:  # checkpointing was switched off: evaluate the weights in memory
        model = trained.inference_model()
        report["evaluated_checkpoint"] = None
    else:
        raise UserError(f"{run_dir}: no checkpoint to evaluate")
    texts, lm_source = language_model_texts(datamodule)
    lm_path = build_arpa(texts, run_dir / LM_FILE, order=LM_ORDER)
    lexicon = sorted({w for t in texts for w in t.split()})
    report["language_model"] = {"source": lm_source, "sentences": len(texts), "words": len(lexicon),
                                "order": LM_ORDER}
    lm_weight, word_score = tune_beam_on_dev(model, datamodule, lm_path, lexicon, beam_size, report,
                                             tune_utterances)
    decoders = build_decoders(model.tokenizer, "both", lm_path=lm_path, lexicon=lexicon, beam_size=beam_size,
                              lm_weight=lm_weight, word_score=word_score)
    report["eval"] = {}
    for split in datamodule.test_splits:
        utterances = datamodule.test_utterances(split)
        result = evaluate(model, utterances, decoders, max_batch_seconds=datamodule.max_batch_seconds)
        per_decoder = result.to_dict().get("decoders", {})
        report["eval"][split] = {name: {key: scores.get(key) for key in REPORTED_SCORES} | {"utterances": result.utterances}
                                 for name, scores in per_decoder.items()}
    write_report(run_dir, report)
    return report
