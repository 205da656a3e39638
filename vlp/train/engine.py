"""Model + AdamW + schedule wrapped by `deepspeed.initialize` from our derived DeepSpeed config.

AdamW is torch's (fused kernel on CUDA and CPU) passed as DeepSpeed's client optimizer, over `param_groups`
(no weight decay on biases, norms, embeddings, temperature); with ZeRO optimizer offload it is
DeepSpeed's CPU Adam, which that mode requires.

`clamp_parameters` keeps the parameters a model names in `parameter_bounds()` (learnable temperatures)
in range after each optimizer step, in every copy DeepSpeed holds of them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from vlp.train.schedule import build_scheduler


def _offloads_optimizer(ds_cfg: Dict[str, Any]) -> bool:
    off = ds_cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") in ("cpu", "nvme")


def build_optimizer(groups: List[Dict[str, Any]], train_cfg: DictConfig, ds_cfg: Dict[str, Any],
                    device: torch.device) -> torch.optim.Optimizer:
    t = train_cfg
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=float(t.lr), betas=tuple(float(b) for b in t.betas), eps=float(t.eps))
    if _offloads_optimizer(ds_cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kw)  # fused: ~4x faster on CPU too


def build_engine(model: torch.nn.Module, groups: List[Dict[str, Any]], cfg: DictConfig, ds_cfg: Dict[str, Any],
                 device: torch.device) -> Tuple[Any, torch.optim.Optimizer, Any]:
    """-> (engine, optimizer, lr_scheduler); the scheduler is stepped by DeepSpeed at each optimizer step."""
    import deepspeed

    optimizer = build_optimizer(groups, cfg.train, ds_cfg, device)
    if cfg.train.compile and int(cfg.train.zero_stage) == 3:
        # nn.MultiheadAttention reads out_proj.weight without calling out_proj: ZeRO-3 gathers a module's
        # parameters when its forward starts, which a compiled graph never does for out_proj. As a ZeRO-3
        # leaf, the attention module gathers its children's parameters itself (eager runs need no help).
        from deepspeed.utils import set_z3_leaf_modules

        if any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
            set_z3_leaf_modules(model, [torch.nn.MultiheadAttention])
    scheduler = build_scheduler(optimizer, cfg.train, int(ds_cfg["train_batch_size"]))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False)
    if cfg.train.compile:
        # DeepSpeed's own entry to torch.compile: it compiles the module in place (state-dict names unchanged,
        # so checkpoints and exports are those of an eager run) and keeps its ZeRO-3 hooks out of the graph
        engine.compile()
    return engine, optimizer, scheduler


def use_channels_last(model: torch.nn.Module, setting: str) -> bool:
    """`train.channels_last`: true/false, or auto = on when the image tower is convolutional beyond a patch
    embedding (more than one Conv2d with a kernel wider than 1: ConvNeXt, ResNet, EfficientNet), where
    NHWC activations let cuDNN/oneDNN skip layout conversions; ViTs (one patch conv) stay as they are.
    Only the images are made NHWC (`DeviceNormalize`): convolutions keep the layout of their input."""
    if setting in ("true", "false"):
        return setting == "true"
    if setting != "auto":
        from vlp.config import ConfigError

        raise ConfigError(f"bad value for 'train.channels_last': {setting!r}; want auto, true or false")
    vision = getattr(model, "vision", model)
    convs = [m for m in vision.modules() if isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) > 1]
    return len(convs) > 1


def _clamp(t: Optional[torch.Tensor], low: float, high: float) -> None:
    if t is not None and t.numel():
        t.clamp_(low, high)


def _unfused_masters(optimizer: Any) -> Dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master copy in DeepSpeed's FP16_UnfusedOptimizer, the wrapper of our
    torch AdamW for fp16/bf16 without ZeRO (groups of parameters and of their fp32 copies, in step)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    return {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups) for lp, hp in zip(lps, hps)}


@torch.no_grad()
def clamp_parameters(model: torch.nn.Module, optimizer: Any = None) -> None:
    """Clamp each (parameter, low, high) of `model.parameter_bounds()` in place, as open_clip clamps
    logit_scale and ALBEF its temperature, but in every copy DeepSpeed keeps, so the next step starts
    from the clamped value: the module's tensor (under ZeRO-3 the local partition `ds_tensor`, and the
    gathered data of a persistent parameter) and the fp32 master copy of `optimizer` (the engine's):
    ZeRO-1/2 through `safe_get/set_full_fp32_param` (a collective), ZeRO-3 its local partition, fp16/bf16
    without ZeRO the unfused optimizer's copy. Elementwise, so each rank clamps what it holds. Every rank
    calls it after each optimizer step; a model without bounds is left as is.
    """
    bounds = model.parameter_bounds() if callable(getattr(model, "parameter_bounds", None)) else []
    if not bounds:
        return
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                                 safe_set_local_fp32_param)

    masters = _unfused_masters(optimizer)
    for p, low, high in bounds:
        _clamp(p.data, low, high)
        if hasattr(p, "ds_id"):  # ZeRO-3: partitioned; data is empty unless gathered (persistent)
            _clamp(p.ds_tensor, low, high)
            master = safe_get_local_fp32_param(p)
            if master is not None and master.numel():
                safe_set_local_fp32_param(p, master.clamp(low, high))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2 (and DeepSpeed's BF16_Optimizer): partitioned fp32 master
            safe_set_full_fp32_param(p, safe_get_full_fp32_param(p).clamp(low, high))
        elif id(p) in masters:
            masters[id(p)].clamp_(low, high)
        elif p.dtype in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"cannot find the fp32 master copy of a {p.dtype} parameter of shape {tuple(p.shape)} "
                               f"in {type(optimizer).__name__} to clamp it")


__all__ = ["build_optimizer", "build_engine", "clamp_parameters", "use_channels_last"]
