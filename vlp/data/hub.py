"""`hf://` shards: files in a Hugging Face Hub repo, read through huggingface_hub without a token on any
command line.

A spec is `hf://datasets/ORG/NAME[@REVISION]/PATH` (`hf://spaces/...` a Space, `hf://ORG/NAME/...` a
model repo, as in huggingface_hub's `HfFileSystem`; `@refs/pr/3` or `@refs%2Fpr%2F3` for a ref with
slashes). A PATH ending in `.tar` (`.tgz`, `.tar.gz`, ...) is one shard (brace patterns are expanded
before, like local ones); any other PATH is a directory and means every `*.tar` directly in it, sorted,
listed with `HfApi.list_repo_tree`.

Files are read from `hf_hub_url` (the Hub's `resolve` URL on `HF_ENDPOINT`) by `vlp.data.remote`, with
its stall timeout and retries on 429/5xx. The token is huggingface_hub's (`HF_TOKEN`, `hf auth login`,
through `build_hf_headers`): it goes in the request's Authorization header, to the Hub's own host only (a
redirect to a CDN does not carry it), never in a URL, a spec, a message or a subprocess's arguments
(webdataset's own `hf://` opener runs `curl -H 'Authorization: Bearer TOKEN'`: vlp never calls it).
`HF_HUB_OFFLINE=1` refuses hf:// shards with a message saying so.
"""
from __future__ import annotations

import functools
import os
import re
import urllib.error
from typing import List, NamedTuple, Optional, Tuple
from urllib.parse import unquote

from vlp.config import ConfigError
from vlp.data.remote import RemoteStream, open_url, redact

PREFIX = "hf://"
_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}
_SHARD_FILE = re.compile(r"\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(OSError):
    """An hf:// file or directory the Hub does not serve (missing, private, offline mode); the message names
    the hf:// URL."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "Hub error"


class HubPath(NamedTuple):
    repo_type: str  # "dataset", "model" or "space"
    repo_id: str  # ORG/NAME
    revision: Optional[str]  # None: the default branch
    path: str  # inside the repo; "" for its root


def is_hub(url: str) -> bool:
    return url.startswith(PREFIX)


def parse(url: str, what: str = "data.train_shards") -> HubPath:
    """The parts of an hf:// URL; a malformed one raises `ConfigError` naming `what`."""
    parts = url[len(PREFIX):].split("/")
    repo_type = _TYPES[parts.pop(0)] if len(parts) > 1 and parts[0] in _TYPES else "model"
    if "@" in parts[0] or ":" in parts[0]:  # hf://user:token@datasets/...: never printed
        raise ConfigError(f"'{what}': an hf:// spec carries no credentials (not shown here): the token comes from "
                          "HF_TOKEN or `hf auth login`; write hf://datasets/ORG/NAME/PATH")
    if "?" in url or "#" in url or len(parts) < 2 or not _NAME.match(parts[0]) or not parts[1]:
        raise ConfigError(f"'{what}': {redact(url)!r} is not an hf:// shard spec: write "
                          "hf://datasets/ORG/NAME[@REVISION]/PATH (a .tar file, brace pattern or directory)")
    name, _, revision = parts[1].partition("@")
    rest = parts[2:]
    if revision == "refs" and len(rest) >= 2:  # @refs/pr/3/PATH, @refs/convert/parquet/PATH
        revision, rest = f"refs/{rest[0]}/{rest[1]}", rest[2:]
    if not _NAME.match(name) or (parts[1].count("@") and not revision):
        raise ConfigError(f"'{what}': {redact(url)!r}: bad repo name or revision")
    return HubPath(repo_type, f"{parts[0]}/{name}", unquote(revision) if revision else None, "/".join(rest).strip("/"))


def endpoint() -> str:
    """The Hub's URL: `HF_ENDPOINT` as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _check_online(url: str) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{url}: HF_HUB_OFFLINE is set, so nothing is read from the Hub; unset it to read "
                       "hf:// shards")


def _describe(ref: HubPath) -> str:
    return f"{ref.repo_type} repo {ref.repo_id} (revision {ref.revision or 'main'}) on {endpoint()}"


def _access_hint() -> str:
    from huggingface_hub import get_token

    return ("with the token from HF_TOKEN / `hf auth login`" if get_token() else
            "without a token (set HF_TOKEN or run `hf auth login` for a private or gated repo)")


# ------------------------------------------------------------------------------------- expansion
def expand(url: str, what: str = "data.train_shards") -> List[str]:
    """One hf:// URL (braces already expanded) as shard URLs: a shard file as it is (not checked, like an
    http(s) one), a directory as its `*.tar` files, sorted; an unknown repo, revision or directory or one
    holding no `*.tar` raises `ConfigError` naming the URL and `what`."""
    ref = parse(url, what)
    if _SHARD_FILE.search(ref.path):
        return [url]
    try:
        _check_online(url)
        names = _list_tars(endpoint(), ref, url)
    except HubError as e:
        raise ConfigError(f"'{what}': {e}") from None
    if not names:
        raise ConfigError(f"'{what}': directory {url} holds no *.tar shards")
    return [f"{url.rstrip('/')}/{n}" for n in names]


@functools.lru_cache(maxsize=64)
def _list_tars(hub: str, ref: HubPath, url: str) -> Tuple[str, ...]:
    """Names of the `*.tar` files directly in a repo directory (one listing per process and directory)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        entries = list(HfApi(endpoint=hub).list_repo_tree(ref.repo_id, path_in_repo=ref.path or None,
                                                          repo_type=ref.repo_type, revision=ref.revision))
    except RepositoryNotFoundError:
        raise HubError(f"{url}: {ref.repo_type} repo {ref.repo_id} not found on {hub}, or not readable "
                       f"{_access_hint()}") from None
    except RevisionNotFoundError:
        raise HubError(f"{url}: no revision {ref.revision!r} in {_describe(ref)}") from None
    except EntryNotFoundError:
        raise HubError(f"{url}: no directory {ref.path!r} in {_describe(ref)}") from None
    except Exception as e:  # HfHubHTTPError, a connection error (httpx's own classes), ...
        first = (str(e).splitlines() or [""])[0][:300]
        raise HubError(f"{url}: listing the directory failed: {type(e).__name__}: {first}") from None
    prefix = f"{ref.path}/" if ref.path else ""
    return tuple(sorted(e.path[len(prefix):] for e in entries if isinstance(e, RepoFile) and e.path.endswith(".tar")
                        and "/" not in e.path[len(prefix):]))


# --------------------------------------------------------------------------------------- reading
def file_url(url: str) -> str:
    """The Hub's download (`resolve`) URL of an hf:// file: no token in it."""
    from huggingface_hub import hf_hub_url

    ref = parse(url)
    return hf_hub_url(ref.repo_id, ref.path, repo_type=ref.repo_type, revision=ref.revision, endpoint=endpoint())


def open_file(url: str, timeout: float, retries: int, setting: str) -> RemoteStream:
    """A byte stream of an hf:// file (`vlp.data.remote.open_url`: stall timeout naming the hf:// URL,
    retries on 429/5xx), sent with huggingface_hub's auth headers; a file the Hub does not serve raises
    `HubError` naming the hf:// URL."""
    from huggingface_hub.utils import build_hf_headers

    _check_online(url)
    ref = parse(url)
    try:
        return open_url(file_url(url), timeout, retries, setting=setting, headers=build_hf_headers(library_name="vlp"),
                        name=url)
    except urllib.error.HTTPError as e:
        code, kind = e.code, e.headers.get("X-Error-Code", "") if e.headers else ""
        e.close()
        if kind == "RevisionNotFound":
            why = f"no revision {ref.revision!r} in {_describe(ref)}"
        elif kind == "EntryNotFound" or (code == 404 and kind != "RepoNotFound"):
            why = f"no file {ref.path!r} in {_describe(ref)}"
        elif kind in ("RepoNotFound", "GatedRepo") or code in (401, 403):
            why = f"{ref.repo_type} repo {ref.repo_id} not found on {endpoint()}, or not readable {_access_hint()}"
        else:
            why = f"the Hub answered HTTP {code} {e.msg}"
        raise HubError(f"{url}: {why} (HTTP {code}{' ' + kind if kind else ''})") from None


__all__ = ["HubError", "HubPath", "is_hub", "parse", "expand", "file_url", "open_file", "endpoint"]
