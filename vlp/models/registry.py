"""`build_model(cfg.model)`: the one entry point that builds a model from its config, for the family
`model.type` names in `vlp.families` (the only list of families)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from vlp.config import ConfigError, ModelConfig
from vlp.families import builder, families, register_model

__all__ = ["build_model", "register_model", "without_pretrained", "as_model_config"]


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


def _is_open_clip_tag(name: str, tag: str) -> bool:
    try:
        import open_clip

        return bool(open_clip.get_pretrained_cfg(name, tag))
    except Exception:  # unknown name: not a tag
        return False


def without_pretrained(model_cfg: Any) -> DictConfig:
    """A copy of `model_cfg` whose towers build the same architecture with random init and no
    `init_from`: for models whose every weight then comes from a checkpoint or an export, where a
    pretrained download would only cost time (or fail when a local weights file has since moved).
    What the pretrained source also decides is kept: a transformers tower keeps its config source, an
    open_clip tower keeps a pretrained *tag* (it sets the preprocessing mean/std)."""
    cfg = copy.deepcopy(as_model_config(model_cfg))
    if cfg.get("init_from"):
        cfg.init_from = ""
    for side in ("vision", "text"):
        t = cfg[side]
        if not t.pretrained:
            continue
        if t.kind == "hf":
            if not t.name:
                t.name = t.pretrained  # the config source stays the same
            t.pretrained = ""
        elif t.kind == "open_clip":
            if not (t.name and _is_open_clip_tag(t.name, t.pretrained)):
                t.pretrained = ""
        else:
            t.pretrained = ""
    return cfg


def build_model(model_cfg: Any, pretrained: bool = True) -> nn.Module:
    """The model for `model_cfg.type`, built on CPU in fp32 (the trainer moves and casts it).
    `pretrained=False`: the same architecture without fetching the towers' pretrained weights
    (`without_pretrained`). `model.init_from` is the trainer's to apply (`vlp.train.init_from`)."""
    cfg = as_model_config(model_cfg)
    if not pretrained:
        cfg = without_pretrained(cfg)
    try:
        build = builder(cfg.type)
    except KeyError:
        raise ConfigError(f"bad value for 'model.type': {cfg.type!r}; valid: {', '.join(families())}") from None
    return build(cfg)
