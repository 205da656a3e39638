"""SHARDS arguments of the offline tools: a directory, a brace pattern, or a '::'-joined list."""
from __future__ import annotations

from typing import Dict, Iterator, List

import webdataset as wds


class InputError(ValueError):
    """Bad input a user can fix (missing files, unknown format, wrong column): the message says how."""


def expand_shards(spec: str) -> List[str]:
    """Shard paths/URLs named by `spec` (one grammar with training: `vlp.data.shards.expand_shards`)."""
    from vlp.config import ConfigError
    from vlp.data.shards import expand_shards as expand

    try:
        return expand(spec, what="SHARDS")
    except ConfigError as e:
        raise InputError(str(e)) from None


def iter_samples(paths: List[str]) -> Iterator[Dict]:
    """Raw samples (`__key__`, `__url__`, extension -> bytes) in shard order, nothing decoded."""
    return iter(wds.WebDataset(paths, shardshuffle=False, empty_check=False, nodesplitter=None,
                               workersplitter=None))
