"""Vision and text towers from transformers (any AutoModel vision backbone, BERT-like text).

`pretrained` (a local dir or hub name) loads weights with `from_pretrained`; otherwise the tower is
randomly initialised from the config found at `name`. `kwargs` override config fields
(e.g. num_hidden_layers, hidden_size for tiny models). For a dual-encoder checkpoint (CLIP,
SigLIP) the matching sub-model is taken. Tanh "pooler" layers (BERT/ViT: trained for NSP or
classification, or untrained) are removed.

Vision towers are used by what they output, not by their family: one dry forward at build time (a
zero image at the tower's size) shows which features the model gives -- a pooled output (Swin,
ConvNeXt, ResNet's (B, C, 1, 1), DINOv2, SigLIP), a class token (CvT's `cls_token_value`, or the
first token of a model with a class-token parameter: ViT, DINOv2, CLIP) and its tokens (B, L, C) or
feature map (B, C, H, W) -- and the width of the feature `model.vision.pool` selects (config fields
are no guide: CvT has `embed_dim` lists, ConvNeXt/ResNet `hidden_sizes`, and `kwargs` can leave
derived fields such as Swin's `hidden_size` stale). `VISION_POOLS` lists the choices; a choice the
model cannot give is refused at build time, naming the ones it can.
Text features are the model's pooled output where it has one, else the first ([CLS]) token, or a
masked mean with `pool: mean`.
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


# model.vision.pool for hf towers: what each value takes (the config check lists the same values)
VISION_POOLS = {
    "": "auto: the model's pooled output, else its class token, else the mean of its tokens / feature map",
    "pooled": "the model's own pooled output (`pooler_output`, flattened)",
    "cls": "the class token (`cls_token_value`, or the first token where the model has a class-token parameter)",
    "mean": "the mean over its output tokens (B, L, C) or over the spatial positions of its map (B, C, H, W)",
}


def _has_class_token(model: nn.Module) -> bool:
    """A class-token parameter (ViT/DeiT/DINOv2 `cls_token`, CLIP `class_embedding`) puts it at token 0."""
    return any(n.split(".")[-1] in ("cls_token", "class_embedding") for n, _ in model.named_parameters())


def _vision_features(out: Any, mode: str) -> torch.Tensor:
    """(B, C) features of a vision model's output for a resolved pooling `mode` (see `_vision_modes`)."""
    if mode == "pooled":
        return out.pooler_output.flatten(1)
    if mode == "cls_value":
        return out.cls_token_value[:, 0]
    hidden = out.last_hidden_state
    if mode == "first":
        return hidden[:, 0]
    if mode == "mean_map":
        return hidden.mean(dim=(2, 3))
    return hidden.mean(dim=1)  # mean_tokens


def _vision_modes(out: Any, model: nn.Module) -> dict:
    """{pool value: resolved mode} for what this model's output offers; "" maps to the first available."""
    modes = {}
    pooled = getattr(out, "pooler_output", None)
    if torch.is_tensor(pooled) and pooled.dim() >= 2 and pooled[0].numel() == pooled.shape[1]:
        modes["pooled"] = "pooled"
    hidden = getattr(out, "last_hidden_state", None)
    if torch.is_tensor(getattr(out, "cls_token_value", None)):
        modes["cls"] = "cls_value"
    elif torch.is_tensor(hidden) and hidden.dim() == 3 and _has_class_token(model):
        modes["cls"] = "first"
    if torch.is_tensor(hidden) and hidden.dim() in (3, 4):
        modes["mean"] = "mean_tokens" if hidden.dim() == 3 else "mean_map"
    for choice in ("pooled", "cls", "mean"):
        if choice in modes:
            modes[""] = modes[choice]
            break
    return modes


def _probe_vision(model: nn.Module, size: int, pool: str, key: str) -> tuple:
    """One dry forward of a zero image at `size`: (resolved mode, feature width) for `pool`."""
    channels = int(getattr(model.config, "num_channels", 3) or 3)
    param = next(model.parameters(), None)
    x = torch.zeros(1, channels, size, size, dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(pixel_values=x)
    except Exception as e:  # noqa: BLE001 - any library error: say which model and input failed
        raise ConfigError(f"model.{key}: {type(model).__name__} failed on a dry forward of a (1, {channels}, "
                          f"{size}, {size}) image: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from e
    finally:
        model.train(was_training)
    modes = _vision_modes(out, model)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items() if torch.is_tensor(v))
    if not modes:
        raise ConfigError(f"model.{key}: {type(model).__name__} gives no pooled output, class token, tokens or "
                          f"feature map to take image features from (it outputs {shapes})")
    if pool not in modes:
        lacks = {"pooled": "pooled output", "cls": "class token", "mean": "tokens or feature map"}.get(pool, pool)
        valid = ", ".join(repr(k) if k == "" else k for k in VISION_POOLS if k in modes)
        raise ConfigError(f"bad value for 'model.{key}.pool': {pool!r}: {type(model).__name__} gives no {lacks} "
                          f"(it outputs {shapes}); valid for this tower: {valid}")
    return modes[pool], int(_vision_features(out, modes[pool]).shape[-1])


class HFVision(nn.Module):
    """transformers vision model -> (B, dim) features; `mode` is `pool` resolved for this model."""

    def __init__(self, model: nn.Module, pool: str, mode: str = ""):
        super().__init__()
        self.model, self.pool = model, pool
        self.mode = mode or ("first" if pool in ("", "cls") else "mean_tokens")
        self.cls_first = _has_class_token(model)  # its token sequence starts with the class token

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _vision_features(self.model(pixel_values=images), self.mode)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens for a fusion encoder, [CLS] first: a class-token model's sequence as it is
        (ViT, DINOv2, CLIP); otherwise its tokens (B, L, C) or feature map (B, C, H, W) flattened to
        (B, H*W, C), behind the feature `pool` selects (Swin's / ConvNeXt's pooled output, CvT's class
        token) as [CLS]."""
        out = self.model(pixel_values=images)
        hidden = out.last_hidden_state
        if hidden.dim() == 3 and self.cls_first:
            return hidden
        seq = hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden
        return torch.cat([_vision_features(out, self.mode).unsqueeze(1).to(seq.dtype), seq], dim=1)


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
    mode, dim = _probe_vision(model, info["size"], tcfg.pool, key)
    return Tower(HFVision(model, tcfg.pool, mode), dim, info)


def build_hf_text(tcfg: Any, key: str = "text") -> Tower:
    model = _load(tcfg, key, "text")
    cfg = model.config
    info = dict(vocab_size=int(cfg.vocab_size), context_length=int(cfg.max_position_embeddings),
                kind="hf", name=tcfg.pretrained or tcfg.name)
    return Tower(HFText(model, tcfg.pool), int(cfg.hidden_size), info)
