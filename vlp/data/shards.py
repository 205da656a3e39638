"""Shard specs -> shard URLs with sample counts, and reading one shard (or a slice of it).

A spec is a brace pattern (`data/shard-{000000..000099}.tar`), several specs joined by `::`, a
directory (all `*.tar` in it, sorted), a local path, or a URL webdataset's `gopen` opens
(`http(s)://`, `pipe:cmd`, ...). Sample counts (needed for equal batch counts on every rank) come
from a sibling `stats.json` written by `vlp data` (`{"shards": [{"name", "samples"}]}`) or
img2dataset's `NNNNN_stats.json` (`successes`) when present, else from counting samples: a tar
header scan for local files (no member data is read), a full download for remote ones.
"""
from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import tarfile
import urllib.parse
import urllib.request
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple
from urllib.parse import urlparse

import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from vlp.config import ConfigError

log = logging.getLogger(__name__)

_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members (tar_file_iterator)


class Shard(NamedTuple):
    url: str
    samples: Optional[int]  # None: unknown (not counted)


def public_spec(spec: str) -> str:
    """A shard spec fit to publish: URLs lose their userinfo (`user:token@`) and query string (signed-URL
    tokens); local paths and brace patterns stay as written."""
    out = []
    for part in str(spec).split("::"):
        u = urllib.parse.urlsplit(part)
        if u.scheme and u.netloc:
            host = u.hostname or ""
            part = urllib.parse.urlunsplit((u.scheme, host + (f":{u.port}" if u.port else ""), u.path, "", ""))
        out.append(part)
    return "::".join(out)


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def expand_shards(spec: str, what: str = "data.train_shards") -> List[str]:
    """Expand a shard spec into URLs; local paths must exist. `what` names the config key in errors."""
    if not spec or not spec.strip():
        raise ConfigError(f"'{what}' is empty: give shards as a directory, a brace pattern "
                          "(dir/shard-{000000..000009}.tar), a '::'-joined list or URLs")
    urls: List[str] = []
    for url in wds.shardlists.expand_urls(spec.strip()):
        if is_local(url):
            path = local_path(url)
            if os.path.isdir(path):
                tars = sorted(glob.glob(os.path.join(path, "*.tar")))
                if not tars:
                    raise ConfigError(f"'{what}': directory {path!r} holds no *.tar shards")
                urls.extend(tars)
                continue
            if not os.path.isfile(path):
                raise ConfigError(f"'{what}': shard {path!r} does not exist (from spec {spec!r})")
        urls.append(url)
    return urls


def _stats_json(url: str) -> Optional[dict]:
    """The `stats.json` next to a shard, or None."""
    if is_local(url):
        path = os.path.join(os.path.dirname(local_path(url)), "stats.json")
        return _read_local_json(path)
    if urlparse(url).scheme in ("http", "https"):
        return _read_remote_json(url.rsplit("/", 1)[0] + "/stats.json")
    return None


def _read_local_json(path: str) -> Optional[dict]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _load_json(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _load_json(path: str, mtime_ns: int, size: int) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _read_remote_json(url: str) -> Optional[dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())
    except Exception:  # absent or unreadable: fall back to counting
        return None


def _count_from_stats(url: str) -> Optional[int]:
    name = url.rsplit("/", 1)[-1]
    stats = _stats_json(url)
    if stats and isinstance(stats.get("shards"), list):
        for entry in stats["shards"]:
            if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get("samples"), int):
                return entry["samples"]
    stem = name[:-4] if name.endswith(".tar") else name
    if is_local(url):  # img2dataset: 00000.tar + 00000_stats.json
        side = _read_local_json(os.path.join(os.path.dirname(local_path(url)), f"{stem}_stats.json"))
        if side and isinstance(side.get("successes"), int):
            return side["successes"]
    return None


def _member_is_sample_file(info: tarfile.TarInfo) -> Optional[str]:
    """The sample key a tar member belongs to, or None for members webdataset skips."""
    if not info.isreg() or _META.match(info.name):
        return None
    return base_plus_ext(info.name)[0]


@functools.lru_cache(maxsize=256)
def _scan_local(path: str, size: int, mtime_ns: int) -> Tuple[int, ...]:
    """Header offsets of the first member of each sample (seeks over member data)."""
    offsets: List[int] = []
    last = None
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                key = _member_is_sample_file(info)
                if key is not None and key != last:
                    offsets.append(info.offset)
                    last = key
    except (tarfile.TarError, EOFError, OSError) as e:  # truncated: count what is complete
        log.warning("shard %s: header scan stopped early (%s); counted %d samples", path, e, len(offsets))
    return tuple(offsets)


def sample_offsets(path: str) -> Tuple[int, ...]:
    st = os.stat(path)
    return _scan_local(path, st.st_size, st.st_mtime_ns)


def count_samples(url: str) -> int:
    """Samples in one shard: header scan for local files, a full read otherwise."""
    if is_local(url) and local_path(url).endswith(".tar"):
        return len(sample_offsets(local_path(url)))
    log.warning("counting samples of %s by reading it (no stats.json next to it)", url)
    return sum(1 for _ in read_shard(url, lambda *a: None))


def resolve_shards(spec: str, what: str = "data.train_shards", counts: bool = True) -> List[Shard]:
    """Expanded shards with their sample counts (`counts=False`: only where stats give them)."""
    out = []
    for url in expand_shards(spec, what):
        n = _count_from_stats(url)
        if n is None and counts:
            n = count_samples(url)
        out.append(Shard(url, n))
    return out


# ------------------------------------------------------------------------------------- reading
def classify_error(exn: BaseException) -> str:
    """Skip reason for a shard read failure."""
    text = str(exn).lower()
    if isinstance(exn, (tarfile.ReadError, EOFError, tarfile.HeaderError)) or "unexpected end" in text:
        return "truncated_tar"
    return "read_error"


class _EndCheck:
    """Wraps a byte stream to notice a tar that ends without its zero end blocks.

    tarfile's stream mode treats a file cut at (or inside) a member header as a normal end, so a
    truncated shard would otherwise pass silently: at EOF the last bytes read must be zeros.
    """

    def __init__(self, stream):
        self.stream, self.tail, self.eof = stream, b"", False

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if not data or (n is not None and 0 < len(data) < n):
            self.eof = True
        if data:
            self.tail = (self.tail + data)[-_TAR_BLOCK:]
        return data

    def truncated(self) -> bool:
        return self.eof and self.tail.strip(b"\0") != b""


_TAR_BLOCK = 512


def read_shard(url: str, on_error: Callable[[str, str, BaseException], None], start: int = 0,
               end: Optional[int] = None) -> Iterator[Tuple[int, Dict]]:
    """Yield `(index, raw sample)` for samples `start <= index < end` of one shard, undecoded.

    Uses webdataset's tar expander and key grouping. A local uncompressed shard is entered at the
    header of sample `start` (seek, nothing skipped is read); others are streamed and skipped.
    Read errors end the shard and are reported through `on_error(reason, url, exception)`.
    """
    index = 0
    if end is not None and start >= end:
        return
    try:
        stream = wds.gopen(url, "rb")
        if start > 0 and is_local(url) and local_path(url).endswith(".tar"):
            offsets = sample_offsets(local_path(url))
            if start >= len(offsets):
                stream.close()
                return
            stream.seek(offsets[start])
            index = start
    except Exception as e:
        on_error("read_error", url, e)
        return
    errors: List[BaseException] = []

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return False  # stop this shard

    checked = _EndCheck(stream)
    files = tar_file_expander([dict(url=url, stream=checked)], handler=handler)
    stopped_early = True  # also when the consumer closes this generator
    try:
        for sample in group_by_keys(files, handler=handler):
            if end is not None and index >= end:
                break
            if index >= start:
                yield index, sample
            index += 1
        else:
            stopped_early = False
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe we stopped reading early exits non-zero: not an error
            if not stopped_early and not errors:
                errors.append(e)
    if stopped_early:
        return  # reached `end`: errors past the range belong to the slot that reads that part
    if not errors and checked.truncated():
        errors.append(tarfile.ReadError("tar ends without its end-of-archive blocks (truncated)"))
    for e in errors:
        on_error(classify_error(e), url, e)
