"""Model families by `model.type`; `build_model(cfg.model)` is the one entry point.

A family module registers its builder with `@register_model("name")`; the module is imported on
first use through `_MODULES`, so `import vlp.models` stays light and a new family (ALBEF) adds one
line here.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from vlp.config import ConfigError, ModelConfig
from vlp.models.init_from import init_from

_FAMILIES: Dict[str, Callable[[DictConfig], nn.Module]] = {}
_MODULES = {
    "clip": "vlp.models.dual_encoder",
    "align": "vlp.models.dual_encoder",
    "siglip": "vlp.models.dual_encoder",
    "albef": "vlp.models.albef",
}


def register_model(name: str) -> Callable:
    """Decorator: `fn(model_cfg) -> nn.Module` builds family `name`."""

    def wrap(fn: Callable[[DictConfig], nn.Module]) -> Callable[[DictConfig], nn.Module]:
        _FAMILIES[name] = fn
        return fn

    return wrap


def as_model_config(model_cfg: Any) -> DictConfig:
    """Accept `cfg.model` (DictConfig), a `ModelConfig` dataclass, or a plain dict; return a typed DictConfig."""
    if isinstance(model_cfg, DictConfig):
        return model_cfg
    if dataclasses.is_dataclass(model_cfg):
        return OmegaConf.structured(model_cfg)
    if isinstance(model_cfg, dict):
        try:
            return OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
        except Exception as e:
            raise ConfigError(f"model config: {e}") from None
    raise ConfigError(f"model config must be cfg.model, a ModelConfig or a dict, got {type(model_cfg).__name__}")


def build_model(model_cfg: Any) -> nn.Module:
    """The model for `model_cfg.type`, built on CPU in fp32 (the trainer moves and casts it); with
    `model_cfg.init_from`, its towers and projections start from that model (`vlp.models.init_from`),
    and what was loaded is kept as `model.init_report`."""
    cfg = as_model_config(model_cfg)
    if cfg.type not in _FAMILIES and cfg.type in _MODULES:
        try:
            importlib.import_module(_MODULES[cfg.type])
        except ModuleNotFoundError as e:
            if e.name != _MODULES[cfg.type]:
                raise
    if cfg.type not in _FAMILIES:
        raise ConfigError(f"bad value for 'model.type': {cfg.type!r} is not available; "
                          f"valid: {', '.join(sorted(_FAMILIES) or sorted(_MODULES))}")
    model = _FAMILIES[cfg.type](cfg)
    if cfg.get("init_from"):
        model.init_report = init_from(model, cfg)
    return model
