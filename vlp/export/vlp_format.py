"""`--format vlp`: any vlp model, reloaded by `vlp.load_pretrained(DIR or hub name)`.

Files: `model.safetensors` (sharded with an index above `export.max_shard_size`), `vlp_config.yaml`
(the run's resolved config, made self-contained: towers build with random init because the weights
come from the safetensors; tower configs and tokenizers that lived in local directories are copied
in and referenced by paths relative to the export), `vlp_export.json` (the eval image preprocessing
and export provenance) and tokenizer files under `tokenizer/`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict

import torch.nn as nn
from omegaconf import OmegaConf
from vlp.config import persisted_yaml
from vlp.data.shards import public_spec
from vlp.export.tokenizer_files import copy_for_vlp
from vlp.export.weights import cast, save_state_dict
from vlp.models.registry import without_pretrained

CONFIG_FILE, META_FILE, TOWERS_DIR = "vlp_config.yaml", "vlp_export.json", "towers"
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"


def _portable_towers(cfg: Any, out_dir: str) -> None:
    """Rewrite cfg.model towers in place so they rebuild offline from files inside `out_dir`: a
    transformers tower's source config (as read, before `kwargs`, which stay in the config) and its
    image processor config; an open_clip `local-dir:` or `hf-hub:` model's config (as `local-dir:`)."""
    from transformers import AutoConfig

    cfg.model = without_pretrained(cfg.model)
    for side in ("vision", "text"):
        t = cfg.model[side]
        rel = f"{TOWERS_DIR}/{side}"
        dest = os.path.join(out_dir, TOWERS_DIR, side)
        if t.kind == "hf":
            AutoConfig.from_pretrained(t.name).save_pretrained(dest)
            if os.path.isfile(os.path.join(t.name, "preprocessor_config.json")):
                shutil.copy2(os.path.join(t.name, "preprocessor_config.json"), dest)
            t.name = rel
        elif t.kind == "open_clip" and str(t.name).startswith(LOCAL_DIR):
            src = t.name[len(LOCAL_DIR):]
            os.makedirs(dest, exist_ok=True)
            shutil.copy2(os.path.join(src, "open_clip_config.json"), dest)
            t.name = LOCAL_DIR + rel
        elif t.kind == "open_clip" and str(t.name).startswith(HF_HUB):
            # open_clip fetches an hf-hub model's weights whenever it builds one, even with load_weights=False:
            # the export keeps the model's config (from the Hub cache training filled) and names it local-dir
            from open_clip.factory import _get_hf_config

            os.makedirs(dest, exist_ok=True)
            config = _get_hf_config(t.name[len(HF_HUB):])
            tmp = os.path.join(dest, f"open_clip_config.json.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(config, f, indent=1)
            os.replace(tmp, os.path.join(dest, "open_clip_config.json"))
            t.name = LOCAL_DIR + rel


def write_vlp(model: nn.Module, cfg: Any, image_cfg: Dict[str, Any], out_dir: str, dtype: str,
              max_shard_size: str, provenance: Dict[str, Any]) -> Dict[str, Any]:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # a writable copy
    _portable_towers(cfg, out_dir)
    tok_name = copy_for_vlp(cfg.data.tokenizer, out_dir)
    if tok_name is not None:
        cfg.data.tokenizer.name = tok_name
    cfg.train.resume = "none"
    cfg.output_dir = ""  # a local path of the machine that trained it
    cfg.data.train_shards, cfg.data.eval_shards = public_spec(cfg.data.train_shards), public_spec(cfg.data.eval_shards)
    for src in cfg.data.sources:
        src.shards = public_spec(src.shards)
    cfg.data.image_size = int(image_cfg["size"])
    cfg.data.mean, cfg.data.std = list(image_cfg["mean"]), list(image_cfg["std"])
    files = save_state_dict(cast(dict(model.state_dict()), dtype), out_dir, stem="model", max_shard_size=max_shard_size)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        f.write(persisted_yaml(cfg))  # URL credentials removed (the shard specs above lose them entirely)
    meta = {"format": "vlp", "format_version": 1, "image_cfg": dict(image_cfg, mean=list(image_cfg["mean"]),
                                                                        std=list(image_cfg["std"])),
            "dtype": dtype, "weights": files, **provenance}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return {"architecture": type(model).__name__}


__all__ = ["write_vlp", "CONFIG_FILE", "META_FILE"]
