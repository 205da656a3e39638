"""SHARDS arguments of the offline tools: a directory, a brace pattern, or a '::'-joined list."""
from __future__ import annotations

import glob
import os
from typing import Dict, Iterator, List

import webdataset as wds
from webdataset.shardlists import expand_urls


class InputError(ValueError):
    """Bad input a user can fix (missing files, unknown format, wrong column): the message says how."""


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str) -> List[str]:
    """Shard paths/URLs named by `spec`; a directory stands for all `*.tar` inside it, sorted."""
    if not spec:
        raise InputError("no shards given: pass a directory, a brace pattern like 'out/shard-{000000..000009}.tar', "
                         "or paths joined by '::'")
    paths: List[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise InputError(f"directory {part!r} holds no *.tar shards")
            paths.extend(found)
        else:
            paths.extend(expand_urls(part))
    missing = [p for p in paths if not _is_remote(p) and not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"shard not found: {missing[0]!r}{more}")
    return paths


def iter_samples(paths: List[str]) -> Iterator[Dict]:
    """Raw samples (`__key__`, `__url__`, extension -> bytes) in shard order, nothing decoded."""
    return iter(wds.WebDataset(paths, shardshuffle=False, empty_check=False, nodesplitter=None,
                               workersplitter=None))
