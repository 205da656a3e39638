"""hf:// shards against a loopback fake Hub: huggingface_hub's own `HfApi.list_repo_tree`, `hf_hub_url` and
`build_hf_headers` talk to a threaded http.server that answers the tree API and `resolve` downloads of a
private dataset repo holding 2 real tar shards (written by `data_pipelines.shards.ShardWriter`); `.tar`
downloads redirect to a second server on another port (a CDN). Nothing of huggingface_hub or webdataset
is replaced."""
import http.server
import json
import os
import re
import subprocess
import threading
import time
from urllib.parse import unquote

import pytest

from data_pipelines.shards import ShardWriter
from vlp.config import ConfigError

TOKEN = "hf_secrettoken_0123456789abcdef"
REPO = "acme/shards"
BASE = f"hf://datasets/{REPO}"


def _write_shards(out):
    """2 shards of 5 samples each; returns ShardWriter's list of {name, samples, bytes}."""
    with ShardWriter(str(out), "shard", samples_per_shard=5) as w:
        for i in range(10):
            w.write(f"s{i:03d}", {"jpg": bytes([i]) * (100 + 37 * i), "txt": f"caption {i}".encode()})
    return w.shards


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub endpoints huggingface_hub and vlp call: GET /api/datasets/ORG/NAME/tree/REV[/PATH] (one page),
    GET /datasets/ORG/NAME/resolve/REV/PATH and GET /api/datasets/ORG/NAME[/revision/main] (repo info, for
    `HfFileSystem`); `.tar` files answer 302 to the CDN server. The repo is
    private: a request without `Bearer TOKEN` gets 401 RepoNotFound, as from the Hub. PATHs under
    `stall/` are accepted and never answered."""

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code, kind):
        self._send(code, json.dumps({"error": kind}).encode(), [("X-Error-Code", kind),
                                                                ("Content-Type", "application/json")])

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        srv.requests.append((self.path, self.headers.get("Authorization")))
        if srv.cdn is None:  # this is the CDN: no credentials needed
            return self._send(200, srv.files[unquote(path).lstrip("/")])
        info = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/main)?", path)
        if info and info.group(1) == REPO and self.headers.get("Authorization") == f"Bearer {TOKEN}":
            body = {"id": REPO, "sha": "a" * 40, "private": True, "siblings": [{"rfilename": p} for p in srv.files]}
            return self._send(200, json.dumps(body).encode(), [("Content-Type", "application/json")])
        m = (re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
             or re.fullmatch(r"/datasets/([^/]+/[^/]+)/(resolve)/([^/]+)/(.*)", path))
        if not m:
            return self._error(404, "NotFound")
        tree = m.group(2) != "resolve"
        repo = m.group(1)
        rev, inner = (m.group(2), m.group(3)) if tree else (m.group(3), m.group(4))
        rev, inner = unquote(rev), unquote(inner or "")
        if repo != REPO or self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(404 if self.headers.get("Authorization") else 401, "RepoNotFound")
        if rev != "main":
            return self._error(404, "RevisionNotFound")
        if tree:
            prefix = f"{inner}/" if inner else ""
            entries = {}
            for p, data in srv.files.items():
                if p.startswith(prefix):
                    head, sep, _ = p[len(prefix):].partition("/")
                    entries[prefix + head] = ({"type": "directory", "path": prefix + head, "oid": "0" * 40} if sep
                                              else {"type": "file", "path": p, "size": len(data), "oid": "1" * 40})
            if not entries:
                return self._error(404, "EntryNotFound")
            return self._send(200, json.dumps(list(entries.values())).encode(), [("Content-Type", "application/json")])
        if inner.startswith("stall/"):
            srv.release.wait(30)
            return
        if inner not in srv.files:
            return self._error(404, "EntryNotFound")
        if inner.endswith(".tar"):
            return self._send(302, b"", [("Location", f"{srv.cdn}/{inner}")])
        return self._send(200, srv.files[inner])


def _serve(files, cdn):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    srv.files, srv.cdn, srv.requests, srv.release = files, cdn, [], threading.Event()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """(hub server, cdn server, local shard dir, ShardWriter's shard list). The repo: train/ (2 shards,
    stats.json, a readme and a sub-folder), nostats/ (the same 2 shards only), docs/ (no shard),
    stall/shard-000000.tar."""
    from huggingface_hub import constants

    from vlp.data import hub as vlp_hub
    from vlp.data import shards

    local = tmp_path / "local"
    local.mkdir()
    written = _write_shards(local)
    tars = {s["name"]: (local / s["name"]).read_bytes() for s in written}
    files = {f"train/{n}": b for n, b in tars.items()}
    files.update({f"nostats/{n}": b for n, b in tars.items()})
    files["train/stats.json"] = json.dumps({"shards": [{"name": s["name"], "samples": s["samples"]}
                                                       for s in written]}).encode()
    files["train/README.md"] = files["docs/README.md"] = b"not a shard"
    files["train/sub/other-000000.tar"] = tars["shard-000000.tar"]
    files["stall/shard-000000.tar"] = tars["shard-000000.tar"]
    cdn, cdn_url = _serve(files, None)
    srv, url = _serve(files, cdn_url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this talks to 127.0.0.1
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)  # as if huggingface_hub was imported with HF_ENDPOINT set
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    vlp_hub._list_tars.cache_clear()
    shards._read_remote_json.cache_clear()
    yield srv, cdn, local, written
    for s in (srv, cdn):
        s.release.set()
        s.shutdown()
        s.server_close()
    vlp_hub._list_tars.cache_clear()
    shards._read_remote_json.cache_clear()


def _samples(url, start=0, end=None):
    from vlp.data.shards import read_shard

    errors = []
    got = [(i, {k: v for k, v in s.items() if k != "__url__"})
           for i, s in read_shard(url, lambda *a: errors.append(a), start, end)]
    assert not errors, errors
    return got


def test_expand_brace_pattern_and_directory(hub):
    """A brace pattern expands to hf:// URLs (files not checked, as for http(s)); a directory (with or
    without a trailing slash, or the repo root's sub-directory) lists only the `*.tar` directly in it; the
    listing goes through huggingface_hub with the token from HF_TOKEN."""
    from vlp.data.shards import expand_shards

    srv = hub[0]
    want = [f"{BASE}/train/shard-000000.tar", f"{BASE}/train/shard-000001.tar"]
    assert expand_shards(f"{BASE}/train/shard-{{000000..000001}}.tar") == want
    assert not srv.requests  # a brace pattern of files needs no request
    assert expand_shards(f"{BASE}/train") == want
    assert expand_shards(f"{BASE}/train/") == want
    one = f"{BASE}/nostats/shard-000001.tar"
    assert expand_shards(f"{BASE}/train::{one}") == want + [one]
    assert expand_shards(f"{BASE}@main/nostats") == [f"{BASE}@main/nostats/shard-00000{i}.tar" for i in (0, 1)]
    tree = [(p, auth) for p, auth in srv.requests if p.startswith(f"/api/datasets/{REPO}/tree/")]
    assert tree and all(auth == f"Bearer {TOKEN}" for _, auth in tree), tree


def test_samples_and_counts_equal_the_local_shards(hub):
    """Whole shards and slices read from the Hub equal the local files' samples; counts come from the
    stats.json next to the shards, else from reading them, and agree with ShardWriter's. The Hub gets the
    token in the Authorization header; the CDN its downloads redirect to gets no Authorization."""
    from vlp.data.shards import resolve_shards

    srv, cdn, local, written = hub
    for i, s in enumerate(written):
        url = f"{BASE}/train/{s['name']}"
        assert _samples(url) == _samples(str(local / s["name"])) and len(_samples(url)) == 5
        assert _samples(url, 2, 4) == _samples(str(local / s["name"]), 2, 4) == _samples(url)[2:4]
    counts = [s["samples"] for s in written]
    assert [(s.url, s.samples) for s in resolve_shards(f"{BASE}/train")] == [
        (f"{BASE}/train/{s['name']}", s["samples"]) for s in written]
    before = len(cdn.requests)
    assert [s.samples for s in resolve_shards(f"{BASE}/nostats")] == counts
    assert len(cdn.requests) == before + 2  # no stats.json there: each shard downloaded once to count
    hub_auth = {auth for p, auth in srv.requests if REPO in p}  # (huggingface_hub may call other endpoints)
    assert hub_auth == {f"Bearer {TOKEN}"}, hub_auth
    assert cdn.requests and {auth for _, auth in cdn.requests} == {None}


def test_reading_starts_no_process_and_puts_the_token_nowhere_visible(hub, monkeypatch, caplog):
    """Expanding, counting and reading hf:// shards start no subprocess (webdataset's own hf:// opener, run
    here once to show the hook catches it, starts curl with the token in its arguments), produce no `pipe:`
    URL, and the token appears in no URL, request line or log record, only in the Authorization header."""
    import webdataset as wds

    from vlp.data.shards import expand_shards, resolve_shards

    started = []
    real_init = subprocess.Popen.__init__

    def spy(self, args, *a, **kw):
        started.append(args)
        raise AssertionError(f"subprocess started: {args}")

    monkeypatch.setattr(subprocess.Popen, "__init__", spy)
    with pytest.raises(AssertionError):  # the hook sees webdataset's own hf:// opener put the token on curl's
        wds.gopen(f"{BASE}/train/shard-000000.tar")  # command line: what vlp must not call
    assert len(started) == 1 and started[0][0] == "curl" and any(TOKEN in a for a in started[0]), started
    started.clear()
    caplog.set_level("DEBUG")
    urls = expand_shards(f"{BASE}/nostats") + expand_shards(f"{BASE}/train/shard-{{000000..000001}}.tar")
    shards = resolve_shards(f"{BASE}/nostats")
    n = sum(len(_samples(u)) for u in urls)
    monkeypatch.setattr(subprocess.Popen, "__init__", real_init)
    assert not started and n == 20 and [s.samples for s in shards] == [5, 5]
    assert all(u.startswith("hf://") and TOKEN not in u for u in urls + [s.url for s in shards])
    srv, cdn = hub[:2]
    assert not any(TOKEN in p for p, _ in srv.requests + cdn.requests)
    assert TOKEN not in caplog.text


def test_unknown_repo_revision_path_and_file_errors_name_the_url(hub, monkeypatch):
    """Each failure names the hf:// URL and says what is missing, without the token; a spec carrying
    credentials is refused without echoing them; offline mode is named as the reason."""
    from huggingface_hub import constants

    from vlp.data.shards import count_samples, expand_shards, read_shard

    cases = [("hf://datasets/acme/nope/train", "dataset repo acme/nope not found on"),
             (f"{BASE}/missing", "no directory 'missing' in dataset repo acme/shards"),
             (f"{BASE}@v9/train", "no revision 'v9' in dataset repo acme/shards"),
             (f"{BASE}/train/README", "no directory 'train/README'")]
    for spec, why in cases:
        with pytest.raises(ConfigError) as e:
            expand_shards(spec, what="data.eval_shards")
        assert str(e.value).startswith(f"'data.eval_shards': {spec.rstrip('/')}: ") and why in str(e.value), e.value
        assert TOKEN not in str(e.value)
    with pytest.raises(ConfigError, match=f"directory {BASE}/docs holds no \\*.tar shards"):
        expand_shards(f"{BASE}/docs")

    missing = f"{BASE}/train/shard-000009.tar"
    errors = []
    assert list(read_shard(missing, lambda *a: errors.append(a))) == []
    assert [(r, u) for r, u, _ in errors] == [("read_error", missing)]
    assert str(errors[0][2]) == (f"{missing}: no file 'train/shard-000009.tar' in dataset repo acme/shards "
                                 f"(revision main) on {os.environ['HF_ENDPOINT']} (HTTP 404 EntryNotFound)")
    with pytest.raises(RuntimeError) as e:
        count_samples("hf://datasets/acme/nope/shard-000000.tar")
    assert "counting the samples of shard hf://datasets/acme/nope/shard-000000.tar" in str(e.value)
    assert "dataset repo acme/nope not found on" in str(e.value) and "with the token from HF_TOKEN" in str(e.value)

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hub[2] / "no-token"))  # no login token either
    errors.clear()
    list(read_shard(f"{BASE}/train/shard-000000.tar", lambda *a: errors.append(a)))
    assert "not readable without a token (set HF_TOKEN" in str(errors[0][2]), errors

    with pytest.raises(ConfigError) as e:
        expand_shards(f"hf://user:{TOKEN}@datasets/{REPO}/train")
    assert "carries no credentials" in str(e.value) and TOKEN not in str(e.value)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        expand_shards(f"{BASE}/nostats")


def test_a_stalled_download_fails_naming_the_hf_url(hub):
    """A Hub that accepts the request and sends nothing fails the read after the timeout, naming the hf://
    URL and the setting (the retries are for 429/5xx, not for silence)."""
    from vlp.data.remote import RemoteTimeout
    from vlp.data.shards import read_shard

    url = f"{BASE}/stall/shard-000000.tar"
    errors = []
    start = time.monotonic()
    assert list(read_shard(url, lambda *a: errors.append(a), timeout=0.5)) == []
    assert time.monotonic() - start < 5
    assert len(errors) == 1 and isinstance(errors[0][2], RemoteTimeout), errors
    assert str(errors[0][2]).startswith(f"{url}: no data for 0.5 s") and "data.remote_timeout" in str(errors[0][2])


def test_training_loader_and_eval_reader_over_hf_shards(hub, synth_test):
    """The training loader (counts on rank 0 from the stats.json `vlp data` wrote, DataLoader reads) and the
    eval reader give the same batches and records from an hf:// directory as from the local one."""
    import torch

    from vlp.config import load_config
    from vlp.data import build_tokenizer, build_train_loader
    from vlp.eval.data import iter_records

    srv = hub[0]
    for p in sorted(synth_test.iterdir()):
        srv.files[f"synth/{p.name}"] = p.read_bytes()
    assert "synth/stats.json" in srv.files
    cfg = load_config(None, ["data.image_size=32", "data.workers=0", "train.micro_batch_size=8",
                             "data.shuffle_buffer=8", "data.tokenizer.context_length=16"])
    tok = build_tokenizer(cfg.data.tokenizer)
    batches = {}
    for name, spec in (("local", str(synth_test)), ("hf", f"{BASE}/synth")):
        cfg.data.train_shards = spec
        loader = build_train_loader(cfg, None, tok)
        it = iter(loader)
        batches[name] = (loader.batches_per_epoch, [next(it) for _ in range(loader.batches_per_epoch)])
    (n_local, local), (n_hf, remote) = batches["local"], batches["hf"]
    assert n_local == n_hf == 4
    for a, b in zip(local, remote):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_ids"], b["text_ids"])
    records = {name: [(r["__key__"], r.get("txt")) for r in iter_records(spec)]
               for name, spec in (("local", str(synth_test)), ("hf", f"{BASE}/synth"))}
    assert records["hf"] == records["local"] and len(records["local"]) == 32
