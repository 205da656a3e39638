"""The DeepSpeed config, derived from ours (one source of truth).

Batch sizes, accumulation, clipping, ZeRO stage and precision come from `train.*`; the optional
`train.deepspeed` block is merged last for advanced keys (offload, bucket sizes, ...) and may not
contradict a derived key. The optimizer and LR schedule are ours (client objects), so DeepSpeed's
`optimizer`/`scheduler` blocks are refused.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from vlp.config import ConfigError

# derived DeepSpeed key -> the vlp key a user sets instead
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x world size",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "train.lr / train.betas / train.eps / train.weight_decay",
    "scheduler": "train.warmup_steps / train.min_lr",
}


def resolve_precision(precision: str, device_type: Optional[str] = None, bf16_supported: Optional[bool] = None) -> str:
    """`auto` -> bf16 on GPUs that support it, fp32 on CPU; explicit choices are checked against the device."""
    if device_type is None or bf16_supported is None:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        device_type = acc.device_name() if device_type is None else device_type
        bf16_supported = acc.is_bf16_supported() if bf16_supported is None else bf16_supported
    on_cpu = device_type == "cpu"
    if precision == "auto":
        return "bf16" if (not on_cpu and bf16_supported) else "fp32"
    if precision == "fp16" and on_cpu:
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed's loss-scaled fp16 optimizer); "
                          "use fp32 (or auto) on CPU")
    if precision == "bf16" and not bf16_supported:
        raise ConfigError(f"train.precision=bf16 but this {device_type} device has no bf16 support; use fp16 or fp32")
    return precision


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def bucket_sizes(stage: int, n_params: int) -> Dict[str, int]:
    """ZeRO communication buckets sized to the model (about a quarter of it, at most DeepSpeed's
    defaults): DeepSpeed's fixed defaults (5e8 elements) allocate a 2 GB fp32 bucket under ZeRO-3
    even for a small model. Like Hugging Face's "auto" values, in spirit."""
    if stage == 0 or n_params <= 0:
        return {}
    bucket = int(min(5e8, max(5e5, n_params // 4)))
    sizes = {"reduce_bucket_size": bucket}
    if stage in (1, 2):
        sizes["allgather_bucket_size"] = bucket
    else:
        sizes["stage3_prefetch_bucket_size"] = int(min(5e7, bucket))
    return sizes


def deepspeed_config(cfg: DictConfig, world_size: int, *, n_params: Optional[int] = None,
                     device_type: Optional[str] = None, bf16_supported: Optional[bool] = None) -> Dict[str, Any]:
    """DeepSpeed config dict for `cfg` on `world_size` ranks (device probed unless given); with
    `n_params`, ZeRO buckets are sized to the model (`train.deepspeed` can still set them)."""
    t = cfg.train
    precision = resolve_precision(t.precision, device_type, bf16_supported)
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(t.grad_accum),
        "train_batch_size": int(t.micro_batch_size) * int(t.grad_accum) * int(world_size),
        "gradient_clipping": float(t.grad_clip),  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": {"stage": int(t.zero_stage), **bucket_sizes(int(t.zero_stage), n_params or 0)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # our client optimizer is torch's AdamW
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                           "hysteresis": 2, "min_loss_scale": 1})
    extra = OmegaConf.to_container(t.deepspeed, resolve=True) if isinstance(t.deepspeed, DictConfig) else dict(t.deepspeed)
    flat = _flatten(ds)
    for key, val in _flatten(extra).items():
        owner = next((o for o in _OWNED if key == o or key.startswith(o + ".")), None)
        if owner is not None and (owner in ("optimizer", "scheduler") or flat.get(key) != val):
            raise ConfigError(f"'train.deepspeed.{key}' is derived from our config; set {_OWNED[owner]} instead")
    return _deep_merge(ds, extra)


__all__ = ["deepspeed_config", "resolve_precision", "bucket_sizes"]
