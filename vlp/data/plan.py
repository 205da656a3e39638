"""Which samples each (rank, worker) slot reads: pure functions of seeds and shard counts.

Epoch mode: the shards are shuffled with a seed shared by all ranks, laid end to end, and the
resulting sample sequence is cut into `n_slots` equal contiguous pieces of `per_slot` samples
(a piece may start or end inside a shard, which is then read by two slots, each its own part).
Every slot therefore has exactly the same number of samples and so every rank the same number of
batches; what is left after `n_slots * per_slot` (fewer than one global batch per slot) is the
epoch's drop, a different tail each epoch. Resampled mode: each slot draws whole shards with
replacement from its own seed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from vlp.config import ConfigError

Range = Tuple[int, int, Optional[int]]  # shard index, first sample, end sample (None: to the end)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def window(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> List[Range]:
    """Samples `lo <= i < hi` of the shards laid end to end in `order`, as per-shard ranges."""
    ranges: List[Range] = []
    pos = 0
    for i in order:
        n = int(counts[i])
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            ranges.append((int(i), a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return ranges


def epoch_ranges(counts: Sequence[int], seed: int, epoch: int, source: int, pass_: int,
                 slot: int, per_slot: int) -> List[Range]:
    """The slot's piece of one shuffled pass over the shards (same shuffle on every rank)."""
    order = _rng(seed, epoch, source, pass_, 1).permutation(len(counts))
    return window(counts, order, slot * per_slot, (slot + 1) * per_slot)


def window_ranges(seq: Sequence[Range], lo: int, hi: int) -> List[Range]:
    """Samples `lo <= i < hi` of an explicit sequence of ranges (the rest of an epoch after a re-split)."""
    out: List[Range] = []
    pos = 0
    for shard, start, end in seq:
        n = int(end) - int(start)
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((int(shard), int(start) + a - pos, int(start) + b - pos))
        pos += n
        if pos >= hi:
            break
    return out


def merge_ranges(seq: Sequence[Range]) -> List[Range]:
    """Adjacent ranges of one shard joined: (3, 0, 5), (3, 5, 9) -> (3, 0, 9)."""
    out: List[Range] = []
    for shard, start, end in seq:
        if out and out[-1][0] == shard and out[-1][2] == start:
            out[-1] = (shard, out[-1][1], end)
        else:
            out.append((int(shard), int(start), int(end)))
    return out


def resampled_ranges(n_shards: int, seed: int, epoch: int, rank: int, worker: int, source: int,
                     pass_: int, segment: int = 0) -> List[Range]:
    """`n_shards` whole shards drawn with replacement, seeded per (seed, epoch, rank, worker[, segment])."""
    keys = (seed, epoch, rank, worker, source, pass_, 2) + ((segment,) if segment else ())
    picks = _rng(*keys).integers(0, n_shards, n_shards)
    return [(int(i), 0, None) for i in picks]


def batches_per_worker(total_samples: int, world_size: int, workers: int, batch_size: int,
                       what: str) -> int:
    """Batches each slot yields per epoch; an error when there is not even one per slot."""
    q = total_samples // (world_size * workers * batch_size)
    if q == 0:
        raise ConfigError(
            f"{what}: {total_samples} samples per epoch are fewer than one batch for every loader slot "
            f"(world size {world_size} x data.workers {max(workers, 1)} x batch size {batch_size}); "
            "use fewer workers, a smaller batch or more data")
    return q
