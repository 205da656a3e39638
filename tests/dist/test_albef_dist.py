"""ALBEF on two CPU ranks (gloo).

1. Model level: 2 ranks x B give the losses, averaged gradients, momentum buffers and queues of
   1 rank x 2B, ITM negatives and MLM masks included (drawn from a stream seeded alike on every rank,
   over the global batch).
2. DeepSpeed level, through `vlp.train` and the launcher: ZeRO-3 on 2 ranks, every parameter partitioned
   (persistence threshold 0), reproduces 1 rank's losses (so the momentum EMA of partitioned weights is
   right, the MLM decoder gathers the word embeddings it is tied to, and the temperature, driven into a
   narrow range, is clamped in the fp32 master partitions as in the 1-rank run), the momentum weights move, a run
   stopped at step 2 and resumed from its ZeRO-3 checkpoint ends with exactly the losses, queues and
   momentum weights of an uninterrupted run, and `vlp eval retrieval` on the checkpoint reports ITC and
   ITM re-ranked metrics.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from tests.dist.albef_tiny import write_tiny_albef, write_vocab
from tests.dist.train_entry import deepspeed_launch, launcher_env, write_fixed_batches

pytestmark = pytest.mark.slow
WORLD, PER_RANK, STEPS = 2, 4, 3


@pytest.fixture(scope="module")
def setup(synth_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("albef_dist")
    vocab = write_vocab(synth_train, str(root / "bert"))
    return {"root": root, "yaml": write_tiny_albef(str(root / "tiny.yaml"), vocab)}


# ------------------------------------------------------------------------------------ model level
def _model(yaml):
    from vlp.config import load_config
    from vlp.models import build_model

    torch.manual_seed(0)
    return build_model(load_config(yaml, ["model.albef.queue_size=16"]).model)


def _global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    n = WORLD * PER_RANK
    ids = torch.randint(5, 40, (n, 16), generator=g)
    lengths = torch.randint(5, 16, (n,), generator=g)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(n), lengths - 1] = 3
    ids[mask == 0] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text_ids": ids, "text_mask": mask}


def _train(yaml, rows, world):
    """STEPS SGD steps on `rows` of each global batch; gradients averaged over `world` ranks."""
    model = _model(yaml)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        batch = {k: v[rows] for k, v in _global_batch(step).items()}
        out = model(batch)
        out["loss"].backward()
        for p in model.parameters():
            if world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
        model.after_step()
        losses.append(torch.stack([out[k].detach() for k in ("loss", "itc_loss", "itm_loss", "mlm_loss")]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return torch.stack(losses), state


def _worker(rank, init_file, out_dir, yaml):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        losses, state = _train(yaml, slice(rank * PER_RANK, (rank + 1) * PER_RANK), WORLD)
        dist.all_reduce(losses)  # mean over ranks = the global batch's loss
        torch.save({"losses": losses / WORLD, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_rank_with_the_same_global_batch(setup):
    out = setup["root"] / "spawn"
    out.mkdir()
    mp.spawn(_worker, args=(str(out / "init"), str(out), setup["yaml"]), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    ref_losses, ref_state = _train(setup["yaml"], slice(None), 1)
    assert torch.isfinite(ref_losses).all()
    torch.testing.assert_close(ranks[0]["losses"], ref_losses, rtol=2e-5, atol=1e-6)  # loss, ITC, ITM, MLM
    for r in ranks:
        for key, ref in ref_state.items():  # parameters, momentum buffers, queues, pointer, step count
            torch.testing.assert_close(r["state"][key], ref, rtol=1e-4, atol=2e-6, msg=key)
    assert int(ref_state["queue_ptr"]) == (STEPS * WORLD * PER_RANK) % 16


# ------------------------------------------------------------------------------- DeepSpeed level
def _launch(*args, timeout=400):
    rc, out = deepspeed_launch(os.path.join(HERE, "train_entry.py"), *args, timeout=timeout)
    assert rc == 0, out[-4000:]
    return out


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # a resumed run logs steps 3-4 only
    return {r["step"]: r for r in records}


def _state(run_dir):
    from vlp.checkpoint import consolidated_state_dict, find_checkpoint

    return consolidated_state_dict(find_checkpoint(str(run_dir)).path)


def test_zero3_trains_like_one_rank_and_resumes_queues_and_momentum_exactly(setup, synth_train, synth_test):
    from vlp.config import load_config

    root, yaml = setup["root"], setup["yaml"]
    lo, hi = 0.0695, 0.0705  # Adam's first step moves the temperature (0.07) by about lr = 1e-3: out of range
    common = [f"data.train_shards={synth_train}", "train.steps=4", "train.save_every=2", "train.keep_last=3",
              f"model.albef.min_temperature={lo}", f"model.albef.max_temperature={hi}"]
    batches = str(root / "batches.pt")
    write_fixed_batches(load_config(yaml, common), batches, n=4, global_batch=8)
    entry = ["--config", yaml, "--fixed", batches]
    two = root / "two"
    # on 2 ranks x 4: a full ZeRO-3 run; one that stops after 2 steps (its config says 2); then the same
    # run again with 4 steps, which builds a new model and engine and resumes from the step-2 checkpoint
    zero3 = "train.zero_stage=3,train.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"
    log = _launch(*entry, "--runs", f"z3:{zero3} cut:{zero3},train.steps=2 cut:{zero3}",
                  *common, f"output_dir={two}", "train.micro_batch_size=4")
    assert f"resumed from {two / 'cut' / 'checkpoints' / 'step_0000002'} at step 2" in log
    # the same batches on 1 rank x 8 (ZeRO-0)
    ref = subprocess.run([sys.executable, "-m", "tests.dist.train_entry", *entry, *common,
                          f"output_dir={root / 'one'}", "train.micro_batch_size=8"], cwd=ROOT, env=launcher_env(),
                         capture_output=True, text=True, timeout=400)
    assert ref.returncode == 0, ref.stderr[-4000:]

    assert sorted(p for p in os.listdir(two / "cut" / "checkpoints") if p.startswith("step_")) == \
        ["step_0000002", "step_0000004"]
    expected, z3, cut = _losses(root / "one" / "zero0"), _losses(two / "z3"), _losses(two / "cut")
    for step in expected:  # later steps depend on the queue and on the momentum weights
        for key in ("loss", "itc_loss", "itm_loss", "mlm_loss"):
            assert z3[step][key] == pytest.approx(expected[step][key], rel=1e-4), (step, key)
            assert cut[step][key] == z3[step][key], (step, key)  # resumed: exact
    assert expected[4]["alpha"] == pytest.approx(0.4) and expected[1]["alpha"] == 0.0
    lo32, hi32 = torch.tensor(lo).item(), torch.tensor(hi).item()  # the bounds as the fp32 parameter holds them
    temps = [z3[step]["temperature"] for step in (2, 3, 4)]  # each forward reads the last step's clamped value
    assert all(lo32 <= t <= hi32 for t in temps) and temps[0] in (lo32, hi32), temps

    full, resumed = _state(two / "z3"), _state(two / "cut")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert int(full["steps"]) == 4 and int(full["queue_ptr"]) == 0  # 4 batches of 8 filled the 32-long queue
    # the checkpoint's weights are the fp32 master partitions: the clamp reached them
    assert torch.tensor(lo) <= full["temp"] <= torch.tensor(hi)
    assert not [k for k in full if "mlm_head.decoder" in k]  # tied: the word embeddings are the decoder
    init = _model(yaml).state_dict()
    moved, drift = 0, []
    for key in full:
        if key.startswith("momentum_models.") and full[key].is_floating_point():
            online = key[len("momentum_models."):]
            if online in full:
                moved += int(not torch.equal(full[key], init[key]))
                drift.append(((full[key] - init[online]).norm() < (full[online] - init[online]).norm() + 1e-12))
    assert moved > 0.9 * len(drift) and all(drift)  # the EMA moved, lagging the online weights
    assert not torch.equal(full["image_queue"], init["image_queue"])

    out = root / "retrieval.json"
    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "eval", "retrieval", "--checkpoint", str(two / "z3"),
                           "--data", str(synth_test), "--out", str(out), "--rerank-k", "4", "--workers", "0",
                           "--batch-size", "8", "--max-samples", "16"],
                          cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["rerank_k"] == 4 and res["n_images"] == 16
    for part in ("metrics", "reranked"):
        assert 0.0 <= res[part]["mean_recall"] <= 1.0 and "t2i_r1" in res[part]
