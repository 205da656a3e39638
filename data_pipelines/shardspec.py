"""SHARDS arguments of the offline tools: a directory, a brace pattern, or a '::'-joined list."""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterator, List, Optional

from vlp.config import ConfigError
from vlp.data.shards import expand_shards as expand
from vlp.data.shards import read_shard


class InputError(ValueError):
    """Bad input a user can fix (missing files, unknown format, wrong column): the message says how."""


def expand_shards(spec: str) -> List[str]:
    """Shard paths/URLs named by `spec` (one grammar with training: `vlp.data.shards.expand_shards`)."""
    try:
        return expand(spec, what="SHARDS")
    except ConfigError as e:
        raise InputError(str(e)) from None


def iter_samples(paths: List[str], skipped: Optional[Counter] = None) -> Iterator[Dict]:
    """Raw samples (`__key__`, `__url__`, extension -> bytes) in shard order, nothing decoded, read by the
    training reader (`vlp.data.shards.read_shard`): a tar cut short or unreadable ends that shard and is
    counted in `skipped` by reason (`truncated_tar`, `read_error`), and the tool goes on."""
    for url in paths:
        for _, sample in read_shard(url, lambda reason, _url, _exn: skipped.update([reason])
                                    if skipped is not None else None):
            sample.setdefault("__url__", url)
            yield sample
