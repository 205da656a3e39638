"""Two CPU ranks under DeepSpeed's launcher (the training test entry, real `vlp.train`): an ALBEF with
BUS selection, PAD and PTM under ZeRO-2 and ZeRO-3 on the same global batches. ZeRO-3 agrees with
ZeRO-2 step by step, PTM is logged, and the selector's text projection, the PAD queries and their
momentum copies all train and land in the checkpoint; the checkpoint evaluates (ITC and ITM re-ranked
retrieval) and exports in the vlp format."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIST = os.path.join(HERE, "dist")
from tests.dist.albef_tiny import write_tiny_albef, write_vocab
from tests.dist.train_entry import deepspeed_launch, launcher_env, write_fixed_batches

pytestmark = pytest.mark.slow
STEPS = 3


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _train_both_stages(yaml, common, out, batches):
    rc, log = deepspeed_launch(os.path.join(DIST, "train_entry.py"), "--config", yaml, "--fixed", batches,
                               "--runs", "z2:train.zero_stage=2 z3:train.zero_stage=3", *common, f"output_dir={out}")
    assert rc == 0, log[-4000:]
    z2, z3 = _records(f"{out}/z2"), _records(f"{out}/z3")
    assert sorted(z2) == sorted(z3) == list(range(1, STEPS + 1))
    for step in z2:
        for key in ("loss", "ptm_loss"):
            assert torch.isfinite(torch.tensor(z2[step][key])), (step, key)
            assert z3[step][key] == pytest.approx(z2[step][key], rel=1e-4), (step, key)
    return z2


def _trained(run_dir, init, keys):
    from vlp.checkpoint import consolidated_state_dict

    sd = consolidated_state_dict(f"{run_dir}/checkpoints/step_{STEPS:07d}")
    for key in keys:
        assert key in sd, key
        assert not torch.equal(sd[key], init[key]), key  # it trained
    return sd


def _init_state(yaml, common):
    from vlp.config import load_config
    from vlp.models import build_model
    from vlp.train.loop import _seed_all

    _seed_all(0)  # the trainer's initial weights
    return build_model(load_config(str(yaml), common).model).state_dict()


def test_albef_with_bus_and_pad_trains_on_two_ranks_zero2_and_zero3(synth_train, synth_test, tmp_path):
    from vlp.config import load_config

    vocab = write_vocab(synth_train, str(tmp_path / "bert"))
    yaml = write_tiny_albef(str(tmp_path / "tiny.yaml"), vocab)
    common = [f"data.train_shards={synth_train}", f"train.steps={STEPS}", "train.micro_batch_size=4",
              "train.save_every=0", "model.albef.queue_size=24", "model.bus.enabled=true", "model.bus.blocks=[0]",
              "model.bus.pad_queries=4", "model.bus.pad_layers=1"]
    batches = str(tmp_path / "batches.pt")
    write_fixed_batches(load_config(yaml, common), batches, n=STEPS, global_batch=8)
    z2 = _train_both_stages(yaml, common, tmp_path / "two", batches)
    for step in z2:
        for key in ("itc_loss", "itm_loss", "mlm_loss"):
            assert torch.isfinite(torch.tensor(z2[step][key])), (step, key)
    init = _init_state(yaml, common)
    keys = ["selector.text_q.weight", "selector.patch_k.weight", "pad.queries", "ptm_proj.weight",
            "momentum_models.pad.queries", "momentum_models.selector.text_q.weight"]
    for run in ("z2", "z3"):
        sd = _trained(tmp_path / "two" / run, init, keys)
        assert not torch.equal(sd["momentum_models.pad.queries"], sd["pad.queries"])  # the EMA lags

    env = launcher_env()
    out = tmp_path / "retrieval.json"
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "eval", "retrieval", "--checkpoint", str(tmp_path / "two" / "z3"),
                           "--data", str(synth_test), "--out", str(out), "--rerank-k", "4", "--workers", "0",
                           "--batch-size", "8", "--max-samples", "16"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["n_images"] == 16 and res["rerank_k"] == 4
    for part in ("metrics", "reranked"):
        assert 0.0 <= res[part]["mean_recall"] <= 1.0
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "export", "--checkpoint", str(tmp_path / "two" / "z3"),
                           "--format", "vlp", "--out", str(tmp_path / "export")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reloaded and matched the trained model" in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "export", "--checkpoint", str(tmp_path / "two" / "z3"),
                           "--format", "open_clip", "--out", str(tmp_path / "oc")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--format vlp" in proc.stderr and not (tmp_path / "oc").exists()
