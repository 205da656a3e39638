"""Eval image preprocessing from an `image_cfg`: resize, center crop, normalise (the CLIP protocol).

Uses torchvision on PIL images, the same operations open_clip's eval transform applies, so numbers
match tools built on open_clip (CLIP_benchmark). `resize_mode` "shortest" (default) resizes the
shorter side then crops; "squash" resizes both sides to the target without keeping aspect ratio.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from torchvision import transforms as T

_INTERP = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
           "bicubic": T.InterpolationMode.BICUBIC, "area": T.InterpolationMode.BOX,
           "box": T.InterpolationMode.BOX, "lanczos": T.InterpolationMode.LANCZOS}


def eval_transform(image_cfg: Dict[str, Any]) -> Callable:
    """PIL RGB image -> normalised float tensor (3, size, size)."""
    size = int(image_cfg["size"] if not isinstance(image_cfg["size"], (list, tuple)) else image_cfg["size"][-1])
    interp = str(image_cfg.get("interpolation", "bicubic")).lower()
    if interp not in _INTERP:
        raise ValueError(f"image_cfg interpolation {interp!r} unknown; valid: {', '.join(_INTERP)}")
    mode = image_cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        resize = [T.Resize(size, interpolation=_INTERP[interp]), T.CenterCrop(size)]
    elif mode == "squash":
        resize = [T.Resize((size, size), interpolation=_INTERP[interp])]
    else:
        raise ValueError(f"image_cfg resize_mode {mode!r} unsupported; valid: shortest, squash")
    return T.Compose(resize + [T.ToTensor(), T.Normalize(list(image_cfg["mean"]), list(image_cfg["std"]))])
