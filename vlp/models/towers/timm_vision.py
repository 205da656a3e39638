"""Vision towers from timm: any `timm.create_model` name, pooled features (num_classes=0)."""
from __future__ import annotations

import os
from typing import Any, Dict

import timm
from timm.data import resolve_model_data_config

from vlp.config import ConfigError
from vlp.models.towers.base import Tower, config_error, interpolation_name, kwargs_of, square_size

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def _pretrained_args(pretrained: str, key: str) -> Dict[str, Any]:
    """timm's own loader options for `pretrained`: "" | "default" (timm's weights for the name) |
    "hf-hub:org/repo" | a weights file | a directory holding one."""
    if not pretrained:
        return {"pretrained": False}
    if pretrained.lower() in ("default", "true"):
        return {"pretrained": True}
    if pretrained.startswith("hf-hub:"):
        return {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": pretrained[7:], "source": "hf-hub"}}
    if os.path.isdir(pretrained):
        found = [os.path.join(pretrained, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(pretrained, f))]
        if not found:
            raise ConfigError(f"model.{key}.pretrained: directory {pretrained!r} holds none of {list(_WEIGHT_FILES)}")
        pretrained = found[0]
    if os.path.isfile(pretrained):
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": pretrained}}
    raise ConfigError(
        f"model.{key}.pretrained: {pretrained!r} is not a file or directory; give a weights file "
        f"(.safetensors/.bin/.pth), a directory with one, 'hf-hub:org/repo', 'default' for timm's "
        f"weights of the name (e.g. 'vit_base_patch16_224.augreg_in21k'), or '' for random init")


def _add_extras(model: Any, tcfg: Any, key: str) -> None:
    """EViT token reorganization, then a frozen LLM block after the last block, when configured."""
    evit, llm = getattr(tcfg, "evit", None), getattr(tcfg, "frozen_llm", None)
    if evit is not None and evit.keep_rate != 1.0:
        from vlp.models.evit import add_evit
        add_evit(model, evit, key, tcfg.pretrained or tcfg.name)
    if llm is not None and llm.name:
        from vlp.models.frozen_llm import add_frozen_llm
        add_frozen_llm(model, llm, key)


def build_timm_vision(tcfg: Any, patch_dropout: float = 0.0, key: str = "vision") -> Tower:
    """`timm.create_model(name, num_classes=0, **kwargs)`; patch dropout via timm's `patch_drop_rate`."""
    if not tcfg.name:
        raise ConfigError(f"model.{key}.name is empty: give a timm model name, e.g. 'vit_base_patch16_224'")
    kwargs = kwargs_of(tcfg)
    if patch_dropout > 0:
        kwargs["patch_drop_rate"] = patch_dropout
    try:
        model = timm.create_model(tcfg.name, num_classes=0, **_pretrained_args(tcfg.pretrained, key), **kwargs)
    except (TypeError, RuntimeError, ValueError, KeyError, OSError) as e:
        hint = " (model.patch_dropout needs a timm ViT-style model)" if patch_dropout > 0 else ""
        raise ConfigError(str(config_error(key, tcfg, e)) + hint) from e
    _add_extras(model, tcfg, key)
    if tcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data = resolve_model_data_config(model)
    # pretrained_cfg keeps the registered input size even when kwargs change img_size
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None) or kwargs.get("img_size") or data["input_size"]
    info = dict(size=square_size(size), mean=tuple(data["mean"]), std=tuple(data["std"]),
                interpolation=interpolation_name(data.get("interpolation")))
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return Tower(model, int(dim), info)
