"""Video in `vlp data convert`: folders, tables and video2dataset output -> KEY.mp4 + KEY.txt + KEY.json.

The layout is video2dataset's (the one Frozen in Time's WebVid/CC3M pipeline reads; Bain et al.,
"Frozen in Time", ICCV 2021): the video bytes, the caption, and a JSON of `duration`, `fps`, `width`,
`height`, `frames` (`vlp.data.video.probe` of the bytes written) plus the input columns. A video passes
through byte-for-byte unless `--max-side` / `--max-seconds` require a change; it is then re-encoded
once (video only, no audio) as H.264 mp4 (`ENCODER`: libx264, else MPEG-4 part 2), longer side <= N
with even sides and the aspect kept, the first S seconds, a keyframe every 2 s so the loader's seeks
stay short. Unreadable and too-short videos are skipped and counted (`unreadable_video`,
`too_short_video`); `encode_mp4` also writes the synthetic clips (`synth_video`) and the tests' clips.
"""
from __future__ import annotations

import glob
import io
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import cv2
import numpy as np

from data_pipelines import sources
from data_pipelines.images import Loaded, Record, fetch
from data_pipelines.shardspec import InputError, iter_samples
from vlp.data import video as vvideo

VIDEO_REASONS = ("missing_video", "unreadable_video", "too_short_video")
GOP_SECONDS = 2.0  # keyframe interval of re-encoded videos


def _pick_encoder() -> str:
    import av

    for name in ("libx264", "libopenh264", "mpeg4"):
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except Exception:  # listed but not an encoder in this build
                continue
    raise RuntimeError("PyAV has none of the encoders libx264, libopenh264, mpeg4; reinstall `av` (pip wheels bundle them)")


_ENCODER: List[str] = []


def encoder() -> str:
    """The video encoder this PyAV build offers: libx264 (H.264), else libopenh264, else mpeg4."""
    if not _ENCODER:
        _ENCODER.append(_pick_encoder())
    return _ENCODER[0]


def even_size(width: int, height: int, max_side: int = 0) -> Tuple[int, int]:
    """(width, height) scaled so the longer side is <= max_side (0: no limit), aspect kept, both even
    (yuv420p needs even sides) and >= 2."""
    scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
    return (max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2))


def encode_mp4(frames: Iterable[np.ndarray], fps: float, *, times: Optional[Iterable[float]] = None,
               intra: bool = False, quality: int = 0, gop_seconds: float = GOP_SECONDS) -> bytes:
    """RGB HWC uint8 frames (even sides) -> mp4 bytes, yuv420p, one thread (the same input gives the same
    bytes). `times` (seconds) keeps a variable frame rate, else frame i is at i / fps. `intra`: every frame
    a keyframe at a constant quantiser, so equal frames encode to equal decoded frames whatever their
    order (the synthetic twins rely on it). `quality`: x264 CRF (or QP when intra), 0: the default."""
    pairs = ((f, None) for f in frames) if times is None else zip(frames, times)
    return _encode(pairs, fps, intra=intra, quality=quality, gop_seconds=gop_seconds)


def _encode(pairs: Iterable[Tuple[np.ndarray, Optional[float]]], fps: float, intra: bool = False,
            quality: int = 0, gop_seconds: float = GOP_SECONDS) -> bytes:
    import av

    name = encoder()
    rate = Fraction(fps).limit_denominator(1001)
    gop = "1" if intra else str(max(1, round(float(rate) * gop_seconds)))
    if name == "libx264":
        q = str(quality or (18 if intra else 23))
        opts = {"threads": "1", "preset": "medium", "g": gop, **({"qp": q} if intra else {"crf": q})}
    else:  # libopenh264, mpeg4 part 2: bit rate set below
        opts = {"g": gop, "threads": "1"}
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream(name, rate=rate, options=opts)
        stream.pix_fmt = "yuv420p"
        opened, last_pts = False, -1
        for i, (img, t) in enumerate(pairs):
            img = np.ascontiguousarray(img, dtype=np.uint8)
            if not opened:
                h, w = img.shape[:2]
                if h % 2 or w % 2:
                    raise ValueError(f"encode_mp4: frame sides must be even for yuv420p, got {w}x{h}")
                stream.width, stream.height, opened = w, h, True
                if name != "libx264":
                    stream.bit_rate = max(100_000, int(w * h * float(rate) * (2.0 if intra else 0.5)))
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            pts = i if t is None else int(round(t * float(rate)))
            frame.pts = last_pts = max(pts, last_pts + 1)  # strictly increasing, as encoders require
            frame.time_base = Fraction(1) / rate
            for packet in stream.encode(frame):
                out.mux(packet)
        if not opened:
            raise ValueError("encode_mp4: no frames to encode")
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def reencode(data: bytes, max_side: int = 0, max_seconds: float = 0.0) -> bytes:
    """Decode `data` once from the start and write it as mp4 (`encode_mp4`), longer side <= max_side,
    the first max_seconds only (0: no limit for either); timestamps are kept. ValueError if unreadable."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise ValueError(f"unreadable video: {e}") from None
    with container:
        if not container.streams.video:
            raise ValueError("unreadable video: no video stream")
        s = container.streams.video[0]
        s.thread_type = "AUTO"  # offline: FFmpeg may use the cores
        fps = float(s.average_rate or s.guessed_rate or 25)
        start, tb = s.start_time or 0, float(s.time_base)

        def pairs():
            size, n = None, 0
            try:
                for f in container.decode(s):
                    t = max(0.0, ((f.pts if f.pts is not None else 0) - start) * tb)
                    if max_seconds and t >= max_seconds:
                        break
                    img = f.to_ndarray(format="rgb24")
                    size = size or even_size(img.shape[1], img.shape[0], max_side)
                    if (img.shape[1], img.shape[0]) != size:
                        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
                    n += 1
                    yield img, t
            except av.FFmpegError as e:
                if not n:
                    raise ValueError(f"unreadable video: {e}") from None
                # a damaged tail: keep what decoded

        try:
            return _encode(pairs(), fps)
        except ValueError as e:
            raise ValueError(f"unreadable video: {e}") from None


# ------------------------------------------------------------------------------ one video
@dataclass
class LoadedVideo(Loaded):
    """`Loaded` with the probe of the bytes written (duration, fps, width, height, frames)."""

    info: Dict = field(default_factory=dict)
    original: Dict = field(default_factory=dict)  # the input's probe when re-encoded


def _container_ext(data: bytes, rec: Record) -> str:
    """The extension to store the bytes under: the source's own when it is a video one, else from the
    container format PyAV reads."""
    name = urllib.parse.urlsplit(rec.url).path if rec.url else (rec.path or rec.source)
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    if vvideo.is_video_key(ext):
        return ext
    import av

    with av.open(io.BytesIO(data)) as c:
        fmt = c.format.name
        codec = c.streams.video[0].codec_context.name if c.streams.video else ""
    if "mp4" in fmt or "mov" in fmt:
        return "mp4"
    if "matroska" in fmt:
        return "webm" if codec in ("vp8", "vp9", "av1") else "mkv"
    return "avi" if "avi" in fmt else "mp4"


def load_video(rec: Record, max_side: int = 0, max_seconds: float = 0.0, min_seconds: float = 0.0,
               timeout: float = 10.0, max_bytes: int = 0, retries: int = 3, backoff: float = 1.0) -> LoadedVideo:
    """Read, check and (if over `max_side` / `max_seconds`) re-encode the video of `rec`; never raises for
    bad data: returns the skip reason (missing_video, download_failed, download_too_large,
    unreadable_video, too_short_video) instead. Too short: no frame, or under `min_seconds`."""
    raw, failed = fetch(rec, "video", timeout, max_bytes, retries, backoff)
    if failed:
        return LoadedVideo(False, *failed)
    try:
        info = vvideo.probe(raw)
    except ValueError as e:
        return LoadedVideo(False, "unreadable_video", str(e))
    if info["frames"] <= 0 or info["duration"] <= 0 or info["duration"] < min_seconds:
        return LoadedVideo(False, "too_short_video", f"{info['duration']:.3f} s, {info['frames']} frames "
                           f"(--min-seconds {min_seconds:g})")
    try:
        vvideo.decode_frames(raw, [0.0])  # the header can be fine and the stream not
    except ValueError as e:
        return LoadedVideo(False, "unreadable_video", str(e))
    w, h = info["width"], info["height"]
    shrink = bool(max_side and max(w, h) > max_side)
    cut = bool(max_seconds and info["duration"] > max_seconds)
    if not (shrink or cut):
        return LoadedVideo(True, data=raw, ext=_container_ext(raw, rec), width=w, height=h,
                           original_width=w, original_height=h, info=info)
    try:
        data = reencode(raw, max_side if shrink else 0, max_seconds if cut else 0.0)
        out = vvideo.probe(data)
    except ValueError as e:
        return LoadedVideo(False, "unreadable_video", f"re-encoding failed: {e}")
    return LoadedVideo(True, data=data, ext="mp4", width=out["width"], height=out["height"],
                       original_width=w, original_height=h, resized=True, info=out, original=info)


def sample_json(key: str, rec: Record, v: LoadedVideo) -> bytes:
    """KEY.json of a video sample: the input's columns, then key, source, url and the probe."""
    meta = dict(rec.meta)
    meta.update(key=key, source=rec.source, **{k: v.info[k] for k in ("duration", "fps", "width", "height",
                                                                     "frames")})
    meta["duration"] = round(float(meta["duration"]), 4)
    meta["fps"] = round(float(meta["fps"]), 4)
    if rec.url:
        meta["url"] = rec.url
    if v.resized:
        meta.update({f"original_{k}": (round(float(v.original[k]), 4) if k in ("duration", "fps") else v.original[k])
                     for k in ("duration", "fps", "width", "height", "frames")})
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()


# ------------------------------------------------------------------------- sources of video
_EXTS = tuple("." + e for e in vvideo.VIDEO_EXTS)


def _ext_of(loc) -> str:
    loc = "" if loc is None else str(loc).strip()
    if loc.startswith(("http://", "https://")):
        loc = urllib.parse.urlsplit(loc).path
    return os.path.splitext(loc)[1].lower()


def _folder_kinds(src: str) -> Tuple[int, int]:
    images = videos = 0
    for _, _, files in os.walk(src):
        for n in files:
            low = n.lower()
            images += low.endswith(sources.IMAGE_EXTS)
            videos += low.endswith(_EXTS)
    return images, videos


def _shards_hold_video(src: str) -> bool:
    tars = sorted(glob.glob(os.path.join(src, "*.tar")))
    for s in iter_samples(tars[:1]):
        if any(vvideo.is_video_key(k) for k in s):
            return True
        if "json" in s:
            try:
                meta = json.loads(s["json"])
            except ValueError:
                continue
            if isinstance(meta, dict) and ("video_metadata" in meta or "videoID" in meta or "videoid" in meta):
                return True  # video2dataset: failed samples are written without their mp4
    return False


def detect_media(src: str, fmt: str, image_col: Optional[str] = None, video_col: Optional[str] = None) -> str:
    """'video' or 'image': what SRC holds (folder: its files; table: `--video-col`, a video column name,
    or video extensions in the image column; shards: video members)."""
    if fmt == "folder":
        images, videos = _folder_kinds(src)
        if images and videos:
            raise InputError(f"{src!r} holds both images ({images}) and videos ({videos}); convert each kind "
                             "into its own OUT (a folder per kind)")
        return "video" if videos else "image"
    if fmt == "table":
        if video_col:
            if image_col:
                raise InputError("pass --image-col or --video-col, not both: one table converts to one kind")
            return "video"
        columns = sources._table_columns(src) if os.path.isfile(src) else []
        if not image_col and any(c.lower() in sources.VIDEO_COLUMNS for c in columns):
            return "video"
        try:
            _, icol, _, _ = sources.table_columns(src, image_col)
        except InputError:
            return "image"  # the image reader's own error follows
        vals = []
        for v in sources.column_values(src, icol):
            if v is not None and str(v).strip():
                vals.append(_ext_of(v))
            if len(vals) >= 20:
                break
        return "video" if vals and sum(e in _EXTS for e in vals) * 2 > len(vals) else "image"
    if fmt == "img2dataset" and _shards_hold_video(src):
        return "video"
    if video_col:
        raise InputError(f"--video-col is for tables (.csv, .tsv, .parquet); {src!r} is a {fmt} source")
    return "image"


def video_table_columns(src: str, video_col: Optional[str] = None, caption_col: Optional[str] = None,
                        key_col: Optional[str] = None):
    """(columns, video column, caption column, key column) of a video table: `--video-col` or the first of
    VIDEO_COLUMNS then IMAGE_COLUMNS; captions also from `name` (WebVid's CSVs)."""
    return sources.table_columns(src, video_col, caption_col, key_col,
                                 media_candidates=sources.VIDEO_COLUMNS + sources.IMAGE_COLUMNS,
                                 media_option="--video-col",
                                 caption_candidates=sources.CAPTION_COLUMNS + ("name",))


def read_video2dataset(src: str) -> Iterator[Record]:
    """video2dataset output: a sample whose json says status != success comes with its status and no video
    (counted as download_failed)."""
    return sources.read_downloader_output(src, vvideo.VIDEO_EXTS, "video2dataset output")


def read_video_source(src: str, fmt: str, video_col: Optional[str] = None, caption_col: Optional[str] = None,
                      key_col: Optional[str] = None) -> Tuple[str, Iterator[Record]]:
    """(format, records) of a video source: folder, table or video2dataset output."""
    if fmt == "folder":
        return fmt, sources.read_folder(src, exts=_EXTS)
    if fmt == "table":
        return fmt, sources.read_table(src, video_col, caption_col, key_col,
                                       media_candidates=sources.VIDEO_COLUMNS + sources.IMAGE_COLUMNS,
                                       media_option="--video-col",
                                       caption_candidates=sources.CAPTION_COLUMNS + ("name",))
    if fmt == "img2dataset":
        return "video2dataset", read_video2dataset(src)
    raise InputError(f"--format {fmt!r} holds images only; videos come from a folder, a table or video2dataset output")


def missing_reason(rec: Record) -> str:
    """Why a video record has no video: its download failed (video2dataset status) or none is named."""
    status = rec.meta.get("status")
    return "download_failed" if status not in (None, "success") else "missing_video"


def check_options(media: str, *, resize_max: int = 0, min_size: int = 0, max_side: int = 0,
                  max_seconds: float = 0.0, min_seconds: float = 0.0, downloader: str = "auto") -> None:
    """Options of the other kind are refused with the one to use instead."""
    for name, val in (("--max-side", max_side), ("--max-seconds", max_seconds), ("--min-seconds", min_seconds)):
        if val < 0:
            raise InputError(f"{name} must be >= 0, got {val}")
    if media == "video":
        if resize_max:
            raise InputError("--resize-max is for images; for videos use --max-side N (longer side, re-encoded)")
        if min_size:
            raise InputError("--min-size is for images; for videos use --min-seconds S")
        if downloader == "img2dataset":
            raise InputError("--downloader img2dataset downloads images; video URLs are fetched by the built-in "
                             "downloader (--downloader builtin), or download with video2dataset and convert "
                             "its output folder")
    else:
        for name, val in (("--max-side", max_side), ("--max-seconds", max_seconds), ("--min-seconds", min_seconds)):
            if val:
                raise InputError(f"{name} is for videos and this source holds images (use --resize-max / "
                                 "--min-size for images)")
