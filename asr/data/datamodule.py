"""Batching for training and evaluation: duration-capped batches, SortaGrad, DDP sharding.

Every batch is a dict:
    features        (N, T, F) float32, zero-padded log-mel frames
    feature_lengths (N,) int64
    targets         (N, L) int64, token ids padded with 0 (the blank, never a target)
    target_lengths  (N,) int64
    texts, ids      list[str]
    durations       list[float], seconds
"""

from __future__ import annotations

import hashlib
import math
import random
import signal
import sys
from pathlib import Path

import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from asr.data.audio import load_audio
from asr.data.augment import AugmentConfig, Augmenter, vtlp_log_mel
from asr.data.features import FeatureConfig, LogMel, SpecAugment, random_speed, speed_perturb
from asr.data.librispeech import load_split
from asr.data.manifest import Utterance
from asr.data.tokenizer import SentencePieceTokenizer, Tokenizer, build_tokenizer, tokenizer_from_state
from asr.errors import AudioError, UserError, check_range
from asr.fileio import atomic_write_bytes

DURATION_BUCKET_SECONDS = 0.5  # utterances this close in length are interchangeable when shuffling


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's share: every utterance on exactly one rank, every rank the same number of batches.

    Uneven counts would leave DDP ranks waiting on each other, so the largest batches are split
    until the count divides evenly.
    """
    if world_size == 1:
        return batches
    batches = [list(b) for b in batches]
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            raise UserError(f"cannot shard {len(batches)} single-utterance batches over {world_size} ranks: too few utterances")
        b = batches.pop(largest)
        batches[largest:largest] = [b[: len(b) // 2], b[len(b) // 2 :]]
    return batches[rank::world_size]


def pack_batches(order: list[int], durations: list[float], max_batch_seconds: float) -> list[list[int]]:
    """Consecutive runs of `order` whose padded length (count x longest) stays within the cap."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0.0
    for i in order:
        d = durations[i]
        if current and (len(current) + 1) * max(longest, d) > max_batch_seconds:
            batches.append(current)
            current, longest = [], 0.0
        current.append(i)
        longest = max(longest, d)
    if current:
        batches.append(current)
    return batches


class DurationBatchSampler(Sampler):
    """Yields lists of (epoch, index). Epoch 0 with SortaGrad goes shortest-first; later epochs shuffle
    utterances within duration buckets, then shuffle the batches. Deterministic for (seed, epoch)."""

    def __init__(self, durations: list[float], max_batch_seconds: float, shuffle: bool = True,
                 sortagrad: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if max_batch_seconds <= 0:
            raise UserError(f"max_batch_seconds {max_batch_seconds}: must be positive")
        self.durations = list(durations)
        self.max_batch_seconds = max_batch_seconds
        self.shuffle, self.sortagrad, self.seed = shuffle, sortagrad, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0  # batches of the current epoch already consumed (resume mid-epoch)
        self._cached: tuple[int, list[list[int]]] | None = None  # (epoch, batches)
        # Lightning calls set_epoch on `loader.batch_sampler.sampler`, not on the batch sampler itself.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fast_forward(self, consumed_batches: int) -> None:
        """Skip the first `consumed_batches` of the next iteration (used when resuming mid-epoch)."""
        self._skip = consumed_batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch` (computed once per epoch: Lightning asks for len() often)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._plan(epoch))
        return self._cached[1]

    def _plan(self, epoch: int) -> list[list[int]]:
        n = len(self.durations)
        if not self.shuffle or (self.sortagrad and epoch == 0):
            order = sorted(range(n), key=lambda i: (self.durations[i], i))
            return shard_batches(pack_batches(order, self.durations, self.max_batch_seconds), self.rank, self.world_size)
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(n))
        rng.shuffle(order)
        order.sort(key=lambda i: math.floor(self.durations[i] / DURATION_BUCKET_SECONDS))  # stable: random within a bucket
        batches = pack_batches(order, self.durations, self.max_batch_seconds)
        rng.shuffle(batches)
        return shard_batches(batches, self.rank, self.world_size)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for batch in self.batches(self.epoch)[skip:]:
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


class UtteranceDataset(Dataset):
    """Loads audio and computes features on the fly; augmentation is seeded by (seed, epoch, index),
    so a resumed run sees exactly the batches an uninterrupted run would.

    With `cache_bytes` > 0, an utterance's features are kept in memory (in the process that loads
    them: the loader's worker, which must then be persistent) until that many bytes are held, when
    they are the same every epoch: no signal augmentation and no speed perturbation. SpecAugment
    masks a copy, after the cache. A cached utterance costs no audio read or STFT in later epochs.
    """

    def __init__(self, utterances: list[Utterance], tokenizer: Tokenizer, feature_config: FeatureConfig,
                 augment: bool = False, spec_augment: bool = True, speed_perturb: bool = False, seed: int = 0,
                 augmentation: AugmentConfig | None = None, cache_bytes: int = 0):
        self.utterances = utterances
        self.tokenizer = tokenizer
        self.logmel = LogMel(feature_config)
        self.augment = augment
        self.spec_augment = SpecAugment() if (augment and spec_augment) else None
        self.speed_perturb = augment and speed_perturb
        self.seed = seed
        # signal augmentation (asr.data.augment), training only; babble is made of other training utterances
        self.augmenter = (Augmenter(augmentation, babble_source=self._babble_talker)
                          if augment and augmentation is not None and augmentation.enabled else None)
        self.cache_bytes = cache_bytes if self.augmenter is None and not self.speed_perturb else 0
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    def _babble_talker(self, rng: random.Random) -> torch.Tensor:
        """A random other utterance's wave (a silent second if it cannot be read: babble never fails a batch)."""
        utt = self.utterances[rng.randrange(len(self.utterances))]
        try:
            return load_audio(utt.path)
        except AudioError:
            return torch.zeros(SAMPLE_RATE)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        utt = self.utterances[index]
        cached = self._cache.get(index)
        if cached is not None:
            feats = cached if self.spec_augment is None else self._spec_augmented(cached, epoch, index)
            return self._item(utt, feats)
        try:
            wave = load_audio(utt.path)
        except AudioError as err:
            print(f"warning: skipping {utt.id}: {err}")
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(epoch, index))
            if self.speed_perturb:
                wave = speed_perturb(wave, random_speed(random.Random(int(torch.randint(1 << 30, ())))))
            alpha = None
            if self.augmenter is not None:
                rng = random.Random(self._seed(epoch, index))
                wave, _ = self.augmenter.wave(wave, rng)
                alpha = self.augmenter.vtlp_factor(rng)
            if alpha is None:
                feats = self.logmel(wave)  # (T, F)
            else:  # vocal-tract-length perturbation: a warped mel filterbank
                feats = self.logmel.normalize(vtlp_log_mel(self.logmel, wave, alpha))  # (T, F)
            nbytes = feats.numel() * feats.element_size()
            if self.cache_bytes and self._cached_bytes + nbytes <= self.cache_bytes:
                self._cache[index] = feats
                self._cached_bytes += nbytes
            if self.spec_augment is not None:
                feats = self.spec_augment(feats.clone() if index in self._cache else feats)
        return self._item(utt, feats)

    def _spec_augmented(self, feats: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """SpecAugment's masks on a copy of cached features: the same masks as when they are computed, whose
        path draws nothing from torch's generator before SpecAugment when the cache is in use."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(epoch, index))
            return self.spec_augment(feats.clone())

    def _seed(self, epoch: int, index: int) -> int:
        """The seed of one utterance's draws in one epoch."""
        return (self.seed * 1_000_003 + epoch) * 10_000_019 + index

    def _item(self, utt: Utterance, feats: torch.Tensor) -> dict:
        return {"features": feats, "targets": self.tokenizer.encode(utt.text), "text": utt.text,
                "id": utt.id, "duration": utt.duration}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM, SIGUSR1 and Ctrl-C to the training process. timeout,
    systemd, docker and SLURM signal the whole process group: a worker that died of it would take
    the trainer down with a traceback before it could write its checkpoint. The trainer stops the
    workers itself, and they exit on their own when it dies."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def collate(items: list[dict | None]) -> dict:
    items = [it for it in items if it is not None]
    if not items:
        return {}
    n, f = len(items), items[0]["features"].shape[1]
    t_max = max(it["features"].shape[0] for it in items)
    l_max = max(len(it["targets"]) for it in items)
    features = torch.zeros(n, t_max, f)  # (N, T, F)
    targets = torch.zeros(n, max(l_max, 1), dtype=torch.long)  # (N, L)
    for k, it in enumerate(items):
        features[k, : it["features"].shape[0]] = it["features"]
        targets[k, : len(it["targets"])] = torch.tensor(it["targets"], dtype=torch.long)
    return {
        "features": features,
        "feature_lengths": torch.tensor([it["features"].shape[0] for it in items], dtype=torch.long),
        "targets": targets,
        "target_lengths": torch.tensor([len(it["targets"]) for it in items], dtype=torch.long),
        "texts": [it["text"] for it in items],
        "ids": [it["id"] for it in items],
        "durations": [it["duration"] for it in items],
    }


class ASRDataModule(L.LightningDataModule):
    """A corpus in LibriSpeech's layout under `root`, as training, dev and test batches.

    It shards batches over DDP ranks itself (`shard_batches`), so trainers run it with
    `use_distributed_sampler=False`.
    """

    def __init__(self, root: str = "data/synth", train_splits: list[str] = ["train"], dev_split: str = "dev",  # noqa: B006
                 test_splits: list[str] = ["test-clean", "test-unseen-voice"], tokenizer: str = "char",  # noqa: B006
                 vocab_size: int = 256, sp_model_type: str = "unigram", max_batch_seconds: float = 120.0,
                 num_workers: int = 2, sortagrad: bool = True, spec_augment: bool = True,
                 speed_perturb: bool = False, n_mels: int = 80, seed: int = 0,
                 limit_utterances: int | None = None, augment: dict | None = None, feature_cache_gb: float = 0.0):
        """augment: signal augmentation of training audio, per transform a probability and its ranges,
        e.g. {"noise": {"p": 0.3, "snr_db": [10, 30]}, "reverb": {"p": 0.2}} (asr.data.augment.AugmentConfig).
        feature_cache_gb: keep up to this many GB of training and dev features in memory (each loader's,
        in its worker, which then persists across epochs), so that later epochs and dev passes read no
        audio; used only where the features are the same every epoch (no signal augmentation or speed
        perturbation; SpecAugment is applied after the cache). 0 turns it off. The log-mel features of an
        hour of audio take 0.115 GB (float32, 80 channels)."""
        super().__init__()
        self.augmentation = AugmentConfig.from_dict(augment)  # UserError naming a bad key, before any work
        self.root = root
        self.train_splits, self.dev_split, self.test_splits = list(train_splits), dev_split, list(test_splits)
        self.max_batch_seconds = max_batch_seconds
        self.num_workers = num_workers
        self.sortagrad, self.spec_augment, self.speed_perturb = sortagrad, spec_augment, speed_perturb
        self.seed = seed
        self.limit_utterances = limit_utterances
        check_range("data.feature_cache_gb", feature_cache_gb, low=0.0)
        self.feature_cache_bytes = int(feature_cache_gb * 1e9)
        self.feature_config = FeatureConfig(n_mels=n_mels)
        self.n_mels = n_mels
        self.train_utterances = [u for s in self.train_splits for u in self._split(s)]
        self.tokenizer = self._tokenizer(tokenizer, vocab_size, sp_model_type)
        self._train_sampler: DurationBatchSampler | None = None
        self._persistent_loaders: list[DataLoader] = []  # stopped by teardown()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _split(self, split: str) -> list[Utterance]:
        utts = load_split(self.root, split)
        if self.limit_utterances is not None and len(utts) > self.limit_utterances:
            utts = sorted(random.Random(self.seed).sample(utts, self.limit_utterances), key=lambda u: u.id)
        return utts

    def _tokenizer(self, kind: str, vocab_size: int, model_type: str) -> Tokenizer:
        texts = [u.text for u in self.train_utterances]
        if kind == "char":
            return build_tokenizer("char", texts)
        # SentencePiece models are cached next to the corpus, keyed by their training text and options.
        key = hashlib.sha256(("\n".join(texts) + f"|{kind}|{vocab_size}|{model_type}").encode()).hexdigest()[:16]
        cache = Path(self.root) / "tokenizers" / f"{kind}-{model_type}-{vocab_size}-{key}.model"
        if cache.exists():
            try:
                return SentencePieceTokenizer.from_file(cache)
            except UserError as err:  # our own cache, named by a hash of what it was built from
                print(f"warning: {err}; training it again", file=sys.stderr)
        tok = build_tokenizer(kind, texts, vocab_size, model_type)
        atomic_write_bytes(cache, tok.model_proto)
        return tok

    def load_tokenizer_state(self, state: dict) -> None:
        """Use a checkpoint's tokenizer (resume, fine-tuning) instead of the one built here."""
        self.tokenizer = tokenizer_from_state(state)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, utterances: list[Utterance], train: bool, cache: bool = False) -> DataLoader:
        if not utterances:
            raise UserError(f"{self.root}: no utterances to load")
        rank, world = self._rank_and_world()
        sampler = DurationBatchSampler([u.duration for u in utterances], self.max_batch_seconds, shuffle=train,
                                       sortagrad=self.sortagrad, seed=self.seed, rank=rank, world_size=world)
        dataset = UtteranceDataset(utterances, self.tokenizer, self.feature_config, augment=train,
                                   spec_augment=self.spec_augment, speed_perturb=self.speed_perturb, seed=self.seed,
                                   augmentation=self.augmentation,
                                   cache_bytes=self.feature_cache_bytes if cache else 0)
        # A worker's cache lives as long as the worker: kept across epochs when there is one to keep.
        persistent = self.num_workers > 0 and dataset.cache_bytes > 0
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                            persistent_workers=persistent, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=ignore_stop_signals if self.num_workers else None)
        if persistent:
            self._persistent_loaders.append(loader)
        return loader

    def teardown(self, stage: str) -> None:
        """Stop persistent workers (Lightning calls this after fit). They ignore SIGTERM, which is how
        multiprocessing ends daemon processes at exit, so one left running would hang the exit."""
        for loader in self._persistent_loaders:
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None
        self._persistent_loaders = []

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_utterances, train=True, cache=True)
        self._train_sampler = loader.batch_sampler
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split(self.dev_split), train=False, cache=True)

    def test_utterances(self, split: str) -> list[Utterance]:
        return self._split(split)

    def dataloader_for(self, utterances: list[Utterance]) -> DataLoader:
        """Evaluation batches (no augmentation, shortest first) for any list of utterances."""
        return self._loader(utterances, train=False)

    @property
    def train_sampler(self) -> DurationBatchSampler | None:
        return self._train_sampler
