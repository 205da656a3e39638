"""Learnable temperatures are clamped in place after each optimizer step, in the module's tensor and in
DeepSpeed's fp32 master copy (ZeRO 0-3, fp32 and bf16), and keep a gradient at the bound.

Real DeepSpeed engines in this process (a world of one). A tiny CLIP trains its logit scale alone
with lr 10: Adam's first step moves it by about 10, far outside [0, ln 100], whatever the sign.
(tests/dist/test_albef_dist.py checks ALBEF's temperature under ZeRO-3 on two ranks.)
"""
import math

import pytest
import torch

from tests.dist.train_entry import write_tiny_config

from vlp.config import load_config  # noqa: E402

BOUNDS = (0.0, math.log(100.0))


@pytest.fixture(scope="module", autouse=True)
def _own_process_group(own_process_group):
    """deepspeed.initialize runs in this process: see conftest.own_process_group."""


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(8, 3, 32, 32, generator=g), "text_ids": torch.randint(1, 49408, (8, 16), generator=g),
            "text_mask": torch.ones(8, 16, dtype=torch.long)}


def _full(p, optimizer=None):
    """The whole parameter, or with `optimizer` the fp32 master copy it keeps of it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if optimizer is not None:
        got = safe_get_full_fp32_param(p)  # ZeRO-1/2/3
        if got is None and hasattr(optimizer, "fp32_groups"):  # fp16/bf16 without ZeRO
            got = next(hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                       for lp, hp in zip(lps, hps) if lp is p)
        return (p if got is None else got).detach().clone()  # fp32 without ZeRO: the parameter is the master
    with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else torch.no_grad():
        return p.detach().clone()


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"),
                                             (3, "bf16")])
def test_logit_scale_and_master_copy_sit_at_the_bound_and_keep_a_gradient(tmp_path, stage, precision):
    from deepspeed.utils import safe_get_full_grad

    from vlp.models import build_model, param_groups
    from vlp.dist import setup_distributed
    from vlp.train.ds_config import deepspeed_config
    from vlp.train.engine import build_engine, clamp_parameters

    cfg = load_config(write_tiny_config(str(tmp_path / "tiny.yaml")),
                      [f"train.zero_stage={stage}", f"train.precision={precision}", "train.lr=10.0",
                       "train.min_lr=10.0", "train.warmup_steps=0", "train.micro_batch_size=8",
                       # ZeRO-3 keeps parameters this small whole on every rank unless told otherwise
                       "train.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
    info = setup_distributed(60)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert model.parameter_bounds() == [(model.logit_scale, *BOUNDS)]
    model.requires_grad_(False)
    model.logit_scale.requires_grad_(True)  # only the scale moves: lr 10 would wreck the rest
    engine, optimizer, _ = build_engine(model, param_groups(model, 0.0), cfg,
                                        deepspeed_config(cfg, 1, n_params=10**6), info.device)
    p = engine.module.logit_scale
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    grads = []
    for step in range(2):
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _batch(step).items()}
        out = engine(batch)
        engine.backward(out["loss"])
        grads.append(float(safe_get_full_grad(p).float().reshape(())))
        before = float(_full(p, optimizer).reshape(()))
        engine.step()
        moved = float(_full(p, optimizer).reshape(()))
        assert not BOUNDS[0] <= moved <= BOUNDS[1], (step, before, moved)  # lr 10 left the range
        clamp_parameters(engine.module, optimizer)
        bound = BOUNDS[0] if moved < BOUNDS[0] else BOUNDS[1]
        master = _full(p, optimizer)
        assert master.dtype == torch.float32 and master.item() == torch.tensor(bound).item(), (step, master)
        assert _full(p).item() == torch.tensor(bound, dtype=dtype).item(), step  # the module's copy too
        assert out["logit_scale"] > 0
    # the forward read the parameter as is: at the bound after step 1, its gradient is not zero (a clamp in
    # the forward would have cut it)
    assert all(g != 0.0 for g in grads), grads
    scale = engine({k: v.to(dtype) if v.is_floating_point() else v for k, v in _batch(9).items()})["logit_scale"]
    assert scale == pytest.approx(math.exp(_full(p).float().item()), rel=1e-6)
    engine.destroy()


def test_models_name_their_bounds_and_read_the_parameter_as_is(tmp_path):
    from vlp.models import build_model

    cfg = load_config(write_tiny_config(str(tmp_path / "tiny.yaml")))
    model = build_model(cfg.model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # out of range: the forward does not hide it
    assert model(_batch(0))["logit_scale"] == pytest.approx(1000.0, rel=1e-5)
    off = build_model(load_config(str(tmp_path / "tiny.yaml"), ["model.max_logit_scale=0"]).model)
    assert off.parameter_bounds() == []
    siglip = build_model(load_config(str(tmp_path / "tiny.yaml"), ["model.type=siglip"]).model)
    assert siglip.parameter_bounds() == [(siglip.logit_scale, *BOUNDS)]
    from vlp.train.engine import clamp_parameters

    clamp_parameters(model)  # a plain module (no DeepSpeed): the parameter is the only copy
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
