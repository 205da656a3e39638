"""Resume on another layout, data side: the rest of an epoch re-split over other ranks, DataLoader workers and
batch sizes (`TrainLoader.load_states`), with real shards and real workers; ranks simulated in-process."""
from collections import Counter

import pytest

from tests.test_data_loader import BASE, _cfg, tok  # noqa: F401  (tok: fixture)
from vlp.config import load_config
from vlp.data import build_train_loader


@pytest.fixture(scope="module")
def epoch96(tmp_path_factory):
    """96 samples in 6 shards of 16."""
    from data_pipelines.synth import write_synth

    out = tmp_path_factory.mktemp("epoch96")
    write_synth(str(out), n=96, seed=5, split="train", samples_per_shard=16)
    return out


def _loaders(shards, tok, world, workers, batch, *extra):  # noqa: F811
    cfg = _cfg(shards, f"data.workers={workers}", f"train.micro_batch_size={batch}", *extra)
    return [build_train_loader(cfg, None, tok, r, world) for r in range(world)]


def _run(loaders, steps):
    """`steps` lockstep batches on every rank -> (keys consumed, every rank's state after them)."""
    keys = []
    its = [iter(ld) for ld in loaders]
    for _ in range(steps):
        for it in its:
            keys += next(it)["key"]
    return keys, [ld.state_dict() for ld in loaders]


def _epoch_keys(shards, tok):  # noqa: F811
    one = _loaders(shards, tok, 1, 0, 1)[0]
    return [k for _, b in zip(range(one.batches_per_epoch), one) for k in b["key"]]


@pytest.mark.parametrize("extra", [[], ["data.shuffle_buffer=1"]])
def test_two_ranks_to_one_to_two_consume_each_sample_once(epoch96, tok, extra):  # noqa: F811
    """2 ranks x 2 workers x 4 -> 1 rank x 1 worker x 4 -> 2 ranks x 1 worker x 2, within epoch 0."""
    everything = _epoch_keys(epoch96, tok)
    assert len(everything) == len(set(everything)) == 96
    first, states = _run(_loaders(epoch96, tok, 2, 2, 4, *extra), 5)  # 40 samples; odd: mid-rotation
    one = _loaders(epoch96, tok, 1, 1, 4, *extra)[0]
    one.load_states(states)
    assert (one.epoch, one.batches_per_epoch) == (0, 14)  # 56 samples left, 14 batches of 4
    second, states = _run([one], 6)
    two = _loaders(epoch96, tok, 2, 1, 2, *extra)
    for ld in two:
        ld.load_states(states)
    assert {(ld.epoch, ld.batches_per_epoch) for ld in two} == {(0, 8)}  # 32 left: 2 ranks x 8 x 2
    third, states = _run(two, 8)
    seen = first + second + third
    assert Counter(seen) == Counter(everything), "every sample of the epoch exactly once"
    stats = [ld.stats() for ld in two]
    assert sum(s["samples"] for s in stats) == 96 and sum(s["dropped_at_resplit"] for s in stats) == 0
    # the next epoch is the layout's own epoch 1, whatever happened in epoch 0
    after = [next(iter(ld)) for ld in two]
    fresh = _loaders(epoch96, tok, 2, 1, 2, *extra)
    fresh_its = [iter(ld) for ld in fresh]
    for _ in range(fresh[0].batches_per_epoch):
        for it in fresh_its:
            next(it)
    assert [b["key"] for b in after] == [next(it)["key"] for it in fresh_its]
    assert all(ld.epoch == 1 for ld in two)


def test_unchanged_layout_resumes_exactly_and_a_resplit_epoch_resumes_exactly_too(epoch96, tok):  # noqa: F811
    # same layout: load_states is load_state_dict, bit for bit
    ref, _ = _run(_loaders(epoch96, tok, 2, 2, 4), 9)
    a, states = _run(_loaders(epoch96, tok, 2, 2, 4), 4)
    again = _loaders(epoch96, tok, 2, 2, 4)
    for ld in again:
        ld.load_states(states)
    b, _ = _run(again, 5)
    assert a + b == ref
    # a re-split epoch, checkpointed and resumed on its own layout, continues exactly as uninterrupted
    _, states = _run(_loaders(epoch96, tok, 2, 2, 4), 3)
    split = _loaders(epoch96, tok, 1, 2, 4)[0]
    split.load_states(states)
    whole, _ = _run([split], 7)
    split = _loaders(epoch96, tok, 1, 2, 4)[0]
    split.load_states(states)
    part1, mid = _run([split], 3)
    resumed = _loaders(epoch96, tok, 1, 2, 4)[0]
    resumed.load_states(mid)
    part2, _ = _run([resumed], 4)
    assert part1 + part2 == whole


def test_a_rest_that_does_not_fill_a_global_batch_is_dropped_and_counted(epoch96, tok):  # noqa: F811
    _, states = _run(_loaders(epoch96, tok, 2, 1, 4), 3)  # 24 consumed, 72 left
    three = _loaders(epoch96, tok, 3, 1, 5)  # 15 per global batch: 4 batches per slot, 12 dropped
    for ld in three:
        ld.load_states(states)
    assert {ld.batches_per_epoch for ld in three} == {4}
    keys, _ = _run(three, 4)
    assert len(keys) == len(set(keys)) == 60
    assert sum(ld.stats()["dropped_at_resplit"] for ld in three) == 12


def test_mixed_sources_resume_on_another_layout_keeps_the_epoch_length(epoch96, tok, tmp_path):  # noqa: F811
    sources = [{"name": "a", "shards": str(epoch96), "weight": 1.0}, {"name": "b", "shards": str(epoch96), "weight": 1.0}]
    base = ["data.samples_per_epoch=96"]
    cfg = _cfg(None, "data.workers=2", "train.micro_batch_size=4", *base, tmp=str(tmp_path), sources=sources)
    loaders = [build_train_loader(cfg, None, tok, r, 2) for r in range(2)]
    _, states = _run(loaders, 2)  # 16 of 96 consumed
    cfg1 = _cfg(None, "data.workers=1", "train.micro_batch_size=4", *base, tmp=str(tmp_path), sources=sources)
    one = build_train_loader(cfg1, None, tok, 0, 1)
    one.load_states(states)
    assert one.batches_per_epoch == 20  # the 80 samples left of the epoch, in batches of 4
    keys, _ = _run([one], 20)
    assert len(keys) == 80 and one.epoch == 0
    next(iter(one))
    assert one.epoch == 1 and one.batches_per_epoch == 24
