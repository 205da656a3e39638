"""`--format open_clip`: `open_clip_config.json` + `open_clip_model.safetensors` for
`open_clip.create_model_and_transforms("local-dir:DIR")` (or `hf-hub:ORG/NAME` once pushed).

The model is always open_clip's `CustomTextCLIP` (`custom_text: true`, towers under `visual.`/`text.`).
Vision: open_clip towers keep their config (a built-in name's, or the constructor kwargs); timm towers
become `timm_model_name` (random init, our linear head as `timm_proj`), or, when kwargs reshape the
timm model (which open_clip's adapter cannot pass on), a timm ViT is rewritten as open_clip's own
VisionTransformer. Text: open_clip text transformers keep their config; transformers text towers
become `hf_model_name` (config and tokenizer saved in the export). Heads after a tower's own
projection are folded into it; `logit_scale` is stored 0-dim as open_clip expects.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from vlp.export.sides import check_dual_encoder, check_video_export, hf_module, open_clip_text_module, vision_ir
from vlp.export.tokenizer_files import write_open_clip_tokenizer
from vlp.export.transformer_ir import Unsupported, compose, vit_to_open_clip
from vlp.export.weights import ONE_FILE, cast, save_state_dict
from vlp.models.towers.base import kwargs_of

log = logging.getLogger(__name__)
Tensor = torch.Tensor

# timm kwargs that change training only (dropouts), not the eval-mode function open_clip rebuilds
_TIMM_TRAIN_ONLY = {"drop_rate", "drop_path_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                    "pos_drop_rate"}
_HF_TEXT_DIR = "hf_text_config"


def _cfg_fields(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def _named_cfg(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    import open_clip

    base = open_clip.get_model_config(name)
    if base is None:
        raise Unsupported(f"open_clip model name {name!r} has no config this open_clip can list "
                          "(hf-hub:/local-dir: names are not re-exported)")
    cfg = copy.deepcopy(base)
    cfg.update(copy.deepcopy(kwargs))  # create_model's **kwargs override the config's top level
    return cfg


def _sub(sd: Dict[str, Tensor], prefix: str, new: str) -> Dict[str, Tensor]:
    return {new + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------- vision
def _fold_vision_head(sd: Dict[str, Tensor], visual: nn.Module, head: nn.Module) -> None:
    """Compose our image head into the tower's last linear map (`visual.proj` or the timm adapter's)."""
    if isinstance(head, nn.Identity):
        return
    if "visual.proj" in sd and isinstance(getattr(visual, "proj", None), torch.Tensor):
        sd["visual.proj"] = compose(sd["visual.proj"].t(), head, "image").t().contiguous()
    elif "visual.head.proj.weight" in sd and "visual.head.proj.bias" not in sd:
        sd["visual.head.proj.weight"] = compose(sd["visual.head.proj.weight"], head, "image")
    else:
        raise Unsupported("the open_clip vision tower's output does not end in a bias-free linear map to fold "
                          "the image head into")


def _vision(model: nn.Module, vcfg: Any, sd: Dict[str, Tensor], size: int) -> Tuple[Dict, Dict, Any]:
    """(vision_cfg, weights under `visual.`, quick_gelu or None when the tower ignores the switch)."""
    kw = kwargs_of(vcfg)
    if vcfg.kind == "open_clip":
        if vcfg.name:
            full = _named_cfg(vcfg.name, kw)
            vision_cfg, quick = full["vision_cfg"], bool(full.get("quick_gelu", False))
        else:
            from open_clip.model import CLIPVisionCfg

            fields = _cfg_fields(CLIPVisionCfg)
            vision_cfg, quick = {}, False
            for k, v in kw.items():
                if k == "heads":
                    vision_cfg["head_width"] = int(kw["width"]) // int(v)
                elif k in ("output_dim", "patch_dropout"):
                    continue
                elif k in fields:
                    vision_cfg[k] = v
                else:
                    raise Unsupported(f"model.vision.kwargs.{k} has no open_clip vision_cfg field")
        out = _sub(sd, "vision.", "visual.")
        _fold_vision_head(out, model.vision, model.image_proj)
        return vision_cfg, out, quick
    if vcfg.kind == "timm":
        if vcfg.get("evit", {}).get("keep_rate", 1.0) != 1.0 or vcfg.get("frozen_llm", {}).get("name"):
            raise Unsupported("model.vision.evit / frozen_llm: open_clip's ViT has no EViT token reorganization "
                              "nor frozen LLM block; export with --format vlp")
        shaping = [f"kwargs.{k}" for k in sorted(set(kw) - _TIMM_TRAIN_ONLY)]
        if not shaping:
            vision_cfg = {"timm_model_name": vcfg.name, "timm_model_pretrained": False, "timm_pool": "",
                          "timm_proj": "linear", "timm_proj_bias": False, "image_size": size}
            out = _sub(sd, "vision.", "visual.trunk.")
            head = model.image_proj
            if not isinstance(head, nn.Linear) or head.bias is not None:
                raise Unsupported("the image head is not a bias-free linear map")
            out["visual.head.proj.weight"] = head.weight.detach()
            return vision_cfg, out, None  # open_clip's timm adapter ignores quick_gelu
        try:
            ir = vision_ir(model, vcfg)
        except Unsupported as e:
            raise Unsupported(f"open_clip's timm adapter builds timm models by name only (not with model.vision."
                              f"{', model.vision.'.join(shaping)}), and this timm model is not a ViT open_clip's "
                              f"VisionTransformer can express ({e})") from None
        vision_cfg, out = vit_to_open_clip(ir, prefix="visual.")
        return vision_cfg, out, ir.enc.act == "quick_gelu"
    raise Unsupported(f"model.vision.kind={vcfg.kind}: open_clip has no transformers vision towers")


# --------------------------------------------------------------------------------------------- text
def _fold_text_head(sd: Dict[str, Tensor], head: nn.Module) -> None:
    if isinstance(head, nn.Identity):
        return
    if "text.text_projection" in sd:
        sd["text.text_projection"] = compose(sd["text.text_projection"].t(), head, "text").t().contiguous()
    elif "text.text_projection.weight" in sd:
        w = sd["text.text_projection.weight"]
        b = sd.get("text.text_projection.bias")
        sd["text.text_projection.weight"] = compose(w, head, "text")
        if b is not None:
            sd["text.text_projection.bias"] = head.weight.detach() @ b
    else:
        raise Unsupported("the open_clip text tower has no projection to fold the text head into")


def _hf_text(model: nn.Module, tcfg: Any, sd: Dict[str, Tensor], out_dir: str, final_dir: str,
             tok_len: int) -> Tuple[Dict, Dict]:
    inner = hf_module(model, "text")
    pool = tcfg.pool
    removed_pooler = hasattr(inner, "pooler") and inner.pooler is None
    if pool == "mean":
        pooler = "mean_pooler"
    elif pool == "cls" or (pool == "" and (removed_pooler or not hasattr(inner, "pooler"))):
        pooler = "cls_last_hidden_state_pooler"
    else:
        raise Unsupported(f"model.text.pool={pool!r} with {type(inner).__name__}'s own pooled output: open_clip's "
                          "HF text adapter pools by mean, cls token or a tanh pooler")
    head = model.text_proj
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise Unsupported("the text head is not a bias-free linear map")
    name = tcfg.pretrained or tcfg.name
    if os.path.isdir(name) or kwargs_of(tcfg):
        # open_clip builds the tower from AutoConfig.from_pretrained(hf_model_name): save the exact config
        inner.config.save_pretrained(os.path.join(out_dir, _HF_TEXT_DIR))
        name = os.path.join(out_dir, _HF_TEXT_DIR)  # the exporter retargets it when the directory moves
        log.warning("open_clip export: text_cfg.hf_model_name is the absolute path %s (the text tower's config "
                    "is a local directory or has kwargs); the export loads only where that path exists. "
                    "--format hf or vlp are self-contained.", os.path.join(final_dir, _HF_TEXT_DIR))
    text_cfg = {"hf_model_name": name, "hf_model_pretrained": False, "hf_proj_type": "linear",
                "hf_pooler_type": pooler, "context_length": int(tok_len),
                "vocab_size": int(model.text_cfg["vocab_size"])}
    out = _sub(sd, "text.model.", "text.transformer.")
    out["text.proj.weight"] = head.weight.detach()
    return text_cfg, out


def _text(model: nn.Module, tcfg: Any, sd: Dict[str, Tensor], out_dir: str, final_dir: str,
          tok_len: int) -> Tuple[Dict, Dict, Any]:
    """(text_cfg, weights under `text.`, quick_gelu or None when the tower ignores the switch).

    open_clip's tokenizer pads to the text tower's context length; a run that padded shorter is
    reproduced only by towers whose output ignores trailing padding (causal, pooled at end-of-text)."""
    kw = kwargs_of(tcfg)
    if tcfg.kind == "hf":
        return (*_hf_text(model, tcfg, sd, out_dir, final_dir, tok_len), None)
    inner = open_clip_text_module(model)
    if inner is None:
        raise Unsupported(f"model.text.kind={tcfg.kind} tower is not an open_clip text model")
    tower_len = int(getattr(inner, "context_length", tok_len))
    if tower_len != tok_len and not (getattr(inner, "attn_mask", None) is not None
                                     and getattr(inner, "pool_type", "") in ("argmax", "eos")):
        raise Unsupported(f"data.tokenizer.context_length={tok_len} differs from the text tower's {tower_len} "
                          "positions, and this tower's output depends on the padding length")
    if tcfg.name:
        full = _named_cfg(tcfg.name, kw)
        text_cfg, quick = full["text_cfg"], bool(full.get("quick_gelu", False))
    else:
        from open_clip.model import CLIPTextCfg

        fields = _cfg_fields(CLIPTextCfg)
        text_cfg, quick = {}, False
        for k, v in kw.items():
            if k == "output_dim":
                continue
            if k not in fields:
                raise Unsupported(f"model.text.kwargs.{k} has no open_clip text_cfg field")
            text_cfg[k] = v
    out = _sub(sd, "text.model.", "text.")
    _fold_text_head(out, model.text_proj)
    return text_cfg, out, quick


# ------------------------------------------------------------------------------------------- layout
def open_clip_layout(model: nn.Module, cfg: Any, image_cfg: Dict[str, Any], out_dir: str,
                     final_dir: str) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """(open_clip_config.json content, state dict) for a dual encoder; `final_dir` is where the
    export will live (only used when a config must be referenced by absolute path)."""
    check_dual_encoder(model)
    check_video_export(model, cfg, 'open_clip')
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    reasons, vision_cfg, text_cfg, weights = [], {}, {}, {}
    vq = tq = None
    try:
        vision_cfg, vw, vq = _vision(model, cfg.model.vision, sd, int(image_cfg["size"]))
        weights.update(vw)
    except Unsupported as e:
        reasons.append(f"vision tower: {e}")
    try:
        text_cfg, tw, tq = _text(model, cfg.model.text, sd, out_dir, final_dir,
                                 int(cfg.data.tokenizer.context_length))
        weights.update(tw)
    except Unsupported as e:
        reasons.append(f"text tower: {e}")
    if reasons:
        raise Unsupported("; ".join(reasons))
    if vq is not None and tq is not None and vq != tq:
        raise Unsupported("open_clip's quick_gelu switch is shared by both towers; one tower uses QuickGELU, "
                          "the other GELU")
    quick = bool(vq if vq is not None else tq)
    model_cfg: Dict[str, Any] = {"embed_dim": int(cfg.model.embed_dim), "quick_gelu": quick, "custom_text": True,
                                 "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    weights["logit_scale"] = model.logit_scale.detach().reshape(())
    if getattr(model, "logit_bias", None) is not None:
        weights["logit_bias"] = model.logit_bias.detach().reshape(())
        model_cfg["init_logit_bias"] = float(weights["logit_bias"])
    interp = image_cfg["interpolation"]
    if interp not in ("bicubic", "bilinear"):
        log.warning("open_clip preprocessing has bicubic/bilinear only; the run used %s, exported as bilinear",
                    interp)
        interp = "bilinear"
    preprocess_cfg = {"size": int(image_cfg["size"]), "mean": [float(x) for x in image_cfg["mean"]],
                      "std": [float(x) for x in image_cfg["std"]], "interpolation": interp,
                      "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, weights


def instantiate(config: Dict[str, Any], weights: Dict[str, Tensor]) -> nn.Module:
    """open_clip's CustomTextCLIP for the layout, loaded strictly: checks names and shapes before writing."""
    from open_clip.model import CustomTextCLIP

    mc = copy.deepcopy(config["model_cfg"])
    mc.pop("custom_text", None)
    out = CustomTextCLIP(**mc)
    out.load_state_dict(weights, strict=True)
    return out.eval()


def write_open_clip(model: nn.Module, cfg: Any, image_cfg: Dict[str, Any], out_dir: str, final_dir: str,
                    dtype: str, hub_repo: Optional[str] = None) -> Dict[str, Any]:
    import json

    config, weights = open_clip_layout(model, cfg, image_cfg, out_dir, final_dir)
    config["model_cfg"]["text_cfg"].update(write_open_clip_tokenizer(cfg.data.tokenizer, out_dir, hub_repo))
    instantiate(config, weights)
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_state_dict(cast(weights, dtype), out_dir, stem="open_clip_model", max_shard_size=ONE_FILE)
    return {"architecture": "open_clip CustomTextCLIP", "model_cfg": config["model_cfg"]}


__all__ = ["open_clip_layout", "write_open_clip", "instantiate"]
