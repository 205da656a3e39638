"""Optimizer parameter groups: weight decay on weight matrices/kernels only."""
from __future__ import annotations

from typing import Any, Dict, List, Set

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

_NORMS = (nn.LayerNorm, _BatchNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)
# learned position/class tokens and temperature scalars under the names timm, open_clip and transformers use
_NO_DECAY_NAMES = ("pos_embed", "positional_embedding", "position_embedding", "position_embeddings", "cls_token",
                   "class_embedding", "cls_emb", "reg_token", "dist_token", "mask_token", "logit_scale",
                   "logit_bias", "temperature")


def _no_decay_names(model: nn.Module) -> Set[str]:
    names: Set[str] = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag) + _NORMS) or "Norm" in type(mod).__name__:
            names.update(prefix + n for n, _ in mod.named_parameters(recurse=False))
        declared = getattr(mod, "no_weight_decay", None)  # timm / open_clip modules declare their own
        if callable(declared):
            try:
                names.update(prefix + n for n in declared())
            except TypeError:
                pass
    return names


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """[decay group, no-decay group] over trainable parameters; empty groups are left out.

    No decay for: biases and every other parameter with fewer than 2 dims (norm weights, [1]-shaped
    logit_scale/bias), all norm layers (LayerNorm/BatchNorm/GroupNorm/RMSNorm...), embedding tables,
    and position/class/register tokens.
    """
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or name in skip or any(key in leaf for key in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
