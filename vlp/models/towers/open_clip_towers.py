"""Vision and text towers from open_clip.

With a `name` (built-in config, 'local-dir:DIR', 'hf-hub:org/repo', or one added with
`open_clip.add_model_config`) the whole model is made by `open_clip.create_model(name,
pretrained=...)` — `pretrained` is a tag or a weights file — and its tower is kept (one model
serves both towers when both name the same model and weights). With an empty
name the tower class is built directly from `kwargs` (`TextTransformer` / `VisionTransformer`),
which is how tiny test and demo towers are made. open_clip towers end in their own projection to
the model's `embed_dim`.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional, Tuple

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from open_clip.transformer import TextTransformer, VisionTransformer

from vlp.config import ConfigError
from vlp.models.towers.base import Tower, config_error, interpolation_name, kwargs_of, square_size


def _create(tcfg: Any, key: str, **extra: Any) -> nn.Module:
    try:
        return open_clip.create_model(tcfg.name, pretrained=tcfg.pretrained or None, **extra, **kwargs_of(tcfg))
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
        raise config_error(key, tcfg, e) from e


def _embed_dim(tcfg: Any) -> int:
    cfg = open_clip.get_model_config(tcfg.name) or {}
    return int(kwargs_of(tcfg).get("embed_dim", cfg.get("embed_dim", 0)))


def _direct(cls: type, tcfg: Any, key: str, **defaults: Any) -> nn.Module:
    kwargs = {**defaults, **kwargs_of(tcfg)}
    if tcfg.pretrained:
        raise ConfigError(f"model.{key}.pretrained needs model.{key}.name (an open_clip model name)")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise config_error(key, tcfg, e) from e


class OpenClipText(nn.Module):
    """open_clip text tower -> (B, embed_dim). The mask is unused: open_clip text towers are causal
    and pool by their `pool_type` (argmax = CLIP's EOT token); set `use_pad_mask`/`no_causal_mask`
    in kwargs for bidirectional towers that mask `pad_id`. Causal towers only accept full-length
    sequences (their mask is fixed), so shorter ones are right-padded, which the causal mask hides."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        short = self.model.context_length - ids.shape[1]
        if short > 0 and getattr(self.model, "attn_mask", None) is not None:
            ids = F.pad(ids, (0, short), value=getattr(self.model, "pad_id", 0))
        return self.model(ids)


def build_open_clip_vision(tcfg: Any, patch_dropout: float = 0.0, embed_dim: int = 512,
                           key: str = "vision", model: Optional[nn.Module] = None) -> Tower:
    """`model`: an already created open_clip model to take `.visual` from (see `build_open_clip_pair`)."""
    if tcfg.name:
        if model is None:
            model = _create(tcfg, key, force_patch_dropout=patch_dropout if patch_dropout > 0 else None)
        visual = model.visual
        dim = getattr(visual, "output_dim", None) or _embed_dim(tcfg)
        pp = dict(getattr(visual, "preprocess_cfg", None) or asdict(PreprocessCfg(size=visual.image_size)))
    else:
        visual = _direct(VisionTransformer, tcfg, key, output_dim=embed_dim, patch_dropout=patch_dropout,
                         mlp_ratio=4.0)
        dim = visual.output_dim
        pp = asdict(PreprocessCfg(size=visual.image_size))
    if tcfg.grad_checkpointing:
        visual.set_grad_checkpointing(True)
    info = dict(size=square_size(pp["size"]), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                interpolation=interpolation_name(pp.get("interpolation")))
    return Tower(visual, int(dim), info, projects=True)


def build_open_clip_text(tcfg: Any, embed_dim: int = 512, key: str = "text",
                         model: Optional[nn.Module] = None) -> Tower:
    """`model`: an already created open_clip model (force_custom_text=True) to take `.text` from."""
    if tcfg.name:
        text = (model if model is not None else _create(tcfg, key, force_custom_text=True)).text
        dim = getattr(text, "output_dim", None) or _embed_dim(tcfg)
    else:
        text = _direct(TextTransformer, tcfg, key, output_dim=embed_dim)
        dim = text.output_dim
    if tcfg.grad_checkpointing:
        text.set_grad_checkpointing(True)
    vocab = getattr(text, "vocab_size", None) or text.config.vocab_size
    context = getattr(text, "context_length", None) or text.config.max_position_embeddings
    info = dict(vocab_size=int(vocab), context_length=int(context), kind="open_clip", name=tcfg.name)
    return Tower(OpenClipText(text), int(dim), info, projects=True)


def build_open_clip_pair(vision_cfg: Any, text_cfg: Any, patch_dropout: float = 0.0) -> Tuple[Tower, Tower]:
    """Vision and text towers from one `open_clip.create_model` call (one weights load, not two)."""
    model = _create(vision_cfg, "vision", force_custom_text=True,
                    force_patch_dropout=patch_dropout if patch_dropout > 0 else None)
    return (build_open_clip_vision(vision_cfg, patch_dropout, model=model),
            build_open_clip_text(text_cfg, model=model))
