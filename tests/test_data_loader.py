"""Training/eval loaders over real shards with real DataLoader workers; ranks simulated in-process."""
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import simplejpeg
import torch
import webdataset as wds
from omegaconf import OmegaConf

from vlp.config import load_config
from vlp.data import CorruptDataError, build_tokenizer, build_train_loader
from vlp.data.samples import SKIP_REASONS

BASE = ["data.image_size=32", "data.workers=2", "train.micro_batch_size=4", "data.shuffle_buffer=8",
        "data.tokenizer.context_length=16"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(load_config(overrides=BASE).data.tokenizer)


def _cfg(shards="", *overrides, tmp=None, sources=None):
    """A validated config; shard specs are set directly (braces are not override-safe)."""
    if sources is not None:  # through a YAML file, as a user would write it
        path = os.path.join(tmp, "cfg.yaml")
        with open(path, "w") as f:
            f.write(OmegaConf.to_yaml({"data": {"sources": sources}}))
        cfg = load_config(path, BASE + list(overrides))
    else:
        cfg = load_config(None, BASE + list(overrides))
        cfg.data.train_shards = str(shards)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def _jpeg(seed=0):
    return simplejpeg.encode_jpeg(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """70 samples in shards of 16, 16, 16, 16 and 6."""
    from data_pipelines.synth import write_synth

    out = tmp_path_factory.mktemp("uneven")
    write_synth(str(out), n=70, seed=3, split="train", samples_per_shard=16)
    return out


def test_epoch_split_two_ranks_two_workers(uneven, tok):
    cfg = _cfg(uneven)
    loaders = [build_train_loader(cfg, None, tok, rank=r, world_size=2) for r in range(2)]
    # 70 samples / (2 ranks x 2 workers x batch 4) -> 4 batches per worker, 8 per rank, 6 dropped
    assert [ld.batches_per_epoch for ld in loaders] == [8, 8]
    assert loaders[0].stats()["dropped_per_epoch"] == 6
    its = [iter(ld) for ld in loaders]
    epochs = []
    for _ in range(2):
        per_rank = [_keys(_take(it, 8)) for it in its]
        assert [ld.stats()["batches_this_epoch"] for ld in loaders] == [8, 8]  # equal batch counts
        union = per_rank[0] + per_rank[1]
        assert len(union) == len(set(union)) == 64  # no duplicates, nothing lost but the drop
        assert all(k.startswith("synth-train-s3-") for k in union)
        epochs.append(union)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert all(ld.stats()["epoch"] == 1 for ld in loaders)
    batch = next(its[0])
    assert loaders[0].stats()["epoch"] == 2
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["text_ids"].shape == batch["text_mask"].shape == (4, 16)
    assert batch["text_ids"].dtype == torch.int64 and batch["image"].dtype == torch.uint8  # normalised on the device


@pytest.mark.parametrize("mode", ["epoch", "resampled", "mixed"])
def test_resume_continues_exactly(synth_train, synth_test, tok, tmp_path, mode):
    if mode == "mixed":  # two weighted sources, epoch mode per source
        sources = [{"shards": str(synth_train), "weight": 2.0}, {"shards": str(synth_test), "weight": 1.0}]
        cfg = _cfg(None, "data.samples_per_epoch=64", tmp=str(tmp_path), sources=sources)
    else:
        cfg = _cfg(synth_train, *(["data.resampled=true", "data.samples_per_epoch=64"] if mode == "resampled" else []))
    full = _take(iter(build_train_loader(cfg, None, tok, rank=1, world_size=2)), 10)  # 8 per epoch + 2
    first = build_train_loader(cfg, None, tok, rank=1, world_size=2)
    before = _take(iter(first), 3)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    assert state["epoch"] == 0 and state["batches"] == 3
    second = build_train_loader(cfg, None, tok, rank=1, world_size=2)
    second.load_state_dict(state)
    after = _take(iter(second), 7)
    assert _keys(before + after) == _keys(full)  # same samples, same order, across the epoch end
    for a, b in zip(before + after, full):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_ids"], b["text_ids"])
    assert second.stats()["samples"] == 40 and second.stats()["epoch"] == 1
    if mode == "epoch":
        assert len(set(_keys(before + after[:5]))) == 32  # one epoch of rank 1: no duplicates


def test_resampled_is_deterministic_per_seed(synth_train, tok):
    def keys(seed):
        cfg = _cfg(synth_train, "data.resampled=true", "data.samples_per_epoch=48", f"train.seed={seed}")
        ld = build_train_loader(cfg, None, tok, rank=0, world_size=1)
        assert ld.batches_per_epoch == 12
        return _keys(_take(iter(ld), 12))

    a = keys(1)
    assert a == keys(1) and a != keys(2)


@pytest.mark.parametrize("resampled", [False, True])
def test_weighted_mixing_realised(synth_train, synth_test, tok, tmp_path, resampled):
    sources = [{"shards": str(synth_train), "weight": 3.0, "name": "train"},
               {"shards": str(synth_test), "weight": 1.0, "name": "test"}]
    cfg = _cfg(None, "data.samples_per_epoch=400", f"data.resampled={str(resampled).lower()}",
               "data.workers=1", tmp=str(tmp_path), sources=sources)
    ld = build_train_loader(cfg, None, tok, rank=0, world_size=1, batch_size=8)
    assert ld.batches_per_epoch == 50
    keys = _keys(_take(iter(ld), 50))
    share = sum(k.startswith("synth-train") for k in keys) / len(keys)
    stats = ld.stats()
    assert stats["mix_counts"] == {"train": round(share * 400), "test": 400 - round(share * 400)}
    assert abs(stats["mix"]["train"] - 0.75) < 0.07


def _write(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def _cut(path, key, ext, into_data):
    """Truncate a shard inside the data of member KEY.EXT, or exactly at its header."""
    import tarfile

    with tarfile.open(path) as tf:
        info = tf.getmember(f"{key}.{ext}")
    data = path.read_bytes()
    path.write_bytes(data[: info.offset_data + 100 if into_data else info.offset])


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """a.tar: 10 good samples + one of each corrupt kind; b.tar cut inside a member's data (6
    headers, 5 whole samples); c.tar cut at a sample's header (5 whole samples, no end blocks)."""
    out = tmp_path_factory.mktemp("corrupt")
    good = [{"__key__": f"good{i:02d}", "jpg": _jpeg(i), "txt": f"caption {i}".encode()} for i in range(10)]
    bad = [{"__key__": "badjpeg", "jpg": b"\xff\xd8\xff\xe0 garbage", "txt": b"x"},
           {"__key__": "notext", "jpg": _jpeg(1)},
           {"__key__": "emptytext", "jpg": _jpeg(2), "txt": b"  \n"},
           {"__key__": "latin1", "jpg": _jpeg(3), "txt": "caf\xe9".encode("latin-1")},
           {"__key__": "noimage", "txt": b"only a caption"}]
    _write(out / "a.tar", good[:5] + bad + good[5:])
    for name, cut_data in (("b", True), ("c", False)):
        _write(out / f"{name}.tar", [{"__key__": f"{name}{i}", "jpg": _jpeg(20 + i), "txt": b"t"} for i in range(10)])
        _cut(out / f"{name}.tar", f"{name}5", "jpg", cut_data)
    return out


def test_corrupt_samples_counted_not_crashed(corrupt, tok):
    # evaluation reads the same shards with the same reader and the same skip reasons, every sample once
    from vlp.data.transforms import eval_transform
    from vlp.eval.data import EvalDataset

    items = list(EvalDataset(str(corrupt), eval_transform({"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})))
    keys = [it["key"] for it in items if "skip" not in it]
    assert sorted(keys) == sorted([f"good{i:02d}" for i in range(10)] + [f"{s}{i}" for s in "bc" for i in range(5)])
    skipped = Counter(it["skip"] for it in items if "skip" in it)
    assert set(skipped) <= set(SKIP_REASONS)
    assert skipped == {"unreadable_image": 1, "missing_image": 1, "missing_caption": 2, "bad_text": 1, "truncated_tar": 2}
    # training: 26 counted samples -> 6 batches of 2 per worker; skips are made up by reading on
    cfg = _cfg(corrupt, "data.max_corrupt_fraction=0.9", "data.shuffle_buffer=4")
    ld = build_train_loader(cfg, None, tok, rank=0, world_size=1, batch_size=2)
    assert ld.batches_per_epoch == 12
    batches = _take(iter(ld), 12)
    stats = ld.stats()
    assert stats["epoch"] == 0 and stats["batches_this_epoch"] == 12 and stats["samples"] == 24
    assert all(re.fullmatch(r"good\d\d|[bc]\d", k) for k in _keys(batches))
    assert stats["repeated"] > 0 and set(stats["skipped"]) == set(SKIP_REASONS)
    for reason in ("unreadable_image", "missing_image", "missing_caption", "bad_text", "truncated_tar"):
        assert stats["skipped"][reason] >= 1, reason


def test_too_many_corrupt_samples_raise_naming_the_shard(tmp_path, tok):
    samples = [{"__key__": f"s{i:03d}", "jpg": b"\xff\xd8\xff broken" if i % 4 == 0 else _jpeg(i),
                "txt": b"a caption"} for i in range(120)]
    _write(tmp_path / "mostly.tar", samples)
    cfg = _cfg(tmp_path, "data.max_corrupt_fraction=0.1")
    ld = build_train_loader(cfg, None, tok, rank=0, world_size=1, batch_size=4)
    with pytest.raises(CorruptDataError, match=r"mostly\.tar.*data\.max_corrupt_fraction"):
        _take(iter(ld), ld.batches_per_epoch)
