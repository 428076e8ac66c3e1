"""Batching: duration cap, SortaGrad, deterministic shuffling, DDP sharding, collate, augmentation."""

import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from asr.data.datamodule import (
    ASRDataModule, DurationBatchSampler, UtteranceDataset, collate, pack_batches, shard_batches,
)
from asr.data.features import FeatureConfig, LogMel
from asr.data.audio import load_audio
from asr.data.manifest import Utterance
from asr.data.tokenizer import CharTokenizer, SentencePieceTokenizer
from asr.errors import UserError

CAP = 6.0  # seconds of padded audio per batch


def _durations(n: int = 97, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(0.3, 3.0), 3) for _ in range(n)]


def _flat(batches):
    return [i for b in batches for i in b]


def _padded_seconds(batch, durations):
    return len(batch) * max(durations[i] for i in batch)


# --- packing and the sampler --------------------------------------------------------------------

def test_pack_batches_respects_cap_and_order():
    durations = _durations() + [7.5]  # one utterance longer than the cap goes alone
    order = list(range(len(durations)))
    random.Random(1).shuffle(order)
    batches = pack_batches(order, durations, CAP)
    assert _flat(batches) == order
    for b in batches:
        assert len(b) == 1 or _padded_seconds(b, durations) <= CAP
    assert [len(b) for b in batches if len(durations) - 1 in b] == [1]


def test_epoch_zero_is_sorted_by_duration():
    durations = _durations()
    sampler = DurationBatchSampler(durations, CAP, shuffle=True, sortagrad=True, seed=3)
    batches = sampler.batches(0)
    flat = _flat(batches)
    assert sorted(flat) == list(range(len(durations)))
    assert [durations[i] for i in flat] == sorted(durations)
    assert all(_padded_seconds(b, durations) <= CAP for b in batches)


def test_later_epochs_shuffle_deterministically():
    durations = _durations()
    make = lambda seed: DurationBatchSampler(durations, CAP, shuffle=True, sortagrad=True, seed=seed)  # noqa: E731
    a, b, other_seed = make(0), make(0), make(1)
    sorted_order = _flat(a.batches(0))
    for epoch in (1, 2, 3):
        batches = a.batches(epoch)
        assert sorted(_flat(batches)) == list(range(len(durations)))
        assert all(_padded_seconds(x, durations) <= CAP for x in batches)
        assert _flat(batches) != sorted_order
        assert batches == b.batches(epoch), "same (seed, epoch), same batches"
        assert batches != other_seed.batches(epoch)
    assert a.batches(1) != a.batches(2)


def test_eval_sampler_and_no_sortagrad():
    durations = _durations()
    evaluation = DurationBatchSampler(durations, CAP, shuffle=False)
    assert evaluation.batches(0) == evaluation.batches(5)
    assert [durations[i] for i in _flat(evaluation.batches(5))] == sorted(durations)
    no_sortagrad = DurationBatchSampler(durations, CAP, shuffle=True, sortagrad=False)
    assert _flat(no_sortagrad.batches(0)) != _flat(evaluation.batches(0))


class _KeyEcho(torch.utils.data.Dataset):
    def __getitem__(self, key):
        return key


def test_set_epoch_through_loader_batch_sampler_sampler():
    durations = _durations(40)
    sampler = DurationBatchSampler(durations, CAP, seed=5)
    loader = DataLoader(_KeyEcho(), batch_sampler=sampler, collate_fn=lambda keys: keys)
    assert [list(k) for k in loader] == [[(0, i) for i in b] for b in sampler.batches(0)]
    loader.batch_sampler.sampler.set_epoch(2)  # what Lightning calls at each epoch start
    assert [list(k) for k in loader] == [[(2, i) for i in b] for b in sampler.batches(2)]
    assert len(loader) == len(sampler.batches(2))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [97, 13])
def test_ddp_shards_cover_every_utterance_once(world_size, n):
    durations = _durations(n, seed=n)
    for epoch in (0, 1, 2):
        per_rank = []
        for rank in range(world_size):
            sampler = DurationBatchSampler(durations, CAP, seed=9, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            per_rank.append([[i for _, i in b] for b in sampler])
            assert len(sampler) == len(per_rank[-1])
        assert len({len(batches) for batches in per_rank}) == 1, "every rank the same number of batches"
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert seen == Counter(range(n)), "every utterance exactly once per epoch"
        for batches in per_rank:
            assert all(b and _padded_seconds(b, durations) <= CAP for b in batches)


def test_shard_batches_splits_largest_and_rejects_too_few():
    batches = [[0, 1, 2, 3], [4], [5, 6]]
    shards = [shard_batches(batches, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2
    assert sorted(_flat(shards[0] + shards[1])) == list(range(7))
    with pytest.raises(UserError, match="too few utterances"):
        shard_batches([[0], [1], [2]], 0, 2)


def test_fast_forward_skips_then_resets():
    sampler = DurationBatchSampler(_durations(), CAP, seed=2)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.fast_forward(3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full


def test_non_positive_cap():
    with pytest.raises(UserError, match="max_batch_seconds"):
        DurationBatchSampler([1.0], 0)


# --- collate --------------------------------------------------------------------------------------

def test_collate_pads_with_zeros_and_reports_lengths():
    items = [
        {"features": torch.ones(5, 3), "targets": [4, 5], "text": "AB", "id": "a", "duration": 0.05},
        None,  # an unreadable file, already reported by the dataset
        {"features": 2 * torch.ones(8, 3), "targets": [6, 7, 8, 9], "text": "CD E", "id": "b", "duration": 0.08},
    ]
    batch = collate(items)
    assert batch["features"].shape == (2, 8, 3) and batch["features"].dtype == torch.float32
    assert torch.equal(batch["features"][0, :5], torch.ones(5, 3)) and batch["features"][0, 5:].abs().sum() == 0
    assert torch.equal(batch["features"][1], 2 * torch.ones(8, 3))
    assert batch["feature_lengths"].tolist() == [5, 8] and batch["feature_lengths"].dtype == torch.int64
    assert batch["targets"].tolist() == [[4, 5, 0, 0], [6, 7, 8, 9]] and batch["targets"].dtype == torch.int64
    assert batch["target_lengths"].tolist() == [2, 4] and batch["target_lengths"].dtype == torch.int64
    assert (batch["texts"], batch["ids"], batch["durations"]) == (["AB", "CD E"], ["a", "b"], [0.05, 0.08])
    assert collate([None]) == {}


# --- dataset and datamodule on a tiny corpus ------------------------------------------------------

TRAIN = {f"{spk}-{chap}-{k:04d}": (0.25 + 0.15 * (k + 3 * (spk == 2)), text)
         for spk, chap in ((1, 10), (2, 20))
         for k, text in enumerate(["HELLO WORLD", "DON'T STOP", "A B C", "SPEECH IS FUN", "IT'S FINE"])}
DEV = {"3-30-0000": (0.4, "DEV ONE"), "3-30-0001": (0.9, "DEV TWO"), "3-30-0002": (0.6, "DEV THREE")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, write_corpus):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, "train", TRAIN)
    write_corpus(root, "dev", DEV)
    return root


def _datamodule(root, **overrides):
    options = dict(root=str(root), train_splits=["train"], dev_split="dev", test_splits=["dev"],
                   max_batch_seconds=2.0, num_workers=0, seed=1)
    options.update(overrides)
    return ASRDataModule(**options)


def test_datamodule_batches(corpus):
    dm = _datamodule(corpus)
    assert isinstance(dm.tokenizer, CharTokenizer) and dm.vocab_size == 29 and dm.n_mels == 80
    loader = dm.train_dataloader()
    assert dm.train_sampler is loader.batch_sampler
    seen = []
    cfg = FeatureConfig()
    for batch in loader:
        n = len(batch["ids"])
        assert batch["features"].shape[0] == n and batch["features"].shape[2] == 80
        assert n * max(batch["durations"]) <= 2.0 or n == 1
        for k, utt_id in enumerate(batch["ids"]):
            samples = round(TRAIN[utt_id][0] * 16000)
            assert batch["feature_lengths"][k] == cfg.num_frames(samples)
            assert batch["texts"][k] == TRAIN[utt_id][1]
            length = batch["target_lengths"][k]
            assert dm.tokenizer.decode(batch["targets"][k, :length].tolist()) == TRAIN[utt_id][1]
            assert (batch["targets"][k, length:] == 0).all()
            assert batch["features"][k, batch["feature_lengths"][k]:].abs().sum() == 0
        seen += batch["ids"]
    assert sorted(seen) == sorted(TRAIN)
    first_epoch_durations = [TRAIN[i][0] for i in seen]
    assert first_epoch_durations == sorted(first_epoch_durations), "SortaGrad: shortest first"

    val_ids = [i for batch in dm.val_dataloader() for i in batch["ids"]]
    assert val_ids == ["3-30-0000", "3-30-0002", "3-30-0001"]
    assert [u.id for u in dm.test_utterances("dev")] == sorted(DEV)


def test_datamodule_sentencepiece_is_cached(corpus):
    dm = _datamodule(corpus, tokenizer="sentencepiece", vocab_size=40)
    assert isinstance(dm.tokenizer, SentencePieceTokenizer)
    cached = list((corpus / "tokenizers").glob("*.model"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = _datamodule(corpus, tokenizer="sentencepiece", vocab_size=40)
    assert again.tokenizer.tokens == dm.tokenizer.tokens and cached[0].stat().st_mtime_ns == stamp
    batch = next(iter(dm.val_dataloader()))
    assert [dm.tokenizer.decode(t[:n].tolist()) for t, n in zip(batch["targets"], batch["target_lengths"])] == batch["texts"]
    state = CharTokenizer().state_dict()
    dm.load_tokenizer_state(state)
    assert isinstance(dm.tokenizer, CharTokenizer)


def test_limit_utterances(corpus):
    dm = _datamodule(corpus, limit_utterances=4)
    assert len(dm.train_utterances) == 4
    assert [u.id for u in dm.train_utterances] == [u.id for u in _datamodule(corpus, limit_utterances=4).train_utterances]


def _utterances(root):
    return [Utterance(i, str(next(root.rglob(f"{i}.flac"))), s, t, i.split("-")[0]) for i, (s, t) in sorted(TRAIN.items())]


def test_augmentation_is_deterministic_for_seed_epoch_index(corpus):
    utts = _utterances(corpus)
    cfg = FeatureConfig()
    make = lambda seed, **kw: UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, seed=seed, **kw)  # noqa: E731
    a, b = make(0), make(0)
    rng_before = torch.get_rng_state()
    first = a[(1, 3)]["features"]
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG is left alone"
    a[(1, 0)]  # order of access does not matter
    assert torch.equal(b[(1, 3)]["features"], first)
    assert torch.equal(a[(1, 3)]["features"], first)
    assert (first == 0).any(), "SpecAugment masked something"
    assert not torch.equal(a[(2, 3)]["features"], first)
    assert not torch.equal(make(1)[(1, 3)]["features"], first)

    clean = UtteranceDataset(utts, CharTokenizer(), cfg, augment=False)[(1, 3)]["features"]
    assert torch.equal(clean, LogMel(cfg)(load_audio(utts[3].path)))

    speed = make(0, spec_augment=False, speed_perturb=True)
    lengths = {speed[(e, 3)]["features"].shape[0] for e in range(12)}
    assert len(lengths) > 1, "speed perturbation changes the length"
    assert all(torch.equal(speed[(e, 3)]["features"], make(0, spec_augment=False, speed_perturb=True)[(e, 3)]["features"])
               for e in range(3))


def test_unreadable_audio_is_skipped_with_a_warning(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"nope" * 100)
    good = _utterances(corpus)[0]
    ds = UtteranceDataset([good, Utterance("9-9-0000", str(bad), 1.0, "X", "9")], CharTokenizer(), FeatureConfig())
    assert ds[1] is None
    assert "9-9-0000" in capsys.readouterr().out
    batch = collate([ds[0], ds[1]])
    assert batch["ids"] == [good.id]



def test_datamodule_shards_over_ranks_and_takes_the_epoch_from_lightning(corpus):
    from types import SimpleNamespace

    per_rank = []
    for rank in range(2):
        dm = _datamodule(corpus, max_batch_seconds=1.5)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(1)
        per_rank.append([[i for epoch, i in b if epoch == 1] for b in loader.batch_sampler])
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(len(TRAIN)))


def test_signal_augmentation_in_the_training_loader(corpus):
    """data.augment reaches training batches (seeded per seed, epoch, index), never dev batches."""
    from asr.data.augment import AugmentConfig

    augment = {"noise": {"p": 1.0, "snr_db": [10, 10]}, "vtlp": {"p": 1.0}, "babble": {"p": 1.0, "talkers": [2, 2]}}
    utts = _utterances(corpus)
    cfg = FeatureConfig()
    make = lambda: UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, spec_augment=False, seed=0,  # noqa: E731
                                    augmentation=AugmentConfig.from_dict(augment))
    clean = UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, spec_augment=False, seed=0)[(1, 3)]["features"]
    first = make()[(1, 3)]["features"]
    assert first.shape == clean.shape and not torch.allclose(first, clean, atol=0.1)
    assert torch.equal(make()[(1, 3)]["features"], first)  # deterministic
    assert not torch.equal(make()[(2, 3)]["features"], first)  # another epoch, another draw

    dm = _datamodule(corpus, augment=augment)
    plain = _datamodule(corpus)
    dev = next(iter(dm.val_dataloader()))["features"]
    assert torch.equal(dev, next(iter(plain.val_dataloader()))["features"])  # evaluation is never augmented
    with pytest.raises(UserError, match="data.augment.noise.p"):
        _datamodule(corpus, augment={"noise": {"p": 2}})


# --- the feature cache (data.feature_cache_gb) ----------------------------------------------------

def _count_audio_reads(monkeypatch) -> Counter:
    import asr.data.datamodule as datamodule

    reads = Counter()

    def counting_load(path):
        reads[path] += 1
        return load_audio(path)

    monkeypatch.setattr(datamodule, "load_audio", counting_load)
    return reads


def test_feature_cache_reads_each_utterance_once_and_changes_nothing(corpus, monkeypatch):
    utts = _utterances(corpus)
    cfg = FeatureConfig()
    plain = UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, spec_augment=False)
    expected = [plain[(1, i)]["features"] for i in range(len(utts))]
    reads = _count_audio_reads(monkeypatch)
    cached = UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, spec_augment=False, cache_bytes=10**9)
    for epoch in range(3):
        for i in range(len(utts)):
            item = cached[(epoch, i)]
            assert torch.equal(item["features"], expected[i]) and item["text"] == utts[i].text
    assert sorted(reads.values()) == [1] * len(utts), "one read per utterance over three epochs"
    assert cached._cached_bytes == sum(f.numel() * 4 for f in expected)


def test_feature_cache_stops_at_its_size(corpus, monkeypatch):
    utts = _utterances(corpus)
    cfg = FeatureConfig()
    sizes = [UtteranceDataset(utts, CharTokenizer(), cfg)[i]["features"].numel() * 4 for i in range(3)]
    cap = sizes[0] + sizes[1] + sizes[2] // 2  # room for the first two only
    reads = _count_audio_reads(monkeypatch)
    ds = UtteranceDataset(utts, CharTokenizer(), cfg, cache_bytes=cap)
    for epoch in range(2):
        for i in range(3):
            ds[(epoch, i)]
    assert ds._cached_bytes == sizes[0] + sizes[1] <= cap
    assert [reads[utts[i].path] for i in range(3)] == [1, 1, 2]


def test_feature_cache_is_off_where_features_change_every_epoch(corpus):
    from asr.data.augment import AugmentConfig

    utts = _utterances(corpus)
    cfg = FeatureConfig()
    speed = UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, speed_perturb=True, cache_bytes=10**9)
    noisy = UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, cache_bytes=10**9,
                             augmentation=AugmentConfig.from_dict({"noise": {"p": 1.0}}))
    assert speed.cache_bytes == noisy.cache_bytes == 0
    speed[(0, 1)], noisy[(0, 1)]
    assert not speed._cache and not noisy._cache


def test_spec_augment_masks_cached_features_as_it_masks_computed_ones(corpus):
    utts = _utterances(corpus)
    cfg = FeatureConfig()
    plain = UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, seed=3)
    cached = UtteranceDataset(utts, CharTokenizer(), cfg, augment=True, seed=3, cache_bytes=10**9)
    clean = UtteranceDataset(utts, CharTokenizer(), cfg)[3]["features"]
    for epoch in range(4):  # epoch 0 fills the cache, later epochs read it
        masked = cached[(epoch, 3)]["features"]
        assert torch.equal(masked, plain[(epoch, 3)]["features"])
        assert (masked == 0).any() and not torch.equal(masked, clean)
    assert torch.equal(cached._cache[3], clean), "the cache holds unmasked features"


def test_datamodule_feature_cache_option(corpus):
    dm = _datamodule(corpus, feature_cache_gb=0.5, num_workers=1)
    train, dev = dm.train_dataloader(), dm.val_dataloader()
    assert train.persistent_workers and dev.persistent_workers, "a worker's cache lasts as long as the worker"
    assert train.dataset.cache_bytes == dev.dataset.cache_bytes == 500_000_000
    assert [i for b in dev for i in b["ids"]] == [i for b in dev for i in b["ids"]] == ["3-30-0000", "3-30-0002", "3-30-0001"]
    assert dm.dataloader_for(dm.test_utterances("dev")).dataset.cache_bytes == 0, "one evaluation pass: no cache"
    off = _datamodule(corpus, num_workers=1)
    assert not off.train_dataloader().persistent_workers and off.train_dataloader().dataset.cache_bytes == 0
    with pytest.raises(UserError, match="data.feature_cache_gb"):
        _datamodule(corpus, feature_cache_gb=-1)


def _live_workers(iterator) -> list:
    return [w for w in getattr(iterator, "_workers", []) if w.is_alive()]


def test_persistent_workers_are_stopped_by_teardown_and_by_lightning_through_the_resumable_loader(corpus):
    """Workers ignore SIGTERM, which is how multiprocessing ends daemon processes at exit: a persistent
    worker (the feature cache's) left running hangs the trainer's exit. Lightning stops loaders through
    `loader._iterator` (the resumable wrapper must hand it the wrapped loader's), and the data module's
    teardown stops whatever is left."""
    from pytorch_lightning.utilities.combined_loader import _shutdown_workers_and_reset_iterator

    from asr.training.resume import ResumableLoader

    dm = _datamodule(corpus, feature_cache_gb=0.5, num_workers=1)
    started = []
    try:
        train = ResumableLoader(dm.train_dataloader())
        assert sorted(i for b in train for i in b["ids"]) == sorted(TRAIN)
        iterator = train.loader._iterator
        started.append(iterator)
        assert train._iterator is iterator and len(_live_workers(iterator)) == 1, "a persistent worker stays"
        _shutdown_workers_and_reset_iterator(train)  # what Lightning does at the end of fit
        assert train.loader._iterator is None and not _live_workers(iterator)

        dev = dm.val_dataloader()
        assert [i for b in dev for i in b["ids"]] == ["3-30-0000", "3-30-0002", "3-30-0001"]
        iterator = dev._iterator
        started.append(iterator)
        assert len(_live_workers(iterator)) == 1
        dm.teardown("fit")
        assert dev._iterator is None and not _live_workers(iterator)
    finally:  # a failure here must not leave a worker that hangs pytest's own exit
        for iterator in started:
            iterator._shutdown_workers()
