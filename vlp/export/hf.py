"""`--format hf`: a standard transformers dual encoder, loadable with `AutoModel.from_pretrained(DIR)`.

`CLIPModel` when both towers are CLIP-shaped (pre-norm ViT with a LayerNorm before the blocks and
class-token pooling; causal text transformer pooled at end-of-text): transformers CLIP towers, open_clip
ViTs and text transformers, timm ViTs built CLIP-style (`pre_norm=True`). Otherwise
`VisionTextDualEncoderModel` when each tower has a transformers equivalent whose pooled output is
what vlp pools: transformers towers (pooled output kept), CLIP-shaped ViTs/text transformers, and
timm ViTs without a pre-norm as `Dinov2Model` (same blocks; pooled output = normed class token).
Beside the weights: a `CLIPImageProcessor` with the run's size/mean/std and the tokenizer.

SigLIP models (`model.type: siglip`, with a learned logit bias) export only as `SiglipModel` (vlp.export.siglip_hf:
SigLIP-style towers, logit scale and bias kept); CLIPModel and VisionTextDualEncoderModel have no logit bias, so a
SigLIP model whose towers SiglipModel cannot hold is refused with the reason (`--format open_clip`/`vlp` keep it).
ALIGN models are not mapped to transformers' `AlignModel` (see vlp.export.siglip_hf for why); they export as
CLIPModel / VisionTextDualEncoderModel like CLIP models where their towers allow (ViTs, not EfficientNets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from vlp.export.sides import check_dual_encoder, check_video_export, hf_module, text_ir, vision_ir
from vlp.export.tokenizer_files import hf_tokenizer
from vlp.export.transformer_ir import Unsupported, compose, text_to_hf_clip, vit_to_dinov2, vit_to_hf_clip
from vlp.export.weights import DTYPES

Tensor = torch.Tensor


@dataclass
class Part:
    """One tower as the transformers model `AutoModel.from_config(config)` builds."""

    config: Any
    sd: Dict[str, Tensor]  # keys below the dual encoder's `vision_model.` / `text_model.`
    proj: Tensor  # (embed_dim, hidden): the projection head into the joint space
    clip: bool  # a CLIP vision/text transformer: CLIPModel can hold it


def _head_matrix(proj: Optional[Tensor], width: int) -> Tensor:
    return proj if proj is not None else torch.eye(width)


def _hf_tower_part(model: nn.Module, side: str, tcfg: Any, head: nn.Module) -> Part:
    from transformers import CLIPTextModel, CLIPVisionModel

    inner = hf_module(model, side)
    if tcfg.pool:
        raise Unsupported(f"model.{side}.pool={tcfg.pool!r}: transformers dual encoders use the tower's own "
                          "pooled output (pool '')")
    if hasattr(inner, "pooler") and inner.pooler is None:
        raise Unsupported(f"the {side} tower ({type(inner).__name__}) pools its first token without the tanh "
                          "pooler layer, which transformers' dual encoder would apply")
    proj = compose(None, head, side)
    clip = isinstance(inner, (CLIPVisionModel, CLIPTextModel))
    sub = f"{side}_model." if clip else None  # transformers 4 nests CLIP towers one level deeper
    sd = {(k[len(sub):] if sub and k.startswith(sub) else k): v.detach() for k, v in inner.state_dict().items()}
    return Part(inner.config, sd, _head_matrix(proj, int(inner.config.hidden_size)), clip)


def vision_part(model: nn.Module, vcfg: Any) -> Part:
    from transformers import CLIPVisionConfig, Dinov2Config

    if vcfg.kind == "hf":
        return _hf_tower_part(model, "vision", vcfg, model.image_proj)
    ir = vision_ir(model, vcfg)
    proj = _head_matrix(ir.proj, ir.enc.width)
    if ir.pre_ln is not None:
        cfg, sd = vit_to_hf_clip(ir, prefix="")
        return Part(CLIPVisionConfig(**cfg), sd, proj, True)
    cfg, sd = vit_to_dinov2(ir, prefix="")
    return Part(Dinov2Config(**cfg), sd, proj, False)


def text_part(model: nn.Module, tcfg: Any, eot_id: Optional[int]) -> Part:
    from transformers import CLIPTextConfig

    if tcfg.kind == "hf":
        return _hf_tower_part(model, "text", tcfg, model.text_proj)
    ir = text_ir(model, tcfg)
    if eot_id is None:
        raise Unsupported("transformers' CLIP text model pools at the first end-of-text id, which matches "
                          "open_clip's pooling with open_clip's CLIP BPE tokenizer only "
                          "(data.tokenizer.kind=open_clip)")
    cfg, sd = text_to_hf_clip(ir, eot_id, prefix="")
    return Part(CLIPTextConfig(**cfg), sd, _head_matrix(ir.proj, ir.enc.width), True)


def _no_init():
    """transformers' switch that skips random init (minutes for large towers); a no-op where absent."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # other transformers versions
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def is_siglip(model: nn.Module) -> bool:
    return getattr(model, "logit_bias", None) is not None


def hf_model(model: nn.Module, cfg: Any, eot_id: Optional[int]) -> nn.Module:
    """The transformers model (CLIPModel or VisionTextDualEncoderModel; SiglipModel for SigLIP) holding
    `model`'s weights, fp32."""
    from transformers import CLIPConfig, CLIPModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    check_dual_encoder(model)
    check_video_export(model, cfg, 'hf')
    if is_siglip(model):
        from vlp.export.siglip_hf import hf_siglip

        return hf_siglip(model, cfg)[0]
    reasons = []
    try:
        v = vision_part(model, cfg.model.vision)
    except Unsupported as e:
        reasons.append(f"vision tower: {e}")
    try:
        t = text_part(model, cfg.model.text, eot_id)
    except Unsupported as e:
        reasons.append(f"text tower: {e}")
    if reasons:
        raise Unsupported("; ".join(reasons))
    embed = int(cfg.model.embed_dim)
    scale = model.logit_scale.detach().reshape(())
    with _no_init():  # every persistent tensor is overwritten below
        if v.clip and t.clip:
            config = CLIPConfig(vision_config=v.config.to_dict(), text_config=t.config.to_dict(),
                                projection_dim=embed, logit_scale_init_value=float(scale))
            out = CLIPModel(config)
        else:
            config = VisionTextDualEncoderConfig.from_vision_text_configs(v.config, t.config, projection_dim=embed,
                                                                          logit_scale_init_value=float(scale))
            out = VisionTextDualEncoderModel(config)
    sd = {**{"vision_model." + k: x for k, x in v.sd.items()}, **{"text_model." + k: x for k, x in t.sd.items()}}
    sd.update({"visual_projection.weight": v.proj, "text_projection.weight": t.proj, "logit_scale": scale})
    own = out.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("position_ids")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise RuntimeError(f"internal mapping error to {type(out).__name__}: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}")
    out.load_state_dict(sd, strict=False)
    return out.eval()


def image_processor(image_cfg: Dict[str, Any]):
    """`CLIPImageProcessor`: resize the shorter side to `size`, center crop, rescale, normalise."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX}[image_cfg["interpolation"]]
    size = int(image_cfg["size"])
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=resample, do_center_crop=True,
                              crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=list(image_cfg["mean"]), image_std=list(image_cfg["std"]),
                              do_convert_rgb=True)


def write_hf(model: nn.Module, cfg: Any, image_cfg: Dict[str, Any], out_dir: str, dtype: str,
             max_shard_size: str) -> Dict[str, Any]:
    """config.json + model.safetensors (sharded above max_shard_size) + preprocessor + tokenizer files."""
    if is_siglip(model):
        from vlp.export.siglip_hf import write_siglip

        return write_siglip(model, cfg, image_cfg, out_dir, dtype, max_shard_size)
    tok = hf_tokenizer(cfg.data.tokenizer)
    eot = tok.eos_token_id if cfg.data.tokenizer.kind == "open_clip" else None
    out = hf_model(model, cfg, eot)
    if dtype != "fp32":
        out = out.to(DTYPES[dtype])
    out.save_pretrained(out_dir, max_shard_size=max_shard_size)
    image_processor(image_cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    notes = [f"transformers `{type(out).__name__}` with a `{type(out.vision_model).__name__}` vision tower and a "
             f"`{type(out.text_model).__name__}` text tower holding the trained weights (the same computation)."]
    return {"architecture": type(out).__name__, "model_type": out.config.model_type, "notes": notes}


__all__ = ["hf_model", "write_hf", "image_processor", "vision_part", "text_part", "is_siglip"]
