"""Video data tools: the moving-shapes synthetic set (twins) and video in `vlp data convert`."""
import functools
import glob
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from data_pipelines.convert import convert
from data_pipelines.shardspec import InputError
from data_pipelines.shards import ShardWriter
from data_pipelines.synth import COLORS
from data_pipelines.synth_video import MOTIONS, write_synth_video
from data_pipelines.video_convert import encode_mp4
from vlp.cli import main as vlp_main
from vlp.data import video
from vlp.data.video import decode_frames, probe, segment_times

CONVERT = functools.partial(convert, progress=False)


@pytest.fixture(autouse=True)
def _pyav(monkeypatch):
    monkeypatch.setattr(video, "BACKEND", "pyav")


def _samples(d):
    paths = sorted(glob.glob(os.path.join(str(d), "*.tar")))
    return list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))


def _shard_bytes(d):
    return [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(str(d), "*.tar")))]


def _stats(d):
    with open(os.path.join(str(d), "stats.json")) as f:
        return json.load(f)


def _nonzero(skipped):
    return {k: v for k, v in skipped.items() if v}


# ----------------------------------------------------------------------------------- synth
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_video")
    write_synth_video(str(root / "train"), 30, seed=0, split="train", samples_per_shard=12)
    write_synth_video(str(root / "test"), 12, seed=0, split="test", samples_per_shard=5)
    return root


def test_synth_layout_counts_and_stats(synth):
    train = _samples(synth / "train")
    assert len(train) == 30
    assert sorted(os.listdir(synth / "train")) == ["stats.json"] + [f"synth-video-train-{i:06d}.tar" for i in range(3)]
    stats = _stats(synth / "train")
    assert stats["written"] == 30 and [s["samples"] for s in stats["shards"]] == [12, 12, 6]
    assert stats["one_object"] + stats["two_objects"] == 30 and stats["twin_pairs"] == 0
    assert 0 < stats["still_objects"] < stats["moving_objects"]  # ~20% of objects stay still
    assert stats["frames"] == 17 and stats["duration"] == 17 / 8  # 2 s at 8 fps, made odd
    for s in train:
        assert set(k for k in s if not k.startswith("__")) == {"mp4", "txt", "json"}
        meta = json.loads(s["json"])
        info = probe(s["mp4"])
        assert info == {k: meta[k] for k in ("duration", "fps", "width", "height", "frames")}
        assert info["width"] == info["height"] == 64 and len(s["mp4"]) < 40_000
        assert s["txt"].decode() == meta["caption"] and "twin" not in meta


def test_synth_captions_name_every_object_and_its_motion(synth):
    for s in _samples(synth / "train") + _samples(synth / "test"):
        text = s["txt"].decode()
        objs = json.loads(s["json"])["motion"]
        assert 1 <= len(objs) <= 2 and len(text.split(", ")) == len(objs)
        for o in objs:
            assert o["direction"] in MOTIONS
            assert f"{o['size']} {o['color']} {o['shape']} {o['direction']}" in text


def _centroid(frame, color):
    dist = np.abs(frame.astype(int) - np.asarray(COLORS[color])).sum(axis=2)
    ys, xs = np.nonzero(dist < 60)
    return np.array([xs.mean(), ys.mean()])


def test_synth_motion_is_what_the_caption_says(synth):
    """Single-object clips: the shape's centroid moves, in decoded frames, the way the caption says."""
    want = {MOTIONS[0]: (1, 0), MOTIONS[1]: (-1, 0), MOTIONS[2]: (0, -1), MOTIONS[3]: (0, 1), MOTIONS[4]: (0, 0)}
    checked = 0
    for s in _samples(synth / "train"):
        (obj,) = json.loads(s["json"])["motion"][:1]
        if len(json.loads(s["json"])["motion"]) != 1 or obj["color"] in ("white", "black"):
            continue
        first, last = decode_frames(s["mp4"], [0.0, 2.1])
        move = _centroid(last, obj["color"]) - _centroid(first, obj["color"])
        expect = np.array(want[obj["direction"]])
        assert np.abs(move - expect * 0.45 * 64 * 16 / 17).max() < 4, (obj, move)  # 45% of the side
        checked += 1
    assert checked >= 5


def test_synth_test_split_twins_are_exact_reversals(synth):
    test = _samples(synth / "test")
    assert len(test) == 12 and _stats(synth / "test")["twin_pairs"] == 6
    captions = [s["txt"].decode() for s in test]
    assert len(set(captions)) == 12  # retrieval has one right answer per query
    reverse = {MOTIONS[0]: MOTIONS[1], MOTIONS[1]: MOTIONS[0], MOTIONS[2]: MOTIONS[3], MOTIONS[3]: MOTIONS[2],
               MOTIONS[4]: MOTIONS[4]}
    for a, b in zip(test[::2], test[1::2]):
        ma, mb = json.loads(a["json"]), json.loads(b["json"])
        assert ma["twin"] == b["__key__"] and mb["twin"] == a["__key__"] and ma["index"] + 1 == mb["index"]
        assert a["txt"] != b["txt"]
        assert any(o["direction"] != MOTIONS[4] for o in ma["motion"])  # something moves
        for oa, ob in zip(ma["motion"], mb["motion"]):
            assert ob["direction"] == reverse[oa["direction"]] and ob["start"] == oa["end"]
            assert (oa["color"], oa["shape"], oa["size"]) == (ob["color"], ob["shape"], ob["size"])
        duration = probe(a["mp4"])["duration"]
        for k in (1, 2, 3, 4, 8):
            times = segment_times(duration, k, None)  # the K middle frames a frame-average model sees
            fa, fb = decode_frames(a["mp4"], times), decode_frames(b["mp4"], times)
            assert all(np.array_equal(x, y) for x, y in zip(fa, fb[::-1]))  # same frames, time reversed
        first_a, first_b = decode_frames(a["mp4"], [0.0])[0], decode_frames(b["mp4"], [0.0])[0]
        assert not np.array_equal(first_a, first_b)  # but the clips differ (direction)


def test_synth_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_synth_video(str(tmp_path / name), 4, seed=3, split="test", samples_per_shard=4)
    write_synth_video(str(tmp_path / "c"), 4, seed=4, split="test", samples_per_shard=4)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b") != _shard_bytes(tmp_path / "c")


def test_synth_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="even n"):
        write_synth_video(str(tmp_path / "x"), 3, split="test")
    with pytest.raises(ValueError, match="side must be an even"):
        write_synth_video(str(tmp_path / "x"), 2, side=63)


def test_cli_synth_video(tmp_path, capsys):
    out = tmp_path / "data"
    assert vlp_main(["data", "synth", str(out), "--video", "--train", "4", "--test", "2", "--side", "32",
                     "--seconds", "1", "--fps", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train"]["written"] == 4 and res["test"]["twin_pairs"] == 1
    assert probe(_samples(out / "test")[0]["mp4"]) == {"duration": 7 / 6, "fps": 6.0, "width": 32, "height": 32,
                                                      "frames": 7}
    assert len(_samples(out / "train")) == 4
    assert vlp_main(["data", "synth", str(tmp_path / "e"), "--video", "--image-size", "32"]) == 2
    assert "--image-size is for the image set" in capsys.readouterr().err
    assert vlp_main(["data", "synth", str(tmp_path / "e"), "--fps", "4"]) == 2
    assert "--fps is for the video set: add --video" in capsys.readouterr().err
    assert vlp_main(["data", "synth", str(tmp_path / "e"), "--video", "--test", "3"]) == 2
    assert "twin pairs" in capsys.readouterr().err and not (tmp_path / "e").exists()


# --------------------------------------------------------------------------------- convert
def _clip(n=12, fps=6, w=48, h=32, level=80):
    frames = [np.full((h, w, 3), (level + 5 * i) % 256, np.uint8) for i in range(n)]
    return encode_mp4(frames, fps, quality=12)


def _webm(n=8, fps=8, side=32):
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        s = c.add_stream("libvpx", rate=fps, options={"threads": "1"})
        s.width = s.height = side
        s.pix_fmt = "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((side, side, 3), 20 * i, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _write(path, data):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


@pytest.fixture(scope="module")
def clips():
    return {"a": _clip(), "b": _clip(24, 8, 64, 36, level=30), "short": _clip(2, 8, 32, 32), "web": _webm(),
            "junk": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()}


@pytest.fixture
def video_folder(tmp_path, clips):
    src = tmp_path / "videos"
    for name, ext in (("a", "mp4"), ("b", "mp4"), ("short", "mp4"), ("web", "webm"), ("junk", "mp4")):
        _write(src / f"{name}.{ext}", clips[name])
        _write(src / f"{name}.txt", f"clip {name}\n")
    _write(src / "sub" / "nocap.mp4", clips["a"])
    return src


def test_convert_folder_of_videos(tmp_path, video_folder, clips):
    stats = CONVERT(str(video_folder), str(tmp_path / "out"), min_seconds=0.5)
    samples = {s["__key__"]: s for s in _samples(tmp_path / "out")}
    assert sorted(samples) == ["a", "b", "web"] and stats["written"] == 3
    assert _nonzero(stats["skipped"]) == {"unreadable_video": 1, "too_short_video": 1, "missing_caption": 1}
    assert stats["skipped_examples"]["too_short_video"][0]["key"] == "short"
    assert stats["skipped_examples"]["unreadable_video"][0]["key"] == "junk"
    assert samples["a"]["mp4"] == clips["a"] and samples["web"]["webm"] == clips["web"]  # bytes as read
    meta = json.loads(samples["b"]["json"])
    assert {k: meta[k] for k in ("duration", "fps", "width", "height", "frames")} == \
        {"duration": 3.0, "fps": 8.0, "width": 64, "height": 36, "frames": 24}
    assert samples["b"]["txt"] == b"clip b" and stats["options"]["media"] == "video"
    # default --min-seconds 0: only clips without a frame are too short
    stats = CONVERT(str(video_folder), str(tmp_path / "out2"))
    assert stats["written"] == 4 and stats["skipped"]["too_short_video"] == 0


def test_convert_csv_of_videos_max_side_and_max_seconds(tmp_path, video_folder):
    src = tmp_path / "videos.csv"
    pd.DataFrame({"video_path": ["videos/a.mp4", "videos/b.mp4", "videos/missing.mp4", "videos/junk.mp4"],
                  "caption": ["A", "B", "gone", "junk"], "category": ["x", "y", "z", "w"]}).to_csv(src, index=False)
    stats = CONVERT(str(src), str(tmp_path / "out"), max_side=20, max_seconds=1.0)
    assert stats["written"] == 2 and stats["resized"] == 2
    assert _nonzero(stats["skipped"]) == {"missing_video": 1, "unreadable_video": 1}
    for s in _samples(tmp_path / "out"):
        info = probe(s["mp4"])
        meta = json.loads(s["json"])
        assert max(info["width"], info["height"]) <= 20 and info["width"] % 2 == info["height"] % 2 == 0
        assert info["duration"] <= 1.0 + 1e-6 and info["frames"] == meta["frames"] < meta["original_frames"]
        assert meta["category"] in ("x", "y") and meta["row"] in (0, 1)
        assert {k: meta[k] for k in ("width", "height")} == {k: info[k] for k in ("width", "height")}
    sizes = {json.loads(s["json"])["category"]: (json.loads(s["json"])["width"], json.loads(s["json"])["height"])
             for s in _samples(tmp_path / "out")}
    assert sizes == {"x": (20, 12), "y": (20, 10)}  # 48x32 and 64x36, aspect kept, even sides
    with pytest.raises(InputError, match="--resize-max is for images.*--max-side"):
        CONVERT(str(src), str(tmp_path / "bad"), resize_max=32)
    other = tmp_path / "other.csv"  # --video-col names the column; a `url` column of video files is found
    pd.DataFrame({"clip": ["videos/a.mp4"], "url": ["videos/b.mp4"], "text": ["A"]}).to_csv(other, index=False)
    assert CONVERT(str(other), str(tmp_path / "o1"), video_col="clip")["written"] == 1
    assert json.loads(_samples(tmp_path / "o1")[0]["json"])["url"] == "videos/b.mp4"
    stats = CONVERT(str(other), str(tmp_path / "o2"), caption_col="text")
    assert stats["options"]["media"] == "video" and json.loads(_samples(tmp_path / "o2")[0]["json"])["width"] == 64


def test_convert_parquet_of_video_urls(tmp_path, http_root, clips):
    """A WebVid-like table: contentUrl + name, fetched over loopback http by the built-in downloader."""
    root, base = http_root
    _write(root / "a.mp4", clips["a"])
    _write(root / "w.webm", clips["web"])
    _write(root / "junk.mp4", clips["junk"])
    src = tmp_path / "webvid.parquet"
    pd.DataFrame({"videoid": [1, 2, 3, 4], "contentUrl": [f"{base}/a.mp4", f"{base}/gone.mp4", f"{base}/w.webm",
                                                          f"{base}/junk.mp4"],
                  "name": ["first", "404", "web", "junk"], "duration": ["PT00H00M02S"] * 4}).to_parquet(src)
    stats = CONVERT(str(src), str(tmp_path / "out"), key_col="videoid", timeout=5)
    samples = {s["__key__"]: s for s in _samples(tmp_path / "out")}
    assert sorted(samples) == ["1", "3"] and samples["1"]["mp4"] == clips["a"] and "webm" in samples["3"]
    assert _nonzero(stats["skipped"]) == {"download_failed": 1, "unreadable_video": 1}
    assert "404" in stats["skipped_examples"]["download_failed"][0]["detail"]
    meta = json.loads(samples["1"]["json"])
    assert meta["url"] == f"{base}/a.mp4" and meta["duration"] == 2.0 and meta["videoid"] == 1


def test_convert_reads_video2dataset_output(tmp_path, clips):
    """video2dataset shards: failed downloads are written without an mp4 (json status) and are skipped."""
    src = tmp_path / "v2d"
    os.makedirs(src)
    with ShardWriter(str(src), "00000", 10) as w:
        w.write("000000000", {"mp4": clips["a"], "txt": b"ok one", "json": json.dumps(
            {"url": "http://x/a.mp4", "status": "success", "video_metadata": {}}).encode()})
        w.write("000000001", {"txt": b"failed", "json": json.dumps(
            {"url": "http://x/b.mp4", "status": "failed_to_download", "error_message": "404"}).encode()})
        w.write("000000002", {"mp4": clips["b"], "txt": b"ok two", "json": json.dumps({"status": "success"}).encode()})
    os.rename(src / "00000-000000.tar", src / "00000.tar")
    stats = CONVERT(str(src), str(tmp_path / "out"))
    assert stats["format"] == "video2dataset" and stats["written"] == 2
    assert _nonzero(stats["skipped"]) == {"download_failed": 1}
    assert [s["txt"] for s in _samples(tmp_path / "out")] == [b"ok one", b"ok two"]


def test_cli_convert_videos(tmp_path, video_folder, capsys):
    out = tmp_path / "out"
    assert vlp_main(["data", "convert", str(video_folder), str(out), "--max-side", "16", "--min-seconds", "0.5",
                     "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["written"] == 3 and stats["skipped"]["too_short_video"] == 1
    assert all(max(probe(s.get("mp4") or s.get("webm"))["width"], 0) <= 16 for s in _samples(out))
    assert vlp_main(["data", "convert", str(video_folder), str(tmp_path / "e"), "--min-size", "10"]) == 2
    assert "--min-size is for images" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    _write(mixed / "x.mp4", _clip(4))
    _write(mixed / "y.jpg", b"\xff\xd8\xff")
    assert vlp_main(["data", "convert", str(mixed), str(tmp_path / "e")]) == 2
    assert "both images (1) and videos (1)" in capsys.readouterr().err
