"""Vision and text towers from transformers (ViT/CLIP/SigLIP/DINOv2 vision, BERT-like text).

`pretrained` (a local dir or hub name) loads weights with `from_pretrained`; otherwise the tower is
randomly initialised from the config found at `name`. `kwargs` override config fields
(e.g. num_hidden_layers, hidden_size for tiny models). For a dual-encoder checkpoint (CLIP,
SigLIP) the matching sub-model is taken. Tanh "pooler" layers (BERT/ViT: trained for NSP or
classification, or untrained) are removed; features are the model's own pooled output where it
has one (CLIP/SigLIP/DINOv2), else the first ([CLS]) token, or a (masked) mean with `pool: mean`.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn as nn

from vlp.config import ConfigError
from vlp.models.towers.base import (IMAGENET_MEAN, IMAGENET_STD, Tower, config_error, interpolation_name,
                                    kwargs_of, square_size)

log = logging.getLogger(__name__)


def _load(tcfg: Any, key: str, side: str) -> nn.Module:
    """AutoModel (or the vision/text sub-model of a two-tower config), random or pretrained."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    source = tcfg.pretrained or tcfg.name
    if not source:
        raise ConfigError(f"model.{key}: set name (a transformers model dir/hub name) or pretrained")
    kwargs = kwargs_of(tcfg)
    try:
        config = AutoConfig.from_pretrained(source)
        sub = getattr(config, f"{side}_config", None)
        if sub is not None:  # e.g. CLIPConfig -> CLIPVisionModel / CLIPTextModel
            config = sub
        for k, v in kwargs.items():
            if not hasattr(config, k):
                raise ConfigError(f"model.{key}.kwargs.{k}: not a field of {type(config).__name__}")
            setattr(config, k, v)
        if tcfg.pretrained:
            cls = MODEL_MAPPING[type(config)]
            model = cls.from_pretrained(tcfg.pretrained, config=config)
        else:
            model = AutoModel.from_config(config)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise config_error(key, tcfg, e) from e
    if isinstance(getattr(model, "pooler", None), nn.Module) and hasattr(model.pooler, "dense"):
        model.pooler = None
    if tcfg.grad_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def _pool(out: Any, pool: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    hidden = out.last_hidden_state
    if pool == "mean":
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    pooled = getattr(out, "pooler_output", None)
    if pool == "" and pooled is not None:
        return pooled
    return hidden[:, 0]


class HFVision(nn.Module):
    """transformers vision model -> (B, hidden) features."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model, self.pool = model, pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _pool(self.model(pixel_values=images), self.pool)


class HFText(nn.Module):
    """transformers text encoder -> (B, hidden) features."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model, self.pool = model, pool

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _pool(self.model(input_ids=ids, attention_mask=mask), self.pool, mask)


def _image_cfg(source: str, config: Any) -> dict:
    """From the saved image processor when there is one, else the model config's size and ImageNet stats."""
    size = square_size(getattr(config, "image_size", 224))
    info = dict(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError, ImportError) as e:
        log.info("no image processor config at %s (%s): using defaults", source, e)
        return info
    psize = getattr(proc, "crop_size", None) or getattr(proc, "size", None)
    if psize is not None and not isinstance(psize, (int, tuple, list)):  # dict or transformers' SizeDict
        get = psize.get if hasattr(psize, "get") else (lambda k: getattr(psize, k, None))
        psize = get("height") or get("shortest_edge")
    if psize:
        info["size"] = square_size(psize)
    if getattr(proc, "image_mean", None) is not None:
        info["mean"] = tuple(float(x) for x in proc.image_mean)
        info["std"] = tuple(float(x) for x in proc.image_std)
    info["interpolation"] = interpolation_name(getattr(proc, "resample", None))
    return info


def build_hf_vision(tcfg: Any, patch_dropout: float = 0.0, key: str = "vision") -> Tower:
    if patch_dropout > 0:
        raise ConfigError("model.patch_dropout: not supported for hf vision towers; use a timm or open_clip tower")
    model = _load(tcfg, key, "vision")
    info = _image_cfg(tcfg.pretrained or tcfg.name, model.config)
    return Tower(HFVision(model, tcfg.pool), int(model.config.hidden_size), info)


def build_hf_text(tcfg: Any, key: str = "text") -> Tower:
    model = _load(tcfg, key, "text")
    cfg = model.config
    info = dict(vocab_size=int(cfg.vocab_size), context_length=int(cfg.max_position_embeddings),
                kind="hf", name=tcfg.pretrained or tcfg.name)
    return Tower(HFText(model, tcfg.pool), int(cfg.hidden_size), info)
