"""A Hugging Face `datasets` source for the training loader (`data.sources[i].kind: hf`).

The dataset is streamed (`load_dataset(path, name, split=, streaming=True)`): a Hub name or a local
path, through the same call. Each loader slot (rank x DataLoader worker) reads its own part,
`split_dataset_by_node(ds, rank=slot, world_size=slots)` (whole files per slot when the file count
divides the slots, else every slot skips to its rows). The image column is read undecoded
(`Image(decode=False)`: the bytes go through vlp's own decode and augmentation, like tar samples).

It plugs into `vlp.data.stream.RawStream` as a source with the same interface as `SourceStream`:
positions `(source, pass, 0, k)` (the k-th row of this slot's pass) and a snapshot that makes resume
exact. The snapshot holds the dataset's own `state_dict()` at the current position, and a mark (a
`state_dict()` taken every `MARK_EVERY` rows) at or before the oldest row still in the shuffle buffer:
restoring the buffer re-reads from that mark, at most the buffer plus `MARK_EVERY` rows.

What an hf source does not give: exactly-once after a resume on another layout (its rows are split by
`datasets`, not by vlp's plan; the rest of the epoch is read afresh there, its length kept), and a
sample count per epoch unless the dataset's info has one: otherwise set `data.samples_per_epoch`.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from vlp.config import ConfigError

log = logging.getLogger(__name__)
MARK_EVERY = 64  # rows between two saved dataset states (bounds the re-read on restore)
Pos = Tuple[int, int, int, int]
INSTALL = "pip install 'vlp[hf]' (or: pip install datasets)"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.sources[].kind=hf needs Hugging Face datasets: {INSTALL}") from None
    return datasets


def open_dataset(spec: Any):
    """The streaming dataset of one hf source (every slot opens its own)."""
    datasets = _datasets()
    kw = {"split": spec.split or "train", "streaming": True}
    if spec.config:
        kw["name"] = spec.config
    if spec.revision:
        kw["revision"] = spec.revision
    try:
        ds = datasets.load_dataset(spec.path, **kw)
    except Exception as e:
        raise ConfigError(f"data.sources[].path={spec.path!r} (config {spec.config!r}, split {kw['split']!r}): "
                          f"datasets cannot open it: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    cols = list(ds.features) if ds.features else None
    for key, col in (("image_column", spec.image_column), ("caption_column", spec.caption_column)):
        if cols is not None and col not in cols:
            raise ConfigError(f"data.sources[].{key}={col!r} is not a column of {spec.path}; columns: {cols}")
    if ds.features and isinstance(ds.features.get(spec.image_column), datasets.Image):
        ds = ds.cast_column(spec.image_column, datasets.Image(decode=False))
    return ds


def epoch_size(spec: Any) -> Optional[int]:
    """Rows of the split when the dataset's info knows them (Hub datasets with a card), else None."""
    try:
        splits = open_dataset(spec).info.splits
        return int(splits[spec.split or "train"].num_examples) if splits else None
    except (KeyError, TypeError):
        return None


def _rows(ds):
    """The rows of `ds` one by one. `IterableDataset.iter`, not `iter(ds)`: inside a DataLoader worker the
    latter shards the dataset over the workers again, and vlp's slots already are the workers."""
    for batch in ds.iter(batch_size=1):
        yield {k: v[0] for k, v in batch.items()}


def _image_bytes(value: Any) -> Optional[bytes]:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    return None


class HFSourceStream:
    """One slot's rows of an hf source, pass after pass, as raw samples for `RawStream`."""

    def __init__(self, index: int, spec: Any, slot: int, n_slots: int, img_key: str, caption_key: str,
                 on_error: Callable[[str, str, int], None], buffer_size: int = 0):
        self.index, self.spec, self.slot, self.n_slots = index, spec, slot, n_slots
        self.img_key, self.caption_key, self.on_error = img_key, caption_key, on_error
        self.url = f"hf:{spec.path}" + (f"/{spec.config}" if spec.config else "") + f"[{spec.split or 'train'}]"
        self.pos = [0, 0, 0]  # pass, 0, rows read in this pass
        self.marks: Deque[Tuple[int, int, dict]] = deque(maxlen=max(4, buffer_size // MARK_EVERY + 4))
        self._ds = None
        self._it = None
        self._gen = self._read()

    # ------------------------------------------------------------------ reading
    def _open(self, state: Optional[dict] = None):
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(open_dataset(self.spec), rank=self.slot, world_size=self.n_slots)
        if state is not None:
            ds.load_state_dict(state)
        return ds

    def _sample(self, p: int, k: int, row: Dict[str, Any]) -> dict:
        key = row.get(self.spec.key_column) if self.spec.key_column else None
        sample = {"__key__": str(key) if key is not None else f"{self.spec.name or self.index}-{self.slot}of"
                  f"{self.n_slots}-{p}-{k}", "__url__": self.url}
        img = _image_bytes(row.get(self.spec.image_column))
        if img is not None:
            sample[self.img_key] = img
        cap = row.get(self.spec.caption_column)
        if cap is not None:
            sample[self.caption_key] = cap if isinstance(cap, str) else str(cap)
        return sample

    def _read(self):
        from vlp.data.stream import PASS_END

        while True:
            p, _, k = self.pos
            if self._ds is None:
                self._ds = self._open()
                self._it = _rows(self._ds)
            if k % MARK_EVERY == 0 and not (self.marks and tuple(self.marks[-1][:2]) == (p, k)):
                # before a pass's first row the dataset has no iteration state yet: None = from the start
                self.marks.append((p, k, self._ds.state_dict() if k else None))
            try:
                row = next(self._it)
            except StopIteration:
                self.pos = [p + 1, 0, 0]
                self._ds = None
                yield PASS_END
                continue
            except Exception as e:  # a file that cannot be read: the rest of this pass is skipped, counted
                log.warning("%s: read error, the rest of this pass skipped (%s: %s)", self.url, type(e).__name__, e)
                self.on_error("read_error", self.url, 1)
                self.pos = [p + 1, 0, 0]
                self._ds = None
                yield PASS_END
                continue
            self.pos = [p, 0, k + 1]
            yield (self.index, p, 0, k), self._sample(p, k, row)

    def __next__(self):
        return next(self._gen)

    def describe(self) -> List[str]:
        return [self.url]

    # ------------------------------------------------------------------ resume
    def extra_state(self, buffered: Sequence[Pos]) -> dict:
        """The dataset's state now, and the newest mark at or before the oldest buffered row of this source."""
        mine = sorted((p, k) for s, p, _, k in buffered if s == self.index)
        mark = None
        if mine:
            oldest = mine[0]
            cands = [m for m in self.marks if (m[0], m[1]) <= oldest]
            if not cands:
                raise RuntimeError(f"{self.url}: no saved dataset state before buffered row {oldest}; "
                                   "raise data.shuffle_buffer's mark history (vlp bug)")
            mark = list(cands[-1])
        now = self._ds.state_dict() if self._ds is not None else None
        return {"now": now, "mark": mark}

    def fetch(self, wanted: List[Pos], extra: Optional[dict] = None) -> Dict[Pos, dict]:
        """Re-read the buffered rows: from the saved mark forward until the newest of them."""
        want = {(p, k) for _, p, _, k in wanted}
        if not want or not extra or not extra.get("mark"):
            return {}
        p, k, state = extra["mark"]
        p, k = int(p), int(k)
        last = max(want)
        found: Dict[Pos, dict] = {}
        it = _rows(self._open(state))
        while (p, k) <= last:
            try:
                row = next(it)
            except StopIteration:
                p, k = p + 1, 0
                it = _rows(self._open())
                continue
            if (p, k) in want:
                found[(self.index, p, 0, k)] = self._sample(p, k, row)
            k += 1
        return found

    def restore(self, pos: Sequence[int], extra: Optional[dict]) -> None:
        """Continue reading at `pos` from the dataset state saved with it."""
        self.pos = [int(x) for x in pos]
        state = (extra or {}).get("now")
        self._ds = self._open(state) if state is not None else None
        self._it = _rows(self._ds) if self._ds is not None else None
        if self._ds is None and self.pos[2] > 0:  # a pass had ended: the next one starts fresh
            self.pos = [self.pos[0] + 1, 0, 0]
        if extra and extra.get("mark"):
            p, k, st = extra["mark"]
            self.marks.append((int(p), int(k), st))
        self._gen = self._read()


__all__ = ["HFSourceStream", "open_dataset", "epoch_size", "MARK_EVERY", "INSTALL"]
