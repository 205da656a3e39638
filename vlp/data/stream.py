"""One loader slot's stream of raw (undecoded) samples: read planned ranges, mix sources,
shuffle, and snapshot/restore at any point.

A position is `(source, pass, range, offset)`: the `offset`-th sample of range `range` in the
plan of pass `pass`. Plans are pure functions of the seeds (see `plan.py`), so a snapshot is just
the next position per source, the positions of the samples held by the shuffle buffer, the drain
flag and the RNG state. Restoring re-reads only the samples the buffer held (local shards are
entered by seeking to the sample's tar header) and continues reading at the saved positions, so
the restored stream is identical to the uninterrupted one.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlp.data.plan import Range
from vlp.data.remote import DEFAULT_TIMEOUT, redact
from vlp.data.shards import Shard, error_text, read_shard

log = logging.getLogger(__name__)

PASS_END = object()  # a source finished one pass over its plan
Pos = Tuple[int, int, int, int]
OnError = Callable[[str, str, int], None]  # reason, shard url, count


class SourceStream:
    """Reads the ranges of pass 0, 1, 2, ... of one source; `pos` is the next (pass, range, offset)."""

    def __init__(self, index: int, shards: Sequence[Shard], plan: Callable[[int], List[Range]],
                 on_error: OnError, pos: Sequence[int] = (0, 0, 0), timeout: float = DEFAULT_TIMEOUT):
        self.index, self.shards, self.plan_fn, self.on_error = index, shards, plan, on_error
        self.timeout = timeout  # seconds a remote read may wait for data
        self.pos = list(pos)
        self._plans: Dict[int, List[Range]] = {}
        self._gen = self._read()

    def plan(self, pass_: int) -> List[Range]:
        if pass_ not in self._plans:
            self._plans = {pass_: self.plan_fn(pass_)}  # keep one: passes are read in order
        return self._plans[pass_]

    def _shard_error(self, reason: str, url: str, exn: BaseException) -> None:
        log.warning("shard %s: %s, the rest of it skipped (%s)", redact(url), reason, error_text(exn))
        self.on_error(reason, url, 1)

    def _read(self):
        while True:
            p, r, off = self.pos
            ranges = self.plan(p)
            if r >= len(ranges):
                self.pos = [p + 1, 0, 0]
                yield PASS_END
                continue
            shard_idx, start, end = ranges[r]
            url = self.shards[shard_idx].url
            got = 0
            if end is None or start + off < end:
                for k, sample in read_shard(url, self._shard_error, start + off, end, self.timeout):
                    self.pos = [p, r, k - start + 1]
                    got += 1
                    yield (self.index, p, r, k - start), sample
            if end is not None and start + off + got < end:
                self.on_error("short_shard", url, end - start - off - got)
            self.pos = [p, r + 1, 0]

    def __next__(self):
        return next(self._gen)

    def describe(self) -> List[str]:
        """The shard URLs of this slot's first pass (for error messages)."""
        return sorted({self.shards[i].url for i, _, _ in self.plan(0)})

    def extra_state(self, buffered: Sequence[Pos]) -> None:
        """Nothing beyond `pos`: plans are functions of the seeds (an hf source keeps its dataset's state)."""
        return None

    def restore(self, pos: Sequence[int], extra: Optional[dict] = None) -> None:
        self.pos = [int(x) for x in pos]

    def fetch(self, wanted: List[Pos], extra: Optional[dict] = None) -> Dict[Pos, dict]:
        """Read the samples at the given positions of this source (for restoring a shuffle buffer)."""
        by_range: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        for _, p, r, k in wanted:
            by_range[(p, r)].append(k)
        found: Dict[Pos, dict] = {}
        for (p, r), offsets in sorted(by_range.items()):
            shard_idx, start, end = self.plan_fn(p)[r]
            need = set(offsets)
            for k, sample in read_shard(self.shards[shard_idx].url, self._shard_error,
                                        start + min(need), start + max(need) + 1, self.timeout):
                if k - start in need:
                    found[(self.index, p, r, k - start)] = sample
        return found


class RawStream:
    """Sources mixed by weight (a seeded draw per sample), then a shuffle buffer.

    `drain_between_passes` (single source, epoch mode): at the end of a pass the buffer is
    emptied before the next pass is read, so one pass is exactly one set of samples.
    """

    def __init__(self, sources: List[SourceStream], weights: Sequence[float], buffer_size: int,
                 rng: np.random.Generator, drain_between_passes: bool):
        self.sources, self.rng = sources, rng
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.size = max(1, buffer_size)
        self.drain_between_passes = drain_between_passes
        self.buf: List[Tuple[Pos, dict]] = []
        self.draining = False
        self.passes = 0  # pass ends seen (all sources)
        self._empty_passes = 0  # consecutive pass ends without a sample: unreadable shards

    def _pull(self):
        s = 0
        if len(self.sources) > 1:
            s = min(int(np.searchsorted(self.cum, self.rng.random(), side="right")), len(self.sources) - 1)
        while True:
            item = next(self.sources[s])
            if item is not PASS_END:
                self._empty_passes = 0
                return item
            self.passes += 1
            self._empty_passes += 1
            if self._empty_passes > 2:
                urls = self.sources[s].describe()
                raise RuntimeError(f"no readable sample in two passes over {len(urls)} shard(s), e.g. "
                                   f"{urls[:3]}: check the shard files (see the skipped counts)")
            if len(self.sources) == 1:
                return item

    def __next__(self) -> Tuple[Pos, dict]:
        while True:
            while not self.draining and len(self.buf) < self.size:
                item = self._pull()
                if item is PASS_END:
                    if self.drain_between_passes:
                        self.draining = True
                    continue
                self.buf.append(item)
            if not self.buf:
                self.draining = False
                continue
            j = int(self.rng.integers(len(self.buf))) if len(self.buf) > 1 else 0
            self.buf[j], self.buf[-1] = self.buf[-1], self.buf[j]
            return self.buf.pop()

    def snapshot(self) -> dict:
        """JSON-serialisable state: positions, buffered sample positions, drain flag, RNG."""
        buffered = [p for p, _ in self.buf]
        snap = {"pos": [list(s.pos) for s in self.sources], "buf": [list(p) for p in buffered],
                "draining": self.draining, "passes": self.passes, "rng": self.rng.bit_generator.state}
        extra = [s.extra_state(buffered) for s in self.sources]
        if any(e is not None for e in extra):
            snap["extra"] = extra  # hf sources: the dataset's own state (vlp.data.hf_source)
        return snap

    def restore(self, snap: dict, on_missing: Optional[Callable[[int], None]] = None) -> None:
        """Continue exactly where `snap` was taken (sources must be freshly built at pos 0)."""
        wanted = [tuple(p) for p in snap["buf"]]
        extra = snap.get("extra") or [None] * len(self.sources)
        found: Dict[Pos, dict] = {}
        for src, ex in zip(self.sources, extra):
            found.update(src.fetch([p for p in wanted if p[0] == src.index], ex))
        self.buf = [(p, found[p]) for p in wanted if p in found]
        if on_missing and len(self.buf) < len(wanted):
            on_missing(len(wanted) - len(self.buf))
        for src, pos, ex in zip(self.sources, snap["pos"], extra):
            src.restore(pos, ex)
        self.draining = bool(snap["draining"])
        self.passes = int(snap.get("passes", 0))
        self.rng.bit_generator.state = snap["rng"]
