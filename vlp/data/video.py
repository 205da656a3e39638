"""Video clips from bytes: probe, K frames sampled by time, one crop and one flip per clip.

Frame sampling follows Frozen in Time (Bain, Nagrani, Varol and Zisserman, "Frozen in Time: A Joint
Video and Image Encoder for End-to-End Retrieval", ICCV 2021): the clip is cut into K equal segments,
training takes a uniformly random time in each, evaluation each segment's middle; one
RandomResizedCrop box and one flip draw are shared by all frames of a clip. Times, not header frame
indices, pick the frames: header frame counts can be wrong and frame rates variable.

Decoding (PyAV, one thread per DataLoader worker) seeks to the keyframe before the earliest wanted
time and decodes forward to the frame whose pts covers it; the next wanted time is reached by decoding
on when no keyframe lies between (same GOP), else by a new seek. The whole file is never decoded for
one frame. `VLP_VIDEO_BACKEND=torchcodec` reads through torchcodec instead (it needs a system FFmpeg;
not available on the machines vlp is tested on, so that path is untested), `auto` uses it when it
imports; the default, `pyav`, is the path the tests cover.

Speed, measured on this 2-core VM (one process, PyAV 18.1 / FFmpeg's H.264 decoder, 256x256 10 s
25 fps H.264 clips with B-frames, `VideoTransform(224, train=True, frames=4)`, crop and resize
included): about 60 clips/s with a keyframe every 2 s (what `vlp data convert --max-side` writes),
about 40 clips/s with x264's default 250-frame GOP (one keyframe per clip: each frame is reached by
decoding forward from the start).
"""
from __future__ import annotations

import io
import math
import os
from collections import deque
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from vlp.data.augment import hflip
from vlp.data.transforms import INTERPOLATIONS, center_crop_box, random_resized_crop_box

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
BACKENDS = ("auto", "pyav", "torchcodec")
BACKEND = os.environ.get("VLP_VIDEO_BACKEND", "pyav")  # module attribute


def is_video_key(ext: str) -> bool:
    """True for a sample member or file extension of a video container (`mp4`, `.MP4`, `webm` ...)."""
    return str(ext).lower().lstrip(".") in VIDEO_EXTS


# ----------------------------------------------------------------------------------------- PyAV
def _av():
    import av  # the `video` extra; imported on first use so image-only runs never need it

    return av


class _AVReader:
    """One open container: the first video stream's facts and time-ordered frame reads."""

    def __init__(self, data: bytes):
        av = _av()
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise ValueError(f"unreadable video: expected non-empty bytes, got {type(data).__name__} "
                             f"of length {len(data) if hasattr(data, '__len__') else '?'}")
        try:
            self.container = av.open(io.BytesIO(bytes(data)), mode="r")
        except (av.FFmpegError, ValueError, OSError) as e:
            raise ValueError(f"unreadable video ({len(data)} bytes): {e}") from None
        if not self.container.streams.video:
            kinds = ", ".join(s.type for s in self.container.streams) or "none"
            self.container.close()
            raise ValueError(f"unreadable video: the container has no video stream (streams: {kinds})")
        self.stream = s = self.container.streams.video[0]
        self.codec = s.codec_context
        self.codec.thread_count = 1  # one thread per DataLoader worker: parallelism comes from the workers
        self.tb = float(s.time_base) if s.time_base else 1e-6
        self.start = s.start_time if s.start_time is not None else 0
        self._packets = None  # the demux iterator since the last seek; None: not seeked yet
        self._pending: deque = deque()  # packets demuxed (looking ahead) but not yet decoded
        self._frames: deque = deque()  # frames decoded but not yet consumed
        self._last = None  # the last consumed frame: pts <= the current target
        self._eof = False
        self._decoded = 0

    def close(self) -> None:
        self.container.close()

    # ----- facts
    def info(self) -> Dict:
        s = self.stream
        fps = float(s.average_rate or s.guessed_rate or s.base_rate or 0.0)
        duration = 0.0
        if s.duration and s.time_base:
            duration = float(s.duration * s.time_base)  # exact rational, then one rounding
        elif self.container.duration:
            duration = self.container.duration / 1e6  # AV_TIME_BASE units
        if duration <= 0:
            duration = self._scan_duration()
        frames = int(s.frames) if s.frames and s.frames > 0 else int(round(duration * fps))
        return {"duration": float(max(0.0, duration)), "fps": fps, "width": int(self.codec.width),
                "height": int(self.codec.height), "frames": frames}

    def _scan_duration(self) -> float:
        """End of the last packet, demuxed (not decoded) from the start: for containers without a duration."""
        end = None
        for p in self.container.demux(self.stream):
            if p.pts is not None:
                end = max(end or p.pts, p.pts + (p.duration or 0))
        self._packets = None
        return 0.0 if end is None else (end - self.start) * self.tb

    # ----- decoding
    def _seek(self, target: float) -> None:
        self.container.seek(int(math.floor(target)), stream=self.stream, backward=True, any_frame=False)
        self._packets = self.container.demux(self.stream)
        self._pending.clear()
        self._frames.clear()
        self._last, self._eof = None, False

    def _next_packet(self):
        if self._pending:
            return self._pending.popleft()
        return next(self._packets, None)

    def _keyframe_before(self, target: float) -> bool:
        """Whether a keyframe at or before `target` lies ahead (then a seek skips decoding up to it).
        Looks ahead at most one GOP: stops at the first keyframe, or once packets start after `target`."""
        for p in self._pending:
            if p.is_keyframe and p.pts is not None and p.pts <= target:
                return True
            if p.dts is not None and p.dts > target:
                return False
        while True:
            p = next(self._packets, None)
            if p is None:
                return False
            self._pending.append(p)
            if p.size == 0:  # the demuxer's end-of-stream packet
                return False
            if p.is_keyframe and p.pts is not None and p.pts <= target:
                return True
            if p.dts is not None and p.dts > target:
                return False

    def _peek(self):
        """The next decoded frame (not consumed), or None at the end of the stream."""
        av = _av()
        while not self._frames and not self._eof:
            p = self._next_packet()
            if p is None or p.size == 0:  # end of the stream: drain the decoder's delayed frames
                p, self._eof = None, True
            try:
                out = self.codec.decode(p)
            except av.error.EOFError:
                out = []
            except av.FFmpegError:
                continue  # a corrupt packet: decode on from the next one
            prev = self._frames[-1] if self._frames else self._last
            for f in out:
                if f.pts is None:  # no timestamp: one tick after the previous frame
                    f.pts = (prev.pts + max(1, int(prev.duration or 1))) if prev is not None else 0
                self._frames.append(f)
                prev = f
            self._decoded += len(out)
        return self._frames[0] if self._frames else None

    def _advance_to(self, target: float):
        """The frame with the largest pts <= target (the first one when target precedes it, the last
        one when target is past the end); None when nothing decodes."""
        while True:
            nxt = self._peek()
            if nxt is None:
                return self._last
            if nxt.pts > target:
                return self._last if self._last is not None else nxt
            self._last = self._frames.popleft()
            if self._last.duration and target < self._last.pts + self._last.duration:
                return self._last  # it covers target: no need to decode the next frame

    def read(self, times: Sequence[float]) -> List[np.ndarray]:
        if not len(times):
            return []
        targets = [self.start + max(0.0, float(t)) / self.tb for t in times]
        out: List[Optional[np.ndarray]] = [None] * len(targets)
        rgb: Dict[int, np.ndarray] = {}
        for i in sorted(range(len(targets)), key=targets.__getitem__):
            t = targets[i]
            if (self._packets is None or (self._last is not None and t < self._last.pts)
                    or self._keyframe_before(t)):
                self._seek(t)
            frame = self._advance_to(t)
            if frame is not None and frame.pts > t and t > self.start and self._decoded:
                self._seek(self.start)  # the index sent us past t (broken seek): decode from the start
                frame = self._advance_to(t)
            if frame is None:
                raise ValueError(f"unreadable video: no frame decodes (wanted t={times[i]:.3f} s)")
            if frame.pts not in rgb:  # by pts: a freed frame's id() can be reused by a later one
                rgb[frame.pts] = out[i] = frame.to_ndarray(format="rgb24")
            else:  # the same frame again: converted once, its own array
                out[i] = rgb[frame.pts].copy()
        return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- torchcodec
_TORCHCODEC = []


def _torchcodec():
    """torchcodec's VideoDecoder, or None when it is not importable (it needs a system FFmpeg)."""
    if not _TORCHCODEC:
        try:
            from torchcodec.decoders import VideoDecoder

            _TORCHCODEC.append(VideoDecoder)
        except Exception:  # not installed, or its FFmpeg libraries are missing
            _TORCHCODEC.append(None)
    return _TORCHCODEC[0]


class _TCReader:
    """torchcodec: exact seeks, frames played at the given times (clamped into the stream)."""

    def __init__(self, data: bytes, decoder_cls):
        try:
            self.dec = decoder_cls(bytes(data), num_ffmpeg_threads=1, seek_mode="exact")
        except Exception as e:
            raise ValueError(f"unreadable video ({len(data)} bytes): {e}") from None
        md = self.dec.metadata
        self.begin = float(md.begin_stream_seconds or 0.0)
        self.end = float(md.end_stream_seconds or 0.0)
        self.md = md

    def info(self) -> Dict:
        md = self.md
        duration = max(0.0, self.end - self.begin) or float(md.duration_seconds or 0.0)
        fps = float(md.average_fps or 0.0)
        frames = int(md.num_frames or round(duration * fps))
        return {"duration": duration, "fps": fps, "width": int(md.width), "height": int(md.height),
                "frames": frames}

    def read(self, times: Sequence[float]) -> List[np.ndarray]:
        if not len(times):
            return []
        last = float(np.nextafter(self.end, self.begin)) if self.end > self.begin else self.begin
        ts = [min(max(self.begin + float(t), self.begin), last) for t in times]
        try:
            batch = self.dec.get_frames_played_at(ts).data
        except Exception as e:
            raise ValueError(f"unreadable video: {e}") from None
        return list(batch.permute(0, 2, 3, 1).contiguous().numpy())

    def close(self) -> None:
        pass


def _open(data: bytes):
    if BACKEND not in BACKENDS:
        raise ValueError(f"VLP_VIDEO_BACKEND={BACKEND!r}; valid: {', '.join(BACKENDS)}")
    tc = _torchcodec() if BACKEND in ("auto", "torchcodec") else None
    if BACKEND == "torchcodec" and tc is None:
        raise ValueError("VLP_VIDEO_BACKEND=torchcodec but torchcodec is not importable; use auto or pyav")
    return _TCReader(data, tc) if tc is not None else _AVReader(data)


# --------------------------------------------------------------------------------------- public
def probe(data: bytes) -> dict:
    """{duration (s), fps, width, height, frames (estimate)} of the first video stream; ValueError if
    the bytes are not a readable video."""
    reader = _open(data)
    try:
        return reader.info()
    finally:
        reader.close()


def segment_times(duration: float, k: int, rng: Optional[np.random.Generator]) -> List[float]:
    """K times in [0, duration): one per equal segment, uniformly random in it with `rng` (training),
    its middle without (evaluation)."""
    if int(k) != k or k < 1:
        raise ValueError(f"frames (k) must be an integer >= 1, got {k!r}")
    duration = float(duration)
    if not math.isfinite(duration) or duration < 0:
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {duration!r}")
    seg = duration / k
    if rng is None:
        return [(i + 0.5) * seg for i in range(int(k))]
    return [float(rng.uniform(i * seg, (i + 1) * seg)) if seg > 0 else 0.0 for i in range(int(k))]


def decode_frames(data: bytes, times: Sequence[float]) -> List[np.ndarray]:
    """RGB HWC uint8 frames shown at `times` (seconds from the stream's start); a time past the last
    decodable frame gives the last frame. ValueError when no frame decodes."""
    reader = _open(data)
    try:
        return reader.read(times)
    finally:
        reader.close()


def read_clip_for_eval(data: bytes, frames: int) -> List[Image.Image]:
    """The K segment-middle frames as PIL RGB images, for evaluation's own per-frame preprocessing."""
    reader = _open(data)
    try:
        times = segment_times(reader.info()["duration"], frames, None)
        return [Image.fromarray(f, "RGB") for f in reader.read(times)]
    finally:
        reader.close()


class TooShortVideo(ValueError):
    """A clip shorter than the transform's `min_seconds`, or without a frame: skipped as too_short_video."""


class VideoTransform:
    """bytes -> uint8 (K, 3, size, size): K frames by `segment_times`, one crop box (train: random
    resized crop with `crop_scale`; eval: the central square) and one flip draw shared by the clip.

    Draws from `rng` in this order: the K times, the crop box, the flip. `min_seconds`: a shorter clip
    raises `TooShortVideo` (a ValueError).
    """

    def __init__(self, size: int, train: bool, frames: int, crop_scale: Sequence[float] = (0.5, 1.0),
                 interpolation: str = "bilinear", hflip: bool = False, min_seconds: float = 0.0):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"VideoTransform interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        if int(frames) != frames or frames < 1:
            raise ValueError(f"VideoTransform frames must be an integer >= 1 (frames per clip), got {frames!r}")
        if int(size) != size or size < 1:
            raise ValueError(f"VideoTransform size must be an integer >= 1 (output side in px), got {size!r}")
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"VideoTransform crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(crop_scale)}")
        if not min_seconds >= 0:
            raise ValueError(f"VideoTransform min_seconds must be >= 0, got {min_seconds!r}")
        self.size, self.train, self.frames = int(size), bool(train), int(frames)
        self.crop_scale, self.interpolation = (lo, hi), interpolation
        self.hflip, self.min_seconds = bool(hflip), float(min_seconds)

    def with_frames(self, frames: int) -> "VideoTransform":
        """The same transform decoding `frames` per clip (the frame curriculum)."""
        return VideoTransform(self.size, self.train, frames, self.crop_scale, self.interpolation, self.hflip,
                              self.min_seconds)

    def __call__(self, data: bytes, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        if self.train and rng is None:
            raise ValueError("VideoTransform(train=True) needs a numpy Generator (rng)")
        reader = _open(data)
        try:
            info = reader.info()
            if info["duration"] < self.min_seconds or (info["duration"] <= 0 and info["frames"] <= 0):
                raise TooShortVideo(f"too short: {info['duration']:.3g} s ({info['frames']} frames), "
                                 f"min_seconds is {self.min_seconds:g}")
            times = segment_times(info["duration"], self.frames, rng if self.train else None)
            frames = reader.read(times)
        finally:
            reader.close()
        h, w = frames[0].shape[:2]
        if self.train:
            top, left, ch, cw = random_resized_crop_box(h, w, self.crop_scale, rng)
        else:
            top, left, ch, cw = center_crop_box(h, w)
        flip = self.train and self.hflip and rng.random() < 0.5
        interp = INTERPOLATIONS[self.interpolation]
        out = np.empty((len(frames), 3, self.size, self.size), np.uint8)
        for i, f in enumerate(frames):
            if f.shape[:2] != (h, w):  # a mid-stream resolution change: back to the first frame's size
                f = cv2.resize(f, (w, h), interpolation=interp)
            crop = f[top:top + ch, left:left + cw]
            if crop.shape[:2] != (self.size, self.size):
                crop = cv2.resize(crop, (self.size, self.size), interpolation=interp)
            if flip:
                crop = hflip(crop)
            out[i] = crop.transpose(2, 0, 1)
        return out


__all__ = ["VIDEO_EXTS", "is_video_key", "probe", "segment_times", "decode_frames", "VideoTransform",
           "read_clip_for_eval"]


def clip_grid(frames, gap: int = 2):
    """PIL frames of one clip -> one PIL image: a grid of ceil(sqrt(n)) columns, white gaps between."""
    n = len(frames)
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = -(-n // cols)
    w, h = frames[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, f in enumerate(frames):
        grid.paste(f.resize((w, h)), ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return grid
