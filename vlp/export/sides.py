"""What each tower of a vlp dual encoder is, in terms the export layouts can map.

The DualEncoder holds `vision`/`text` tower modules and `image_proj`/`text_proj` heads
(`nn.Identity` when the tower already projects). These helpers unwrap the vlp tower wrappers and
read ViT/text transformers into the library-neutral form of `transformer_ir`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from vlp.models.video import temporal_parts_used
from vlp.export.transformer_ir import (TextTransformer, Unsupported, ViT, compose, text_from_open_clip,
                                       vit_from_open_clip, vit_from_timm)


def check_dual_encoder(model: nn.Module) -> None:
    for attr in ("vision", "text", "image_proj", "text_proj", "logit_scale"):
        if not hasattr(model, attr):
            raise Unsupported(f"{type(model).__name__} is not a dual encoder (no `{attr}`): only --format vlp "
                              "exports it")


def check_video_export(model: nn.Module, cfg: Any, layout: str) -> None:
    """HF and open_clip layouts hold image towers. A video model exports there only as its image path (the
    1-frame path, exactly the image ViT): at once when its temporal parts are unused (still at their init,
    or a frame-average tower, which has none), else only when asked (`export.image_only=true`)."""
    if not getattr(model, "video", False):
        return
    if temporal_parts_used(model.vision) and not cfg.export.image_only:
        raise Unsupported(f"this is a video model whose space-time tower's temporal attention has been trained: the "
                          f"{layout} layout holds an image tower only, so the video path cannot be exported there "
                          f"(use --format vlp, which vlp.load_pretrained reads back whole); to export the image path "
                          f"alone (the 1-frame path, which never uses the temporal parts) set export.image_only=true")


def hf_module(model: nn.Module, side: str) -> Optional[nn.Module]:
    """The transformers model inside a vlp `hf` tower wrapper (HFVision/HFText), else None."""
    tower = getattr(model, side)
    inner = getattr(tower, "model", None)
    from transformers import PreTrainedModel

    return inner if isinstance(inner, PreTrainedModel) else None


def open_clip_text_module(model: nn.Module) -> Optional[nn.Module]:
    """The open_clip text tower inside vlp's OpenClipText wrapper, else None."""
    inner = getattr(model.text, "model", None)
    if inner is None or type(inner).__module__.split(".")[0] != "open_clip":
        return None
    return inner


def vision_ir(model: nn.Module, vcfg: Any) -> ViT:
    """The vision tower (timm ViT, open_clip ViT, or open_clip's timm adapter around a ViT) with its
    projection into the joint space composed in."""
    v = model.vision
    if vcfg.kind == "timm":
        ir = vit_from_timm(v)
    elif vcfg.kind == "open_clip":
        if type(v).__name__ == "TimmModel":
            ir = vit_from_timm(v.trunk)
            extra = [n for n in v.head._modules if n not in ("drop", "proj")]
            if extra:
                raise Unsupported(f"open_clip timm adapter head has {extra} (attention pool / MLP projection)")
            ir.proj = compose(None, getattr(v.head, "proj", None), "open_clip timm adapter")
        else:
            ir = vit_from_open_clip(v)
    else:
        raise Unsupported(f"model.vision.kind={vcfg.kind} is not a ViT this layout reads")
    ir.proj = compose(ir.proj, model.image_proj, "image")
    return ir


def text_ir(model: nn.Module, tcfg: Any) -> TextTransformer:
    if tcfg.kind != "open_clip" or open_clip_text_module(model) is None:
        raise Unsupported(f"model.text.kind={tcfg.kind} is not an open_clip text transformer")
    ir = text_from_open_clip(open_clip_text_module(model))
    head = model.text_proj
    if not isinstance(head, nn.Identity):
        if ir.proj_b is not None and bool(ir.proj_b.abs().max() > 0):
            raise Unsupported("text projection with a bias followed by a linear head")
        ir.proj, ir.proj_b = compose(ir.proj, head, "text"), None
    return ir


__all__ = ["check_dual_encoder", "hf_module", "open_clip_text_module", "vision_ir", "text_ir"]
