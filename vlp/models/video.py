"""Video towers: a timm ViT that reads clips (B, K, 3, H, W).

`temporal: divided` is the space-time transformer of Frozen in Time (Bain et al., ICCV 2021, "Frozen in
Time: A Joint Video and Image Encoder for End-to-End Retrieval", §3.1; reference code
m-bain/frozen-in-time `model/video_transformer.py`). Each block gains a temporal attention over the same
patch position in every frame and a third norm; per block

    t = timeattn(norm3(x));  s = attn(norm1(x + t));  x = x + s;  x = x + mlp(norm2(x))

so the temporal term reaches the residual stream only through the spatial attention's input. The
spatial attention is divided: a patch attends to [CLS] and to the patches of its own frame, [CLS]
attends to every patch of every frame. A learnt temporal embedding (zeros at init) is added per frame to
ViT's tiled position embedding. As in the reference, `timeattn.qkv` starts at zero and `timeattn.proj`'s
weight at ones (zero x zero would leave both without gradient), so t = 0 at step 0: the model is the
image ViT, and an image ViT's weights load into it unchanged (the new parameters keep their init).

Ours, on purpose:
- an image (or a 1-frame curriculum stage) takes the image ViT's own path: no temporal attention and no
  temporal embedding, because a single frame has no time. The 1-frame path is therefore exactly the image
  model at any point of training, and it exports to image layouts (HF, open_clip) with the temporal parts
  left out. Clips of K > 1 frames take the space-time path; a batch may mix both (`frames` per sample).
- the temporal attention runs over patch tokens only ([CLS] attends across frames through the spatial
  attention already).

`temporal: mean` is the baseline with the same towers: the image ViT on each frame, features averaged
over the clip's frames (order-blind by construction).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from vlp.config import ConfigError

TEMPORAL = ("divided", "mean")


class SpaceTimeBlock(nn.Module):
    """A timm ViT block (same parameter names, so image weights load) plus `norm3` and `timeattn`."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, child)
        attn = block.attn
        dim = attn.qkv.in_features
        eps = getattr(block.norm1, "eps", 1e-6)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.timeattn = Attention(dim, num_heads=attn.num_heads, qkv_bias=True)
        reset_temporal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The image block, unchanged (the 1-frame path)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_video(self, x: torch.Tensor, frames: int, patches: int) -> torch.Tensor:
        """x: (B, 1 + K*N, D), [CLS] first, then frame-major patches."""
        B, T, D = x.shape
        K, N = frames, patches
        p = self.norm3(x[:, 1:]).reshape(B, K, N, D).transpose(1, 2).reshape(B * N, K, D)
        t = self.timeattn(p).reshape(B, N, K, D).transpose(1, 2).reshape(B, K * N, D)
        t = torch.cat([x.new_zeros(B, 1, D), t], dim=1)
        s = divided_attention(self.attn, self.norm1(x + t), K, N)
        x = x + self.drop_path1(self.ls1(s))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def reset_temporal(block: SpaceTimeBlock) -> None:
    """Frozen in Time's init: qkv weight and bias 0, proj weight 1 and bias 0 (t = 0, gradients alive)."""
    with torch.no_grad():
        block.timeattn.qkv.weight.zero_()
        block.timeattn.qkv.bias.zero_()
        block.timeattn.proj.weight.fill_(1.0)
        block.timeattn.proj.bias.zero_()


def divided_attention(attn: nn.Module, x: torch.Tensor, frames: int, patches: int) -> torch.Tensor:
    """timm `Attention` weights on (B, 1 + K*N, D): patches see [CLS] + their own frame, [CLS] sees all."""
    B, T, _ = x.shape
    K, N, H, hd = frames, patches, attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = attn.attn_drop.p if attn.training else 0.0
    cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v, dropout_p=drop)  # (B, H, 1, hd)

    def per_frame(t: torch.Tensor) -> torch.Tensor:  # (B, H, K*N, hd) -> (B*K, H, N, hd)
        return t[:, :, 1:].reshape(B, H, K, N, hd).transpose(1, 2).reshape(B * K, H, N, hd)

    def with_cls(t: torch.Tensor) -> torch.Tensor:
        c = t[:, :, :1].unsqueeze(1).expand(B, K, H, 1, hd).reshape(B * K, H, 1, hd)
        return torch.cat([c, per_frame(t)], dim=2)

    out = F.scaled_dot_product_attention(per_frame(q), with_cls(k), with_cls(v), dropout_p=drop)
    out = out.reshape(B, K, H, N, hd).transpose(1, 2).reshape(B, H, K * N, hd)
    out = torch.cat([cls_out, out], dim=2).transpose(1, 2).reshape(B, T, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def temporal_parts_used(vit: nn.Module) -> bool:
    """Whether the clip path differs from the image path: a space-time tower whose temporal parts (temporal
    embedding, temporal attention, its norm) have left their init. The frame-average tower has none."""
    if getattr(vit, "video_temporal", "") != "divided":
        return False
    with torch.no_grad():
        if vit.temporal_embed.abs().max() > 0:
            return True
        for b in vit.blocks:
            ta = b.timeattn
            if (ta.qkv.weight.abs().max() > 0 or ta.qkv.bias.abs().max() > 0 or ta.proj.bias.abs().max() > 0
                    or (ta.proj.weight != 1).any() or (b.norm3.weight != 1).any() or b.norm3.bias.abs().max() > 0):
                return True
    return False


def check_video_tower(vcfg: Any, model_cfg: Any) -> None:
    """Refuse what the video tower cannot be, naming the option (the family is checked with the config)."""
    v = model_cfg.vision
    if v.kind != "timm":
        raise ConfigError(f"model.video.enabled: the video tower is a timm ViT; model.vision.kind is {v.kind!r}")
    if vcfg.temporal not in TEMPORAL:
        raise ConfigError(f"bad value for 'model.video.temporal': {vcfg.temporal!r}; valid: {', '.join(TEMPORAL)}")
    if vcfg.temporal == "divided":
        used = []
        if v.evit.keep_rate != 1.0:
            used.append("model.vision.evit.keep_rate")
        if v.frozen_llm.name:
            used.append("model.vision.frozen_llm.name")
        if model_cfg.patch_dropout:
            used.append("model.patch_dropout")
        if used:
            raise ConfigError(f"model.video.temporal=divided does not combine with {used[0]}: the space-time blocks "
                              "replace the ViT's blocks (use model.video.temporal=mean, or leave it off)")


def add_video(vit: nn.Module, vcfg: Any) -> nn.Module:
    """Make a timm VisionTransformer read clips, in place (see the module docstring)."""
    vit.video_temporal = str(vcfg.temporal)
    if vcfg.temporal == "mean":
        return vit
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"model.video.temporal=divided needs a timm VisionTransformer (vit_*), got "
                          f"{type(vit).__name__}; use model.video.temporal=mean for other towers")
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or getattr(vit, "dynamic_img_size", False):
        raise ConfigError("model.video.temporal=divided needs a ViT with one [CLS] token, no register tokens and "
                          "a fixed image size (timm kwargs class_token=True, reg_tokens=0, dynamic_img_size=False)")
    vit.blocks = nn.Sequential(*[SpaceTimeBlock(b) for b in vit.blocks])
    vit.temporal_embed = nn.Parameter(torch.zeros(1, int(vcfg.max_frames), vit.embed_dim))
    return vit


def _space_time(vit: nn.Module, video: torch.Tensor) -> torch.Tensor:
    B, K = video.shape[:2]
    if K > vit.temporal_embed.shape[1]:
        raise ValueError(f"a clip of {K} frames, but the model's temporal embedding has "
                         f"{vit.temporal_embed.shape[1]} rows (model.video.max_frames)")
    x = vit.patch_embed(video.flatten(0, 1))  # (B*K, N, D)
    N, D = x.shape[1], x.shape[2]
    pos = vit.pos_embed
    pos_cls, pos_patch = (None, pos) if vit.no_embed_class else (pos[:, :1], pos[:, 1:])
    x = (x + pos_patch).reshape(B, K, N, D) + vit.temporal_embed[:, :K].unsqueeze(2)
    cls = vit.cls_token.expand(B, -1, -1)
    if pos_cls is not None:
        cls = cls + pos_cls
    x = vit.norm_pre(vit.pos_drop(torch.cat([cls, x.reshape(B, K * N, D)], dim=1)))
    for blk in vit.blocks:
        if vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk.forward_video, x, K, N, use_reentrant=False)
        else:
            x = blk.forward_video(x, K, N)
    return vit.forward_head(vit.norm(x))


def encode_clips(vit: nn.Module, video: torch.Tensor, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K, 3, H, W) normalised clips -> (B, dim) features. `frames` (B,): each clip's real frames, 1
    (an image, padded) or K; None: all K. Every rank runs the same modules whatever its batch holds (ZeRO-3
    gathers weights per module call)."""
    B, K = video.shape[:2]
    if frames is None:
        frames = torch.full((B,), K, dtype=torch.long, device=video.device)
    frames = frames.to(video.device)
    if vit.video_temporal == "mean":
        feats = vit(video.flatten(0, 1)).reshape(B, K, -1)
        mask = (torch.arange(K, device=video.device)[None, :] < frames[:, None]).to(feats.dtype)
        return (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if K == 1:
        return vit(video[:, 0])
    single = frames <= 1
    idx_img, idx_vid = single.nonzero().flatten(), (~single).nonzero().flatten()
    out = torch.cat([vit(video[idx_img, 0]), _space_time(vit, video[idx_vid])])
    order = torch.empty_like(frames)
    order[torch.cat([idx_img, idx_vid])] = torch.arange(B, device=video.device)
    return out[order]
