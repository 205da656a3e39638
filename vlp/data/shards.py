"""Shard specs -> shard URLs with sample counts, and reading one shard (or a slice of it).

A spec is a brace pattern (`data/shard-{000000..000099}.tar`), several specs joined by `::`, a
directory (all `*.tar` in it, sorted), a local path, an `hf://` Hub path (`vlp.data.hub`: a file,
brace pattern or directory in a Hub repo), or a URL webdataset's `gopen` opens (`http(s)://`,
`pipe:cmd`, ...). Sample counts (needed for equal batch counts on every rank) come
from a sibling `stats.json` written by `vlp data` (`{"shards": [{"name", "samples"}]}`) or
img2dataset's `NNNNN_stats.json` (`successes`) when present, else from counting samples: a tar
header scan for local files (no member data is read), a full download for remote ones. In a
distributed run the training loader resolves them on rank 0 only and shares the result
(`vlp.dist.run_on_rank0`), so each remote shard is downloaded for counting once, not once per rank.

http(s) shards are read with urllib (`vlp.data.remote`): a read that gets no data for
`data.remote_timeout` seconds fails naming the URL, and 429/5xx answers are retried with backoff.
hf:// shards are read the same way from the Hub's download URL, with huggingface_hub's token in a
request header (never on a command line: webdataset's own hf:// opener, which runs curl, is not used).
"""
from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import tarfile
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple
from urllib.parse import urlparse

import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from vlp.config import ConfigError
from vlp.data import hub
from vlp.data.remote import DEFAULT_TIMEOUT, RemoteTimeout, is_remote, open_url, read_capped, redact

log = logging.getLogger(__name__)

_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members (tar_file_iterator)
SHARD_RETRIES = 3  # http(s) answers 429/5xx: retries with backoff 1, 2, 4 s before the read fails
TIMEOUT_SETTING = "data.remote_timeout (training)"


class Shard(NamedTuple):
    url: str
    samples: Optional[int]  # None: unknown (not counted)


def public_spec(spec: str) -> str:
    """A shard spec fit to publish: URLs lose their userinfo (`user:token@`) and query string (signed-URL
    tokens); local paths and brace patterns stay as written."""
    return "::".join(redact(part) for part in str(spec).split("::"))


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
        if hub.is_hub(url):
            urls.extend(hub.expand(url, what))
            continue
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


def _stats_json(url: str, timeout: float = DEFAULT_TIMEOUT) -> Optional[dict]:
    """The `stats.json` next to a shard, or None."""
    if is_local(url):
        path = os.path.join(os.path.dirname(local_path(url)), "stats.json")
        return _read_local_json(path)
    if is_remote(url) or hub.is_hub(url):
        return _read_remote_json(url.rsplit("/", 1)[0] + "/stats.json", timeout)


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
def _read_remote_json(url: str, timeout: float) -> Optional[dict]:
    """A remote (http(s) or hf://) stats.json, or None when absent or unreadable (then shards are counted);
    a server that stalls raises `RemoteTimeout`."""
    try:
        with open_shard(url, timeout) as stream:
            return json.loads(read_capped(stream, 1 << 28, url))
    except RemoteTimeout:
        raise
    except Exception:  # absent (404) or unreadable: fall back to counting
        return None


def _count_from_stats(url: str, timeout: float = DEFAULT_TIMEOUT) -> Optional[int]:
    name = url.rsplit("/", 1)[-1]
    stats = _stats_json(url, timeout)
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


def count_samples(url: str, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Samples in one shard: header scan for local files, a full read otherwise. A shard that cannot be
    read raises (a remote one that stalls: `RemoteTimeout`, naming the URL); a truncated one counts its
    complete samples, with a warning."""
    if is_local(url) and local_path(url).endswith(".tar"):
        return len(sample_offsets(local_path(url)))
    log.warning("counting samples of %s by reading it (no stats.json next to it)", redact(url))
    errors: List[Tuple[str, BaseException]] = []
    n = sum(1 for _ in read_shard(url, lambda reason, _url, exn: errors.append((reason, exn)), timeout=timeout))
    for reason, exn in errors:
        if isinstance(exn, RemoteTimeout):
            raise exn
        if reason != "truncated_tar":
            raise RuntimeError(f"counting the samples of shard {redact(url)}: {error_text(exn)}") from exn
        log.warning("shard %s: %s; counted its %d complete samples", redact(url), error_text(exn), n)
    return n


def resolve_shards(spec: str, what: str = "data.train_shards", counts: bool = True,
                   timeout: float = DEFAULT_TIMEOUT) -> List[Shard]:
    """Expanded shards with their sample counts (`counts=False`: only where stats give them).
    `timeout`: seconds a remote read may wait for data (stats.json, counting)."""
    out = []
    for url in expand_shards(spec, what):
        n = _count_from_stats(url, timeout)
        if n is None and counts:
            n = count_samples(url, timeout)
        out.append(Shard(url, n))
    return out


# ------------------------------------------------------------------------------------- reading
def error_text(exn: BaseException) -> str:
    """The first line of an exception's message: its own `__str__` (HTTPError's), else its first argument
    (webdataset appends its stream and URL to `args`)."""
    plain = type(exn).__str__ in (BaseException.__str__, OSError.__str__)
    first = exn.args[0] if plain and exn.args and isinstance(exn.args[0], str) else str(exn)
    return f"{type(exn).__name__}: {(first.splitlines() or [''])[0][:300]}"


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


def open_shard(url: str, timeout: float = DEFAULT_TIMEOUT):
    """A byte stream of one shard: http(s) through `vlp.data.remote` (stall timeout, retries on
    429/5xx), hf:// the same way through `vlp.data.hub` (the token in a header, no subprocess), anything
    else through webdataset's `gopen` (files, `pipe:`, ...)."""
    if hub.is_hub(url):
        return hub.open_file(url, timeout, SHARD_RETRIES, setting=TIMEOUT_SETTING)
    if is_remote(url):
        return open_url(url, timeout, SHARD_RETRIES, setting=TIMEOUT_SETTING)
    return wds.gopen(url, "rb")


def read_shard(url: str, on_error: Callable[[str, str, BaseException], None], start: int = 0,
               end: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Tuple[int, Dict]]:
    """Yield `(index, raw sample)` for samples `start <= index < end` of one shard, undecoded.

    Uses webdataset's tar expander and key grouping. A local uncompressed shard is entered at the
    header of sample `start` (seek, nothing skipped is read); others are streamed and skipped.
    Read errors end the shard and are reported through `on_error(reason, url, exception)`; a remote
    read that gets no data for `timeout` seconds is one (`RemoteTimeout`, its message names the URL).
    """
    index = 0
    if end is not None and start >= end:
        return
    try:
        stream = open_shard(url, timeout)
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
