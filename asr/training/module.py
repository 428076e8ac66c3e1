"""SpeechRecognizer: CTC training of a DeepSpeech network, with dev WER/CER after every epoch."""

from __future__ import annotations

import math
import sys
import time

import pytorch_lightning as L
import torch
import torch.nn.functional as F

from asr.errors import UserError, check_range
from asr.model.deepspeech import DeepSpeech, DeepSpeechConfig
from asr.model.inference import CHECKPOINT_KEY, InferenceModel, check_vocabulary, checkpoint_payload

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")  # decay after warmup


class SpeechRecognizer(L.LightningModule):
    """CTC training of a DeepSpeech network; dev WER/CER (greedy) after every epoch."""

    def __init__(
        self,
        net: DeepSpeechConfig = DeepSpeechConfig(),  # noqa: B008  (frozen, so one shared default is safe)
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        momentum: float = 0.9,
        warmup_steps: int = 200,
        schedule: str = "cosine",
        final_lr_ratio: float = 0.05,
        max_nonfinite_in_a_row: int = 10,
        feature_normalization: str = "utterance",
    ):
        """
        Args:
            net: the network (asr.model.deepspeech.DeepSpeechConfig; a recipe sets `model.net.rnn_hidden`
                and so on; n_mels and vocab_size are linked from the data module).
            optimizer: adamw, or sgd (Nesterov momentum).
            warmup_steps: linear warmup from 0 to lr over this many optimizer steps.
            schedule: decay after warmup down to lr * final_lr_ratio at the last step: cosine, linear, constant.
            max_nonfinite_in_a_row: stop training after this many consecutive batches with a non-finite
                loss or gradient (each is skipped and counted).
            feature_normalization: "utterance" (each utterance's own mean and std), or "global" (the
                training set's, computed at setup and saved in the checkpoint): what streaming needs.
        """
        super().__init__()
        # The network's config is saved by the checkpoint's own entry (checkpoint_payload), as plain data.
        self.save_hyperparameters(ignore=["net"])
        if optimizer not in OPTIMIZERS:
            raise UserError(f"model.optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
        if schedule not in SCHEDULES:
            raise UserError(f"model.schedule {schedule!r}: expected one of {SCHEDULES}")
        check_range("model.lr", lr, low=0.0, low_open=True)
        check_range("model.weight_decay", weight_decay, low=0.0)
        check_range("model.momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_range("model.warmup_steps", warmup_steps, low=0)
        check_range("model.final_lr_ratio", final_lr_ratio, low=0.0, high=1.0)
        check_range("model.max_nonfinite_in_a_row", max_nonfinite_in_a_row, low=1)
        from asr.data.features import NORMALIZATIONS

        if feature_normalization not in NORMALIZATIONS:
            raise UserError(f"model.feature_normalization {feature_normalization!r}: expected one of {NORMALIZATIONS}")
        self.config = net
        self.net = DeepSpeech(self.config)
        self.tokenizer = None  # from the data module in setup()
        self.feature_config = None
        self.data_config: dict = {}
        # Training statistics for the report; kept in checkpoints so a resumed run reports the whole run.
        self.stats = {"wall_seconds": 0.0, "audio_seconds": 0.0, "utterances": 0, "nonfinite_batches_skipped": 0}
        self.schedule_steps: int | None = None  # the LR schedule's length when a time budget plans it
        self._nonfinite_in_a_row = 0
        self._bn_snapshot: list[torch.Tensor] | None = None  # taken at an optimizer step's first micro-batch
        self._fit_started = None
        self._dev_counts: list[torch.Tensor] = []

    # -- data and checkpoint plumbing --

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            if self.hparams.feature_normalization == "global" and dm.feature_config.normalization != "global":
                # before any loader exists, so that every split is normalised with these statistics
                from dataclasses import replace

                from asr.data.features import global_statistics

                mean, std = global_statistics([u.path for u in dm.train_utterances], dm.feature_config)
                dm.feature_config = replace(dm.feature_config, normalization="global", mean=mean, std=std)
            self.tokenizer = dm.tokenizer
            self.feature_config = dm.feature_config
            self.data_config = {"root": str(dm.root), "train_splits": list(dm.train_splits)}
            check_vocabulary("data module", dm.tokenizer.tokens, dm.tokenizer, self.config.vocab_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is None:
            raise UserError("cannot save a checkpoint without a tokenizer (train through a data module)")
        payload = checkpoint_payload(self.config, self.tokenizer, self.feature_config)
        payload["data"] = self.data_config
        payload["stats"] = dict(self.stats, wall_seconds=self._wall_seconds())
        checkpoint[CHECKPOINT_KEY] = payload

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        payload = checkpoint.get(CHECKPOINT_KEY)
        if payload is None:
            raise UserError("checkpoint to resume from is not a checkpoint of this project")
        if self.tokenizer is not None:
            check_vocabulary("checkpoint to resume from", payload["vocabulary"], self.tokenizer,
                             self.config.vocab_size)
        self.stats.update(payload.get("stats", {}))

    def inference_model(self) -> InferenceModel:
        return InferenceModel.from_module(self.net, self.tokenizer, self.feature_config)

    # -- optimisation --

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.dim() == 1 else decay).append(p)  # no weight decay on biases and norms
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        warmup = hp.warmup_steps
        total_steps: dict[str, int] = {}

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.schedule == "constant" or step == warmup:
                return 1.0
            # Asked lazily: estimated_stepping_batches sets up the training loader, which must happen
            # after a checkpoint's loader state is restored, not here in configure_optimizers.
            if self.schedule_steps is not None:  # a time budget's plan (asr.training.budget)
                total = max(1, self.schedule_steps)
            else:
                if "n" not in total_steps:
                    total_steps["n"] = max(1, int(self.trainer.estimated_stepping_batches))
                total = total_steps["n"]
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if hp.schedule == "cosine" else 1 - progress
            return hp.final_lr_ratio + (1 - hp.final_lr_ratio) * shape

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _ctc_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits, out_lengths = self.net(batch["features"], batch["feature_lengths"])  # (T', N, V)
        log_probs = logits.float().log_softmax(dim=-1)
        loss = F.ctc_loss(log_probs, batch["targets"], out_lengths.to(log_probs.device), batch["target_lengths"],
                          blank=0, reduction="mean", zero_infinity=True)
        return loss, log_probs

    def _batch_norm_buffers(self) -> list[torch.Tensor]:
        return [b for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def training_step(self, batch: dict, batch_idx: int):
        if not batch:  # every utterance of the batch failed to load
            return None
        # BatchNorm's running statistics change in the forward pass; keep a copy from the first
        # micro-batch of the optimizer step, so a skipped non-finite step leaves them as they were
        # before all of its micro-batches (gradient accumulation), not just the last one.
        if self._bn_snapshot is None:
            self._bn_snapshot = [b.clone() for b in self._batch_norm_buffers()]
        loss, _ = self._ctc_loss(batch)
        self.stats["audio_seconds"] += float(sum(batch["durations"]))
        self.stats["utterances"] += len(batch["durations"])
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(batch["durations"]))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the step when any gradient is NaN/inf. After DDP's all-reduce every rank sees the
        same gradients, so every rank takes the same decision without extra communication."""
        snapshot, self._bn_snapshot = self._bn_snapshot, None  # the next micro-batch starts a new step
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.log("grad_norm", norm, batch_size=1)
        if torch.isfinite(norm):
            self._nonfinite_in_a_row = 0
            return
        if str(self.trainer.precision).startswith("16"):
            return  # fp16's gradient scaler skips the step and lowers its scale itself
        for p in self.parameters():
            p.grad = None  # optimizers skip parameters without a gradient
        for buffer, saved in zip(self._batch_norm_buffers(), snapshot or []):
            buffer.copy_(saved)
        self.stats["nonfinite_batches_skipped"] += 1
        self._nonfinite_in_a_row += 1
        limit = self.hparams.max_nonfinite_in_a_row
        print(f"warning: step {self.global_step}: non-finite loss or gradient, batch skipped "
              f"({self._nonfinite_in_a_row} in a row, stopping at {limit})", file=sys.stderr)
        if self._nonfinite_in_a_row >= limit:
            raise UserError(
                f"training stopped: {self._nonfinite_in_a_row} batches in a row had a non-finite loss or gradient "
                f"(step {self.global_step}); lower model.lr, enable gradient clipping, or check the data"
            )

    # -- validation --

    def on_validation_epoch_start(self) -> None:
        self._dev_counts = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch:
            return
        from asr.decode import GreedyDecoder
        from asr.evaluate import count_edits

        loss, log_probs = self._ctc_loss(batch)
        out_lengths = self.net.output_lengths(batch["feature_lengths"].cpu())
        hyps = GreedyDecoder(self.tokenizer).decode(log_probs.transpose(0, 1).detach().float().cpu(), out_lengths)
        refs = batch["texts"]
        counts = count_edits(refs, [h.text for h in hyps])  # the scoring of asr evaluate
        n = len(refs)
        self._dev_counts.append(torch.tensor([counts.word_edits, counts.reference_words, counts.char_edits,
                                              counts.reference_chars, float(loss) * n, n], dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        counts = torch.stack(self._dev_counts).sum(0) if self._dev_counts else torch.zeros(6, dtype=torch.float64)
        counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        word_errors, word_total, char_errors, char_total, loss_sum, n = counts.tolist()
        if n == 0:
            return
        self.log("dev_wer", word_errors / max(word_total, 1), prog_bar=True, sync_dist=False)
        self.log("dev_cer", char_errors / max(char_total, 1), prog_bar=True, sync_dist=False)
        self.log("dev_loss", loss_sum / n, sync_dist=False)
        self._dev_counts = []

    # -- wall time --

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()

    def _wall_seconds(self) -> float:
        if self._fit_started is None:
            return self.stats["wall_seconds"]
        return self.stats["wall_seconds"] + time.perf_counter() - self._fit_started

    def on_train_end(self) -> None:
        self.stats["wall_seconds"] = self._wall_seconds()
        self._fit_started = None
