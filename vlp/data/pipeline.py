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

A `data.sources` entry of kind hf streams a Hugging Face dataset instead of shards
(`vlp.data.hf_source`): it is read by `datasets` per slot and counts as a weighted, length-less
source (the epoch is `data.samples_per_epoch`, or the split's size when the dataset's info has it).

Corrupt data is skipped and counted per reason (`samples.SKIP_REASONS`); each batch carries its
worker's counts, summed by `stats()`. Once 100+ samples were read (per worker, and summed over a
rank's workers) and more than `data.max_corrupt_fraction` of them were corrupt, `CorruptDataError`
names the worst shard. A caption field holding several captions (one per line) gives a random one.

Resume is exact in every mode (epoch, resampled, mixed): each batch carries its worker's stream
snapshot (`stream.py`); `state_dict()` keeps the latest per worker. A restored loader restarts the
epoch's workers from those snapshots and rotates the DataLoader workers so the round-robin
continues at the worker that was next. On another world size, `data.workers` or batch size,
`load_states` takes every rank's saved state and re-splits the rest of the epoch over the new
slots (`EpochPlan`): each sample not yet consumed is consumed once. With other seeds or sources it
warns and starts the next epoch. DataLoader workers are started afresh each epoch.
"""
from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.config import ConfigError, frames_at
from vlp.data.plan import (Range, batches_per_worker, epoch_ranges, merge_ranges, resampled_ranges,
                           window_ranges)
from vlp.data.samples import SKIP_REASONS, collate, decode_clip_sample, decode_sample, image_keys, pick_caption
from vlp.data.shards import Shard, resolve_shards
from vlp.data.stream import RawStream, SourceStream
from vlp.data.transforms import ImageTransform, resolve_image_cfg
from vlp.data.video import VideoTransform
from vlp.dist import ignore_stop_signals, kill_workers_at_exit, run_on_rank0, stop_signals_blocked

log = logging.getLogger(__name__)
STATE_VERSION = 1


class CorruptDataError(RuntimeError):
    """Too large a fraction of the samples read is corrupt."""


@dataclass
class Source:
    name: str
    shards: List[Shard]
    weight: float
    hf: Any = None  # kind hf: its data.sources entry (vlp.data.hf_source); shards stay empty


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
    per_slot: List[int]  # epoch mode: samples per slot per pass, per source
    shuffle_buffer: int
    img_keys: List[str]
    caption_key: str
    transform: ImageTransform
    tokenizer: Any
    max_corrupt_fraction: float
    remote_timeout: float = 60.0  # seconds an http(s) shard read may wait for data
    train: bool = True
    video_keys: Optional[List[str]] = None  # video models: clips from these fields (images: 1-frame clips)
    video_transform: Any = None  # vlp.data.video.VideoTransform, its `frames` set by the curriculum
    device_decode: bool = False  # data.decode=device: JPEG bytes + crop/flip in the batch, decoded by the trainer


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


@dataclass
class EpochPlan:
    """What one epoch reads on this layout. The default: pass 0 of each source is its shards shuffled with
    (seed, epoch), cut into `per_slot` pieces, `quota` batches per slot. After a resume on another layout
    (`TrainLoader.load_states`) the rest of the epoch is explicit: `seqs[i]` is the sequence of source i's
    samples not yet consumed, cut into the new slots' pieces; `segment` counts such re-splits (it seeds
    the workers' RNG and resampled draws anew); `dropped` samples of it did not fill a global batch."""
    quota: int
    per_slot: List[int]
    seqs: Optional[List[List[Range]]] = None
    segment: int = 0
    dropped: int = 0

    def to_dict(self) -> dict:
        return {"quota": self.quota, "per_slot": list(self.per_slot), "segment": self.segment,
                "dropped": self.dropped, "seqs": [[list(r) for r in seq] for seq in self.seqs] if self.seqs else None}

    @staticmethod
    def from_dict(d: dict) -> "EpochPlan":
        seqs = [[tuple(r) for r in seq] for seq in d["seqs"]] if d.get("seqs") else None
        return EpochPlan(int(d["quota"]), [int(x) for x in d["per_slot"]], seqs, int(d.get("segment", 0)),
                         int(d.get("dropped", 0)))


def _worker_rng(spec: _Spec, epoch: int, worker: int, segment: int = 0) -> np.random.Generator:
    keys = [spec.seed & 0xFFFFFFFF, epoch, spec.rank, worker, 3] + ([segment] if segment else [])
    return np.random.default_rng(keys)


def _slot_plan(spec: _Spec, plan: EpochPlan, epoch: int, slot: int, rank: int, worker: int, source: int,
               later_per_slot: Optional[List[int]] = None):
    """Pass p -> the ranges source `source` gives slot `slot` (rank, worker) in `epoch` under `plan`; passes
    after the first are whole shuffled passes cut into `later_per_slot` (default: this layout's) pieces."""
    later = spec.per_slot if later_per_slot is None else later_per_slot
    src = spec.sources[source]
    if spec.resampled:
        return lambda p: resampled_ranges(len(src.shards), spec.seed, epoch, rank, worker, source, p, plan.segment)
    counts = [s.samples for s in src.shards]

    def ranges(p: int) -> List[Range]:
        if p == 0 and plan.seqs is not None:  # the rest of a re-split epoch
            n = plan.per_slot[source]
            return window_ranges(plan.seqs[source], slot * n, (slot + 1) * n)
        return epoch_ranges(counts, spec.seed, epoch, source, p, slot, plan.per_slot[source] if p == 0 else later[source])
    return ranges


def _source_streams(spec: _Spec, plan: EpochPlan, epoch: int, worker: int, on_error) -> List[Any]:
    slot = spec.rank * spec.slots + worker
    streams: List[Any] = []
    for i, src in enumerate(spec.sources):
        if src.hf is not None:
            from vlp.data.hf_source import HFSourceStream

            streams.append(HFSourceStream(i, src.hf, slot, spec.world_size * spec.slots, spec.img_keys[0],
                                          spec.caption_key, on_error, spec.shuffle_buffer))
        else:
            streams.append(SourceStream(i, src.shards, _slot_plan(spec, plan, epoch, slot, spec.rank, worker, i),
                                        on_error, timeout=spec.remote_timeout))
    return streams


def _train_batches(spec: _Spec, plan: EpochPlan, epoch: int, worker: int, snap: Optional[dict]) -> Iterator[Dict]:
    """The `plan.quota` batches of one slot in one epoch, continuing from `snap` when given."""
    counters = _Counters(spec, f"rank {spec.rank} worker {worker}", snap and snap.get("counters"))
    rng = _worker_rng(spec, epoch, worker, plan.segment)
    sources = _source_streams(spec, plan, epoch, worker, lambda reason, url, n: counters.skip(reason, url, n))
    single_epoch = not spec.resampled and len(spec.sources) == 1
    raw = RawStream(sources, [s.weight for s in spec.sources], spec.shuffle_buffer, rng,
                    drain_between_passes=single_epoch)
    done = 0
    if snap:
        raw.restore(snap["stream"], on_missing=lambda n: counters.skip("read_error", "(shuffle buffer)", n))
        done = int(snap["batches"])
    while done < plan.quota:
        images, captions, keys, frames = [], [], [], []
        mix = [0] * len(spec.sources)
        repeated = 0
        while len(images) < spec.batch_size:
            (s, p, _, _), sample = next(raw)
            counters.sample()
            if spec.video_keys is None:
                out = decode_sample(sample, spec.img_keys, spec.caption_key, spec.transform, rng,
                                    defer=spec.device_decode)
            else:
                out = decode_clip_sample(sample, spec.video_keys, spec.img_keys, spec.caption_key,
                                         spec.video_transform, spec.transform, rng)
            if isinstance(out, str):
                counters.skip(out, sample.get("__url__", "?"))
                continue
            images.append(out[0])
            if spec.video_keys is not None:
                frames.append(out[1])
            captions.append(pick_caption(out[-1], rng))
            keys.append(sample["__key__"])
            mix[s] += 1
            repeated += single_epoch and p > 0
        batch = collate(images, captions, keys, spec.tokenizer, frames if spec.video_keys is not None else None,
                        size=spec.transform.size if spec.device_decode else 0)
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
    def __init__(self, spec: _Spec, plan: EpochPlan, epoch: int, rotation: int, snaps: Dict[int, dict]):
        super().__init__()
        self.spec, self.plan, self.epoch, self.rotation, self.snaps = spec, plan, epoch, rotation, snaps

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.spec.slots
        return _train_batches(self.spec, self.plan, self.epoch, worker, self.snaps.get(worker))


def _sources(data) -> List[Source]:
    if data.sources and data.train_shards:
        raise ConfigError("set either 'data.train_shards' or 'data.sources', not both")
    if not data.sources:
        return [Source("0", [], 1.0)]
    return [Source(s.name or str(i), [], float(s.weight), s if s.kind == "hf" else None)
            for i, s in enumerate(data.sources)]


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
        spe = int(data.samples_per_epoch)

        def resolve():
            out = []
            for src, spec, what in zip(sources, specs, whats):
                if src.hf is None:
                    out.append((resolve_shards(spec, what, counts=need_counts, timeout=timeout), None))
                else:  # opened here once (columns checked before any worker starts); rows from its info
                    from vlp.data.hf_source import epoch_size

                    out.append(([], epoch_size(src.hf)))
            return out
        resolved = run_on_rank0(resolve)
        for src, (shards, _) in zip(sources, resolved):
            src.shards = shards
        for i, (src, (_, rows)) in enumerate(zip(sources, resolved)):
            if src.hf is not None and spe <= 0 and rows is None:
                raise ConfigError(f"data.sources[{i}] (hf: {src.hf.path}): the dataset does not say how many rows "
                                  "its split has; set data.samples_per_epoch (samples per epoch over all sources)")
        self._totals = [sum(s.samples or 0 for s in src.shards) if src.hf is None else int(rows or 0)
                        for src, (_, rows) in zip(sources, resolved)]
        self._streaming = any(src.hf is not None for src in sources)  # sources vlp's plans do not cut
        self.spec_sources = sources
        self._whats = [w if src.hf is None else f"data.sources[{i}] (hf: {src.hf.path})"
                       for i, (w, src) in enumerate(zip(whats, sources))]
        self._resampled, self._samples_per_epoch = bool(data.resampled), int(data.samples_per_epoch)
        plan = self._default_plan(self.world_size, slots, self.batch_size)
        per_slot = plan.per_slot
        self.dropped_per_epoch = plan.dropped
        size = resolve_image_cfg(image_cfg, data)
        self.image_cfg = size
        self.spec = _Spec(
            sources=sources, resampled=bool(data.resampled), seed=self.seed, rank=self.rank,
            world_size=self.world_size, slots=slots, batch_size=self.batch_size,
            per_slot=per_slot, shuffle_buffer=int(data.shuffle_buffer), img_keys=image_keys(data.image_key),
            caption_key=data.caption_key,
            transform=ImageTransform(size["size"], True, tuple(data.crop_scale), data.interpolation, data.hflip,
                                     (data.randaugment.n, data.randaugment.m)),
            tokenizer=tokenizer,
            max_corrupt_fraction=float(data.max_corrupt_fraction), remote_timeout=timeout)
        self.spec.device_decode = data.decode == "device"
        if cfg.model.video.enabled:
            v = data.video
            self.spec.video_keys = image_keys(v.key)
            self.spec.video_transform = VideoTransform(
                size["size"], True, frames_at(v.curriculum, v.frames, 0), tuple(data.crop_scale),
                data.interpolation, data.hflip, min_seconds=float(v.min_seconds))
        self.plan = plan  # this epoch's; the default one unless the run was resumed on another layout
        self.batches_per_epoch = plan.quota * slots
        self.epoch = 0
        self.consumed = 0  # batches handed out in this epoch
        self._snaps: Dict[int, dict] = {}
        self._samples = 0
        self._batches = 0
        self._repeated = 0
        self._skipped: Counter = Counter()
        self._skipped_by_shard: Counter = Counter()
        self._mix = [0] * len(sources)
        self._resplit_dropped = 0

    def _default_plan(self, world: int, slots: int, batch: int) -> EpochPlan:
        """The plan of an epoch read by `world` ranks x `slots` loader slots x batches of `batch`."""
        totals, whats = self._totals, self._whats
        if not self._resampled and len(totals) == 1 and not self._streaming:
            quota = batches_per_worker(totals[0], world, slots, batch, whats[0])
            return EpochPlan(quota, [quota * batch], dropped=totals[0] - quota * batch * slots * world)
        spe = self._samples_per_epoch
        total = spe if spe > 0 else sum(totals)
        quota = batches_per_worker(total, world, slots, batch, "data.samples_per_epoch" if spe > 0 else whats[0])
        per_slot = []
        if not self._resampled:
            per_slot = [n // (world * slots) for n in totals]
            for n, what, src in zip(per_slot, whats, self.spec_sources):
                if n == 0 and src.hf is None:
                    raise ConfigError(f"{what}: fewer samples than loader slots (world size x data.workers)")
        return EpochPlan(quota, per_slot)

    def _reset_plan(self) -> None:
        self.plan = self._default_plan(self.world_size, self.spec.slots, self.batch_size)
        self.batches_per_epoch = self.plan.quota * self.spec.slots

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Dict]:
        while True:
            yield from self._epoch()
            self.epoch += 1
            self.consumed = 0
            self._snaps = {}
            if self.plan.seqs is not None or self.plan.segment:
                self._reset_plan()

    def _expected_workers(self, rotation: int) -> Iterator[int]:
        """Round-robin order of logical workers for the rest of this epoch."""
        left = {w: self.plan.quota - int(self._snaps.get(w, {}).get("batches", 0)) for w in range(self.spec.slots)}
        order = [(j + rotation) % self.spec.slots for j in range(self.spec.slots)]
        while any(left.values()):
            for w in order:
                if left[w] > 0:
                    left[w] -= 1
                    yield w

    def _epoch(self) -> Iterator[Dict]:
        rotation = self.consumed % self.spec.slots
        expected = self._expected_workers(rotation)
        loader = _data_loader(_TrainDataset(self.spec, self.plan, self.epoch, rotation, dict(self._snaps)),
                              self.workers)
        with stop_signals_blocked():  # the workers start here, with SIGINT/SIGTERM blocked until they ignore them
            batches = iter(loader)
        for batch in batches:
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

    @property
    def frames(self) -> int:
        """Frames per clip the loader decodes now (video models; 0 for images)."""
        return self.spec.video_transform.frames if self.spec.video_transform is not None else 0

    def set_frames(self, k: int) -> bool:
        """Decode `k` frames per clip from the next batch on (the frame curriculum). The workers restart
        from the loader's exact position (its state), so no sample is lost or repeated by the change.
        Returns whether anything changed; the caller must then start a new iterator."""
        if self.spec.video_transform is None or self.frames == int(k):
            return False
        sd = self.state_dict()
        self.spec.video_transform = self.spec.video_transform.with_frames(int(k))
        self.load_state_dict(sd)
        return True

    # ------------------------------------------------------------------------------ state
    def _layout(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "slots": self.spec.slots,
                "batch_size": self.batch_size, "seed": self.seed, "resampled": self.spec.resampled,
                "sources": [[s.name, s.hf.path if s.hf is not None else len(s.shards)] for s in self.spec.sources]}

    def state_dict(self) -> dict:
        """JSON-serialisable position: epoch, batches consumed, per-worker stream snapshots, stats (and the
        epoch's plan after a re-split)."""
        sd = {"version": STATE_VERSION, "epoch": self.epoch, "batches": self.consumed,
              "layout": self._layout(), "workers": {str(w): s for w, s in self._snaps.items()},
              "stats": self._stat_counts()}
        if self.plan.seqs is not None or self.plan.segment:
            sd["plan"] = self.plan.to_dict()
        return sd

    def _load_stats(self, counts: dict) -> None:
        self._samples, self._batches = int(counts.get("samples", 0)), int(counts.get("batches", 0))
        self._repeated = int(counts.get("repeated", 0))
        self._skipped = Counter(counts.get("skipped", {}))
        self._skipped_by_shard = Counter(counts.get("skipped_by_shard", {}))
        self._mix = list(counts.get("mix_counts", self._mix))
        self._resplit_dropped = int(counts.get("dropped_at_resplit", 0))

    def load_state_dict(self, sd: dict) -> None:
        """This rank's saved position on the same layout (see `load_states` for any layout)."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')!r}; this vlp reads {STATE_VERSION}")
        self._load_stats(sd.get("stats", {}))
        self.epoch, self.consumed = int(sd["epoch"]), int(sd["batches"])
        self._snaps = {int(w): s for w, s in sd.get("workers", {}).items()}
        if sd.get("plan"):
            self.plan = EpochPlan.from_dict(sd["plan"])
            self.batches_per_epoch = self.plan.quota * self.spec.slots
        if sd.get("layout") != self._layout() and self.consumed > 0:
            log.warning("data loader state was saved with %s, now %s: the rest of epoch %d is skipped, "
                        "continuing with epoch %d", sd.get("layout"), self._layout(), self.epoch, self.epoch + 1)
            self._next_epoch()
        if self.consumed >= self.batches_per_epoch:
            self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch, self.consumed, self._snaps = self.epoch + 1, 0, {}
        self._reset_plan()

    def load_states(self, states: List[dict]) -> None:
        """Every rank's saved position (rank order), on any layout. With this rank's layout unchanged it is
        `load_state_dict(states[rank])`, exact. Otherwise (another world size, data.workers or batch size)
        the samples of the current epoch that no rank consumed yet are laid end to end, in the old slots'
        order, and cut anew over this layout's slots: each is consumed once, none consumed before comes back;
        what does not fill a last global batch is dropped and counted (`dropped_at_resplit`). Later epochs
        are planned from the seed and the epoch alone, as always."""
        for sd in states:
            if sd.get("version") != STATE_VERSION:
                raise ValueError(f"data loader state version {sd.get('version')!r}; this vlp reads {STATE_VERSION}")
        if len(states) == self.world_size and states[self.rank].get("layout") == self._layout():
            return self.load_state_dict(states[self.rank])
        old = states[0]["layout"]
        mine = self._layout()
        epochs = {(int(sd["epoch"]), int(sd["batches"])) for sd in states}
        if len(epochs) != 1:
            raise ValueError(f"the ranks' saved loader positions disagree (epoch, batches): {sorted(epochs)}")
        if self.rank == 0:  # one rank carries the totals so far: they are summed over ranks in the logs
            summed: Dict[str, Any] = {}
            for sd in states:
                for k, v in sd.get("stats", {}).items():
                    if isinstance(v, dict):
                        summed[k] = dict(Counter(summed.get(k, {})) + Counter(v))
                    elif isinstance(v, list):
                        summed[k] = [a + b for a, b in zip(summed.get(k, [0] * len(v)), v)]
                    else:
                        summed[k] = summed.get(k, 0) + v
            self._load_stats(summed)
        self.epoch, self.consumed, self._snaps = int(states[0]["epoch"]), 0, {}
        same_data = all(old.get(k) == mine.get(k) for k in ("seed", "resampled", "sources"))
        if not same_data:
            log.warning("data loader state was saved with seed/sources %s, now %s: the rest of epoch %d is skipped, "
                        "continuing with epoch %d", {k: old.get(k) for k in ("seed", "resampled", "sources")},
                        {k: mine.get(k) for k in ("seed", "resampled", "sources")}, self.epoch, self.epoch + 1)
            return self._next_epoch()
        self._resplit(states)

    def _old_plan(self, sd: dict) -> EpochPlan:
        lay = sd["layout"]
        return EpochPlan.from_dict(sd["plan"]) if sd.get("plan") else \
            self._default_plan(int(lay["world_size"]), int(lay["slots"]), int(lay["batch_size"]))

    def _slot_rest(self, plan: EpochPlan, later: List[int], slot: int, rank: int, worker: int,
                   snap: Optional[dict]) -> List[List[Range]]:
        """Per source, the ranges of one old slot's pass that it has not consumed: the samples in its shuffle
        buffer, then what it has not read. Single-source epochs count pass 0 only (later passes of a slot
        make up for corrupt samples and are another slot's samples again)."""
        spec, single = self.spec, len(self.spec.sources) == 1
        out: List[List[Range]] = []
        for i in range(len(spec.sources)):
            fn = _slot_plan(spec, plan, self.epoch, slot, rank, worker, i, later)
            cache: Dict[int, List[Range]] = {}

            def ranges(p: int) -> List[Range]:
                if p not in cache:
                    cache[p] = fn(p)
                return cache[p]
            if snap is None:
                out.append(list(ranges(0)))
                continue
            stream = snap["stream"]
            p_now, r_now, off = (int(x) for x in stream["pos"][i])
            rest: List[Range] = []
            for s, p, r, k in sorted(tuple(int(x) for x in b) for b in stream["buf"]):
                if s == i and (p == 0 or not single):
                    shard, start, _ = ranges(p)[r]
                    rest.append((shard, start + k, start + k + 1))
            if p_now == 0 or not single:
                plan_now = ranges(p_now)
                for j in range(r_now, len(plan_now)):
                    shard, start, end = plan_now[j]
                    lo = start + (off if j == r_now else 0)
                    if end is not None and lo < end:
                        rest.append((shard, lo, end))
            out.append(rest)
        return out

    def _resplit(self, states: List[dict]) -> None:
        """The rest of the epoch, from every old rank's state, over this layout (see `load_states`)."""
        lay = states[0]["layout"]
        w0, s0, b0 = int(lay["world_size"]), int(lay["slots"]), int(lay["batch_size"])
        old = self._old_plan(states[0])
        later = [] if self._resampled else self._default_plan(w0, s0, b0).per_slot
        consumed = int(states[0]["batches"])
        world, slots, batch = self.world_size, self.spec.slots, self.batch_size
        n_src = len(self.spec.sources)
        seqs: List[List[Range]] = [[] for _ in range(n_src)]
        if not self._resampled and not self._streaming:
            for r in range(w0):
                workers = states[r].get("workers", {})
                for w in range(s0):
                    for i, rest in enumerate(self._slot_rest(old, later, r * s0 + w, r, w, workers.get(str(w)))):
                        seqs[i].extend(rest)
            seqs = [merge_ranges(seq) for seq in seqs]
        lengths = [sum(e - a for _, a, e in seq) for seq in seqs]
        if not self._resampled and n_src == 1 and not self._streaming:
            remaining = lengths[0]
        else:  # an epoch of mixed or resampled sources is a number of samples
            remaining = max(0, (old.quota * s0 - consumed) * w0 * b0)
        quota = remaining // (world * slots * batch)
        dropped = remaining - quota * world * slots * batch
        self._resplit_dropped += dropped if self.rank == 0 else 0
        if self.rank == 0:
            print(f"vlp train: data: the rest of epoch {self.epoch} ({remaining} samples not yet consumed by "
                  f"{w0} rank(s) x {s0} loader slot(s) x batch {b0}) is re-split over {world} rank(s) x {slots} "
                  f"slot(s) x batch {batch}: {quota} batch(es) per slot; {dropped} sample(s) that do not fill a "
                  "global batch are dropped, like an epoch's tail", file=sys.stderr, flush=True)
        if quota == 0:
            return self._next_epoch()
        cut = not self._resampled and not self._streaming  # vlp's plans cut the data: the rest is explicit
        per_slot = ([quota * batch] if n_src == 1 else [n // (world * slots) for n in lengths]) if cut else \
            self._default_plan(world, slots, batch).per_slot
        self.plan = EpochPlan(quota, per_slot, seqs if cut else None, old.segment + 1, dropped)
        self.batches_per_epoch = quota * slots

    def _stat_counts(self) -> dict:
        return {"samples": self._samples, "batches": self._batches, "repeated": self._repeated,
                "skipped": dict(self._skipped), "skipped_by_shard": dict(self._skipped_by_shard),
                "mix_counts": list(self._mix), "dropped_at_resplit": self._resplit_dropped}

    def stats(self) -> dict:
        """Counts so far: samples, batches, skipped per reason, epoch, realised source mix."""
        out = {"samples": self._samples, "batches": self._batches, "epoch": self.epoch,
               "batches_this_epoch": self.consumed, "batches_per_epoch": self.batches_per_epoch,
               "dropped_per_epoch": self.dropped_per_epoch, "repeated": self._repeated,
               "dropped_at_resplit": self._resplit_dropped,
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
