"""Publishing to the Hub: huggingface_hub talks to a local HTTP server on 127.0.0.1 that implements
the endpoints a repo creation + single commit need (create repo, branch, YAML check, preupload,
NDJSON commit), so the files that arrive can be compared with the export. Also: --dry-run sends
nothing, and with the server down the CLI fails clearly (exit 3) and leaves the export intact."""
import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

TOKEN = "hf_testtoken_1234567890"
TINY = """\
model:
  type: clip
  embed_dim: 16
  vision:
    kind: timm
    name: vit_tiny_patch16_224
    kwargs: {img_size: 32, patch_size: 16, embed_dim: 16, depth: 1, num_heads: 2, mlp_ratio: 2.0}
  text:
    kind: open_clip
    kwargs: {context_length: 16, vocab_size: 49408, width: 16, heads: 2, layers: 1, mlp_ratio: 2.0}
data:
  workers: 0
  shuffle_buffer: 0
  image_size: 32
  tokenizer: {kind: open_clip, name: ViT-B-32, context_length: 16}
train: {steps: 1, micro_batch_size: 8, warmup_steps: 0, tensorboard: false, peak_flops: 1.0e12, resume: none}
"""


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API subset used by HfApi.create_repo / create_branch / create_commit (regular uploads)."""

    requests: list = []
    commits: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        base = f"http://{self.headers['Host']}"
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            req = json.loads(body)
            return self._reply({"url": f"{base}/{req['organization']}/{req['name']}", "name": req["name"]})
        if path == "/api/validate-yaml":
            return self._reply({"errors": [], "warnings": []})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/branch/[^/]+", path):
            return self._reply({})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            self.commits.setdefault(m.group(1), []).append({"revision": m.group(2), "header": header, "files": files})
            return self._reply({"commitUrl": f"{base}/{m.group(1)}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._reply({"error": f"unexpected {path}"}, status=404)

    # ---- downloads (snapshot_download): repo info, file tree, and files of the last commit
    def _repo_files(self, repo):
        commits = self.commits.get(repo)
        return commits[-1]["files"] if commits else None

    def _serve(self, body_too):
        path = self.path.split("?")[0]
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            files = self._repo_files(m.group(1))
            if files is None:
                return self._reply({"error": "Repository not found"}, status=404)
            if m.group(2) == "revision":
                return self._reply({"id": m.group(1), "sha": "a" * 40, "private": False,
                                    "siblings": [{"rfilename": p} for p in files]})
            return self._reply([{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                                for p, c in sorted(files.items())])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        files = self._repo_files(m.group(1)) if m else None
        if not files or m.group(3) not in files:
            return self._reply({"error": "Entry not found"}, status=404)
        content = files[m.group(3)]
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
        self.send_header("X-Repo-Commit", "a" * 40)
        self.end_headers()
        if body_too:
            self.wfile.write(content)

    def do_GET(self):
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": b""})
        self._serve(True)

    def do_HEAD(self):
        self._serve(False)


@pytest.fixture
def hub():
    FakeHub.requests, FakeHub.commits = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def run(synth_train, tmp_path_factory):
    """A 1-step run of a tiny CLIP, trained by `vlp train` in its own process."""
    root = tmp_path_factory.mktemp("hubrun")
    (root / "tiny.yaml").write_text(TINY)
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "train", "--config", str(root / "tiny.yaml"),
                           f"output_dir={root / 'run'}", f"data.train_shards={synth_train}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(root / "run")


@pytest.fixture
def online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1; these tests talk to 127.0.0.1 only."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _local_files(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = open(full, "rb").read()
    return out


def test_push_creates_the_repo_and_uploads_every_file_in_one_commit(run, hub, online, tmp_path):
    from vlp.export import export

    url, server = hub
    res = export(run, "vlp", str(tmp_path / "exp"), push_to_hub="my-org/tiny-clip", private=True, revision="v1",
                 commit_message="first export", endpoint=url, log=lambda m: None)
    create = json.loads(server.requests[0]["body"])
    assert server.requests[0]["path"] == "/api/repos/create"
    assert (create["organization"], create["name"], create.get("visibility")) == ("my-org", "tiny-clip", "private")
    assert any(r["path"] == "/api/models/my-org/tiny-clip/branch/v1" for r in server.requests)
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in server.requests)
    (commit,) = server.commits["my-org/tiny-clip"]
    assert commit["revision"] == "v1" and commit["header"]["summary"] == "first export"
    local = _local_files(res.out)
    assert set(commit["files"]) == set(local) >= {"README.md", "model.safetensors", "vlp_config.yaml"}
    assert all(commit["files"][k] == v for k, v in local.items())
    assert res.commit_url.endswith("/my-org/tiny-clip/commit/" + "a" * 40)


def test_dry_run_lists_files_with_sizes_and_sends_nothing(run, hub, online, tmp_path):
    from vlp.export import export

    url, server = hub
    lines = []
    res = export(run, "open_clip", str(tmp_path / "exp"), push_to_hub="my-org/tiny-clip", dry_run=True,
                 endpoint=url, log=lines.append)
    listing = "\n".join(lines)
    assert "would upload 4 files" in listing and "my-org/tiny-clip@main (public)" in listing
    for name in ("README.md", "open_clip_config.json", "open_clip_model.safetensors",
                 "images/training_curves.png"):
        assert re.search(rf"\d+(\.\d)? (B|KB|MB)\s+{re.escape(name)}", listing), name
    assert server.requests == [] and res.commit_url is None
    assert os.path.isfile(os.path.join(res.out, "open_clip_model.safetensors"))


def test_unreachable_hub_fails_clearly_and_keeps_the_local_export(run, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "exp"
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN)
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "export", "--checkpoint", run, "--format", "vlp",
                           "--out", str(out), "--push-to-hub", "my-org/tiny-clip"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "upload to my-org/tiny-clip" in proc.stderr and "failed" in proc.stderr
    assert f"the export in {out} is complete" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    import vlp

    assert vlp.load_pretrained(str(out)).embed_dim == 16  # intact and loadable


LOAD_FROM_HUB = r"""
import sys
import vlp
from safetensors.torch import save_file
model = vlp.load_pretrained(sys.argv[1])
ids, mask = model.tokenizer(["a photo of a cat"])
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
print(model.training, tuple(ids.shape))
"""


def test_a_pushed_vlp_export_loads_by_hub_name(run, hub, online, tmp_path):
    """Upload, then `vlp.load_pretrained("ORG/NAME")` in a fresh process: snapshot_download from the server."""
    from safetensors.torch import load_file

    import vlp
    from vlp.export import export

    url, server = hub
    res = export(run, "vlp", str(tmp_path / "exp"), push_to_hub="my-org/tiny-clip", endpoint=url, log=lambda m: None)
    env = dict(os.environ, HF_ENDPOINT=url, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"))
    out = str(tmp_path / "loaded.safetensors")
    proc = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, "my-org/tiny-clip", out], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "(1,", "16)"]
    local = vlp.load_pretrained(res.out).state_dict()
    remote = load_file(out)
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)
    assert any("/resolve/" in r["path"] or "/api/models/my-org/tiny-clip/revision/" in r["path"]
               for r in server.requests)


def test_an_export_above_the_size_threshold_goes_up_resumably_in_large_folder_mode(hub, online, tmp_path, caplog):
    """Above `large_threshold` bytes push() switches from one create_commit to HfApi.upload_large_folder
    (upload_folder, its replacement, on huggingface_hub 2); the default threshold is a few GB. Every
    visible file arrives with its bytes; hidden files (upload_large_folder's resume state) never do."""
    import logging

    from vlp.export.hub import LARGE_FOLDER_BYTES, describe, push, upload_method

    url, server = hub
    folder = tmp_path / "exp"
    (folder / "images").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    (folder / "images" / "curves.png").write_bytes(os.urandom(500))
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "state.json").write_text("{}")
    size = sum(len(v) for k, v in _local_files(folder).items() if not k.startswith("."))
    assert 1024 ** 3 <= LARGE_FOLDER_BYTES <= 50 * 1024 ** 3
    assert upload_method(size) == "create_commit" and upload_method(LARGE_FOLDER_BYTES + 1) != "create_commit"
    large = upload_method(size, large_threshold=size - 1)
    assert large in ("upload_large_folder", "upload_folder")
    assert f"resumably in several commits (HfApi.{large})" in describe(str(folder), "my-org/big", None, False,
                                                                      large_threshold=size - 1)
    assert "in one commit" in describe(str(folder), "my-org/big", None, False)

    with caplog.at_level(logging.INFO, logger="vlp.export.hub"):
        push(str(folder), "my-org/big", endpoint=url, commit_message="big export", large_threshold=size - 1)
    assert f"with HfApi.{large}" in caplog.text
    arrived = {p: c for commit in server.commits["my-org/big"] for p, c in commit["files"].items()}
    local = {k: v for k, v in _local_files(folder).items() if not k.startswith(".")}
    assert arrived == local and {"README.md", "model.safetensors", "images/curves.png"} == set(arrived)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlp.export.hub"):
        push(str(folder), "my-org/small", endpoint=url, commit_message="small export", large_threshold=size)
    assert "with HfApi.create_commit" in caplog.text
    (commit,) = server.commits["my-org/small"]
    assert commit["files"] == local and commit["header"]["summary"] == "small export"
