"""EViT token reorganization for timm ViTs: keep the patch tokens the [CLS] token attends to most.

Liang et al., ICLR 2022, "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (§3, reference code youweiliang/evit `evit.py`, `helpers.py`). At chosen blocks
(0-based 3/6/9 of 12), after the attention residual and before the MLP, the block keeps
k = ceil(keep_rate * n) of its n patch tokens, ranked by the [CLS] row of the attention map averaged
over heads, and (with `fuse`) sums the others, each weighted by its [CLS] attention, into one extra
token appended at the end; [CLS] (and any register tokens) always stay. A fused token is a patch token
for the next reorganization, so ViT-B/16 at 224 px goes 196 -> 139 -> 99 -> 71 patch tokens at 0.7.

Gradients: the top-k choice is discrete, but the fusion weights are the attention probabilities
themselves (not detached, as in the reference), so the loss reaches q/k of [CLS] and the dropped tokens
through the fused token. Training warms the keep rate up as the reference's `adjust_keep_rate`: 1.0
for `shrink_start` optimizer steps, then a half-cosine down to `keep_rate` over `shrink_steps`; each
EViT block counts optimizer steps in a persistent `evit_step` buffer advanced by `after_step()` (the
model's `after_step`, called once per optimizer step by the trainer) and restored with checkpoints.
Eval mode always uses the target keep rate, as the reference does at inference.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.config import ConfigError


def keep_rate_at(step: int, keep_rate: float, shrink_start: int, shrink_steps: int) -> float:
    """The reference's warm-up: 1.0 before `shrink_start`, cosine to `keep_rate` over `shrink_steps`."""
    if step < shrink_start:
        return 1.0
    if step >= shrink_start + shrink_steps:
        return keep_rate
    t = (step - shrink_start) / shrink_steps
    return keep_rate + (1.0 - keep_rate) * 0.5 * (1.0 + math.cos(math.pi * t))


def attention_with_cls(attn: nn.Module, x: torch.Tensor, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention.forward` on `x` (B,N,C), plus the [CLS] row of its attention probabilities over the
    patch tokens, averaged over heads: (B, N - num_prefix), float32.

    The output goes through fused scaled-dot-product attention; the [CLS] row is recomputed from the same
    q and k (one query: a small extra matmul), so no full N x N probability matrix is kept.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, H, 1, N)
    cls_attn = logits.softmax(dim=-1).mean(dim=1)[:, 0, num_prefix:]
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), cls_attn


def reorganize(x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, num_prefix: int = 1,
               fuse: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Keep the top ceil(keep_rate * n) of the n patch tokens of `x` (B, num_prefix + n, C) by `cls_attn`
    (B, n); with `fuse`, append the attention-weighted sum of the rest as one token.

    Returns (tokens, kept) where `kept` (B, k) indexes the kept patch tokens (in order of decreasing
    attention, the order they take in the output), or (x, None) when every token is kept.
    """
    n = x.shape[1] - num_prefix
    k = math.ceil(keep_rate * n)
    if k >= n:
        return x, None
    patches = x[:, num_prefix:]
    kept = cls_attn.topk(k, dim=1).indices
    parts = [x[:, :num_prefix], patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))]
    if fuse:
        weights = cls_attn.scatter(1, kept, 0.0).to(x.dtype)  # attention of the dropped tokens, 0 elsewhere
        parts.append(torch.einsum("bn,bnc->bc", weights, patches).unsqueeze(1))
    return torch.cat(parts, dim=1), kept


class EViTBlock(nn.Module):
    """A timm ViT `Block` that reorganizes its tokens between attention and MLP.

    It takes over the block's own submodules under the same names, so state-dict keys (and pretrained
    weights loaded before wrapping) are unchanged.
    """

    def __init__(self, block: nn.Module, keep_rate: float, num_prefix: int, fuse: bool = True,
                 shrink_start: int = 0, shrink_steps: int = 0):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.keep_rate, self.num_prefix, self.fuse = float(keep_rate), int(num_prefix), bool(fuse)
        self.shrink_start, self.shrink_steps = int(shrink_start), int(shrink_steps)
        self.register_buffer("evit_step", torch.zeros(1, dtype=torch.long))

    def current_keep_rate(self) -> float:
        if not self.training or self.shrink_start == self.shrink_steps == 0:  # no step read (a GPU sync)
            return self.keep_rate
        return keep_rate_at(int(self.evit_step.item()), self.keep_rate, self.shrink_start, self.shrink_steps)

    def after_step(self) -> None:
        """Advance the keep-rate schedule by one optimizer step."""
        self.evit_step += 1

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("EViT blocks take no attention mask: token reorganization changes the sequence")
        # one code path at every keep rate (also 1.0 in warm-up): ZeRO-3 sees the same module order each step
        out, cls_attn = attention_with_cls(self.attn, self.norm1(x), self.num_prefix)
        x = x + self.drop_path1(self.ls1(out))
        x, _ = reorganize(x, cls_attn, self.current_keep_rate(), self.num_prefix, self.fuse)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}, num_prefix={self.num_prefix}"


def check_evit(ecfg: Any, key: str) -> None:
    """Range checks of `model.<key>.evit` that need no model."""
    if not 0.0 < ecfg.keep_rate <= 1.0:
        raise ConfigError(f"bad value for 'model.{key}.evit.keep_rate': want 0 < r <= 1 (1.0 = off, paper 0.7), "
                          f"got {ecfg.keep_rate}")
    if ecfg.shrink_start < 0 or ecfg.shrink_steps < 0:
        raise ConfigError(f"bad value for 'model.{key}.evit.shrink_start/shrink_steps': must be >= 0, got "
                          f"{ecfg.shrink_start}/{ecfg.shrink_steps}")


def replace_blocks(model: nn.Module, indices: Any, option: str, method: str, paper: str,
                   wrap: Callable[[nn.Module], nn.Module], tower: str = "") -> None:
    """Replace blocks `indices` (0-based) of a timm VisionTransformer with a class token by `wrap(block)`,
    in place; each must be timm's plain `Block` with `timm.layers.Attention`. `option` is the config key
    named in errors (e.g. 'model.vision.evit'), `method` the method's name, `paper` its block choice."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    blocks = getattr(model, "blocks", None)
    if blocks is None or getattr(model, "cls_token", None) is None:
        raise ConfigError(f"{option}: needs a timm VisionTransformer with a class token ({method} ranks tokens "
                          f"by [CLS] attention); {f'the tower {tower!r} ' if tower else ''}{type(model).__name__} has "
                          f"{'no blocks' if blocks is None else 'no class token'}")
    chosen = sorted(set(int(i) for i in indices))
    if not chosen or chosen[0] < 0 or chosen[-1] >= len(blocks):
        raise ConfigError(f"bad value for '{option}.blocks': {list(indices)}; want 0-based indices of the "
                          f"tower's {len(blocks)} blocks ({paper})")
    for i in chosen:
        blk = blocks[i]
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ConfigError(f"{option}: block {i} is {type(blk).__name__} with "
                              f"{type(getattr(blk, 'attn', None)).__name__}; {method} supports timm's plain "
                              "vision_transformer.Block with timm.layers.Attention")
        blocks[i] = wrap(blk)


def add_evit(model: nn.Module, ecfg: Any, key: str = "vision", tower: str = "") -> nn.Module:
    """Replace blocks `ecfg.blocks` of a timm VisionTransformer (in place) by EViT blocks; returns `model`."""
    check_evit(ecfg, key)
    replace_blocks(model, ecfg.blocks, f"model.{key}.evit", "EViT", "paper: [3, 6, 9] of 12",
                   lambda blk: EViTBlock(blk, ecfg.keep_rate, model.num_prefix_tokens, ecfg.fuse,
                                         ecfg.shrink_start, ecfg.shrink_steps), tower)
    return model


def token_counts(model: nn.Module, image_size: int) -> list:
    """Patch tokens entering each block and the final norm of a timm ViT in eval mode (a 1-image probe)."""
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1] - model.num_prefix_tokens))
             for b in model.blocks]
    hooks.append(model.norm.register_forward_pre_hook(
        lambda m, args: counts.append(args[0].shape[1] - model.num_prefix_tokens)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model.forward_features(torch.zeros(1, 3, image_size, image_size, dtype=p.dtype, device=p.device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return counts


__all__ = ["EViTBlock", "add_evit", "replace_blocks", "attention_with_cls", "reorganize", "keep_rate_at", "check_evit", "token_counts"]
