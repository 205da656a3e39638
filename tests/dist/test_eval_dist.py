"""Eval on 2 gloo ranks gives the same numbers as 1 process: through the DeepSpeed launcher
(`vlp eval retrieval --nproc 2`), and for ITM re-ranking and zero-shot classification."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_eval_models import (SHAPES, ReversingFusion, save_open_clip_export, second_caption,
                                    synth_records, write_shards)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(synth_test, tmp_path_factory):
    """An open_clip export and an uneven set: 2-caption samples plus undecodable/caption-less ones."""
    root = tmp_path_factory.mktemp("evaldist")
    export = save_open_clip_export(str(root / "export"))
    samples = []
    for i, rec in enumerate(synth_records(synth_test)[:19]):
        meta = json.loads(rec["json"])
        samples.append({"__key__": rec["__key__"], "jpg": rec["jpg"], "json": rec["json"],
                        "txt": rec["txt"].decode() + "\n" + second_caption(meta)})
        if i in (4, 11):
            samples.append({"__key__": f"bad{i}", "jpg": b"not an image", "txt": "a caption"})
        if i == 7:
            samples.append({"__key__": "nocap", "jpg": rec["jpg"]})
    return export, write_shards(str(root / "data"), samples, 3)


def _evaluate(export, data, rank, world):
    from vlp.eval.evaluate import evaluate_retrieval
    from vlp.load import load_model
    from vlp.eval.zeroshot import evaluate_zeroshot

    loaded = load_model(export)
    kw = dict(batch_size=3, workers=0, rank=rank, world_size=world, progress=False)
    r = evaluate_retrieval(ReversingFusion(loaded.model), loaded.tokenizer, loaded.preprocess, data, rerank_k=5, **kw)
    z = evaluate_zeroshot(loaded.model, loaded.tokenizer, loaded.preprocess, data, SHAPES, ["a {}.", "a photo of a {}."],
                          label_key="objects.0.shape", **kw)
    return {"r": r, "z": z}


def _worker(rank, world, port, export, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from vlp.dist import join_launcher_group

    r, w, _ = join_launcher_group()
    res = _evaluate(export, data, r, w)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res, f)
    torch.distributed.destroy_process_group()


def test_rerank_and_zeroshot_two_ranks_equal_one(setup, tmp_path):
    export, data = setup
    out = str(tmp_path / "res")
    ctx = mp.start_processes(_worker, args=(2, _free_port(), export, data, out), nprocs=2, join=False,
                             start_method="spawn")
    one = json.loads(json.dumps(_evaluate(export, data, 0, 1)))  # meanwhile, the single-process reference
    while not ctx.join(timeout=120):
        pass
    two = [json.load(open(f"{out}.{r}")) for r in range(2)]
    assert two[0] == two[1]  # every rank returns the same dict
    r1, r2 = one["r"], two[0]["r"]
    assert r1["n_images"] == r2["n_images"] == 19 and r1["n_texts"] == r2["n_texts"] == 38
    assert r1["skipped"] == r2["skipped"] == {"unreadable_image": 2, "missing_caption": 1}
    assert r2["metrics"] == r1["metrics"] and r2["reranked"] == r1["reranked"]
    assert r2["reranked"] != r2["metrics"]
    assert r2["examples"] == r1["examples"]
    assert two[0]["z"]["metrics"] == one["z"]["metrics"] and two[0]["z"]["n_samples"] == 19


def test_cli_under_deepspeed_launcher_equals_one_process(setup, tmp_path):
    from vlp.cli import main

    export, data = setup
    two = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlp.cli", "eval", "retrieval", "--checkpoint", export, "--data",
                             data, "--out", str(two), "--batch-size", "4", "--workers", "2", "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    one = tmp_path / "one.json"
    assert main(["eval", "retrieval", "--checkpoint", export, "--data", data, "--out", str(one), "--workers", "0"]) == 0
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert b["metrics"] == a["metrics"] and b["skipped"] == a["skipped"] == {"unreadable_image": 2, "missing_caption": 1}
    assert b["n_images"] == a["n_images"] == 19 and b["n_texts"] == 38
