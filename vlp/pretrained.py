"""Load a `vlp export --format vlp` directory or Hub repository.

    model = vlp.load_pretrained("runs/demo/export/vlp")        # or "org/name" on the Hub
    ids, mask = model.tokenizer(["a photo of a cat"])
    text_emb = model.encode_text(ids, mask)

The model comes back on CPU in eval mode with three extra attributes: `tokenizer` (the run's caption
tokenizer, `tok(list[str]) -> (ids, mask)`), `image_cfg` (size/mean/std/interpolation of the eval
preprocessing) and `vlp_config` (the stored config). `load_tokenizer` gives the tokenizer alone.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

CONFIG_FILE, META_FILE = "vlp_config.yaml", "vlp_export.json"
_PATH_KEYS = ("model.vision.name", "model.text.name", "data.tokenizer.name")


def resolve(name_or_path: str, revision: Optional[str] = None) -> str:
    """A local export directory as is; otherwise a Hub repo id fetched with `snapshot_download`
    (honours HF_HUB_OFFLINE and the cache)."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, CONFIG_FILE)):
            raise FileNotFoundError(f"{name_or_path}: no {CONFIG_FILE}; not a `vlp export --format vlp` directory")
        return name_or_path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such export directory (and not a Hub repo id ORG/NAME)")
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, revision=revision)


def load_config(path: str):
    """The stored config with paths relative to the export made absolute."""
    from omegaconf import OmegaConf

    from vlp.config import from_dict

    data = OmegaConf.load(os.path.join(path, CONFIG_FILE))
    for key in _PATH_KEYS:
        value = OmegaConf.select(data, key)
        if not value:
            continue
        prefix = "local-dir:" if str(value).startswith("local-dir:") else ""
        rel = str(value)[len(prefix):]
        if not os.path.isabs(rel) and os.path.exists(os.path.join(path, rel)):
            OmegaConf.update(data, key, prefix + os.path.abspath(os.path.join(path, rel)))
    return from_dict(OmegaConf.to_container(data, resolve=True))


def load_tokenizer(name_or_path: str, revision: Optional[str] = None):
    """The caption tokenizer stored with the export: `tok(list[str]) -> (ids, mask)`."""
    from vlp.data.tokenizers import build_tokenizer

    return build_tokenizer(load_config(resolve(name_or_path, revision)).data.tokenizer)


def load_pretrained(name_or_path: str, revision: Optional[str] = None) -> Any:
    """The exported model in eval mode on CPU, with `.tokenizer`, `.image_cfg` and `.vlp_config`."""
    from huggingface_hub import load_torch_model

    from vlp.data.tokenizers import build_tokenizer
    from vlp.export.build import effective_image_cfg
    from vlp.models import build_model

    path = resolve(name_or_path, revision)
    cfg = load_config(path)
    model = build_model(cfg.model)
    load_torch_model(model, path, strict=True, filename_pattern="model{suffix}.safetensors")
    model.eval()
    meta_path = os.path.join(path, META_FILE)
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    image_cfg = meta.get("image_cfg") or effective_image_cfg(model, cfg.data)
    image_cfg = dict(image_cfg, mean=tuple(image_cfg["mean"]), std=tuple(image_cfg["std"]))
    model.image_cfg = image_cfg
    model.tokenizer = build_tokenizer(cfg.data.tokenizer)
    model.vlp_config = cfg
    return model


__all__ = ["load_pretrained", "load_tokenizer", "load_config", "resolve"]
