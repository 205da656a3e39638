"""The DeepSpeed config derived from ours, the LR schedule, and config checks before any work."""
import json

import pytest
import torch

from vlp.config import ConfigError, load_config
from vlp.train.ds_config import deepspeed_config, resolve_precision
from vlp.train.schedule import build_scheduler, lr_at


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_deepspeed_config_maps_our_keys():
    cfg = _cfg("train.micro_batch_size=8", "train.grad_accum=4", "train.grad_clip=0.0", "train.zero_stage=2")
    ds = deepspeed_config(cfg, world_size=3, device_type="cpu", bf16_supported=True)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 3
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed would default to 1.0
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # auto on CPU -> fp32
    assert "optimizer" not in ds and "scheduler" not in ds  # ours are client objects


def test_precision_follows_the_device():
    assert resolve_precision("auto", "cpu", True) == "fp32"
    assert resolve_precision("auto", "cuda", True) == "bf16"
    assert resolve_precision("auto", "cuda", False) == "fp32"
    ds = deepspeed_config(_cfg("train.precision=fp16"), 2, device_type="cuda", bf16_supported=False)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a GPU"):
        resolve_precision("fp16", "cpu", True)
    with pytest.raises(ConfigError, match="no bf16 support"):
        resolve_precision("bf16", "cuda", False)


def test_deepspeed_block_is_merged_last_but_cannot_contradict_ours():
    cfg = _cfg("train.zero_stage=3", "train.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
               "train.deepspeed.communication_data_type=fp32")
    ds = deepspeed_config(cfg, 2, device_type="cpu", bf16_supported=True)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["communication_data_type"] == "fp32"
    same = _cfg("train.grad_clip=1.0", "train.deepspeed.gradient_clipping=1.0")
    assert deepspeed_config(same, 1, device_type="cpu", bf16_supported=True)["gradient_clipping"] == 1.0
    for bad, hint in [("train.deepspeed.gradient_clipping=1.0", "train.grad_clip"),
                      ("train.deepspeed.zero_optimization.stage=1", "train.zero_stage"),
                      ("train.deepspeed.optimizer.type=Adam", "train.lr")]:
        with pytest.raises(ConfigError, match=f"'train.deepspeed.*derived.*{hint}"):
            deepspeed_config(_cfg(bad), 1, device_type="cpu", bf16_supported=True)


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    lr, lo, warm, total = 1e-3, 1e-5, 10, 110
    assert lr_at(0, lr, lo, warm, total) == pytest.approx(1e-4)
    assert lr_at(9, lr, lo, warm, total) == pytest.approx(lr)
    assert lr_at(10, lr, lo, warm, total) == pytest.approx(lr)
    assert lr_at(60, lr, lo, warm, total) == pytest.approx(lo + 0.5 * (lr - lo))
    assert lr_at(110, lr, lo, warm, total) == pytest.approx(lo)
    vals = [lr_at(s, lr, lo, warm, total) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert lr_at(0, lr, lo, 0, total) == pytest.approx(lr)  # no warm-up


def test_scheduler_steps_the_optimizer_lr_and_restores_from_state():
    cfg = _cfg("train.lr=0.1", "train.min_lr=0.01", "train.warmup_steps=2", "train.steps=6")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.0}], lr=0.1)
    sched = build_scheduler(opt, cfg.train)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, 0.1, 0.01, 2, 6) for s in range(6)])
    state = sched.state_dict()
    assert state == {"last_epoch": 6, "samples": 6, "ref_batch": 1}  # the schedule itself comes from the config
    # a resumed run with a longer schedule and another lr follows its own config from step 3 on
    longer = _cfg("train.lr=0.2", "train.min_lr=0.01", "train.warmup_steps=2", "train.steps=12")
    opt2 = torch.optim.AdamW([p], lr=0.123)
    sched2 = build_scheduler(opt2, longer.train)
    sched2.load_state_dict({"last_epoch": 3})
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(lr_at(3, 0.2, 0.01, 2, 12))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(4, 0.2, 0.01, 2, 12))


def test_a_changed_global_batch_continues_the_schedule_by_samples():
    """Started at global batch 64, resumed at step 30 with batch 32: the curve over samples is the same one
    and the run ends after the same samples (train.steps batches of 64), in 2 x 70 more steps."""
    cfg = _cfg("train.lr=0.1", "train.min_lr=0.0", "train.warmup_steps=10", "train.steps=100")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    first = build_scheduler(opt, cfg.train, 64)
    for _ in range(30):
        opt.step()
        first.step()
    state = first.state_dict()
    assert state == {"last_epoch": 30, "samples": 30 * 64, "ref_batch": 64}
    opt2 = torch.optim.AdamW([p], lr=0.1)
    resumed = build_scheduler(opt2, cfg.train, 32)
    resumed.load_state_dict(state)
    assert resumed.total_samples == 100 * 64 and resumed.samples == 30 * 64
    seen = []
    while resumed.samples < resumed.total_samples:
        seen.append((resumed.samples, opt2.param_groups[0]["lr"]))
        opt2.step()
        resumed.step()
    assert len(seen) == 140 and resumed.last_epoch == 170
    assert all(lr == pytest.approx(lr_at(n / 64, 0.1, 0.0, 10, 100)) for n, lr in seen)
    assert seen[2][1] == pytest.approx(lr_at(31, 0.1, 0.0, 10, 100))  # two batches of 32 = one of 64
    # a checkpoint from before samples were recorded: steps of the current batch
    old = build_scheduler(torch.optim.AdamW([p], lr=0.1), cfg.train, 32)
    old.load_state_dict({"last_epoch": 30})
    assert (old.samples, old.ref_batch) == (30 * 32, 32)


@pytest.mark.parametrize("override, message", [
    ("train.keep_last=-1", "'train.keep_last'"),
    ("train.min_lr=1.0", "'train.min_lr'"),
    ("train.precision=fp16", "train.precision=fp16 needs a GPU"),
    ("data.train_shards=/nonexistent/dir", "'data.train_shards'"),
    ("eval.every=5", "data.eval_shards"),
    ("train.deepspeed.gradient_clipping=2.0", "'train.deepspeed.gradient_clipping'.*train.grad_clip"),
])
def test_check_before_work_names_the_key(override, message, synth_train):
    from vlp.train.loop import check_before_work

    with pytest.raises(ConfigError, match=message):  # from the schema (load_config) or the machine/files
        check_before_work(_cfg(f"data.train_shards={synth_train}", override))


def test_check_before_work_accepts_a_valid_config(synth_train):
    from vlp.train.loop import check_before_work

    check_before_work(_cfg(f"data.train_shards={synth_train}"))
    with pytest.raises(ConfigError, match="no training data"):
        check_before_work(_cfg())


def test_wandb_enabled_but_missing_is_a_config_error(monkeypatch, synth_train):
    import sys

    from vlp.train.loop import check_before_work

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match="train.wandb=true but wandb is not installed"):
        check_before_work(_cfg(f"data.train_shards={synth_train}", "train.wandb=true"))


def test_zero_buckets_are_sized_to_the_model_unless_set():
    cfg = _cfg("train.zero_stage=3")
    zero = deepspeed_config(cfg, 2, n_params=8_000_000, device_type="cpu", bf16_supported=True)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 2_000_000 and zero["stage3_prefetch_bucket_size"] == 2_000_000
    big = deepspeed_config(cfg, 2, n_params=10**10, device_type="cpu", bf16_supported=True)["zero_optimization"]
    assert big["reduce_bucket_size"] == 5 * 10**8  # DeepSpeed's default is the cap
    mine = _cfg("train.zero_stage=2", "train.deepspeed.zero_optimization.reduce_bucket_size=123")
    zero = deepspeed_config(mine, 2, n_params=8_000_000, device_type="cpu", bf16_supported=True)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123 and zero["allgather_bucket_size"] == 2_000_000


def test_warmup_longer_than_the_run_warns_and_clamps():
    """A short smoke run of a real config just works: the warm-up spans the whole run."""
    with pytest.warns(UserWarning, match="train.warmup_steps=5000 exceeds train.steps=20"):
        cfg = _cfg("train.steps=20", "train.warmup_steps=5000")
    assert cfg.train.warmup_steps == 20


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path, caplog):
    """A kill mid-write leaves half a JSON line: the resumed run drops it (and the records after its
    step) and appends on a clean line."""
    from vlp.train.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')
    with caplog.at_level("WARNING", logger="vlp.train.metrics"):
        w = MetricsWriter(str(tmp_path), 0, 20, tensorboard=False, wandb_cfg=None)
    assert "line 3 is not JSON" in caplog.text
    w.log({"step": 30, "loss": 0.8})
    w.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [10, 20, 30]
