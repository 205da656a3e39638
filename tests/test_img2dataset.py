"""img2dataset as the URL downloader of `vlp data convert`, and `vlp train` on its output as it is.

img2dataset cannot live in vlp's environment (it requires webdataset<0.3, vlp webdataset>=1): `make test`
installs it into .venv/img2dataset (`make img2dataset`) and vlp runs it as a separate program. The end-to-end
test serves JPEGs from a loopback HTTP server, lets img2dataset download them through `vlp data convert`,
then runs `vlp train` (1 process, a few steps) on that folder with no conversion step and checks its sample
counts against img2dataset's. It fails when no img2dataset executable is found. The other tests check
the delegation logic (arguments, choice of downloader, messages) and need no img2dataset.
"""
import functools
import glob
import io
import json
import os
import subprocess
import sys
import tarfile

import pandas as pd
import pytest
from PIL import Image

from data_pipelines import download
from data_pipelines.convert import convert
from data_pipelines.shardspec import InputError
from tests.dist.train_entry import launcher_env, write_tiny_config
from tests.loopback import QuietHandler, serve_folder
from vlp.cli import main as vlp_main
from vlp.data.shards import count_samples, resolve_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = functools.partial(convert, progress=False)


def _jpeg(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class _Handler(QuietHandler):
    """Serves the folder; files named `optout*` carry the `X-Robots-Tag: noai` opt-out header."""

    def end_headers(self):
        if os.path.basename(self.path).startswith("optout"):
            self.send_header("X-Robots-Tag", "noai")
        super().end_headers()


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root, _Handler) as url:
        yield root, url


def _no_img2dataset(monkeypatch, tmp_path):
    """This process as on a machine without img2dataset: none on PATH, no VLP_IMG2DATASET, no .venv copy."""
    monkeypatch.delenv(download.ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "no-venv"))
    assert download.find_img2dataset() is None


def _url_table(path, base, names, captions=None, **extra):
    df = pd.DataFrame({"url": [f"{base}/{n}" for n in names],
                       "caption": captions or [f"picture {n}" for n in names], **extra})
    if str(path).endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------ delegation logic (no img2dataset needed)
def test_img2dataset_arguments_come_from_the_table_and_the_convert_options(tmp_path):
    src = _url_table(tmp_path / "laion.parquet", "http://127.0.0.1:9", ["a.jpg", "b.jpg"],
                     similarity=[0.3, 0.4], punsafe=[0.0, 0.1])
    columns, icol, ccol, _ = download.sources.table_columns(str(src), "url", "caption")
    args = download.img2dataset_args(str(src), str(tmp_path / "out"), icol, ccol, columns, samples_per_shard=500,
                                     resize_max=384, min_size=64, workers=3, timeout=2.5, retries=4,
                                     extra=["--thread_count", "16"])
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["--url_list"] == str(src) and opts["--input_format"] == "parquet"
    assert opts["--url_col"] == "url" and opts["--caption_col"] == "caption"
    assert opts["--output_format"] == "webdataset" and opts["--output_folder"] == str(tmp_path / "out")
    assert opts["--number_sample_per_shard"] == "500" and opts["--processes_count"] == "3"
    assert opts["--timeout"] == "3" and opts["--retries"] == "4" and opts["--min_image_size"] == "64"
    assert (opts["--resize_mode"], opts["--image_size"], opts["--resize_only_if_bigger"]) == \
        ("keep_ratio_largest", "384", "True")
    assert opts["--incremental_mode"] == "incremental"  # resumable; --overwrite is done by vlp
    assert json.loads(opts["--save_additional_columns"]) == ["similarity", "punsafe"]
    assert "--disallowed_header_directives" not in opts  # img2dataset's opt-out default stays on
    assert args[-2:] == ["--thread_count", "16"]
    keep = download.img2dataset_args("t.csv", "o", "url", "caption")  # no resize: images kept as they are
    assert dict(zip(keep[::2], keep[1::2]))["--resize_mode"] == "no" and "--save_additional_columns" not in keep
    with pytest.raises(InputError, match="img2dataset reads"):
        download.img2dataset_args("t.json", "o", "url", "caption")


def test_choice_of_downloader(tmp_path, monkeypatch):
    urls = _url_table(tmp_path / "urls.csv", "http://127.0.0.1:9", [f"{i}.jpg" for i in range(5)])
    local = tmp_path / "local.csv"
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["a", "b"]}).to_csv(local, index=False)
    mixed = tmp_path / "mixed.csv"
    pd.DataFrame({"image": ["a.jpg", "http://127.0.0.1:9/b.jpg"], "caption": ["a", "b"]}).to_csv(mixed, index=False)
    fake = tmp_path / "bin" / "img2dataset"  # an executable file: choosing does not run it
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)

    assert download.choose_downloader(str(local), "image").kind is None  # no URLs: files are read as before
    c = download.choose_downloader(str(urls), "url", "auto", str(fake))
    assert (c.kind, c.executable, c.census.urls) == ("img2dataset", str(fake), 5)
    monkeypatch.setenv(download.ENV_VAR, str(fake))
    assert download.choose_downloader(str(urls), "url").executable == str(fake)
    assert download.choose_downloader(str(urls), "url", "builtin").kind == "builtin"
    with pytest.raises(InputError, match="mixes URLs and local paths"):
        download.choose_downloader(str(mixed), "image", "img2dataset")
    assert download.choose_downloader(str(mixed), "image").kind == "builtin"  # auto: small mixed table
    with pytest.raises(InputError, match="holds no http"):
        download.choose_downloader(str(local), "image", "img2dataset")
    monkeypatch.setenv(download.ENV_VAR, str(tmp_path / "nowhere" / "img2dataset"))
    with pytest.raises(InputError, match="VLP_IMG2DATASET=.*not an executable.*pipx install img2dataset"):
        download.choose_downloader(str(urls), "url")

    _no_img2dataset(monkeypatch, tmp_path)
    small = download.choose_downloader(str(urls), "url")  # auto without img2dataset: built-in, with a note
    assert small.kind == "builtin" and "pipx install img2dataset" in small.note and "5 URLs" in small.note
    assert "\n" not in small.note
    with pytest.raises(InputError, match="more than 4 URLs.*img2dataset was not found.*pipx install img2dataset"):
        download.choose_downloader(str(urls), "url", max_urls=4)  # the built-in downloader's cap
    with pytest.raises(InputError, match="more than 4 URLs.*--downloader builtin"):
        download.choose_downloader(str(urls), "url", "builtin", max_urls=4)
    with pytest.raises(InputError, match="img2dataset not found.*pipx install img2dataset"):
        download.choose_downloader(str(urls), "url", "img2dataset")


def test_cli_says_how_to_install_img2dataset_when_it_is_missing(tmp_path, monkeypatch, capsys):
    src = _url_table(tmp_path / "urls.csv", "http://127.0.0.1:9", ["a.jpg"])
    _no_img2dataset(monkeypatch, tmp_path)
    rc = vlp_main(["data", "convert", str(src), str(tmp_path / "out"), "--downloader", "img2dataset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("vlp data convert: error: --downloader img2dataset: img2dataset not found")
    assert "`pipx install img2dataset`" in err[0] and "webdataset<0.3" in err[0]
    assert not (tmp_path / "out").exists()


def test_unfinished_img2dataset_shards_are_reported(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for stem in ("00000", "00001"):
        with tarfile.open(out / f"{stem}.tar", "w"):
            pass
    (out / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2, "failed_to_download": 1,
                                                        "failed_to_resize": 0, "status_dict": {"success": 2}}))
    with pytest.raises(InputError, match="00001.tar have no _stats.json.*--resume"):
        download.summarize(str(out))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        download._prepare(str(out), overwrite=False, resume=False)
    (out / "stats.json").write_text("{}")  # img2dataset's resume would take it for shard stats
    with pytest.raises(FileExistsError, match="not img2dataset output"):
        download._prepare(str(out), overwrite=False, resume=True)


# ------------------------------------------------------------------------ the real img2dataset, end to end
def _train_counts(shards, run, steps, batch):
    """`vlp train` (1 process, the tiny CLIP of tests/dist/train_entry.py) on SHARDS: its metrics records."""
    cfg = write_tiny_config(str(run.parent / "tiny.yaml"))
    cmd = [os.path.join(os.path.dirname(sys.executable), "vlp"), "train", "--config", cfg, "--nproc", "1",
           f"data.train_shards={shards}", f"output_dir={run}", f"train.steps={steps}",
           f"train.micro_batch_size={batch}", "train.warmup_steps=1", f"train.save_every={steps}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_img2dataset_downloads_and_vlp_train_reads_its_output(tmp_path, http_root):
    exe = download.find_img2dataset()
    if exe is None:  # `make test` (and so .ci/run) installs it: a missing one is a failure, never a skip
        pytest.fail("img2dataset not found (not on PATH, no VLP_IMG2DATASET, no .venv/img2dataset): "
                    "`make img2dataset` installs it; it cannot share vlp's venv (webdataset<0.3)")
    root, base = http_root
    names = []
    for i in range(21):  # 64..104 px wide: larger than --resize-max 48
        name = f"img{i:02d}.jpg"
        (root / name).write_bytes(_jpeg((64 + 2 * i, 40 + i), (10 * i, 255 - 10 * i, 120)))
        names.append(name)
    (root / "optout.jpg").write_bytes(_jpeg((64, 64), (0, 0, 0)))  # X-Robots-Tag: noai
    (root / "tiny.jpg").write_bytes(_jpeg((8, 8), (9, 9, 9)))  # below --min-size 16
    names[5:5] = ["optout.jpg", "missing.jpg", "tiny.jpg"]  # missing: 404
    src = _url_table(tmp_path / "urls.csv", base, names, similarity=[0.25] * len(names))
    out = tmp_path / "out"

    stats = CONVERT(str(src), str(out), downloader="auto", samples_per_shard=8, resize_max=48, min_size=16,
                    timeout=5, retries=1, img2dataset_args=["--thread_count", "4"])
    assert stats["downloader"] == "img2dataset" and stats["command"][0] == exe
    assert stats["rows"] == 24 and stats["written"] == 21
    assert {k: v for k, v in stats["skipped"].items() if v} == {"download_failed": 2, "too_small": 1}
    assert any("X-Robots-Tag" in s for s in stats["img2dataset_status"]), stats["img2dataset_status"]
    assert any("404" in s for s in stats["img2dataset_status"]), stats["img2dataset_status"]
    assert [s["samples"] for s in stats["shards"]] == [5, 8, 8]  # 8 rows per shard, less its failures
    assert not (out / "stats.json").exists()  # img2dataset's resume would read it as shard stats
    captions, sides = [], []
    for tar in sorted(glob.glob(str(out / "*.tar"))):
        with tarfile.open(tar) as t:
            files = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".jpg")):
            sides.append(max(Image.open(io.BytesIO(files[name])).size))
            captions.append(files[name[:-4] + ".txt"].decode())
            assert json.loads(files[name[:-4] + ".json"])["similarity"] == 0.25  # other columns kept
    assert sorted(captions) == sorted(f"picture {n}" for n in names if n.startswith("img"))
    assert max(sides) == 48

    # resumable: a lost shard is downloaded again, the finished ones are kept
    os.remove(out / "00001.tar")
    os.remove(out / "00001_stats.json")
    kept = os.path.getmtime(out / "00000.tar")
    with pytest.raises(FileExistsError, match="--resume"):
        CONVERT(str(src), str(out), downloader="img2dataset")
    again = CONVERT(str(src), str(out), downloader="img2dataset", samples_per_shard=8, resize_max=48,
                    min_size=16, timeout=5, retries=1, img2dataset_args=["--thread_count", "4"], resume=True)
    assert again["written"] == 21 and [s["samples"] for s in again["shards"]] == [5, 8, 8]
    assert os.path.getmtime(out / "00000.tar") == kept

    # vlp reads the folder as img2dataset left it: counts from NNNNN_stats.json agree with the tars
    resolved = resolve_shards(str(out))
    assert [os.path.basename(s.url) for s in resolved] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [s.samples for s in resolved] == [5, 8, 8] == [count_samples(s.url) for s in resolved]

    # `vlp train` on it directly: 21 samples, batches of 4 -> 5 batches an epoch, 1 dropped; 6 steps
    # finish epoch 0 and start epoch 1
    recs = _train_counts(out, tmp_path / "run", steps=6, batch=4)
    last = recs[-1]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert last["data/batches_per_epoch"] * 4 + last["data/dropped_per_epoch"] == stats["written"]
    assert (last["data/batches_per_epoch"], last["data/dropped_per_epoch"]) == (5, 1)
    assert last["samples_seen"] == 24 and last["data/epoch"] == 1
    assert not any(v for k, v in last.items() if k.startswith("data/skipped/"))
