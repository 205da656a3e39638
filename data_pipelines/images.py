"""Fetch, validate and (optionally) shrink one image for the converters; runs in worker processes.

URL downloads (`vlp.data.remote`) stop at `max_bytes` (skip reason download_too_large), are retried
with exponential backoff on HTTP 429 and 5xx (`retries` times, then download_failed), and fail when
the server sends nothing for `timeout` seconds.

An image passes through byte-for-byte unless it must change: larger than `resize_max`, or in a
form the training loader may not read (not JPEG/PNG/WebP, or a CMYK JPEG). Then it is re-encoded
once as RGB JPEG quality 95 (EXIF orientation applied, transparency flattened onto white).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from PIL import Image, ImageOps

from vlp.data.remote import TooLarge, read_url

PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
USER_AGENT = "vlp-data-convert/0.1"
MAX_IMAGE_BYTES = 50_000_000  # default cap of one URL download (--max-image-bytes)


@dataclass
class Record:
    """One source sample before its image is read: where the image is, its caption(s), metadata."""

    key: str  # raw key from the source (sanitised when written)
    caption: Optional[str]  # None: the source has no caption for it
    path: str = ""  # local image file
    url: str = ""  # http(s) image URL
    data: bytes = b""  # image bytes already in memory (img2dataset shards)
    source: str = ""  # what to record as the sample's origin
    meta: Dict = field(default_factory=dict)  # extra fields copied into KEY.json


@dataclass
class Loaded:
    """Outcome of `load_image`: image bytes and sizes, or the skip reason with a detail."""

    ok: bool
    reason: str = ""
    detail: str = ""
    data: bytes = b""
    ext: str = ""
    width: int = 0
    height: int = 0
    original_width: int = 0
    original_height: int = 0
    resized: bool = False


def fetch(rec: Record, kind: str, timeout: float, max_bytes: int, retries: int,
          backoff: float) -> Tuple[Optional[bytes], Optional[Tuple[str, str]]]:
    """(the record's bytes, None), or (None, (skip reason, detail)) for a missing file (`missing_{kind}`), an
    over-size download, a failed download or an unreadable file (`unreadable_{kind}`); `kind` is image or
    video. Other errors of a local read propagate."""
    try:
        if rec.data:
            return rec.data, None
        if rec.url:
            cap = "--max-image-bytes" + (" (the cap of each download, videos too)" if kind == "video" else "")
            return read_url(rec.url, timeout, retries, backoff, max_bytes, setting="--timeout",
                            cap_setting=cap, user_agent=USER_AGENT), None
        with open(rec.path, "rb") as f:
            return f.read(), None
    except FileNotFoundError as e:
        return None, (f"missing_{kind}", str(e))
    except TooLarge as e:
        return None, ("download_too_large", str(e))
    except Exception as e:  # HTTP errors, timeouts, resets, truncated bodies, bad URLs; unreadable files
        if rec.url:
            return None, ("download_failed", f"{type(e).__name__}: {e}")
        if not isinstance(e, OSError):
            raise
        return None, (f"unreadable_{kind}", f"{type(e).__name__}: {e}")


def _reencode(im: Image.Image, resize_max: int) -> Image.Image:
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        im = flat
    elif im.mode != "RGB":
        im = im.convert("RGB")
    if resize_max and max(im.size) > resize_max:
        scale = resize_max / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.LANCZOS, reducing_gap=3.0)
    return im


def load_image(rec: Record, resize_max: int = 0, min_size: int = 0, timeout: float = 10.0,
               max_bytes: int = MAX_IMAGE_BYTES, retries: int = 3, backoff: float = 1.0) -> Loaded:
    """Read and check the image of `rec`; never raises for bad data, returns a skip reason instead.
    URL downloads: at most `max_bytes` (0: no cap), `retries` retries after 429/5xx, `backoff` x 1, 2, 4 ...
    seconds apart."""
    raw, failed = fetch(rec, "image", timeout, max_bytes, retries, backoff)
    if failed:
        return Loaded(False, *failed)
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except Exception as e:  # PIL raises many types for corrupt data
        return Loaded(False, "unreadable_image", f"{type(e).__name__}: {e}")
    w, h = im.size
    if min(w, h) < min_size:
        return Loaded(False, "too_small", f"{w}x{h} < min_size {min_size}")
    ext = PASS_THROUGH.get(im.format or "")
    if ext == "jpg" and im.mode not in ("RGB", "L"):  # CMYK/YCCK JPEGs: not every decoder reads them
        ext = None
    if ext and not (resize_max and max(w, h) > resize_max):
        return Loaded(True, data=raw, ext=ext, width=w, height=h, original_width=w, original_height=h)
    out = _reencode(im, resize_max)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=95)
    return Loaded(True, data=buf.getvalue(), ext="jpg", width=out.width, height=out.height,
                  original_width=w, original_height=h, resized=bool(resize_max and max(w, h) > resize_max))
