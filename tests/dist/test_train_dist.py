"""Two CPU ranks (gloo) under DeepSpeed's launcher: ZeRO 0-3 reproduce one rank's losses, and a
run stopped by SIGTERM, then killed (a rank dies), resumes to exactly the uninterrupted losses."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from tests.dist.train_entry import deepspeed_launch, launcher_env, write_fixed_batches, write_tiny_config

pytestmark = pytest.mark.slow


def _launch(script, *args, timeout=300):
    """`deepspeed --num_gpus 2 SCRIPT ARGS` -> (returncode, combined output)."""
    return deepspeed_launch(script, *args, timeout=timeout)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    return write_tiny_config(str(tmp_path_factory.mktemp("cfg") / "tiny.yaml"))


def test_zero_stages_on_two_ranks_match_one_rank(tiny_yaml, synth_train, tmp_path):
    """Same global batches (32 pairs), same init: 2 ranks x 16 under ZeRO 0/1/2/3, and 2 ranks x
    2 GradCache chunks x 8 under ZeRO-3, all reproduce 1 rank x 32."""
    from vlp.config import load_config

    common = [f"data.train_shards={synth_train}", "train.steps=20", "train.warmup_steps=2", "train.grad_clip=1.0"]
    batches = str(tmp_path / "batches.pt")
    one = load_config(tiny_yaml, common + [f"output_dir={tmp_path}/one"])
    write_fixed_batches(one, batches, n=20, global_batch=32)

    runs = " ".join(f"zero{s}:train.zero_stage={s}" for s in (0, 1, 2, 3))
    runs += " cache3:train.zero_stage=3,train.micro_batch_size=8,train.grad_accum=2,train.grad_cache=true"
    rc, log = _launch(os.path.join(HERE, "train_entry.py"), "--config", tiny_yaml, "--fixed", batches,
                      "--runs", runs, *common, f"output_dir={tmp_path}/two", "train.micro_batch_size=16")
    assert rc == 0, log[-4000:]
    # the two ranks share this host's cores, so they share one peak measurement taken with both ranks' threads
    peaks = [line for line in log.splitlines() if "vlp train: MFU against" in line]
    assert len(peaks) == 5 and all(line.count("GFLOP/s with") == 1 and "one measurement per host" in line
                                   for line in peaks), peaks

    env = launcher_env()
    ref = subprocess.run([sys.executable, "-m", "tests.dist.train_entry", "--config", tiny_yaml, "--fixed", batches,
                          *common, f"output_dir={tmp_path}/one", "train.micro_batch_size=32"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-4000:]
    expected = _losses(f"{tmp_path}/one/zero0")
    assert sorted(expected) == list(range(1, 21))
    assert expected[20] < expected[1]
    for run in ("zero0", "zero1", "zero2", "zero3", "cache3"):  # cache3: GradCache, 2 x 8 per rank
        got = _losses(f"{tmp_path}/two/{run}")
        assert sorted(got) == sorted(expected), run
        worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
        assert worst <= 1e-4, (run, worst)


def test_sigterm_then_kill_then_resume_matches_uninterrupted(tiny_yaml, synth_train, tmp_path):
    common = ["--config", tiny_yaml, f"data.train_shards={synth_train}", "data.workers=1", "train.steps=12",
              "train.save_every=4", "train.micro_batch_size=8", "train.zero_stage=2", "model.patch_dropout=0.25"]
    pretrain = os.path.join(ROOT, "launch", "pretrain.py")
    entry = os.path.join(HERE, "train_entry.py")

    rc, log = _launch(pretrain, *common, f"output_dir={tmp_path}/ref")
    assert rc == 0, log[-4000:]
    expected = _losses(f"{tmp_path}/ref")
    assert sorted(expected) == list(range(1, 13))

    out = f"output_dir={tmp_path}/cut"
    latest = tmp_path / "cut" / "checkpoints" / "latest"
    # SIGTERM reaches rank 1 only, while it fetches step 3's batch: both ranks save step 3 and stop
    rc, log = _launch(entry, *common, out, "--fault", "term:1:3")
    assert rc == 128 + 15, log[-4000:]
    assert latest.read_text() == "step_0000003"
    assert "stopped by signal 15 at step 3" in log
    # resumed at 3, checkpoint at 8, then rank 1 is SIGKILLed fetching step 10's batch
    rc, log = _launch(entry, *common, out, "--fault", "kill:1:7")
    assert rc != 0
    assert "exits with return code = -9" in log and "another rank probably died first" in log
    assert latest.read_text() == "step_0000008"
    # the real entry resumes from step 8 and finishes
    rc, log = _launch(pretrain, *common, out)
    assert rc == 0, log[-4000:]
    assert "resumed from" in log and "step_0000008" in log
    got = _losses(f"{tmp_path}/cut")
    assert got == expected  # exact: fp32 on CPU, data position and RNG restored per rank
