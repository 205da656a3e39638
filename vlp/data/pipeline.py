"""The training loader: shards -> shuffled, decoded, tokenised batch dicts. (Evaluation reads the same
shards with the same reader and skip reasons in a fixed order: `vlp.eval.data`.)

Shard sample counts are resolved once, on rank 0, and shared with the other ranks (remote shards
without a stats.json are downloaded to count them: once, not once per rank). Stages, all inside each
DataLoader worker: shard plan (`plan.py`: per-epoch shard shuffle and
split) -> tar reading with webdataset (`shards.py`) -> weighted source mixing and the sample
shuffle buffer on raw bytes (`stream.py`) -> decode + crop + resize (`transforms.py`) -> batch
tokenisation and collate (`samples.py`). Workers build whole batches; the DataLoader takes them
round-robin (worker k mod W), so the stream is a deterministic function of
(seed, epoch, rank, worker).

Equal batch counts. Every (rank, worker) slot yields exactly `q` batches per epoch, so every rank
yields `q * W` (`batches_per_epoch`) and DeepSpeed ranks never wait on each other. Epoch mode
cuts each epoch's shuffled sample sequence into equal per-slot pieces of `q * B` samples; the
rest, fewer than `world_size * W * B` samples, is dropped, a different tail each epoch
(`stats()['dropped_per_epoch']`). Samples skipped as corrupt are made up by reading on into
the slot's next pass, counted as `repeated`. Resampled mode and weighted source mixing read
infinite streams; an epoch is `data.samples_per_epoch` samples (0: the shards' total).

Corrupt data is skipped and counted per reason (`samples.SKIP_REASONS`); each batch carries its
worker's counts, summed by `stats()`. Once 100+ samples were read (per worker, and summed over a
rank's workers) and more than `data.max_corrupt_fraction` of them were corrupt, `CorruptDataError`
names the worst shard. A caption field holding several captions (one per line) gives a random one.

Resume is exact in every mode (epoch, resampled, mixed): each batch carries its worker's stream
snapshot (`stream.py`); `state_dict()` keeps the latest per worker. A restored loader restarts the
epoch's workers from those snapshots and rotates the DataLoader workers so the round-robin
continues at the worker that was next. It needs the same world size, `data.workers`, batch size,
seed and sources; otherwise it warns and starts the next epoch. DataLoader workers are started
afresh each epoch.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.config import ConfigError
from vlp.data.plan import batches_per_worker, epoch_ranges, resampled_ranges
from vlp.data.samples import SKIP_REASONS, collate, decode_sample, image_keys, pick_caption
from vlp.data.shards import Shard, resolve_shards
from vlp.data.stream import RawStream, SourceStream
from vlp.data.transforms import ImageTransform, resolve_image_cfg
from vlp.dist import ignore_stop_signals, kill_workers_at_exit, run_on_rank0

log = logging.getLogger(__name__)
STATE_VERSION = 1


class CorruptDataError(RuntimeError):
    """Too large a fraction of the samples read is corrupt."""


@dataclass
class Source:
    name: str
    shards: List[Shard]
    weight: float


@dataclass
class _Spec:
    """Everything a worker needs, picklable."""

    sources: List[Source]
    resampled: bool
    seed: int
    rank: int
    world_size: int
    slots: int  # loader slots (DataLoader workers, at least 1) per rank
    batch_size: int
    quota: int  # batches per slot per epoch (train)
    per_slot: List[int]  # epoch mode: samples per slot per pass, per source
    shuffle_buffer: int
    img_keys: List[str]
    caption_key: str
    transform: ImageTransform
    mean: Sequence[float]
    std: Sequence[float]
    tokenizer: Any
    max_corrupt_fraction: float
    remote_timeout: float = 60.0  # seconds an http(s) shard read may wait for data
    train: bool = True


def check_corrupt(seen: int, bad: int, by_shard: Dict[str, int], limit: float, where: str) -> None:
    """Raise `CorruptDataError` when 100+ samples were seen and more than `limit` of them were bad."""
    if seen >= 100 and bad > limit * seen:
        worst, n = max(by_shard.items(), key=lambda kv: kv[1], default=("?", 0))
        raise CorruptDataError(
            f"{bad} of {seen} samples read by {where} are corrupt, more than data.max_corrupt_fraction="
            f"{limit}; worst shard: {worst} ({n} skipped). Fix or remove that shard, or raise "
            "data.max_corrupt_fraction")


class _Counters:
    """Per-worker skip counts (delta since the last batch) and the corrupt-fraction check."""

    def __init__(self, spec: _Spec, where: str, state: Optional[dict] = None):
        self.spec, self.where = spec, where
        self.delta: Counter = Counter()
        self.delta_by_shard: Counter = Counter()
        self.by_shard: Counter = Counter()
        self.seen = int((state or {}).get("seen", 0))
        self.bad = int((state or {}).get("bad", 0))

    def sample(self) -> None:
        self.seen += 1

    def skip(self, reason: str, url: str, n: int = 1) -> None:
        self.delta[reason] += n
        self.delta_by_shard[url] += n
        self.by_shard[url] += n
        self.bad += n
        if reason in ("truncated_tar", "read_error", "short_shard"):
            self.seen += n  # not a sample the stream produced, but counted as one read
        check_corrupt(self.seen, self.bad, self.by_shard, self.spec.max_corrupt_fraction, self.where)

    def take(self) -> dict:
        out = {"reasons": dict(self.delta), "shards": dict(self.delta_by_shard)}
        self.delta, self.delta_by_shard = Counter(), Counter()
        return out

    def state(self) -> dict:
        return {"seen": self.seen, "bad": self.bad}


def _worker_rng(spec: _Spec, epoch: int, worker: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed & 0xFFFFFFFF, epoch, spec.rank, worker, 3])


def _source_streams(spec: _Spec, epoch: int, worker: int, on_error) -> List[SourceStream]:
    slot = spec.rank * spec.slots + worker
    streams = []
    for i, src in enumerate(spec.sources):
        if spec.resampled:
            def plan(p, n=len(src.shards), i=i):
                return resampled_ranges(n, spec.seed, epoch, spec.rank, worker, i, p)
        else:
            def plan(p, counts=[s.samples for s in src.shards], i=i):
                return epoch_ranges(counts, spec.seed, epoch, i, p, slot, spec.per_slot[i])
        streams.append(SourceStream(i, src.shards, plan, on_error, timeout=spec.remote_timeout))
    return streams


def _train_batches(spec: _Spec, epoch: int, worker: int, snap: Optional[dict]) -> Iterator[Dict]:
    """The `quota` batches of one slot in one epoch, continuing from `snap` when given."""
    counters = _Counters(spec, f"rank {spec.rank} worker {worker}", snap and snap.get("counters"))
    rng = _worker_rng(spec, epoch, worker)
    sources = _source_streams(spec, epoch, worker, lambda reason, url, n: counters.skip(reason, url, n))
    single_epoch = not spec.resampled and len(spec.sources) == 1
    raw = RawStream(sources, [s.weight for s in spec.sources], spec.shuffle_buffer, rng,
                    drain_between_passes=single_epoch)
    done = 0
    if snap:
        raw.restore(snap["stream"], on_missing=lambda n: counters.skip("read_error", "(shuffle buffer)", n))
        done = int(snap["batches"])
    while done < spec.quota:
        images, captions, keys = [], [], []
        mix = [0] * len(spec.sources)
        repeated = 0
        while len(images) < spec.batch_size:
            (s, p, _, _), sample = next(raw)
            counters.sample()
            out = decode_sample(sample, spec.img_keys, spec.caption_key, spec.transform, rng)
            if isinstance(out, str):
                counters.skip(out, sample.get("__url__", "?"))
                continue
            images.append(out[0])
            captions.append(pick_caption(out[1], rng))
            keys.append(sample["__key__"])
            mix[s] += 1
            repeated += single_epoch and p > 0
        batch = collate(images, captions, keys, spec.tokenizer, spec.mean, spec.std)
        done += 1
        batch["_meta"] = {"worker": worker, "skipped": counters.take(), "mix": mix, "repeated": repeated,
                          "state": {"batches": done, "stream": raw.snapshot(), "counters": counters.state()}}
        yield batch


def _identity(x):
    return x


def _worker_init(worker_id):
    import cv2

    cv2.setNumThreads(1)
    ignore_stop_signals(worker_id)


def _data_loader(dataset: IterableDataset, workers: int) -> DataLoader:
    if workers:
        kill_workers_at_exit()
    return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                      worker_init_fn=_worker_init if workers else None,
                      pin_memory=torch.cuda.is_available())


class _TrainDataset(IterableDataset):
    def __init__(self, spec: _Spec, epoch: int, rotation: int, snaps: Dict[int, dict]):
        super().__init__()
        self.spec, self.epoch, self.rotation, self.snaps = spec, epoch, rotation, snaps

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.spec.slots
        return _train_batches(self.spec, self.epoch, worker, self.snaps.get(worker))


def _sources(data) -> List[Source]:
    if data.sources and data.train_shards:
        raise ConfigError("set either 'data.train_shards' or 'data.sources', not both")
    if not data.sources:
        return [Source("0", [], 1.0)]
    return [Source(s.name or str(i), [], float(s.weight)) for i, s in enumerate(data.sources)]


class TrainLoader:
    """Endless training batches, epoch after epoch, with exact resume (see the module docstring)."""

    def __init__(self, cfg, image_cfg: Optional[dict], tokenizer, rank: int = 0, world_size: int = 1,
                 batch_size: Optional[int] = None):
        data = cfg.data
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = int(batch_size or cfg.train.micro_batch_size)
        self.seed = int(cfg.train.seed)
        self.workers = int(data.workers)
        slots = max(1, self.workers)
        sources = _sources(data)
        specs = [data.train_shards] if not data.sources else [s.shards for s in data.sources]
        whats = ["data.train_shards"] if not data.sources else [f"data.sources[{i}].shards" for i in range(len(specs))]
        need_counts = not data.resampled or data.samples_per_epoch <= 0
        timeout = float(data.remote_timeout)
        # rank 0 reads stats.json / counts the shards (a full download for remote ones without stats) and
        # every rank takes its answer: identical counts everywhere, each shard fetched once, not once per rank
        resolved = run_on_rank0(lambda: [resolve_shards(spec, what, counts=need_counts, timeout=timeout)
                                         for spec, what in zip(specs, whats)])
        for src, shards in zip(sources, resolved):
            src.shards = shards
        totals = [sum(s.samples or 0 for s in src.shards) for src in sources]
        single_epoch = not data.resampled and len(sources) == 1
        per_slot = []
        if single_epoch:
            quota = batches_per_worker(totals[0], self.world_size, slots, self.batch_size, whats[0])
            per_slot = [quota * self.batch_size]
            self.dropped_per_epoch = totals[0] - quota * self.batch_size * slots * self.world_size
        else:
            total = data.samples_per_epoch if data.samples_per_epoch > 0 else sum(totals)
            quota = batches_per_worker(total, self.world_size, slots, self.batch_size,
                                       "data.samples_per_epoch" if data.samples_per_epoch > 0 else whats[0])
            if not data.resampled:
                per_slot = [n // (self.world_size * slots) for n in totals]
                for n, what in zip(per_slot, whats):
                    if n == 0:
                        raise ConfigError(f"{what}: fewer samples than loader slots (world size x data.workers)")
            self.dropped_per_epoch = 0
        size = resolve_image_cfg(image_cfg, data)
        self.image_cfg = size
        self.spec = _Spec(
            sources=sources, resampled=bool(data.resampled), seed=self.seed, rank=self.rank,
            world_size=self.world_size, slots=slots, batch_size=self.batch_size, quota=quota,
            per_slot=per_slot, shuffle_buffer=int(data.shuffle_buffer), img_keys=image_keys(data.image_key),
            caption_key=data.caption_key,
            transform=ImageTransform(size["size"], True, tuple(data.crop_scale), data.interpolation, data.hflip,
                                     (data.randaugment.n, data.randaugment.m)),
            mean=size["mean"], std=size["std"], tokenizer=tokenizer,
            max_corrupt_fraction=float(data.max_corrupt_fraction), remote_timeout=timeout)
        self.batches_per_epoch = quota * slots
        self.epoch = 0
        self.consumed = 0  # batches handed out in this epoch
        self._snaps: Dict[int, dict] = {}
        self._samples = 0
        self._batches = 0
        self._repeated = 0
        self._skipped: Counter = Counter()
        self._skipped_by_shard: Counter = Counter()
        self._mix = [0] * len(sources)

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Dict]:
        while True:
            yield from self._epoch()
            self.epoch += 1
            self.consumed = 0
            self._snaps = {}

    def _expected_workers(self, rotation: int) -> Iterator[int]:
        """Round-robin order of logical workers for the rest of this epoch."""
        left = {w: self.spec.quota - int(self._snaps.get(w, {}).get("batches", 0)) for w in range(self.spec.slots)}
        order = [(j + rotation) % self.spec.slots for j in range(self.spec.slots)]
        while any(left.values()):
            for w in order:
                if left[w] > 0:
                    left[w] -= 1
                    yield w

    def _epoch(self) -> Iterator[Dict]:
        rotation = self.consumed % self.spec.slots
        expected = self._expected_workers(rotation)
        loader = _data_loader(_TrainDataset(self.spec, self.epoch, rotation, dict(self._snaps)), self.workers)
        for batch in loader:
            meta = batch.pop("_meta")
            want = next(expected, None)
            if meta["worker"] != want:
                raise RuntimeError(f"data loader order broke: got a batch of worker {meta['worker']}, "
                                   f"expected {want} (epoch {self.epoch}, batch {self.consumed})")
            self._snaps[meta["worker"]] = meta["state"]
            self._skipped.update(meta["skipped"]["reasons"])
            self._skipped_by_shard.update(meta["skipped"]["shards"])
            self._repeated += meta["repeated"]
            self._mix = [a + b for a, b in zip(self._mix, meta["mix"])]
            self._samples += len(batch["key"])
            self._batches += 1
            self.consumed += 1
            bad = sum(self._skipped.values())
            check_corrupt(self._samples + bad, bad, self._skipped_by_shard, self.spec.max_corrupt_fraction,
                          f"rank {self.rank}")
            yield batch

    # ------------------------------------------------------------------------------ state
    def _layout(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "slots": self.spec.slots,
                "batch_size": self.batch_size, "seed": self.seed, "resampled": self.spec.resampled,
                "sources": [[s.name, len(s.shards)] for s in self.spec.sources]}

    def state_dict(self) -> dict:
        """JSON-serialisable position: epoch, batches consumed, per-worker stream snapshots, stats."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": self.consumed,
                "layout": self._layout(), "workers": {str(w): s for w, s in self._snaps.items()},
                "stats": self._stat_counts()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')!r}; this vlp reads {STATE_VERSION}")
        counts = sd.get("stats", {})
        self._samples, self._batches = int(counts.get("samples", 0)), int(counts.get("batches", 0))
        self._repeated = int(counts.get("repeated", 0))
        self._skipped = Counter(counts.get("skipped", {}))
        self._skipped_by_shard = Counter(counts.get("skipped_by_shard", {}))
        self._mix = list(counts.get("mix_counts", self._mix))
        self.epoch, self.consumed = int(sd["epoch"]), int(sd["batches"])
        self._snaps = {int(w): s for w, s in sd.get("workers", {}).items()}
        if sd.get("layout") != self._layout() and self.consumed > 0:
            log.warning("data loader state was saved with %s, now %s: the rest of epoch %d is skipped, "
                        "continuing with epoch %d", sd.get("layout"), self._layout(), self.epoch, self.epoch + 1)
            self.epoch, self.consumed, self._snaps = self.epoch + 1, 0, {}
        if self.consumed >= self.batches_per_epoch:
            self.epoch, self.consumed, self._snaps = self.epoch + 1, 0, {}

    def _stat_counts(self) -> dict:
        return {"samples": self._samples, "batches": self._batches, "repeated": self._repeated,
                "skipped": dict(self._skipped), "skipped_by_shard": dict(self._skipped_by_shard),
                "mix_counts": list(self._mix)}

    def stats(self) -> dict:
        """Counts so far: samples, batches, skipped per reason, epoch, realised source mix."""
        out = {"samples": self._samples, "batches": self._batches, "epoch": self.epoch,
               "batches_this_epoch": self.consumed, "batches_per_epoch": self.batches_per_epoch,
               "dropped_per_epoch": self.dropped_per_epoch, "repeated": self._repeated,
               "skipped": {r: int(self._skipped.get(r, 0)) for r in SKIP_REASONS}}
        if len(self.spec.sources) > 1:
            total = max(1, sum(self._mix))
            out["mix"] = {s.name: n / total for s, n in zip(self.spec.sources, self._mix)}
            out["mix_counts"] = {s.name: n for s, n in zip(self.spec.sources, self._mix)}
        return out


def build_train_loader(cfg, image_cfg: Optional[dict], tokenizer, rank: int = 0, world_size: int = 1,
                       batch_size: Optional[int] = None) -> TrainLoader:
    """The training loader for this rank (see the module docstring for its guarantees)."""
    return TrainLoader(cfg, image_cfg, tokenizer, rank, world_size, batch_size)
