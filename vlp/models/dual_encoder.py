"""Dual-encoder image-text models: one vision and one text tower, linear heads into a joint space.

- clip: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
  (§2.3-2.5): symmetric InfoNCE, learnable temperature initialised at 0.07, logit scale clipped at 100.
  As open_clip's training loop, the trainer clamps log(logit scale) in place to [0, ln max_logit_scale]
  after each optimizer step (`parameter_bounds`, vlp.train.engine.clamp_parameters); the forward uses it
  as is, so the gradient never vanishes at the bound. `model.max_logit_scale=0` turns the clamp off.
- align: Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation Learning With Noisy
  Text Supervision" (§3.2, §5): the same loss with both directions summed, temperature initialised
  at 1.0 and label smoothing (0.1 in the paper; `model.label_smoothing`).
- siglip: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (§3.2-3.3): pairwise
  sigmoid loss, t = exp(t') with t' initialised at log 10, bias initialised at -10.
Locked towers follow LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning"): frozen weights, eval mode, no activations kept; their new projection head still trains.
BUS (`model.bus`) is ALBEF's only: a dual encoder's image embedding may not depend on the caption
(vlp.models.bus), and `check_bus` says so.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from vlp.config import ConfigError
from vlp.losses import clip_loss, siglip_loss
from vlp.models.bus import check_bus
from vlp.models.registry import register_model
from vlp.models.towers import Tower, build_towers
from vlp.models.video import add_video, check_video_tower, encode_clips


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
        self.siglip_chunked = bool(getattr(cfg, "siglip_chunked", False))
        self.video = bool(cfg.video.enabled)  # the vision tower reads clips (vlp.models.video)
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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised pixels -> (B, embed_dim) unit-norm float32 embeddings. A video model also
        takes clips (B,K,3,H,W) here (`encode_video`), so every evaluation path serves both."""
        if images.dim() == 5:
            return self.encode_video(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked["vision"]):
            feats = self.vision(images)
        return F.normalize(self.image_proj(feats).float(), dim=-1)

    def example_batch(self, n: int, image_size: int, context_length: int, param: torch.Tensor) -> Dict[str, Any]:
        """FLOP counting's batch (vlp.models.flops): images, or for a video model clips of
        `example_frames` frames (the trainer sets it per curriculum stage; default model.video.max_frames)."""
        ids = torch.ones(n, context_length, dtype=torch.long, device=param.device)
        batch: Dict[str, Any] = {"text_ids": ids, "text_mask": torch.ones_like(ids)}
        shape = (n, 3, image_size, image_size)
        if self.video:
            k = int(getattr(self, "example_frames", 0) or self.image_cfg["frames"])
            batch["video"] = torch.zeros((n, k) + shape[1:], device=param.device, dtype=param.dtype)
        else:
            batch["image"] = torch.zeros(shape, device=param.device, dtype=param.dtype)
        return batch

    def encode_video(self, video: torch.Tensor, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,K,3,H,W) normalised clips (`frames`: real frames per clip, 1 for an image) -> (B, embed_dim)."""
        if not self.video:
            raise ValueError("encode_video: this model's vision tower reads images (model.video.enabled is false)")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked["vision"]):
            feats = encode_clips(self.vision, video, frames)
        return F.normalize(self.image_proj(feats).float(), dim=-1)

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked["text"]):
            return self.text(ids, mask)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,L) token ids and mask (1 = real token) -> (B, embed_dim) unit-norm float32 embeddings."""
        return F.normalize(self.text_proj(self._text_features(ids, mask)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit multiplier exp(logit_scale) (shape [1], fp32); the trainer keeps it in range."""
        return self.logit_scale.float().exp()

    def parameter_bounds(self) -> List[Tuple[nn.Parameter, float, float]]:
        """(parameter, low, high) the trainer clamps in place after each optimizer step: log(logit scale)
        in [0, ln max_logit_scale] as open_clip (none when max_logit_scale is 0)."""
        return [] if self.max_log_scale is None else [(self.logit_scale, 0.0, self.max_log_scale)]

    def compute_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> Dict[str, Any]:
        """Loss from embeddings of this rank's batch (negatives gathered across ranks)."""
        scale = self.scale()
        out: Dict[str, Any] = {}
        if self.objective == "siglip":
            bias = self.logit_bias.float()
            loss = siglip_loss(image_emb, text_emb, scale, bias, chunked=self.siglip_chunked)
            out["logit_bias"] = float(bias.item())
        else:
            loss = clip_loss(image_emb, text_emb, scale, local_loss=self.local_loss,
                             label_smoothing=self.label_smoothing, sum_directions=self.objective == "align")
        out.update(loss=loss, contrastive_loss=loss.detach(), logit_scale=float(scale.item()))
        return out

    def forward(self, batch: Dict[str, Any], loss_fn: Optional[Callable[..., Dict[str, Any]]] = None) -> Dict[str, Any]:
        """Encode the batch, then `loss_fn(image_emb, text_emb)` (default: `compute_loss`); GradCache
        (vlp.train.grad_cache) passes its own, through the engine so that ZeRO's hooks run."""
        if "video" in batch:
            image_emb = self.encode_video(batch["video"], batch.get("video_frames"))
        else:
            image_emb = self.encode_image(batch["image"])
        text_emb = self.encode_text(batch["text_ids"], batch["text_mask"])
        return (loss_fn or self.compute_loss)(image_emb, text_emb)


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
    if cfg.max_logit_scale and init < 1.0 - 1e-6:
        raise ConfigError(f"the initial logit scale {init:g} is below 1 (temperature above 1), where the clamp to "
                          f"[1, model.max_logit_scale] would move it at the first step; set model.max_logit_scale=0 "
                          f"to train without the clamp")


def build_dual_encoder(cfg: DictConfig) -> DualEncoder:
    _check(cfg)
    if cfg.bus.enabled:
        check_bus(cfg.bus, cfg.type, cfg.vision)
    if cfg.video.enabled:
        check_video_tower(cfg.video, cfg)
    vision, text = build_towers(cfg)
    if cfg.video.enabled:
        add_video(vision.module, cfg.video)
        vision.info.update(frames=int(cfg.video.max_frames), temporal=str(cfg.video.temporal))
    return DualEncoder(cfg, vision, text, objective=cfg.type)


for _family in ("clip", "align", "siglip"):
    register_model(_family)(build_dual_encoder)
