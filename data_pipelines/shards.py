"""Shard output shared by every offline writer: numbered tar shards, atomic writes, stats.json.

Each shard is written under a temporary name and renamed when complete, so a reader never sees a
half-written `.tar`; `stats.json` is written the same way, last.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Optional

import webdataset as wds

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive to whole records


def _member_bytes(size: int) -> int:
    """Bytes one member takes in a ustar archive: header block plus data padded to the block size."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _archive_bytes(members: int) -> int:
    """File size of an archive whose members take `members` bytes: end blocks, record padding."""
    return -(-(members + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def prepare_out_dir(out: str, overwrite: bool) -> None:
    """Create OUT; refuse a non-empty OUT unless `overwrite`, which removes old shards and stats."""
    os.makedirs(out, exist_ok=True)
    existing = sorted(os.listdir(out))
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"output directory {out!r} is not empty ({len(existing)} entries, e.g. {existing[0]!r}); "
            "pass --overwrite (overwrite=True) to replace its shards, or choose an empty directory")
    for path in glob.glob(os.path.join(out, "*.tar")) + glob.glob(os.path.join(out, "*.tar.tmp")):
        os.remove(path)
    stats = os.path.join(out, "stats.json")
    if os.path.exists(stats):
        os.remove(stats)


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


class ShardWriter:
    """Writes samples (`key -> {ext: bytes}`) into `{prefix}-{NNNNNN}.tar` shards.

    A new shard starts when the current one holds `samples_per_shard` samples or the next sample
    would push it past `max_shard_bytes` (0: no byte limit; a single sample larger than the limit
    still gets a shard of its own).
    """

    def __init__(self, out: str, prefix: str, samples_per_shard: int = 1000,
                 max_shard_bytes: int = 0, mtime: Optional[float] = 0.0):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
        if max_shard_bytes < 0:
            raise ValueError(f"max_shard_bytes must be >= 0, got {max_shard_bytes}")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", prefix):
            raise ValueError(f"shard prefix {prefix!r} may contain only letters, digits, '_' and '-'")
        self.out, self.prefix = out, prefix
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.mtime = mtime  # fixed mtime: the same input gives byte-identical shards
        self.shards: List[Dict] = []
        self._writer = None
        self._tmp = self._path = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = os.path.join(self.out, name)
        self._tmp = self._path + ".tmp"
        self._writer = wds.TarWriter(self._tmp, encoder=False, mtime=self.mtime)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self._tmp, self._path)
        self.shards.append({"name": os.path.basename(self._path), "samples": self._count,
                            "bytes": os.path.getsize(self._path)})
        self._writer = None

    def write(self, key: str, files: Dict[str, bytes]) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        size = sum(_member_bytes(len(v)) for v in files.values())
        if self._writer is not None and (
                self._count >= self.samples_per_shard
                or (self.max_shard_bytes and _archive_bytes(self._bytes + size) > self.max_shard_bytes)):
            self._finish()
        if self._writer is None:
            self._open()
        sample = {"__key__": key}
        sample.update(files)
        self._writer.write(sample)
        self._count += 1
        self._bytes += size

    def close(self) -> List[Dict]:
        """Finish the open shard; returns the list of shards written ({name, samples, bytes})."""
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (on error) so no partial file remains."""
        if self._writer is not None:
            self._writer.close()
            os.remove(self._tmp)
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
