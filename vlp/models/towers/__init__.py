"""Tower builders by `kind`: vision (timm | hf | open_clip), text (hf | open_clip)."""
from __future__ import annotations

from typing import Any, Tuple

from vlp.config import ConfigError
from vlp.models.towers.base import Tower, kwargs_of


def _no_extras(tcfg: Any, key: str) -> None:
    """EViT and the frozen LLM block exist for timm vision towers only: refuse them anywhere else."""
    evit, llm = getattr(tcfg, "evit", None), getattr(tcfg, "frozen_llm", None)
    used = [f"evit.keep_rate={evit.keep_rate}"] if evit is not None and evit.keep_rate != 1.0 else []
    used += [f"frozen_llm.name={llm.name!r}"] if llm is not None and llm.name else []
    if used:
        raise ConfigError(f"model.{key}.{used[0]}: supported on vision towers of kind timm (a ViT) only, "
                          f"not on this {tcfg.kind} {key} tower {tcfg.pretrained or tcfg.name!r}")


def build_vision_tower(tcfg: Any, patch_dropout: float = 0.0, embed_dim: int = 512) -> Tower:
    if tcfg.kind != "timm":
        _no_extras(tcfg, "vision")
    if tcfg.kind == "timm":
        from vlp.models.towers.timm_vision import build_timm_vision
        return build_timm_vision(tcfg, patch_dropout)
    if tcfg.kind == "hf":
        from vlp.models.towers.hf import build_hf_vision
        return build_hf_vision(tcfg, patch_dropout)
    if tcfg.kind == "open_clip":
        from vlp.models.towers.open_clip_towers import build_open_clip_vision
        return build_open_clip_vision(tcfg, patch_dropout, embed_dim)
    raise ConfigError(f"bad value for 'model.vision.kind': {tcfg.kind!r}; valid: timm, hf, open_clip")


def build_text_tower(tcfg: Any, embed_dim: int = 512) -> Tower:
    _no_extras(tcfg, "text")
    if tcfg.kind == "hf":
        from vlp.models.towers.hf import build_hf_text
        return build_hf_text(tcfg)
    if tcfg.kind == "open_clip":
        from vlp.models.towers.open_clip_towers import build_open_clip_text
        return build_open_clip_text(tcfg, embed_dim)
    raise ConfigError(f"bad value for 'model.text.kind': {tcfg.kind!r}; valid: hf, open_clip")


def build_towers(model_cfg: Any) -> Tuple[Tower, Tower]:
    """(vision, text) towers of `model_cfg`; one open_clip model serves both when both name it."""
    v, t = model_cfg.vision, model_cfg.text
    if (v.kind == t.kind == "open_clip" and v.name and (v.name, v.pretrained) == (t.name, t.pretrained)
            and kwargs_of(v) == kwargs_of(t)):
        from vlp.models.towers.open_clip_towers import build_open_clip_pair
        _no_extras(v, "vision")
        _no_extras(t, "text")
        return build_open_clip_pair(v, t, model_cfg.patch_dropout)
    return (build_vision_tower(v, model_cfg.patch_dropout, model_cfg.embed_dim),
            build_text_tower(t, model_cfg.embed_dim))


__all__ = ["Tower", "build_towers", "build_vision_tower", "build_text_tower"]
