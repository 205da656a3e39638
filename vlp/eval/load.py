"""Load any model we can evaluate from a directory, dispatching on the files it holds.

- a training run (`RUN/checkpoints/`), its `checkpoints/` folder, or one `step_XXXXXXX/` checkpoint:
  the stored config rebuilds the model, and DeepSpeed's `zero_to_fp32` consolidates the weights of
  any ZeRO stage into fp32 (`vlp.export.checkpoint`, shared with `vlp export`);
- a vlp export (`vlp_config.yaml`): `vlp.load_pretrained`;
- an open_clip export (`open_clip_config.json`): `open_clip.create_model_and_transforms("local-dir:DIR")`;
- a transformers export (`config.json`): `AutoModel`, a dual encoder with `get_image_features` and
  `get_text_features` (CLIPModel, SiglipModel, VisionTextDualEncoderModel, ...).

Every branch returns the same model-like interface (`encode_image`, `encode_text(ids, mask)` giving
L2-normalised embeddings, `match_scores` when the model has an ITM head), a tokenizer returning
(ids, mask), the `image_cfg`, and `preprocess` (PIL image -> tensor) exactly as the format defines it.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINTS, LATEST, STATE_FILE = "checkpoints", "latest", "vlp_state.json"
VLP_EXPORT_FILES = ("vlp_config.yaml",)


class Loaded(NamedTuple):
    model: Any  # model-like: encode_image, encode_text(ids, mask)[, match_scores]
    tokenizer: Callable[[List[str]], Tuple[torch.Tensor, torch.Tensor]]
    image_cfg: Dict[str, Any]
    preprocess: Callable  # PIL RGB image -> float tensor (3, H, W)
    info: Dict[str, Any]  # format, path, and the resolved config for vlp models


# ------------------------------------------------------------------------------- vlp checkpoints
def image_cfg_for(model_image_cfg: Dict[str, Any], data_cfg) -> Dict[str, Any]:
    """The model's image_cfg with the run's `data.image_size/mean/std` overrides, by the same rule as
    the data pipeline's eval loader (`vlp.data.transforms.resolve_image_cfg`)."""
    from vlp.data.transforms import resolve_image_cfg

    return resolve_image_cfg(model_image_cfg, data_cfg)


def _load_run(path: str) -> Loaded:
    """Checkpoint lookup and ZeRO consolidation are shared with `vlp export` (vlp.export.checkpoint)."""
    from vlp.data.tokenizers import build_tokenizer
    from vlp.eval.preprocess import eval_transform
    from vlp.export.checkpoint import checkpoint_config, find_checkpoint, load_trained_model

    ckpt = find_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    model = load_trained_model(ckpt, cfg)
    image_cfg = image_cfg_for(model.image_cfg, cfg.data)
    info = {"format": "vlp-checkpoint", "path": ckpt.path, "step": ckpt.step, "config": cfg}
    return Loaded(model, build_tokenizer(cfg.data.tokenizer), image_cfg, eval_transform(image_cfg), info)


# ------------------------------------------------------------------------------------ vlp export
def _load_vlp_export(path: str) -> Loaded:
    import vlp
    from vlp.eval.preprocess import eval_transform

    model = vlp.load_pretrained(path)  # eval mode, with .tokenizer, .image_cfg and .vlp_config
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


class OpenClipTokenizer:
    """open_clip tokenizer -> (ids, mask); mask marks non-padding positions."""

    def __init__(self, tok, name: str):
        self.tok, self.name = tok, name
        self.context_length = int(getattr(tok, "context_length", 77))
        inner = getattr(tok, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
        self.pad_id = int(getattr(inner, "pad_token_id", None) or 0)
        self.vocab_size = int(getattr(tok, "vocab_size", 0) or len(getattr(tok, "encoder", {})) or len(inner or []))

    def __call__(self, texts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = self.tok(list(texts))
        return ids, (ids != self.pad_id).long()


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
    tokenizer = OpenClipTokenizer(open_clip.get_tokenizer(name), name)
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


class HFTokenizer:
    """transformers tokenizer -> (ids, mask), truncated to the text tower's positions."""

    def __init__(self, tok, context_length: int, name: str):
        self.tok, self.context_length, self.name = tok, context_length, name
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        self.vocab_size = len(tok)
        self.pad_to_max = "siglip" in type(tok).__name__.lower()  # SigLIP was trained on max-length padding

    def __call__(self, texts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok(list(texts), padding="max_length" if self.pad_to_max else True, truncation=True,
                       max_length=self.context_length, return_tensors="pt")
        mask = enc.get("attention_mask")
        return enc["input_ids"], (mask if mask is not None else torch.ones_like(enc["input_ids"])).long()


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
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(f"{path}: {type(model).__name__} (model_type {config.model_type!r}) is not an "
                         "image-text dual encoder (needs get_image_features/get_text_features)")
    model.eval()
    proc = AutoImageProcessor.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    text_cfg = getattr(config, "text_config", config)
    ctx = min(int(getattr(text_cfg, "max_position_embeddings", 512) or 512), int(tok.model_max_length or 512))

    def preprocess(img):
        return proc(images=img, return_tensors="pt")["pixel_values"][0]

    return Loaded(HFDualEncoderForEval(model), HFTokenizer(tok, ctx, path), _hf_image_cfg(proc), preprocess,
                  {"format": "hf", "path": os.path.abspath(path), "model_type": config.model_type})


# ---------------------------------------------------------------------------------------- dispatch
def detect_format(path: str) -> str:
    """Which loader a directory needs: vlp-checkpoint | vlp-export | open_clip | hf."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    has = lambda *names: any(os.path.isfile(os.path.join(path, n)) for n in names)  # noqa: E731
    if (has(STATE_FILE, LATEST) or os.path.isdir(os.path.join(path, CHECKPOINTS))
            or glob.glob(os.path.join(path, "step_*", STATE_FILE))):
        return "vlp-checkpoint"  # vlp.export.checkpoint.find_checkpoint says what is missing, if anything
    if has(*VLP_EXPORT_FILES):
        return "vlp-export"
    if has("open_clip_config.json"):
        return "open_clip"
    if has("config.json"):
        return "hf"
    raise FileNotFoundError(
        f"{path}: not a model directory; expected a training run (checkpoints/), a checkpoint "
        f"({STATE_FILE}), a vlp export ({VLP_EXPORT_FILES[0]}), an open_clip export (open_clip_config.json) "
        "or a transformers export (config.json)")


_LOADERS = {"vlp-checkpoint": _load_run, "vlp-export": _load_vlp_export, "open_clip": _load_open_clip, "hf": _load_hf}


def load_for_eval(path: str) -> Loaded:
    """(model, tokenizer, image_cfg, preprocess, info) for a run, checkpoint or export directory; on CPU."""
    return _LOADERS[detect_format(path)](path)
