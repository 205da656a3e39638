"""http(s) reads for shards, their `stats.json` and the converter's image downloads (`data_pipelines`).

- A read that waits `timeout` seconds for data (the server accepted the connection but sends nothing,
  before or during the body) raises `RemoteTimeout`, whose message names the URL (without userinfo or
  query string, where signed-URL tokens live) and the setting that bounds it.
- HTTP 429 and 5xx answers are retried `retries` times with exponential backoff (`backoff` x 1, 2, 4 ...
  seconds, or the server's Retry-After when longer, at most 60 s); the last answer's error is raised.
- `read_capped` stops a download at `max_bytes` (announced by Content-Length or not) with `TooLarge`.
- `headers` (credentials, e.g. a Hub token: `vlp.data.hub`) go to the URL's own origin only: a redirect to
  another host (a CDN) does not carry them; `name` is the URL that messages show instead of `url`.
"""
from __future__ import annotations

import functools
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Optional

from vlp.config import redact_url

DEFAULT_TIMEOUT = 60.0
USER_AGENT = "vlp/0.1"
MAX_RETRY_WAIT = 60.0


class RemoteTimeout(TimeoutError):
    """No data from a URL for the allowed time."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno ...]" form of several args
        return str(self.args[0]) if self.args else "no data from the server in time"


class TooLarge(ValueError):
    """A download over its size cap."""


def is_remote(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("http", "https")


redact = redact_url  # vlp.config owns it: persisted configs redact with it too


def _stalled(url: str, timeout: float, setting: str) -> RemoteTimeout:
    return RemoteTimeout(f"{redact(url)}: no data for {timeout:g} s (the server accepted the connection but "
                         f"sent nothing); {setting} sets this limit")


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or (isinstance(e, urllib.error.URLError)
                                          and isinstance(getattr(e, "reason", None), TimeoutError))


def _retry_wait(e: urllib.error.HTTPError, attempt: int, backoff: float) -> float:
    wait = backoff * 2 ** attempt
    try:
        wait = max(wait, float(e.headers.get("Retry-After", "")))
    except (TypeError, ValueError, AttributeError):
        pass
    return min(wait, MAX_RETRY_WAIT)


def retryable(code: int) -> bool:
    return code == 429 or 500 <= code <= 599


def _origin(url: str) -> tuple:
    u = urllib.parse.urlsplit(url)
    return u.scheme, u.hostname, u.port


class _OriginOnlyRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib's own, re-sending the request's origin-only headers (set as
    unredirected headers, which urllib never forwards) only when the redirect stays on that origin."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        origin, sent = getattr(req, "vlp_origin", None), getattr(req, "vlp_headers", {})
        if new is not None and origin is not None:
            new.vlp_origin, new.vlp_headers = origin, sent
            if _origin(new.full_url) == origin:
                for k, v in sent.items():
                    new.add_unredirected_header(k, v)
        return new


@functools.lru_cache(maxsize=1)
def _origin_only_opener() -> urllib.request.OpenerDirector:  # built on first use, like urlopen's own
    return urllib.request.build_opener(_OriginOnlyRedirect)


class RemoteStream:
    """The body of an http(s) answer; a read that waits longer than the timeout raises RemoteTimeout."""

    def __init__(self, resp, url: str, timeout: float, setting: str):
        self.resp, self.url, self.timeout, self.setting = resp, url, timeout, setting

    def read(self, n: int = -1) -> bytes:
        try:
            return self.resp.read(n)
        except Exception as e:
            if _is_timeout(e):
                raise _stalled(self.url, self.timeout, self.setting) from None
            raise

    def close(self) -> None:
        self.resp.close()

    def __enter__(self) -> "RemoteStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_url(url: str, timeout: float = DEFAULT_TIMEOUT, retries: int = 0, backoff: float = 1.0,
             setting: str = "the timeout", user_agent: str = USER_AGENT, headers: Optional[Dict[str, str]] = None,
             name: Optional[str] = None) -> RemoteStream:
    """Open `url` for reading (see the module docstring); `setting` names the option that sets `timeout`
    in the timeout's message. HTTP errors other than retried ones raise `urllib.error.HTTPError`."""
    req = urllib.request.Request(url, headers={"User-Agent": user_agent})
    urlopen = urllib.request.urlopen
    if headers:
        for k, v in headers.items():
            req.add_unredirected_header(k, v)
        req.vlp_origin, req.vlp_headers, urlopen = _origin(url), dict(req.unredirected_hdrs), _origin_only_opener().open
    shown = name or url
    for attempt in range(retries + 1):
        try:
            return RemoteStream(urlopen(req, timeout=timeout), shown, timeout, setting)
        except urllib.error.HTTPError as e:
            if not retryable(e.code) or attempt == retries:
                if attempt:
                    e.msg = f"{e.msg} (after {attempt} retries)"
                raise
            e.close()
            time.sleep(_retry_wait(e, attempt, backoff))
        except Exception as e:
            if _is_timeout(e):
                raise _stalled(shown, timeout, setting) from None
            raise
    raise AssertionError("unreachable")


def read_capped(stream, max_bytes: int, url: str, setting: str = "the size cap") -> bytes:
    """All of `stream`, or `TooLarge` past `max_bytes` (0: no cap), reading at most one byte more."""
    if max_bytes <= 0:
        return stream.read()
    length = getattr(getattr(stream, "resp", None), "headers", {}).get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise TooLarge(f"{redact(url)}: {int(length)} bytes, over {setting} of {max_bytes} bytes")
    data = bytearray()
    while len(data) <= max_bytes:  # read(n) may return less than n before the end
        more = stream.read(max_bytes + 1 - len(data))
        if not more:
            break
        data += more
    if len(data) > max_bytes:
        raise TooLarge(f"{redact(url)}: more than {max_bytes} bytes, over {setting}")
    return bytes(data)


def read_url(url: str, timeout: float = DEFAULT_TIMEOUT, retries: int = 0, backoff: float = 1.0,
             max_bytes: int = 0, setting: str = "the timeout", cap_setting: str = "the size cap",
             user_agent: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
             name: Optional[str] = None) -> bytes:
    """The whole body of `url` (see `open_url` and `read_capped`)."""
    with open_url(url, timeout, retries, backoff, setting, user_agent or USER_AGENT, headers, name) as stream:
        return read_capped(stream, max_bytes, name or url, cap_setting)


__all__ = ["RemoteTimeout", "TooLarge", "RemoteStream", "open_url", "read_url", "read_capped", "redact",
           "is_remote", "retryable", "DEFAULT_TIMEOUT"]
