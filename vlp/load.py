"""Load a model from any directory vlp reads: one loader for `vlp eval`, export verification,
`model.init_from` and `vlp.load_pretrained`.

`detect_format` tells the layouts apart by the files a directory holds:
- a training run (`RUN/checkpoints/`), its `checkpoints/` folder, or one `step_XXXXXXX/` checkpoint
  (`vlp-checkpoint`): the stored config rebuilds the model and DeepSpeed's `zero_to_fp32` consolidates
  the weights of any ZeRO stage into fp32 (`vlp.checkpoint`);
- a vlp export (`vlp_config.yaml`, `vlp-export`): the stored config and `model*.safetensors`; also a Hub
  repo id, through `snapshot_download` (`load_pretrained`);
- an open_clip export (`open_clip_config.json`): `open_clip.create_model_and_transforms("local-dir:DIR")`;
- a transformers export (`config.json`, `hf`): `AutoModel`, a dual encoder with `get_image_features`
  and `get_text_features` (CLIPModel, SiglipModel, VisionTextDualEncoderModel, ...).

`load_model` returns the same interface for each (`Loaded`): a model with `encode_image`,
`encode_text(ids, mask)` giving L2-normalised embeddings (and `match_scores` when it has an ITM head),
the tokenizer (`vlp.data.tokenizers`: `tok(list[str]) -> (ids, mask)`), the `image_cfg`, and
`preprocess` (PIL image -> tensor) exactly as the format defines it. Everything loads on CPU in fp32.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from vlp.checkpoint import CHECKPOINTS, LATEST, STATE_FILE, checkpoint_config, consolidated_state_dict, find_checkpoint
from vlp.config import from_dict
from vlp.data.tokenizers import HFTokenizer, OpenClipTokenizer, build_tokenizer
from vlp.data.transforms import eval_transform, resolve_image_cfg
from vlp.models import build_model

VLP_CONFIG_FILE, VLP_META_FILE = "vlp_config.yaml", "vlp_export.json"
_PATH_KEYS = ("model.vision.name", "model.text.name", "data.tokenizer.name")
log = logging.getLogger(__name__)


class Loaded(NamedTuple):
    model: Any  # model-like: encode_image, encode_text(ids, mask)[, match_scores]
    tokenizer: Callable[[List[str]], Tuple[torch.Tensor, torch.Tensor]]
    image_cfg: Dict[str, Any]
    preprocess: Callable  # PIL RGB image -> float tensor (3, H, W)
    info: Dict[str, Any]  # format, path, and the resolved config for vlp models


# ------------------------------------------------------------------------------- vlp checkpoints
def load_trained_model(ckpt, cfg) -> nn.Module:
    """The run's model built from its config (no pretrained download), with the checkpoint's consolidated
    weights, in eval mode on CPU."""
    model = build_model(cfg.model, pretrained=False)
    sd = consolidated_state_dict(ckpt.path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt.path}: the weights do not fit the model built from its config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


def _load_run(path: str) -> Loaded:
    ckpt = find_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    model = load_trained_model(ckpt, cfg)
    image_cfg = resolve_image_cfg(model.image_cfg, cfg.data)
    info = {"format": "vlp-checkpoint", "path": ckpt.path, "step": ckpt.step, "config": cfg}
    return Loaded(model, build_tokenizer(cfg.data.tokenizer), image_cfg, eval_transform(image_cfg), info)


# ------------------------------------------------------------------------------------ vlp export
def resolve(name_or_path: str, revision: Optional[str] = None) -> str:
    """A local export directory as is; otherwise a Hub repo id fetched with `snapshot_download`
    (honours HF_HUB_OFFLINE and the cache)."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, VLP_CONFIG_FILE)):
            raise FileNotFoundError(f"{name_or_path}: no {VLP_CONFIG_FILE}; not a `vlp export --format vlp` directory")
        return name_or_path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such export directory (and not a Hub repo id ORG/NAME)")
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, revision=revision)


def _literal(node: Any, key: str, found: List[str]) -> Any:
    """`node` with every `${...}` in its strings escaped, so OmegaConf keeps it as text, never resolves it."""
    if isinstance(node, dict):
        return {k: _literal(v, f"{key}.{k}" if key else str(k), found) for k, v in node.items()}
    if isinstance(node, list):
        return [_literal(v, f"{key}[{i}]", found) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        found.append(key)
        return node.replace("${", "\\${")
    return node


def export_config(path: str):
    """A vlp export's stored config with paths relative to the export made absolute. Read as data: an
    export (perhaps downloaded) stores resolved values, so a `${...}` in it stays literal text, never
    resolved (an `${oc.env:VAR}` would read this machine's environment)."""
    found: List[str] = []
    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(path, VLP_CONFIG_FILE)), resolve=False)
    data = OmegaConf.create(_literal(raw, "", found))
    if found:
        log.warning("%s: %s hold %s text, kept as written (not resolved)", os.path.join(path, VLP_CONFIG_FILE),
                    ", ".join(found), "${...}")
    for key in _PATH_KEYS:
        value = OmegaConf.select(data, key)
        if not value:
            continue
        prefix = "local-dir:" if str(value).startswith("local-dir:") else ""
        rel = str(value)[len(prefix):]
        if not os.path.isabs(rel) and os.path.exists(os.path.join(path, rel)):
            OmegaConf.update(data, key, prefix + os.path.abspath(os.path.join(path, rel)))
    return from_dict(OmegaConf.to_container(data, resolve=False))


def _architecture_only(model_cfg: Any):
    """`model_cfg` with nothing that loads weights: the export's safetensors hold them all. No
    `init_from`; no tower `pretrained` (a transformers tower keeps it as its config source, `name`; an
    open_clip tag is dropped too, its preprocessing being stored in the export); open_clip towers with
    a transformers text model (`hf_model_name`) don't fetch its weights (`pretrained_hf=False`)."""
    cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=False))
    cfg.init_from = ""
    for side in ("vision", "text"):
        t = cfg[side]
        if t.kind == "hf" and t.pretrained and not t.name:
            t.name = t.pretrained
        t.pretrained = ""
        if t.kind == "open_clip" and t.name and not str(t.name).startswith(("hf-hub:", "local-dir:")):
            t.kwargs = dict(t.kwargs or {}, pretrained_hf=False)
    return cfg


def load_tokenizer(name_or_path: str, revision: Optional[str] = None):
    """The caption tokenizer stored with a vlp export: `tok(list[str]) -> (ids, mask)`."""
    return build_tokenizer(export_config(resolve(name_or_path, revision)).data.tokenizer)


def load_pretrained(name_or_path: str, revision: Optional[str] = None) -> Any:
    """A `vlp export --format vlp` directory or Hub repo: the model in eval mode on CPU, with `.tokenizer`,
    `.image_cfg` and `.vlp_config`.

        model = vlp.load_pretrained("runs/demo/export/vlp")        # or "org/name" on the Hub
        ids, mask = model.tokenizer(["a photo of a cat"])
        text_emb = model.encode_text(ids, mask)
    """
    from huggingface_hub import load_torch_model

    path = resolve(name_or_path, revision)
    cfg = export_config(path)
    model = build_model(_architecture_only(cfg.model), pretrained=False)
    load_torch_model(model, path, strict=True, filename_pattern="model{suffix}.safetensors")
    model.float().eval()
    meta_path = os.path.join(path, VLP_META_FILE)
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    image_cfg = meta.get("image_cfg") or resolve_image_cfg(model.image_cfg, cfg.data)
    image_cfg = dict(image_cfg, mean=tuple(image_cfg["mean"]), std=tuple(image_cfg["std"]))
    model.image_cfg = image_cfg
    model.tokenizer = build_tokenizer(cfg.data.tokenizer)
    model.vlp_config = cfg
    return model


def _load_vlp_export(path: str) -> Loaded:
    model = load_pretrained(path)
    info = {"format": "vlp-export", "path": os.path.abspath(path), "config": model.vlp_config}
    return Loaded(model, model.tokenizer, dict(model.image_cfg), eval_transform(model.image_cfg), info)


# -------------------------------------------------------------------------------------- open_clip
class OpenClipForEval(nn.Module):
    """open_clip CLIP/CustomTextCLIP behind our interface (the mask is implied by the padding)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        return self.model.encode_text(ids, normalize=True)


def _load_open_clip(path: str) -> Loaded:
    import open_clip

    name = f"local-dir:{os.path.abspath(path)}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu")
    model.eval()
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    image_cfg = {"size": int(size[-1] if isinstance(size, (list, tuple)) else size),
                 "mean": tuple(pp.get("mean", model.visual.image_mean)), "std": tuple(pp.get("std", model.visual.image_std)),
                 "interpolation": pp.get("interpolation", "bicubic"), "resize_mode": pp.get("resize_mode", "shortest")}
    tokenizer = OpenClipTokenizer(name, None)
    return Loaded(OpenClipForEval(model), tokenizer, image_cfg, preprocess,
                  {"format": "open_clip", "path": os.path.abspath(path)})


# ----------------------------------------------------------------------------------- transformers
def _features(out) -> torch.Tensor:
    """transformers >= 5 returns a ModelOutput whose pooler_output holds the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFDualEncoderForEval(nn.Module):
    """A transformers dual encoder (get_image_features / get_text_features) behind our interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=images)), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        return F.normalize(_features(self.model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)


def _hf_image_cfg(proc) -> Dict[str, Any]:
    crop = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
    if not isinstance(crop, (int, float)):  # dict or transformers' SizeDict
        crop = dict(crop)
        crop = crop.get("height") or crop.get("shortest_edge")
    size = crop
    from PIL import Image

    resample = getattr(proc, "resample", None)
    try:
        interpolation = Image.Resampling(int(resample)).name.lower()
    except (TypeError, ValueError):
        interpolation = str(getattr(resample, "name", resample)).lower()
    return {"size": int(size), "mean": tuple(proc.image_mean), "std": tuple(proc.image_std),
            "interpolation": interpolation}


def _load_hf(path: str) -> Loaded:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(f"{path}: {type(model).__name__} (model_type {config.model_type!r}) is not an "
                         "image-text dual encoder (needs get_image_features/get_text_features)")
    model.eval()
    proc = AutoImageProcessor.from_pretrained(path)
    text_cfg = getattr(config, "text_config", config)
    tokenizer = HFTokenizer(path, int(getattr(text_cfg, "max_position_embeddings", 512) or 512))
    tokenizer.context_length = min(tokenizer.context_length, tokenizer.model_max_length or 512)

    def preprocess(img):
        return proc(images=img, return_tensors="pt")["pixel_values"][0]

    return Loaded(HFDualEncoderForEval(model), tokenizer, _hf_image_cfg(proc), preprocess,
                  {"format": "hf", "path": os.path.abspath(path), "model_type": config.model_type})


# ---------------------------------------------------------------------------------------- dispatch
def detect_format(path: str) -> str:
    """Which loader a directory needs: vlp-checkpoint | vlp-export | open_clip | hf."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    has = lambda *names: any(os.path.isfile(os.path.join(path, n)) for n in names)  # noqa: E731
    if (has(STATE_FILE, LATEST) or os.path.isdir(os.path.join(path, CHECKPOINTS))
            or glob.glob(os.path.join(path, "step_*", STATE_FILE))):
        return "vlp-checkpoint"  # vlp.checkpoint.find_checkpoint says what is missing, if anything
    if has(VLP_CONFIG_FILE):
        return "vlp-export"
    if has("open_clip_config.json"):
        return "open_clip"
    if has("config.json"):
        return "hf"
    raise FileNotFoundError(
        f"{path}: not a model directory; expected a training run (checkpoints/), a checkpoint "
        f"({STATE_FILE}), a vlp export ({VLP_CONFIG_FILE}), an open_clip export (open_clip_config.json) "
        "or a transformers export (config.json)")


_LOADERS = {"vlp-checkpoint": _load_run, "vlp-export": _load_vlp_export, "open_clip": _load_open_clip, "hf": _load_hf}


def load_model(path: str) -> Loaded:
    """(model, tokenizer, image_cfg, preprocess, info) for a run, checkpoint or export directory; on CPU."""
    return _LOADERS[detect_format(path)](path)


__all__ = ["Loaded", "load_model", "detect_format", "load_trained_model", "load_pretrained", "load_tokenizer",
           "export_config", "resolve"]
