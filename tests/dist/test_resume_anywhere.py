"""Resume on any layout (issue: resume anywhere): one run continued 2 ranks -> 1 rank -> 2 ranks, changing
the ZeRO stage at each resume, for CLIP (0->3->2, 3->2->0) and ALBEF (0->3->2); and the real data pipeline continued over other ranks,
DataLoader workers and global batch within one epoch.

With the same global batches (fixed, each rank its slice) the losses of the resumed chain must equal those
of an uninterrupted 2-rank run to 1e-4 relative: CLIP's and ALBEF's losses are functions of the global
batch (gathered negatives, queues, world-size-invariant ALBEF sampling), so any difference is state lost
or corrupted in the re-partitioning (AdamW moments, step count, queues, momentum towers, schedule), not
noise. ZeRO stages and rank counts themselves agree to ~1e-6 (tests/dist/test_train_dist.py).
"""
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from tests.dist.albef_tiny import write_tiny_albef, write_vocab
from tests.dist.train_entry import deepspeed_launch, launcher_env, write_fixed_batches, write_tiny_config

pytestmark = pytest.mark.slow
TOL = 1e-4
# each chain: the ZeRO stage of its 2-rank start, its 1-rank middle and its 2-rank end; every stage is a source
# and a target of a change. 2->0->3 passed too (add "Y": (2, 0, 3)); left out to keep the suite under 20 minutes
CHAINS = {"clip": {"X": (0, 3, 2), "Z": (3, 2, 0)}, "albef": {"X": (0, 3, 2)}}


def _records(run_dir):
    """step -> the last record logged for it (a resumed run logs the steps since its checkpoint again)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _one_rank(*args):
    proc = subprocess.run([sys.executable, "-m", "tests.dist.train_entry", *map(str, args)], cwd=ROOT,
                          env=launcher_env(), capture_output=True, text=True, timeout=400)
    return proc.returncode, proc.stdout + proc.stderr


def _keys_by_step(run_dir):
    """Every rank's logged sample keys, the last record of each (rank, step)."""
    out = Counter()
    keys_dir = os.path.join(run_dir, "keys")
    for name in sorted(os.listdir(keys_dir)):
        per_step = {}
        with open(os.path.join(keys_dir, name)) as f:
            for rec in map(json.loads, f):
                per_step[rec["step"]] = rec["keys"]
        for keys in per_step.values():
            out.update(keys)
    return out


def _shard_keys(shards):
    keys = set()
    for name in sorted(os.listdir(shards)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shards, name)) as tar:
                keys |= {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    return keys


@pytest.fixture(scope="module")
def configs(synth_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("anywhere")
    vocab = write_vocab(synth_train, str(root / "bert"))
    return {"clip": write_tiny_config(str(root / "clip.yaml")),
            "albef": write_tiny_albef(str(root / "albef.yaml"), vocab), "root": root}


@pytest.mark.parametrize("family", ["clip", "albef"])
def test_two_to_one_to_two_ranks_across_zero_stages_continue_the_loss_curve(family, configs, synth_train):
    from vlp.config import load_config

    yaml, root = configs[family], configs["root"] / family
    common = [f"data.train_shards={synth_train}", "train.warmup_steps=2", "train.lr=1e-3", "train.min_lr=1e-3",
              "train.save_every=0", "train.curves=false", f"output_dir={root}"]
    batches = str(root / "batches.pt")
    root.mkdir()
    write_fixed_batches(load_config(yaml, common), batches, n=12, global_batch=16)
    fixed = ["--config", yaml, "--fixed", batches]
    data = []  # CLIP also continues the real data pipeline: 2 ranks x 2 workers x 4 -> 1 x 1 x 16 -> 2 x 1 x 4
    if family == "clip":
        data = ["data:train.zero_stage=2,data.workers=2,train.micro_batch_size=4,train.steps=2,train.log_keys=true",
                "data:train.zero_stage=3,data.workers=1,train.micro_batch_size=16,train.steps=4,train.log_keys=true",
                "data:train.zero_stage=0,data.workers=1,train.micro_batch_size=4,train.steps=8,train.log_keys=true"]

    chains = CHAINS[family]

    def runs(part, steps):
        return " ".join(f"{name}:train.zero_stage={stages[part]},train.steps={steps}" for name, stages in chains.items())

    rc, log = deepspeed_launch(os.path.join(HERE, "train_entry.py"), *fixed, "--runs",
                               "ref:train.zero_stage=0,train.steps=12 " + runs(0, 4) + (" " + data[0] if data else ""),
                               *common, "train.micro_batch_size=8")
    assert rc == 0, log[-4000:]
    rc, log = _one_rank(*fixed, "--runs", runs(1, 8) + (" " + data[1] if data else ""), *common,
                        "train.micro_batch_size=16")
    assert rc == 0, log[-4000:]
    assert log.count("re-partitioned from whole per-parameter tensors") == len(chains) + bool(data)
    rc, log2 = deepspeed_launch(os.path.join(HERE, "train_entry.py"), *fixed, "--runs",
                                runs(2, 12) + (" " + data[2] if data else ""), *common, "train.micro_batch_size=8")
    assert rc == 0, log2[-4000:]

    ref = _records(root / "ref")
    assert sorted(ref) == list(range(1, 13)) and ref[12]["loss"] < ref[1]["loss"]
    names = ["loss"] + (["itc_loss", "itm_loss", "mlm_loss"] if family == "albef" else [])
    for chain in chains:
        got = _records(root / chain)
        assert sorted(got) == list(range(1, 13)), chain
        for step in range(1, 13):
            for k in names:
                rel = abs(got[step][k] - ref[step][k]) / abs(ref[step][k])
                assert rel <= TOL, (chain, step, k, got[step][k], ref[step][k])
        assert got[12]["samples_seen"] == 12 * 16
    if data:
        # the global batch went 8 -> 16 -> 8: a warning, and the schedule and the end follow samples seen
        assert "the global batch is 16" in log and "the run started with 8" in log
        assert "the global batch is 8" not in log2 or "the run started with 8" not in log2
        got = _records(root / "data")
        assert sorted(got) == list(range(1, 8)) and got[7]["samples_seen"] == 64
        assert "re-split over 1 rank(s) x 1 slot(s) x batch 16" in log
        seen = _keys_by_step(root / "data")
        epoch = _shard_keys(synth_train)
        assert len(epoch) == 64 and Counter({k: 1 for k in epoch}) == seen, "each sample of the epoch once"
