"""Rebuild a model from its stored config without fetching the towers' pretrained weights.

Exports overwrite every weight with the checkpoint's, so pretrained weights (and `model.init_from`)
would only cost a download (or fail when a local weights file or the init_from source has since
moved). What the pretrained source also decides is kept: a transformers tower keeps its config
source, an open_clip tower keeps a pretrained *tag* (it sets the preprocessing mean/std).
"""
from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn
from omegaconf import DictConfig

from vlp.models.init_from import without_init_from


def _is_open_clip_tag(name: str, tag: str) -> bool:
    try:
        import open_clip

        return bool(open_clip.get_pretrained_cfg(name, tag))
    except Exception:  # unknown name: not a tag
        return False


def without_pretrained(model_cfg: Any) -> DictConfig:
    """A copy of `model_cfg` whose towers build the same architecture with random init (no init_from)."""
    cfg = without_init_from(model_cfg)
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


def effective_image_cfg(model: nn.Module, data_cfg: Any) -> Dict[str, Any]:
    """Eval preprocessing of the run: the tower's image_cfg with `data.image_size/mean/std` applied,
    exactly as the data pipeline's eval loader (and `vlp eval`) resolve it."""
    from vlp.data.transforms import resolve_image_cfg

    cfg = resolve_image_cfg(model.image_cfg, data_cfg)
    return dict(size=int(cfg["size"]), mean=tuple(float(x) for x in cfg["mean"]),
                std=tuple(float(x) for x in cfg["std"]), interpolation=str(cfg["interpolation"]))


def build_without_pretrained(model_cfg: Any) -> nn.Module:
    from vlp.models import build_model

    return build_model(without_pretrained(model_cfg))


__all__ = ["without_pretrained", "build_without_pretrained", "effective_image_cfg"]
