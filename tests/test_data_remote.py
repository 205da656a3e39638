"""Remote (http) shards and downloads against a real loopback HTTP server: sample counting happens once per
shard on rank 0 of a 2-rank gloo group, a server that stalls fails the read after the timeout naming the
URL, and the converter retries 429/5xx with backoff and caps download sizes.

As a script this file is one rank of the 2-rank group: it builds the real training loader over http
shards and prints the sample counts it got.
"""
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARDS = "synth-train-{000000..000003}.tar"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the server's root, with behaviours by path prefix (see `server`)."""

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=(), length=True):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.requests.append((path, time.monotonic()))
            nth = sum(p == path for p, _ in srv.requests)
        kind, _, rest = path.lstrip("/").partition("/")
        if path.endswith("stats.json"):  # served whole from the root for /shards/ and /stall-body/
            stats = os.path.join(srv.root, "stats.json")
            if kind not in ("shards", "stall-body") or not os.path.isfile(stats):
                return self._send(404)
            return self._send(200, open(stats, "rb").read())
        if kind == "stall":  # accept, read the request, answer nothing
            srv.release.wait(30)
            return
        if kind == "stall-body":  # headers and the first half of the file, then nothing
            data = open(os.path.join(srv.root, rest), "rb").read()
            self._send(200, data[:len(data) // 2], [("Content-Length", str(len(data)))], length=False)
            self.wfile.flush()
            srv.release.wait(30)
            return
        if kind == "flaky" and nth <= 2:
            return self._send(503, b"busy")
        if kind == "limited" and nth <= 1:
            return self._send(429, b"slow down", [("Retry-After", "0")])
        if kind == "down":
            return self._send(500, b"broken")
        if kind == "nolength":  # HTTP/1.0 style: the body ends when the connection closes
            data = open(os.path.join(srv.root, rest), "rb").read()
            self._send(200, data, length=False)
            self.close_connection = True
            return
        if kind in ("flaky", "limited"):
            self.path = "/" + rest
        elif kind == "shards":
            self.path = "/" + rest
        return super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(root dir, base URL, server): GET /shards/NAME and /NAME serve root/NAME; /stall/... never answers;
    /stall-body/NAME sends half of NAME then stalls; /flaky/NAME answers 503 twice, then NAME;
    /limited/NAME answers 429 (Retry-After: 0) once, then NAME; /down/... always 500; /nolength/NAME
    serves NAME without Content-Length; /shards/stats.json and /stall-body/stats.json serve root/stats.json
    whole, if there is one; other */stats.json are 404. `server.requests` logs
    (path, time) of every GET."""
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    srv.root, srv.requests, srv.lock, srv.release = str(root), [], threading.Lock(), threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}", srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _within(seconds, fn):
    """fn()'s result or exception, failing the test if it takes longer than `seconds` (a hang)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds} s"
    return out, time.monotonic() - start


# ------------------------------------------------------------------------------ counting on one rank
def rank_main(spec: str) -> None:
    import torch.distributed as dist

    from vlp.config import load_config
    from vlp.data import build_train_loader

    dist.init_process_group("gloo")
    cfg = load_config(None, ["data.image_size=32", "data.workers=0", "train.micro_batch_size=4"])
    cfg.data.train_shards = spec
    loader = build_train_loader(cfg, None, None, dist.get_rank(), dist.get_world_size())
    print("COUNTS", json.dumps([s.samples for s in loader.spec.sources[0].shards]), loader.batches_per_epoch)
    cfg.data.train_shards = spec.replace("synth-train", "missing")  # rank 0 fails: every rank raises its error
    try:
        build_train_loader(cfg, None, None, dist.get_rank(), dist.get_world_size())
    except Exception as e:
        print("ERROR", type(e).__name__, e)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_count_each_remote_shard_once(server, synth_train):
    """No stats.json next to the shards: rank 0 downloads each shard once to count it and both ranks get
    the same counts (each rank counting for itself downloaded every shard twice). A shard rank 0 cannot
    count fails every rank with rank 0's error, naming the URL (no rank left waiting)."""
    root, base, srv = server
    for p in synth_train.glob("*.tar"):
        shutil.copy(p, root / p.name)
    spec = f"{base}/shards/{SHARDS}"
    from vlp.dist import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, __file__, spec], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    counts = [next(line for line in log.splitlines() if line.startswith("COUNTS")) for log in logs]
    assert counts[0] == counts[1] == "COUNTS [16, 16, 16, 16] 8"
    errors = [next(line for line in log.splitlines() if line.startswith("ERROR")) for log in logs]
    assert errors[0] == errors[1] == (f"ERROR RuntimeError counting the samples of shard {base}/shards/missing-000000"
                                      ".tar: HTTPError: HTTP Error 404: File not found"), errors
    got = sorted(p for p, _ in srv.requests)
    assert got == ["/shards/missing-000000.tar", "/shards/stats.json"] + [
        f"/shards/synth-train-00000{i}.tar" for i in range(4)], got


def test_remote_shard_reads_like_the_local_file(server, synth_train):
    from vlp.data.shards import read_shard

    root, base, _ = server
    name = sorted(p.name for p in synth_train.glob("*.tar"))[1]
    shutil.copy(synth_train / name, root / name)
    errors = []
    local = [(i, s["__key__"]) for i, s in read_shard(str(synth_train / name), lambda *a: errors.append(a), 3, 9)]
    remote = [(i, s["__key__"]) for i, s in read_shard(f"{base}/{name}", lambda *a: errors.append(a), 3, 9)]
    assert remote == local and len(local) == 6 and not errors


# ------------------------------------------------------------------------------------------ stalls
def test_stalled_count_and_loader_fail_naming_the_url(server):
    from vlp.config import load_config
    from vlp.data import build_train_loader
    from vlp.data.remote import RemoteTimeout
    from vlp.data.shards import count_samples

    _, base, _ = server
    url = f"{base}/stall/shard-000000.tar"
    out, took = _within(20, lambda: count_samples(url, timeout=0.5))
    assert isinstance(out.get("error"), RemoteTimeout), out
    assert f"{url}: no data for 0.5 s" in str(out["error"]) and "data.remote_timeout" in str(out["error"])
    assert took < 5  # the retries are for 429/5xx answers, not for a silent server

    cfg = load_config(None, ["data.image_size=32", "data.workers=0", "data.remote_timeout=0.5"])
    cfg.data.train_shards = f"{base}/stall/shard-{{000000..000001}}.tar"
    out, _ = _within(20, lambda: build_train_loader(cfg, None, None))
    assert isinstance(out.get("error"), RemoteTimeout) and url in str(out["error"]), out


def test_stall_mid_shard_ends_the_read_with_the_url(server, synth_train):
    from vlp.data.shards import read_shard

    root, base, _ = server
    name = sorted(p.name for p in synth_train.glob("*.tar"))[0]
    shutil.copy(synth_train / name, root / name)
    url = f"{base}/stall-body/{name}"
    errors = []
    out, took = _within(20, lambda: [i for i, _ in read_shard(url, lambda *a: errors.append(a), timeout=0.5)])
    assert "error" not in out and out["value"] == list(range(len(out["value"])))  # the samples before the stall
    assert 4 <= len(out["value"]) < 16 and took < 5
    (reason, where, exn), = errors
    assert reason == "read_error" and where == url and f"{url}: no data for 0.5 s" in str(exn)


def test_training_loader_skips_a_stalled_shard_and_logs_its_url(server, synth_train, caplog):
    """The loader's reads honour data.remote_timeout: a shard whose server stalls mid-way ends after it,
    is counted as a read_error skip and logged with its URL; the loader reads on."""
    from vlp.config import load_config
    from vlp.data import build_train_loader

    root, base, _ = server
    name = sorted(p.name for p in synth_train.glob("*.tar"))[0]
    shutil.copy(synth_train / name, root / name)
    (root / "stats.json").write_text(json.dumps({"shards": [{"name": name, "samples": 16}]}))
    cfg = load_config(None, ["data.image_size=32", "data.workers=0", "train.micro_batch_size=4",
                             "data.shuffle_buffer=0", "data.remote_timeout=0.5", "data.max_corrupt_fraction=1.0"])
    url = f"{base}/stall-body/{name}"
    cfg.data.train_shards = url
    from vlp.data import build_tokenizer

    loader = build_train_loader(cfg, None, build_tokenizer(cfg.data.tokenizer))
    it = iter(loader)
    out, took = _within(30, lambda: [next(it) for _ in range(3)])  # 12 samples: past the stall at ~8
    assert "error" not in out and [len(b["key"]) for b in out["value"]] == [4, 4, 4] and took < 10, out
    assert loader.stats()["skipped"]["read_error"] >= 1
    assert any(f"{url}: no data for 0.5 s" in r.getMessage() for r in caplog.records), caplog.text


def test_remote_timeout_is_validated():
    from vlp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'data.remote_timeout': must be > 0, got 0"):
        load_config(None, ["data.remote_timeout=0"])


# -------------------------------------------------------------------------------- converter downloads
def _jpeg(side):
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_converter_retries_429_and_5xx_with_backoff_and_caps_sizes(server, tmp_path):
    import pandas as pd

    from data_pipelines.convert import convert

    root, base, srv = server
    small, big = _jpeg(32), _jpeg(256)
    assert len(small) < 20_000 < len(big)
    for name, data in (("a.jpg", small), ("b.jpg", small), ("big.jpg", big)):
        (root / name).write_bytes(data)
    urls = {"flaky": f"{base}/flaky/a.jpg", "limited": f"{base}/limited/b.jpg", "down": f"{base}/down/c.jpg",
            "big": f"{base}/big.jpg", "big_nolength": f"{base}/nolength/big.jpg", "ok": f"{base}/a.jpg"}
    src = tmp_path / "urls.csv"
    pd.DataFrame({"url": list(urls.values()), "caption": list(urls)}).to_csv(src, index=False)
    stats = convert(str(src), str(tmp_path / "out"), key_col="caption", timeout=5, retries=3, retry_backoff=0.1,
                    max_image_bytes="20kB", progress=False)
    assert stats["written"] == 3  # flaky (503, 503, 200), limited (429, 200), ok
    assert {k: v for k, v in stats["skipped"].items() if v} == {"download_failed": 1, "download_too_large": 2}
    down = stats["skipped_examples"]["download_failed"][0]
    assert down["key"] == "down" and "HTTP Error 500" in down["detail"] and "after 3 retries" in down["detail"]
    too_large = {e["key"]: e["detail"] for e in stats["skipped_examples"]["download_too_large"]}
    assert too_large == {"big": f"{urls['big']}: {len(big)} bytes, over --max-image-bytes of 20000 bytes",
                         "big_nolength": f"{urls['big_nolength']}: more than 20000 bytes, over --max-image-bytes"}
    times = {}
    for path, t in srv.requests:
        times.setdefault(path, []).append(t)
    assert len(times["/flaky/a.jpg"]) == 3 and len(times["/limited/b.jpg"]) == 2 and len(times["/down/c.jpg"]) == 4
    gaps = [b - a for a, b in zip(times["/down/c.jpg"], times["/down/c.jpg"][1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps  # 0.1 s x 1, 2, 4

    with pytest.raises(Exception, match="--retries must be >= 0"):
        convert(str(src), str(tmp_path / "bad"), retries=-1, progress=False)


if __name__ == "__main__":
    rank_main(sys.argv[1])
