"""`vlp data convert`: every source format, skip reasons, resizing, shard limits, output safety."""
import functools
import glob
import io
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.convert import convert, parse_bytes, sanitize_key
from data_pipelines.shardspec import InputError
from data_pipelines.sources import detect_format
from vlp.cli import main as vlp_main

CONVERT = functools.partial(convert, progress=False)
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def _image_bytes(size=(32, 24), color=(200, 30, 30), fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def _read(out):
    """All samples of OUT's shards, in order: key -> {ext: bytes}."""
    paths = sorted(glob.glob(os.path.join(out, "*.tar")))
    return {s["__key__"]: s for s in wds.WebDataset(paths, shardshuffle=False, empty_check=False)}


def _stats(out):
    with open(os.path.join(out, "stats.json")) as f:
        return json.load(f)


def _nonzero(skipped):
    return {k: v for k, v in skipped.items() if v}


# ------------------------------------------------------------------------------------ folder
@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        _write(str(src / f"img{i}.jpg"), _image_bytes(color=COLORS[i]))
        _write(str(src / f"img{i}.txt"), f"  caption number {i}\n")
    _write(str(src / "sub" / "deep.png"), _image_bytes(fmt="PNG"))
    _write(str(src / "sub" / "deep.txt"), "a png in a subfolder")
    _write(str(src / "photo.v2.final.jpg"), _image_bytes(color=COLORS[4]))  # dots in the name
    _write(str(src / "photo.v2.final.txt"), "dots in the file name")
    _write(str(src / "photo_v2_final.jpg"), _image_bytes(color=COLORS[5]))  # sanitises alike
    _write(str(src / "photo_v2_final.txt"), "underscores in the file name")
    _write(str(src / "odd.bmp"), _image_bytes(fmt="BMP"))  # not read by the loader: re-encoded
    _write(str(src / "odd.txt"), "a bitmap")
    # problems, one per reason
    _write(str(src / "nocap.jpg"), _image_bytes())
    _write(str(src / "empty.jpg"), _image_bytes())
    _write(str(src / "empty.txt"), "   \n")
    _write(str(src / "broken.jpg"), b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _write(str(src / "broken.txt"), "unreadable")
    _write(str(src / "tiny.jpg"), _image_bytes(size=(8, 8)))
    _write(str(src / "tiny.txt"), "too small")
    _write(str(src / "img0.png"), _image_bytes(fmt="PNG"))  # same key as img0.jpg
    return src


def test_folder(folder, tmp_path):
    out = tmp_path / "out"
    assert detect_format(str(folder)) == "folder"
    stats = CONVERT(str(folder), str(out), min_size=16, samples_per_shard=4)
    samples = _read(out)
    assert stats["written"] == len(samples) == 8
    assert _nonzero(stats["skipped"]) == {"missing_caption": 1, "empty_caption": 1, "unreadable_image": 1,
                                          "too_small": 1, "duplicate_key": 1}
    assert stats["skipped_examples"]["too_small"][0]["key"] == "tiny"
    assert "img0" in samples and "sub_deep" in samples
    assert samples["img0"]["txt"] == b"caption number 0"
    assert "photo_v2_final" in samples and len([k for k in samples if k.startswith("photo_v2_final")]) == 2
    assert all("." not in k and "/" not in k for k in samples)
    assert "png" in samples["sub_deep"] and "jpg" not in samples["sub_deep"]
    assert samples["odd"]["jpg"][:2] == b"\xff\xd8" and "bmp" not in samples["odd"]
    assert samples["img1"]["jpg"] == open(folder / "img1.jpg", "rb").read()  # passed through unchanged
    meta = json.loads(samples["img1"]["json"])
    assert meta["source"] == str(folder / "img1.jpg") and (meta["width"], meta["height"]) == (32, 24)
    assert meta["key"] == "img1"
    assert [s["samples"] for s in stats["shards"]] == [4, 4]
    assert stats["total_bytes"] == sum(os.path.getsize(out / s["name"]) for s in stats["shards"])
    assert not glob.glob(str(out / "*.tmp"))


def test_workers_keep_order(folder, tmp_path):
    CONVERT(str(folder), str(tmp_path / "one"), samples_per_shard=3)
    CONVERT(str(folder), str(tmp_path / "two"), samples_per_shard=3, workers=2)
    one, two = _read(tmp_path / "one"), _read(tmp_path / "two")
    assert list(one) == list(two)
    assert all(one[k]["jpg" if "jpg" in one[k] else "png"] == two[k]["jpg" if "jpg" in two[k] else "png"]
               for k in one)


def test_refuses_non_empty_out_unless_overwrite(folder, tmp_path):
    out = tmp_path / "out"
    CONVERT(str(folder), str(out), samples_per_shard=2)
    assert len(glob.glob(str(out / "*.tar"))) > 1
    with pytest.raises(FileExistsError, match="--overwrite"):
        CONVERT(str(folder), str(out))
    stats = CONVERT(str(folder), str(out), samples_per_shard=100, overwrite=True)
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "stats.json"]  # stale shards removed
    assert stats["written"] == len(_read(out))


def test_resize_max(tmp_path):
    src = tmp_path / "src"
    _write(str(src / "wide.png"), _image_bytes(size=(200, 100), fmt="PNG"))
    _write(str(src / "wide.txt"), "wide")
    _write(str(src / "small.jpg"), _image_bytes(size=(40, 30)))
    _write(str(src / "small.txt"), "small")
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    _write(str(src / "cmyk.jpg"), cmyk.getvalue())
    _write(str(src / "cmyk.txt"), "cmyk")
    stats = CONVERT(str(src), str(tmp_path / "out"), resize_max=64)
    samples = _read(tmp_path / "out")
    assert Image.open(io.BytesIO(samples["cmyk"]["jpg"])).mode == "RGB"
    wide = Image.open(io.BytesIO(samples["wide"]["jpg"]))
    assert wide.format == "JPEG" and wide.size == (64, 32)
    meta = json.loads(samples["wide"]["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (64, 32, 200, 100)
    assert samples["small"]["jpg"] == open(src / "small.jpg", "rb").read()
    assert stats["resized"] == 1


def test_shard_limits(tmp_path):
    src = tmp_path / "src"
    rng = __import__("numpy").random.default_rng(0)
    for i in range(7):  # noise images: ~10 kB each, incompressible
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype="uint8")).save(buf, format="PNG")
        _write(str(src / f"n{i}.png"), buf.getvalue())
        _write(str(src / f"n{i}.txt"), f"noise {i}")
    stats = CONVERT(str(src), str(tmp_path / "count"), samples_per_shard=3)
    assert [s["samples"] for s in stats["shards"]] == [3, 3, 1]
    limit = parse_bytes("40KB")
    stats = CONVERT(str(src), str(tmp_path / "bytes"), max_shard_bytes="40KB", prefix="b")
    assert len(stats["shards"]) > 1 and sum(s["samples"] for s in stats["shards"]) == 7
    for s in stats["shards"]:
        assert os.path.getsize(tmp_path / "bytes" / s["name"]) <= limit
        assert s["name"].startswith("b-")
    assert len(_read(tmp_path / "bytes")) == 7


def test_parse_bytes_and_keys():
    assert parse_bytes("1.5KB") == 1500 and parse_bytes("2MiB") == 2 * 1024 ** 2 and parse_bytes(123) == 123
    with pytest.raises(InputError):
        parse_bytes("lots")
    used = set()
    assert sanitize_key("a/b.c", used) == "a_b_c"
    second = sanitize_key("a_b_c", used)
    assert second != "a_b_c" and second.startswith("a_b_c_") and "." not in second
    long = sanitize_key("x" * 300, used)
    assert len(long) <= 80


# ------------------------------------------------------------------------------------ tables
def _table_images(d):
    rows = []
    for i in range(3):
        _write(str(d / "imgs" / f"t{i}.jpg"), _image_bytes(color=COLORS[i]))
        rows.append({"filepath": f"imgs/t{i}.jpg", "caption": f"table caption {i}", "uid": f"u{i}"})
    rows.append({"filepath": "imgs/missing.jpg", "caption": "no such file", "uid": "u3"})
    rows.append({"filepath": "imgs/t0.jpg", "caption": "", "uid": "u4"})
    rows.append({"filepath": "imgs/t1.jpg", "caption": "same uid again", "uid": "u1"})
    return rows


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet"])
def test_tables(tmp_path, ext):
    rows = _table_images(tmp_path)
    src = tmp_path / f"table.{ext}"
    df = pd.DataFrame(rows)
    if ext == "parquet":
        df.to_parquet(src)
    else:
        df.to_csv(src, sep="\t" if ext == "tsv" else ",", index=False)
    assert detect_format(str(src)) == "table"
    stats = CONVERT(str(src), str(tmp_path / "out"), key_col="uid")
    samples = _read(tmp_path / "out")
    assert list(samples) == ["u0", "u1", "u2"]
    assert _nonzero(stats["skipped"]) == {"missing_image": 1, "empty_caption": 1, "duplicate_key": 1}
    assert samples["u2"]["txt"] == b"table caption 2"
    meta = json.loads(samples["u2"]["json"])
    assert meta["source"] == str(tmp_path / "imgs" / "t2.jpg") and meta["row"] == 2
    # default keys are row numbers; auto-detected columns
    stats = CONVERT(str(src), str(tmp_path / "rows"))
    assert list(_read(tmp_path / "rows")) == ["000000000", "000000001", "000000002", "000000005"]


def test_table_bad_column_is_reported_before_writing(tmp_path):
    src = tmp_path / "t.csv"
    pd.DataFrame([{"img": "a.jpg", "words": "x"}]).to_csv(src, index=False)
    with pytest.raises(InputError, match="--image-col"):
        CONVERT(str(src), str(tmp_path / "out"))
    with pytest.raises(InputError, match="no column 'nope'"):
        CONVERT(str(src), str(tmp_path / "out"), image_col="img", caption_col="nope")
    assert not (tmp_path / "out").exists()


def test_csv_with_urls(tmp_path, http_root):
    root, base = http_root
    for i in range(3):
        _write(str(root / f"u{i}.jpg"), _image_bytes(color=COLORS[i]))
    _write(str(root / "junk.jpg"), b"not an image at all")
    src = tmp_path / "urls.csv"
    pd.DataFrame({"url": [f"{base}/u0.jpg", f"{base}/gone.jpg", f"{base}/u1.jpg", f"{base}/junk.jpg",
                          f"{base}/u2.jpg"],
                  "text": ["first", "404", "second", "junk", "third"]}).to_csv(src, index=False)
    stats = CONVERT(str(src), str(tmp_path / "out"), workers=2, timeout=5)
    samples = _read(tmp_path / "out")
    assert [s["txt"] for s in samples.values()] == [b"first", b"second", b"third"]
    assert _nonzero(stats["skipped"]) == {"download_failed": 1, "unreadable_image": 1}
    assert "404" in stats["skipped_examples"]["download_failed"][0]["detail"]
    meta = json.loads(samples["000000002"]["json"])
    assert meta["url"] == f"{base}/u1.jpg" and meta["width"] == 32
    assert samples["000000004"]["jpg"] == open(root / "u2.jpg", "rb").read()


# -------------------------------------------------------------------------------- COCO/Karpathy
def _coco(tmp_path):
    imgs = tmp_path / "images"
    for i in range(3):
        _write(str(imgs / f"{i:012d}.jpg"), _image_bytes(color=COLORS[i]))
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 32, "height": 24} for i in range(3)],
        "annotations": [{"id": 10, "image_id": 0, "caption": "zero a "}, {"id": 11, "image_id": 1, "caption": "one a"},
                        {"id": 12, "image_id": 0, "caption": "zero b"}, {"id": 13, "image_id": 1, "caption": "one b"}],
    }
    src = tmp_path / "ann" / "captions.json"
    _write(str(src), json.dumps(data))
    return src, imgs


def test_coco(tmp_path):
    src, imgs = _coco(tmp_path)
    assert detect_format(str(src)) == "coco"
    with pytest.raises(InputError, match="--images-dir"):
        CONVERT(str(src), str(tmp_path / "bad"))
    stats = CONVERT(str(src), str(tmp_path / "out"), images_dir=str(imgs))
    samples = _read(tmp_path / "out")
    assert list(samples) == ["000000000000", "000000000001"]
    assert samples["000000000000"]["txt"] == b"zero a"
    assert json.loads(samples["000000000000"]["json"])["captions"] == ["zero a", "zero b"]
    assert _nonzero(stats["skipped"]) == {"missing_caption": 1}  # image 2 has no caption
    CONVERT(str(src), str(tmp_path / "all"), images_dir=str(imgs), all_captions=True)
    samples = _read(tmp_path / "all")
    assert list(samples) == ["000000000000_10", "000000000000_12", "000000000001_11", "000000000001_13"]
    assert samples["000000000001_13"]["txt"] == b"one b"


def test_karpathy(tmp_path):
    imgs = tmp_path / "flickr"
    entries = []
    for i, split in enumerate(["train", "test", "test", "val", "restval"]):
        _write(str(imgs / "sub" / f"{i}.jpg"), _image_bytes(color=COLORS[i]))
        entries.append({"filepath": "sub", "filename": f"{i}.jpg", "split": split, "imgid": i,
                        "sentences": [{"raw": f"img {i} cap {j}", "tokens": []} for j in range(3)]})
    src = tmp_path / "dataset_flickr.json"
    _write(str(src), json.dumps({"images": entries, "dataset": "flickr30k"}))
    assert detect_format(str(src)) == "karpathy"
    CONVERT(str(src), str(tmp_path / "test"), split="test", images_dir=str(imgs))
    test = _read(tmp_path / "test")
    assert list(test) == ["1", "2"]
    assert test["1"]["txt"].decode().splitlines() == ["img 1 cap 0", "img 1 cap 1", "img 1 cap 2"]
    CONVERT(str(src), str(tmp_path / "train"), split="train,restval", images_dir=str(imgs))
    train = _read(tmp_path / "train")
    assert list(train) == ["0", "4"] and train["0"]["txt"] == b"img 0 cap 0"
    CONVERT(str(src), str(tmp_path / "each"), split="train", images_dir=str(imgs), all_captions=True)
    assert list(_read(tmp_path / "each")) == ["0_0", "0_1", "0_2"]
    with pytest.raises(InputError, match="valid splits"):
        CONVERT(str(src), str(tmp_path / "x"), split="dev", images_dir=str(imgs))


# ---------------------------------------------------------------------------------- img2dataset
def test_img2dataset(tmp_path):
    src = tmp_path / "i2d"
    os.makedirs(src)
    with wds.TarWriter(str(src / "00000.tar"), encoder=False) as w:
        for i in range(5):
            key = f"{i:09d}"
            sample = {"__key__": key, "json": json.dumps({"url": f"http://x/{i}.jpg", "key": key,
                                                          "status": "success"}).encode()}
            sample["jpg"] = b"garbage" if i == 3 else _image_bytes(color=COLORS[i])
            if i != 4:
                sample["txt"] = f"downloaded {i}".encode()
            w.write(sample)
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(7)],
                             "status": ["success"] * 5 + ["failed_to_download"] * 2}), src / "00000.parquet")
    _write(str(src / "00000_stats.json"), json.dumps({"count": 7, "successes": 5}))
    assert detect_format(str(src)) == "img2dataset"
    stats = CONVERT(str(src), str(tmp_path / "out"))
    samples = _read(tmp_path / "out")
    assert list(samples) == ["000000000", "000000001", "000000002"]
    assert _nonzero(stats["skipped"]) == {"download_failed": 2, "unreadable_image": 1, "missing_caption": 1}
    meta = json.loads(samples["000000001"]["json"])
    assert meta["url"] == "http://x/1.jpg" and meta["source"] == "00000.tar/000000001" and meta["width"] == 32


# ------------------------------------------------------------------------------------------ CLI
def test_cli_convert(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = vlp_main(["data", "convert", str(folder), str(out), "--json", "--prefix", "cli", "--min-size", "16"])
    stats = json.loads(capsys.readouterr().out)
    assert rc == 0 and stats["written"] == 8 and stats == _stats(out)
    assert stats["shards"][0]["name"] == "cli-000000.tar"
    rc = vlp_main(["data", "convert", str(folder), str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = vlp_main(["data", "convert", str(tmp_path / "nowhere.csv"), str(tmp_path / "o2")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_cli_convert_ends_with_a_summary_and_a_bar_with_a_total(folder, tmp_path, capsys):
    """Without --json: a progress bar that knows the folder's image count (so it shows an ETA) and a summary
    block naming what was written, what was skipped and where the files are."""
    out = tmp_path / "out"
    assert vlp_main(["data", "convert", str(folder), str(out), "--min-size", "16"]) == 0
    cap = capsys.readouterr()
    n_images = sum(1 for p in folder.rglob("*") if p.suffix in (".jpg", ".png", ".bmp"))
    assert f"/{n_images} [" in cap.err  # tqdm's "n/total [elapsed<remaining"
    assert "── vlp data convert: done" in cap.out and "8 samples in 1 shard(s)" in cap.out
    assert f"shards   {out}" in cap.out and "stats.json" in cap.out
