"""What every tower builder returns, and the small helpers they share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from vlp.config import ConfigError

# Used where a tower states no preprocessing of its own (timm's IMAGENET_DEFAULT_*).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


@dataclass
class Tower:
    """A built tower: `module` maps images (B,3,H,W) or (ids, mask) to (B, dim) features.

    `info` is the image_cfg (vision) or text_cfg (text) the data pipeline and trainer read.
    `projects` says the features are already in the joint space (open_clip towers): no head needed.
    """

    module: nn.Module
    dim: int
    info: Dict[str, Any] = field(default_factory=dict)
    projects: bool = False


def kwargs_of(tcfg: Any) -> Dict[str, Any]:
    """The tower's `kwargs` as a plain dict (YAML lists stay lists)."""
    kw = tcfg.kwargs
    if isinstance(kw, DictConfig):
        return OmegaConf.to_container(kw, resolve=True)  # type: ignore[return-value]
    return dict(kw or {})


def interpolation_name(value: Any, default: str = "bicubic") -> str:
    """Map a library's interpolation (str or PIL enum int) onto the data pipeline's choices."""
    pil = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "area", 5: "bilinear"}
    if isinstance(value, int):
        return pil.get(value, default)
    name = str(getattr(value, "value", value) or "").lower()
    if name in INTERPOLATIONS:
        return name
    return {"lanczos": "bicubic", "box": "area", "hamming": "bilinear", "random": default}.get(name, default)


def square_size(size: Any) -> int:
    """An int side from an int, an (H, W) pair or a (C, H, W) triple; non-square takes H."""
    if isinstance(size, (tuple, list)):
        return int(size[-2] if len(size) >= 2 else size[0])
    return int(size)


def config_error(key: str, tcfg: Any, err: Exception) -> ConfigError:
    """Wrap a library's construction error with the config keys that caused it."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(
        f"model.{key}: cannot build {tcfg.kind} tower name={tcfg.name!r} pretrained={tcfg.pretrained!r} "
        f"kwargs={kwargs_of(tcfg)}: {type(err).__name__}: {msg}")
