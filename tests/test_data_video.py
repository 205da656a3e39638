"""vlp.data.video: probe, time-based frame sampling, seeking decode, one crop and one flip per clip.

Clips are written by PyAV (H.264 with B-frames and a short GOP, or VP9 webm); each frame's grey level
encodes its index, so a decoded frame tells which frame it is.
"""
import io

import av
import numpy as np
import pytest

from data_pipelines.video_convert import encode_mp4
from vlp.data import video
from vlp.data.video import (VideoTransform, decode_frames, is_video_key, probe, read_clip_for_eval,
                            segment_times)

STEP = 5  # grey level per frame index


@pytest.fixture(autouse=True)
def _pyav(monkeypatch):
    monkeypatch.setattr(video, "BACKEND", "pyav")  # the path these tests cover, torchcodec or not


def index_frames(n, w=32, h=32, pattern=False):
    """Frame i: grey STEP*i in the green channel; with `pattern`, red rises from left to right (static)."""
    for i in range(n):
        img = np.full((h, w, 3), STEP * i, np.uint8)
        if pattern:
            img[..., 0] = np.linspace(0, 255, w, dtype=np.float32)[None, :].astype(np.uint8)
            img[..., 2] = 0
        yield img


def index_clip(n=40, fps=10, gop_seconds=1.0, **kw):
    return encode_mp4(index_frames(n, **kw), fps, gop_seconds=gop_seconds, quality=10)


def index_of(img):
    return int(round(float(img[..., 1].mean()) / STEP))


@pytest.fixture(scope="module")
def clip():
    return index_clip()  # 40 frames at 10 fps: 4 s, a keyframe every 10 frames


def test_is_video_key():
    assert all(is_video_key(e) for e in ("mp4", ".MP4", "webm", "mkv", "mov", "avi"))
    assert not any(is_video_key(e) for e in ("jpg", "txt", "json", ""))


def test_segment_times_eval_middles_train_inside_each_segment():
    assert segment_times(10.0, 4, None) == [1.25, 3.75, 6.25, 8.75]
    assert segment_times(3.0, 1, None) == [1.5]
    draws = [segment_times(10.0, 4, np.random.default_rng(s)) for s in range(50)]
    for ts in draws:
        assert all(2.5 * i <= t < 2.5 * (i + 1) for i, t in enumerate(ts))
    assert len({tuple(ts) for ts in draws}) == 50  # random within the segment, not fixed
    assert segment_times(10.0, 4, np.random.default_rng(3)) == draws[3]  # a function of the generator
    for bad in ((10.0, 0), (10.0, 1.5), (-1.0, 4), (float("nan"), 4)):
        with pytest.raises(ValueError):
            segment_times(bad[0], bad[1], None)


def test_probe(clip):
    assert probe(clip) == {"duration": 4.0, "fps": 10.0, "width": 32, "height": 32, "frames": 40}
    assert probe(index_clip(6, 8, w=48, h=20)) == {"duration": 0.75, "fps": 8.0, "width": 48, "height": 20,
                                                  "frames": 6}


def test_decoded_frames_are_the_frames_shown_at_those_times(clip):
    times = [3.95, 0.0, 0.05, 0.1, 0.99, 1.0, 2.34, 2.34, 1.5, 3.99]  # unsorted, repeated, across GOPs
    frames = decode_frames(clip, times)
    assert [index_of(f) for f in frames] == [int(t * 10 + 1e-9) for t in times]
    assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)


def test_time_past_the_end_gives_the_last_frame(clip):
    assert [index_of(f) for f in decode_frames(clip, [100.0, 4.0, 3.95])] == [39, 39, 39]


def test_decoding_seeks_across_gops_and_reads_forward_within_one(clip):
    reader = video._AVReader(clip)
    reader.read([3.95])  # the last GOP's keyframe is frame 30: the whole file is not decoded
    assert reader._decoded <= 16
    reader = video._AVReader(clip)
    reader.read([0.1, 0.3, 0.5])  # one GOP: no new seek, each frame decoded once
    assert reader._decoded <= 10
    reader = video._AVReader(clip)
    reader.read([0.2, 3.6])  # far apart: a seek instead of decoding the 3 GOPs between
    assert reader._decoded <= 24


def test_webm_vp9_without_stream_duration():
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx-vp9", rate=10, options={"g": "5", "threads": "1"})
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i, img in enumerate(index_frames(20)):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = buf.getvalue()
    info = probe(data)
    assert abs(info["duration"] - 2.0) < 0.06 and info["fps"] == 10.0 and info["width"] == 32
    assert [index_of(f) for f in decode_frames(data, [0.0, 1.25, 0.75, 1.95])] == [0, 12, 7, 19]


def test_unreadable_bytes_raise_value_error(clip):
    rng = np.random.default_rng(0)
    junk = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    for data in (junk, b"", clip[: len(clip) // 3]):
        for fn in (probe, lambda d: decode_frames(d, [0.5]), lambda d: VideoTransform(16, False, 2)(d, None),
                   lambda d: read_clip_for_eval(d, 2)):
            with pytest.raises(ValueError, match="unreadable video"):
                fn(data)


def test_transform_eval_middle_frames_center_crop():
    data = index_clip(40, 10, w=48, h=32, pattern=True)
    out = VideoTransform(16, train=False, frames=4)(data, None)
    assert out.shape == (4, 3, 16, 16) and out.dtype == np.uint8
    assert [int(round(float(f[1].mean()) / STEP)) for f in out] == [5, 15, 25, 35]
    red = out[0, 0].astype(int).mean(axis=0)  # the central 32x32 of 48 columns: red 1/6 .. 5/6 of 255
    assert abs(red[0] - 255 * 8 / 48) < 12 and abs(red[-1] - 255 * 40 / 48) < 12


def test_transform_train_one_crop_and_one_flip_for_all_frames():
    data = index_clip(40, 10, w=48, h=32, pattern=True)
    tf = VideoTransform(16, train=True, frames=4, hflip=True)
    flips = []
    for seed in range(24):
        out = tf(data, np.random.default_rng(seed))
        assert out.shape == (4, 3, 16, 16)
        idx = [int(round(float(f[1].mean()) / STEP)) for f in out]
        assert all(10 * i <= j < 10 * (i + 1) for i, j in enumerate(idx)), idx  # one frame per segment
        red = out[:, 0].astype(int)
        assert np.abs(red - red[0]).max() <= 6  # the same crop box (and flip) in every frame
        slope = red[0].mean(axis=0)
        flips.append(slope[0] > slope[-1])
    assert 0 < sum(flips) < 24  # flipped in some clips, not in others
    no_flip = VideoTransform(16, train=True, frames=4, hflip=False)
    for seed in range(8):
        slope = no_flip(data, np.random.default_rng(seed))[0, 0].astype(int).mean(axis=0)
        assert slope[0] < slope[-1]


def test_transform_same_generator_same_clip():
    data = index_clip(20, 10)
    tf = VideoTransform(16, train=True, frames=3, hflip=True)
    assert np.array_equal(tf(data, np.random.default_rng(5)), tf(data, np.random.default_rng(5)))


def test_one_frame_clip_and_k_larger_than_the_frame_count():
    data = index_clip(10, 10)
    assert [int(round(float(f[1].mean()) / STEP)) for f in VideoTransform(16, False, 1)(data, None)] == [5]
    out = VideoTransform(16, False, 16)(data, None)  # 16 samples of 10 frames: repeats, in order
    idx = [int(round(float(f[1].mean()) / STEP)) for f in out]
    assert idx == sorted(idx) and set(idx) == set(range(10))


def test_min_seconds_and_argument_errors():
    data = index_clip(10, 10)  # 1 s
    with pytest.raises(ValueError, match="too short"):
        VideoTransform(16, False, 2, min_seconds=1.5)(data, None)
    assert VideoTransform(16, False, 2, min_seconds=1.0)(data, None).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="interpolation 'cubic'.*bilinear"):
        VideoTransform(16, True, 4, interpolation="cubic")
    with pytest.raises(ValueError, match="frames must be an integer >= 1"):
        VideoTransform(16, True, 0)
    with pytest.raises(ValueError, match="crop_scale"):
        VideoTransform(16, True, 4, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        VideoTransform(16, True, 4)(data, None)


def test_read_clip_for_eval_gives_pil_middle_frames(clip):
    images = read_clip_for_eval(clip, 4)
    assert [im.mode for im in images] == ["RGB"] * 4 and images[0].size == (32, 32)
    assert [index_of(np.asarray(im)) for im in images] == [5, 15, 25, 35]
