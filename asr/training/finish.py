"""The end of a training run: the word LM, beam tuning on dev, evaluation of the test splits, report."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as L
import torch

from asr.data.datamodule import ASRDataModule
from asr.data.synth import LM_TEXT_FILE  # a corpus's text-only LM corpus, beside LibriSpeech/
from asr.errors import UserError
from asr.training.budget import budget_summary
from asr.training.module import SpeechRecognizer
from asr.training.run_folder import BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, LM_FILE
from asr.training.timing import OpTiming

LM_ORDER = 3
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
            "budget": budget_summary(stats),  # None unless trained to --budget_minutes
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


def tune_beam_on_dev(recognizer, datamodule: ASRDataModule, lm_path, lexicon: list[str], report: dict,
                     max_utterances: int | None = None) -> tuple[float, float]:
    """The LM weight and word score with the lowest beam+LM WER on the dev split (never a test split),
    or on `max_utterances` of it spread evenly: asr.inference.tuning.tune_beam, the tuner `asr evaluate
    --tune-on` uses too."""
    from asr.inference.tuning import tune_beam

    dev = datamodule.test_utterances(datamodule.dev_split)
    tuning = tune_beam(recognizer, dev, lm_path, lexicon, max_utterances=max_utterances)
    report["decoding"] = {"beam_size": recognizer.options.beam_size, "lm_order": LM_ORDER,
                          "lm_weight": tuning.lm_weight, "word_score": tuning.word_score,
                          "tuned_on": datamodule.dev_split, "tuned_on_utterances": tuning.utterances,
                          "dev_wer": tuning.wer,
                          "dev_wer_by_weight/score": {f"{w}/{s}": wer for w, s, wer in tuning.grid}}
    return tuning.lm_weight, tuning.word_score


def finish_run(report: dict, run_dir: Path, datamodule: ASRDataModule, beam_size: int,
               device: torch.device = torch.device("cpu"), trained: SpeechRecognizer | None = None,
               tune_utterances: int | None = None) -> dict:
    """Build the word LM from the training transcripts, evaluate the best checkpoint on every test
    split with greedy and beam+LM decoding, and write report.json + report.md. Decoding goes through
    asr.inference (DecodingOptions, Recognizer), as `asr evaluate` does."""
    from asr.decode import GreedyDecoder
    from asr.evaluate import evaluate
    from asr.inference import DecodingOptions, Recognizer
    from asr.inference.decoders import build_decoders
    from asr.lm import build_arpa
    from asr.model.inference import load_for_inference
    from asr.report import write_report

    started = time.perf_counter()
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
    options = DecodingOptions(decoder="both", beam_size=beam_size, lm=str(lm_path), device=str(model.device),
                              max_batch_seconds=datamodule.max_batch_seconds)
    acoustic = Recognizer(model, {"greedy": GreedyDecoder(model.tokenizer)}, options)
    lm_weight, word_score = tune_beam_on_dev(acoustic, datamodule, lm_path, lexicon, report, tune_utterances)
    options = options.with_(lm_weight=lm_weight, word_score=word_score)
    recognizer = Recognizer(model, build_decoders(model.tokenizer, options, lm_path, lexicon), options)
    report["eval"] = {}
    for split in datamodule.test_splits:
        utterances = datamodule.test_utterances(split)
        result = evaluate(recognizer, utterances)
        per_decoder = result.to_dict().get("decoders", {})
        report["eval"][split] = {name: {key: scores.get(key) for key in REPORTED_SCORES} | {"utterances": result.utterances}
                                 for name, scores in per_decoder.items()}
    report["evaluation_seconds"] = time.perf_counter() - started  # LM, beam tuning and the test splits
    write_report(run_dir, report)
    return report
