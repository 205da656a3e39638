"""Read the weights `model.init_from` names, whatever layout holds them, as tensors under vlp's names.

Layouts (told apart by `vlp.load.detect_format`, the same rule `vlp eval` uses):
- a vlp training run, its `checkpoints/` folder or one `step_XXXXXXX/` checkpoint: DeepSpeed's
  weights consolidated to fp32 by `vlp.checkpoint` (any ZeRO stage);
- a vlp export (`vlp_config.yaml` + `model*.safetensors`);
- an open_clip export (`open_clip_config.json` + `open_clip_model.safetensors`, as `vlp.export.openclip`
  writes it: timm trunks, open_clip ViTs, transformers or open_clip text towers);
- a transformers dual encoder (`config.json`: CLIPModel, VisionTextDualEncoderModel, ...).

The names are a vlp dual encoder's: `vision.<key>` as a vlp vision tower of kind `vision_kind` holds it,
`text.<key>` likewise for `text_kind`, `vision_proj.*` / `text_proj.*` for the linear maps into the joint
space (a dual encoder's `image_proj` included), and `fusion.image_in.*` from an ALBEF. An ALBEF's fusion
layers continue its BERT's layer list (`text.model.encoder.layer.N`), as they came from one BERT.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from vlp.checkpoint import CheckpointNotFound, checkpoint_config, consolidated_state_dict, find_checkpoint
from vlp.config import ConfigError
from vlp.export.transformer_ir import vit_from_hf, vit_from_open_clip
from vlp.load import detect_format, export_config

Tensor = torch.Tensor

LAYOUTS = ("a vlp training run or checkpoint directory (checkpoints/, vlp_state.json)",
           "a vlp export (vlp_config.yaml)",
           "an open_clip export (open_clip_config.json + open_clip_model.safetensors)",
           "a transformers dual encoder (config.json of a CLIPModel or VisionTextDualEncoderModel)")


@dataclass
class SourceWeights:
    path: str
    layout: str  # vlp-checkpoint | vlp-export | open_clip | hf
    tensors: Dict[str, Tensor]
    vision_kind: str = ""  # tower kind whose key names `vision.*` use: timm | hf | open_clip ("" none)
    text_kind: str = ""  # hf | open_clip ("" none)
    vision_ir: Optional[Callable[[], Any]] = None  # the vision tower as vlp.export.transformer_ir.ViT


def bad_path(path: str, why: str) -> ConfigError:
    return ConfigError(f"bad value for 'model.init_from': {path!r} {why}; it takes {'; '.join(LAYOUTS)}")


def read_source(path: str) -> SourceWeights:
    """The weights at `path` (a directory in one of LAYOUTS) under vlp's names."""
    if not os.path.isdir(path):
        raise bad_path(path, "is not a directory")
    try:
        layout = detect_format(path)
    except FileNotFoundError:
        raise bad_path(path, "holds none of these layouts") from None
    return _READERS[layout](os.path.abspath(path))


# --------------------------------------------------------------------------------------------- vlp
def _vlp_names(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A vlp DualEncoder's / ALBEF's state dict -> the names above (momentum copies and heads dropped)."""
    out, fusion = {}, {}
    for k, v in sd.items():
        if k.startswith(("vision.", "text.", "vision_proj.", "text_proj.", "fusion.image_in.")):
            out[k] = v
        elif k.startswith("image_proj."):
            out["vision_proj." + k[len("image_proj."):]] = v
        elif k.startswith("fusion.layer."):
            fusion[k[len("fusion.layer."):]] = v
    layer = re.compile(r"^text\.model\.encoder\.layer\.(\d+)\.")
    n_text = 1 + max((int(m.group(1)) for m in map(layer.match, out) if m), default=-1)
    for k, v in fusion.items():
        i, rest = k.split(".", 1)
        out[f"text.model.encoder.layer.{n_text + int(i)}.{rest}"] = v
    return out


def _read_checkpoint(path: str) -> SourceWeights:
    try:
        ckpt = find_checkpoint(path)
    except CheckpointNotFound as e:
        raise bad_path(path, f"looks like a vlp run but has no complete checkpoint ({e})") from None
    cfg = checkpoint_config(ckpt).model
    return SourceWeights(ckpt.path, "vlp-checkpoint", _vlp_names(consolidated_state_dict(ckpt.path)),
                         cfg.vision.kind, cfg.text.kind)


def _safetensors(path: str, stem: str) -> Dict[str, Tensor]:
    """`stem.safetensors`, or the shards listed in `stem.safetensors.index.json`."""
    from safetensors.torch import load_file

    single = os.path.join(path, f"{stem}.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = single + ".index.json"
    if not os.path.isfile(index):
        raise bad_path(path, f"has neither {stem}.safetensors nor {stem}.safetensors.index.json")
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    sd: Dict[str, Tensor] = {}
    for name in files:
        sd.update(load_file(os.path.join(path, name)))
    return sd


def _read_vlp_export(path: str) -> SourceWeights:
    cfg = export_config(path).model
    return SourceWeights(path, "vlp-export", _vlp_names(_safetensors(path, "model")), cfg.vision.kind,
                         cfg.text.kind)


# --------------------------------------------------------------------------------------- open_clip
def _read_open_clip(path: str) -> SourceWeights:
    with open(os.path.join(path, "open_clip_config.json")) as f:
        model_cfg = json.load(f)["model_cfg"]
    sd = _safetensors(path, "open_clip_model")
    vcfg, tcfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    sub = lambda prefix, new: {new + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
    out: Dict[str, Tensor] = {}
    ir = None
    if vcfg.get("timm_model_name"):  # open_clip's timm adapter: the trunk is the timm model
        vision_kind = "timm"
        out.update(sub("visual.trunk.", "vision."))
        out.update(sub("visual.head.proj.", "vision_proj."))
    else:  # open_clip's own VisionTransformer, with the image head folded into `proj`
        vision_kind = "open_clip"
        out.update(sub("visual.", "vision."))
        if "visual.proj" in sd:
            out["vision_proj.weight"] = sd["visual.proj"].t().contiguous()

        def ir():
            import open_clip.model as oc

            visual = oc._build_vision_tower(int(model_cfg["embed_dim"]), vcfg, bool(model_cfg.get("quick_gelu")))
            visual.load_state_dict(sub("visual.", ""), strict=True)
            return vit_from_open_clip(visual)
    if tcfg.get("hf_model_name"):  # open_clip's transformers adapter
        text_kind = "hf"
        out.update(sub("text.transformer.", "text.model."))
        out.update(sub("text.proj.", "text_proj."))
    else:
        text_kind = "open_clip"
        out.update(sub("text.", "text.model."))
    return SourceWeights(path, "open_clip", out, vision_kind, text_kind, ir)


# ------------------------------------------------------------------------------------ transformers
def _read_hf(path: str) -> SourceWeights:
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise bad_path(path, f"cannot be read by transformers' AutoModel ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    vision, text = getattr(model, "vision_model", None), getattr(model, "text_model", None)
    if vision is None or text is None:
        raise bad_path(path, f"holds a transformers {type(model).__name__}, not a dual encoder with vision_model and "
                             "text_model (load a single tower with model.vision.pretrained / model.text.pretrained)")
    out = {f"vision.model.{k}": v.detach() for k, v in vision.state_dict().items()}
    out.update({f"text.model.{k}": v.detach() for k, v in text.state_dict().items()})
    for ours, theirs in (("vision_proj", "visual_projection"), ("text_proj", "text_projection")):
        head = getattr(model, theirs, None)
        if isinstance(head, torch.nn.Linear):
            out.update({f"{ours}.{k}": v.detach() for k, v in head.state_dict().items()})

    def ir():
        return vit_from_hf(vision)

    return SourceWeights(path, "hf", out, "hf", "hf", ir)


_READERS = {"vlp-checkpoint": _read_checkpoint, "vlp-export": _read_vlp_export, "open_clip": _read_open_clip,
            "hf": _read_hf}

__all__ = ["SourceWeights", "read_source", "bad_path", "LAYOUTS"]
