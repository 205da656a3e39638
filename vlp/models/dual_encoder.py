"""Dual-encoder image-text models: one vision and one text tower, linear heads into a joint space.

- clip: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
  (§2.3-2.4): symmetric InfoNCE, learnable temperature initialised at 0.07, logit scale clamped at 100.
- align: Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation Learning With Noisy
  Text Supervision" (§3.2, §5): the same loss with both directions summed, temperature initialised
  at 1.0 and label smoothing (0.1 in the paper; `model.label_smoothing`).
- siglip: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (§3.2-3.3): pairwise
  sigmoid loss, t = exp(t') with t' initialised at log 10, bias initialised at -10.
Locked towers follow LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning"): frozen weights, eval mode, no activations kept; their new projection head still trains.
BUS's text-semantics-aware patch selection (`model.bus`, vlp.models.bus) steers the ViT with the
paired caption's text-tower feature in training (the text tower runs first) and adds the patch-text
matching loss; `encode_image` (retrieval, zero-shot) uses the text-agnostic selector.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from vlp.config import ConfigError
from vlp.losses import clip_loss, siglip_loss
from vlp.models.bus import add_tsps, check_bus, ptm_loss, text_guidance
from vlp.models.registry import register_model
from vlp.models.towers import Tower, build_towers


def _head(tower: Tower, embed_dim: int) -> nn.Module:
    """Linear map into the joint space; none when the tower already projects to `embed_dim`."""
    if tower.projects and tower.dim == embed_dim:
        return nn.Identity()
    head = nn.Linear(tower.dim, embed_dim, bias=False)
    nn.init.normal_(head.weight, std=tower.dim ** -0.5)
    return head


class DualEncoder(nn.Module):
    """Two towers + heads + learnable temperature (+ bias for SigLIP); `objective` picks the loss."""

    def __init__(self, cfg: DictConfig, vision: Tower, text: Tower, objective: str):
        super().__init__()
        self.objective = objective
        self.vision, self.text = vision.module, text.module
        self.image_proj, self.text_proj = _head(vision, cfg.embed_dim), _head(text, cfg.embed_dim)
        self.image_cfg: Dict[str, Any] = dict(vision.info)
        self.text_cfg: Dict[str, Any] = dict(text.info)
        self.embed_dim = int(cfg.embed_dim)
        self.local_loss = bool(cfg.local_loss)
        self.label_smoothing = float(cfg.label_smoothing)
        self.max_log_scale = math.log(cfg.max_logit_scale) if cfg.max_logit_scale > 0 else None
        # learnable scalars have shape [1]: DeepSpeed rejects 0-dim parameters
        if objective == "siglip":
            init = math.log(cfg.siglip_init_logit_scale)
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.siglip_init_bias)))
        else:
            init = math.log(1.0 / cfg.init_temperature)
            self.logit_bias = None
        self.logit_scale = nn.Parameter(torch.full((1,), init))
        self.bus = bool(cfg.bus.enabled)
        self.ptm_weight = float(cfg.bus.ptm_weight) if self.bus else 0.0
        self.ptm_temperature = float(cfg.bus.ptm_temperature)
        if self.bus:
            add_tsps(self.vision, cfg.bus, text.dim)
            if self.ptm_weight:
                self.ptm_proj = nn.Linear(vision.dim, cfg.embed_dim)
        self.locked = {"vision": bool(cfg.vision.locked), "text": bool(cfg.text.locked)}
        for name, locked in self.locked.items():
            if locked:
                getattr(self, name).requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        for name, locked in self.locked.items():
            if locked:
                getattr(self, name).eval()  # keeps BatchNorm statistics and dropout off
        return self

    def after_step(self) -> None:
        """Called by the trainer once per optimizer step: advances step schedules inside the towers
        (EViT's keep-rate warm-up) by calling each submodule's own `after_step`."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "after_step", None)):
                module.after_step()

    def encode_image(self, images: torch.Tensor, texts: Optional[torch.Tensor] = None,
                     ptm: bool = False) -> torch.Tensor:
        """(B,3,H,W) normalised pixels -> (B, embed_dim) unit-norm float32 embeddings. With BUS, `texts`
        (B, text-tower width) steer the patch selection; None: text-agnostic."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked["vision"]), \
                (text_guidance(self.vision, texts, ptm) if self.bus else contextlib.nullcontext()):
            feats = self.vision(images)
        return F.normalize(self.image_proj(feats).float(), dim=-1)

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked["text"]):
            return self.text(ids, mask)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,L) token ids and mask (1 = real token) -> (B, embed_dim) unit-norm float32 embeddings."""
        return F.normalize(self.text_proj(self._text_features(ids, mask)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit multiplier exp(logit_scale), clamped at `max_logit_scale` (shape [1], fp32)."""
        log_scale = self.logit_scale.float()
        if self.max_log_scale is not None:
            log_scale = log_scale.clamp(max=self.max_log_scale)
        return log_scale.exp()

    def compute_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> Dict[str, Any]:
        """Loss from embeddings of this rank's batch (negatives gathered across ranks)."""
        scale = self.scale()
        out: Dict[str, Any] = {}
        if self.objective == "siglip":
            bias = self.logit_bias.float()
            loss = siglip_loss(image_emb, text_emb, scale, bias)
            out["logit_bias"] = float(bias.item())
        else:
            loss = clip_loss(image_emb, text_emb, scale, local_loss=self.local_loss,
                             label_smoothing=self.label_smoothing, sum_directions=self.objective == "align")
        out.update(loss=loss, contrastive_loss=loss.detach(), logit_scale=float(scale.item()))
        return out

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if not self.bus:
            image_emb = self.encode_image(batch["image"])
            text_emb = self.encode_text(batch["text_ids"], batch["text_mask"])
            return self.compute_loss(image_emb, text_emb)
        texts = self._text_features(batch["text_ids"], batch["text_mask"])
        text_emb = F.normalize(self.text_proj(texts).float(), dim=-1)
        image_emb = self.encode_image(batch["image"], texts, ptm=self.ptm_weight > 0)
        out = self.compute_loss(image_emb, text_emb)
        if self.ptm_weight:
            temp = 1.0 / self.scale()
            ptm = ptm_loss(self.vision, self.ptm_proj, text_emb,
                           temp.new_full((1,), self.ptm_temperature) if self.ptm_temperature else temp)
            out["loss"] = out["loss"] + self.ptm_weight * ptm
            out["ptm_loss"] = ptm.detach()
        return out


def _check(cfg: DictConfig) -> None:
    if cfg.embed_dim <= 0:
        raise ConfigError(f"bad value for 'model.embed_dim': must be > 0, got {cfg.embed_dim}")
    if not 0.0 <= cfg.patch_dropout < 1.0:
        raise ConfigError(f"bad value for 'model.patch_dropout': want 0 <= p < 1, got {cfg.patch_dropout}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"bad value for 'model.label_smoothing': want 0 <= s < 1, got {cfg.label_smoothing}")
    if cfg.max_logit_scale < 0:
        raise ConfigError(f"bad value for 'model.max_logit_scale': want > 0 (0 disables the clamp), "
                          f"got {cfg.max_logit_scale}")
    if cfg.type == "siglip":
        if cfg.siglip_init_logit_scale <= 0:
            raise ConfigError(f"bad value for 'model.siglip_init_logit_scale': must be > 0, "
                              f"got {cfg.siglip_init_logit_scale}")
        if cfg.local_loss or cfg.label_smoothing:
            raise ConfigError("model.local_loss and model.label_smoothing apply to clip/align, not siglip: "
                              "leave them at false / 0.0")
        init = cfg.siglip_init_logit_scale
    else:
        if cfg.init_temperature <= 0:
            raise ConfigError(f"bad value for 'model.init_temperature': must be > 0, got {cfg.init_temperature}")
        init = 1.0 / cfg.init_temperature
    if cfg.max_logit_scale and init > cfg.max_logit_scale * (1 + 1e-6):
        raise ConfigError(f"the initial logit scale {init:g} exceeds 'model.max_logit_scale' {cfg.max_logit_scale:g}")


def build_dual_encoder(cfg: DictConfig) -> DualEncoder:
    _check(cfg)
    if cfg.bus.enabled:
        check_bus(cfg.bus, cfg.type, cfg.vision)
    vision, text = build_towers(cfg)
    return DualEncoder(cfg, vision, text, objective=cfg.type)


for _family in ("clip", "align", "siglip"):
    register_model(_family)(build_dual_encoder)
