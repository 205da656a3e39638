"""BUS: bottom-up patch summarization of the image tokens the fusion encoder reads, guided by the text.

Jiang, Xu, Ye, Ye, Li, Yan, Bi, Zhang, Huang, Huang, ICCV 2023, "BUS: Efficient and Effective
Vision-language Pre-training with Bottom-Up Patch Summarization" (arXiv 2307.08504).

What the paper states (abstract, introduction and Fig. 2 "(a) Overview of our VLP model BUS. (b) The
details of the Bottom-Up Patch Summarization"): a Text-Semantics-Aware Patch Selector (TSPS) *inside*
the ViT backbone does a coarse-grained, bottom-level extraction of text-relevant patches; a light
Transformer-based Patch Abstraction Decoder (PAD) *upon* the backbone abstracts them into a short
sequence; an auxiliary Patch-Text Matching (PTM) task trains the selector and aligns patches with the
text; about 50% higher training efficiency at competitive quality, and better results at a higher
input resolution for the same cost (abstract, https://arxiv.org/abs/2307.08504; third-party summaries
add ~51% faster inference and that PTM complements ITC/ITM/MLM and PrefixLM). The method section (the
selector's score, its layers and keep ratio, the number of summary tokens, how PTM gets its labels) was
not available to us: no official code, and the copies of the paper we could search (its ar5iv HTML)
show the abstract and the start of the introduction only. Every formula and default below is ours,
built on the same authors' TRIPS (Jiang et al., EMNLP 2022, arXiv 2305.04474: text-guided patch
selection at ViT layers 5 and 10 keeping 70%, the rest fused into one token) and on EViT (Liang et
al., ICLR 2022: [CLS]-attention ranking, 196 -> 139 -> 99 -> 71 tokens at 0.7).

Where we differ from the paper on purpose: *nothing the model sees in training may depend on what
evaluation does not have*. A selector inside the ViT guided by the paired caption (what the paper
describes) breaks that three ways: the ITC image embedding would be caption-conditioned
in training but caption-free at retrieval (one ViT pass per query otherwise); MLM could read masked
words back through the image tokens selected under the unmasked caption; and ITM negatives would
reuse tokens each image got under its *own* caption, a cue absent at re-ranking, where every
candidate pair is encoded under its own text. Re-running the ViT tail once per condition (ITC,
positive, two negatives, masked caption) would cost up to five ViT tails and lose the speed-up. So
the selection is split at the ViT's output:

- In the ViT, text-agnostic selection (`add_vit_selectors`, blocks `model.bus.blocks`, keep rate
  `model.bus.keep_rate`): EViT's reorganisation (vlp.models.evit.EViTBlock: top ceil(r n) patches
  by the head-averaged [CLS] attention, the rest fused into one token weighted by it). It runs once
  per image and saves the ViT's FLOPs; ITC, zero-shot `encode_image` and every pair below share it.
  Defaults are EViT's (0-based blocks 3, 6, 9 of 12, keep 0.7): this stage *is* EViT now.
- TSPS per (image, caption) pair on the ViT's output tokens (`TextPatchSelector`): each output patch
  p_n gets relevance softmax_n <W_q t, W_k p_n> / sqrt(d) under the caption's text feature t (the text
  encoder's ITC input: [CLS] or the token mean), d = the ViT's head width; the top
  ceil(`model.bus.text_keep_rate` x n) stay and the rest are fused into one relevance-weighted token,
  so the main losses reach the relevance through the fused token. A top-k and a gather per pair, no
  ViT rerun. W_q and W_k read the text feature and the patches detached: the head trains itself, not
  the encoders (BENCHMARKS.md "ALBEF + BUS", "How the selector got its design": an auxiliary loss
  through the ViT's own q/k degraded retrieval). W_q starts random, so the choice depends on the
  caption from the first step.
- PAD (`PatchAbstractionDecoder`, `model.bus.pad_queries` learnable queries, `pad_layers` pre-norm
  decoder layers of the ViT's width and MLP ratio: self-attention among the queries, cross-attention
  to the selected tokens, MLP) runs per pair on the selected tokens; the fusion encoder reads the
  image [CLS] followed by the summaries (without a PAD: [CLS] and the selected tokens). Per pair
  means 5 PAD passes per training sample (3 ITM pairs, MLM, its momentum teacher) instead of 2, so
  the PAD is kept light (1 layer by default; the first layer's query self-attention, the same for
  every pair, runs once per call).
- PTM (`ptm_loss`): the paper's labels are unknown and image-text data has no boxes, so PTM here is
  a matching task between the patches a text selects and that text. For every image i and text j of
  the local batch the relevance head scores image i's output patches under text j; the
  relevance-weighted mean of those (detached) patches, projected to the ITC space, must match text j
  (its ITC feature, detached) better than the other texts, and better than what the other images
  offer text j: a symmetric InfoNCE over the B x B pairs at the model's contrastive temperature
  (detached; `model.bus.ptm_temperature` fixes another). The pooled features are convex combinations
  of one image's patches, so the loss falls only by steering the relevance to the patches that
  identify the text. It trains the relevance head and its projection only.

Which caption selects, in ALBEF (vlp.models.albef): nothing for ITC (the ViT's [CLS]); each ITM pair
(positive, negative image, negative text) its own caption, exactly as `match_scores` does at
re-ranking; MLM the masked caption (the momentum teacher: the momentum text encoder's feature of it).
BUS needs ALBEF's fusion encoder: a dual encoder's image embedding may not see the caption, and
without one BUS would be EViT (`model.vision.evit`) plus a head nothing reads. Measured at ViT-B/16's
196-patch grid with demo widths (configs/demo_bus.yaml; BENCHMARKS.md "ALBEF + BUS"): 0.60 of
ALBEF's training FLOPs and 1.55x its samples/s; the ViT is most of what is left, so the in-ViT keep
rate decides the speed.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.config import ConfigError
from vlp.models.evit import EViTBlock, reorganize, replace_blocks


class TextPatchSelector(nn.Module):
    """TSPS on the ViT's output tokens: per (image, text) pair, keep the text-relevant patch tokens.

    `text_q` (text width -> d, no bias) and `patch_k` (ViT width -> d, no bias), d = the ViT's head
    width; [CLS] (and any other prefix token) always stays first.
    """

    def __init__(self, dim: int, text_dim: int, head_dim: int, keep_rate: float, num_prefix: int, fuse: bool = True):
        super().__init__()
        self.text_q = nn.Linear(text_dim, head_dim, bias=False)
        nn.init.trunc_normal_(self.text_q.weight, std=text_dim ** -0.5)
        self.patch_k = nn.Linear(dim, head_dim, bias=False)
        nn.init.trunc_normal_(self.patch_k.weight, std=dim ** -0.5)
        self.keep_rate, self.num_prefix, self.fuse = float(keep_rate), int(num_prefix), bool(fuse)

    def relevance(self, texts: torch.Tensor, patches: torch.Tensor, pairs: bool = False) -> torch.Tensor:
        """softmax_n <text_q t, patch_k p_n> / sqrt(d), float32. texts (P, text width), patches (P, n, D)
        -> (P, n): pair p is image p under text p; with `pairs`, patches (B, n, D) -> (B, P, n): every
        image under every text. Both inputs enter detached: the head reads them, it does not train them."""
        q = self.text_q(texts.detach().to(patches.dtype))
        k = self.patch_k(patches.detach())
        logits = torch.einsum("td,bnd->btn" if pairs else "bd,bnd->bn", q, k)
        return (logits.float() * q.shape[-1] ** -0.5).softmax(dim=-1)

    def forward(self, tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """tokens (P, prefix + n, D) of the ViT's output, texts (P, text width), one per pair ->
        (P, prefix + k (+ 1 fused), D): the prefix, the k most relevant patches, the fused rest."""
        if texts.shape[0] != tokens.shape[0]:
            raise ValueError(f"TSPS: {texts.shape[0]} texts for {tokens.shape[0]} images")
        rel = self.relevance(texts, tokens[:, self.num_prefix:])
        out, _ = reorganize(tokens, rel, self.keep_rate, self.num_prefix, self.fuse)
        return out

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}, num_prefix={self.num_prefix}"


def ptm_loss(selector: TextPatchSelector, proj: nn.Module, tokens: torch.Tensor, texts: torch.Tensor,
             text_emb: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Patch-text matching over the local batch: tokens (B, prefix + n, D) of the ViT's output, `texts`
    (B, text width) the selector's text features, `text_emb` (B, E) unit-norm ITC text features.

    For pair (image i, text j): pooled_ij = sum_n rel_ijn p_in (patches detached), z_ij =
    normalize(proj(pooled_ij)), logit_ij = <z_ij, t_j> / temperature (t and temperature detached).
    Symmetric cross-entropy with the diagonal as targets. No cross-rank gather: each rank's B x B pairs.
    """
    patches = tokens[:, selector.num_prefix:].detach()
    grid = selector.relevance(texts, patches, pairs=True)  # (B_img, B_txt, n)
    pooled = torch.einsum("ijn,ind->ijd", grid.to(patches.dtype), patches)
    z = F.normalize(proj(pooled).float(), dim=-1)
    logits = torch.einsum("ije,je->ij", z, text_emb.detach().float()) / temperature.detach().float()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------- patch abstraction decoder
class _Attention(nn.Module):
    """Multi-head attention from queries to a key/value sequence, plain Linear modules (ZeRO-3 safe).
    Queries of batch 1 are shared by every context in the batch (projected once)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, (_, Q, D) = context.shape[0], x.shape
        q = self.q(x).reshape(-1, Q, self.heads, D // self.heads).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = self.kv(context).reshape(B, context.shape[1], 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, Q, D))


class _DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.norm_ctx, self.cross_attn = nn.LayerNorm(dim), nn.LayerNorm(dim), _Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), self.norm_ctx(context))
        return x + self.mlp(self.norm3(x))


class PatchAbstractionDecoder(nn.Module):
    """`queries` learnable tokens summarise the image tokens (B, 1 + k, D) through `layers` decoder
    layers; returns [CLS] followed by the summaries: (B, 1 + queries, D). The first layer's
    self-attention and cross-attention queries do not depend on the image: computed once per call,
    not per sequence (BUS runs the PAD once per (image, caption) pair)."""

    def __init__(self, dim: int, queries: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.bus.pad_heads={heads} does not divide the ViT width {dim}")
        self.queries = nn.Parameter(torch.empty(1, queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.layers = nn.ModuleList([_DecoderLayer(dim, heads, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.queries.to(tokens.dtype)  # (1, Q, D) until the first cross-attention makes it (B, Q, D)
        for layer in self.layers:
            x = layer(x, tokens)
        return torch.cat([tokens[:, :1], self.norm(x)], dim=1)


# ------------------------------------------------------------------------------------------ building
def check_bus(bcfg: Any, family: str, vcfg: Any) -> None:
    """Range and compatibility checks of `model.bus` that need no model."""
    if family != "albef":
        raise ConfigError(f"model.bus.enabled=true with model.type={family}: BUS selects patches per (image, caption) "
                          f"pair for a fusion encoder, which a dual encoder has none of, and its image embedding "
                          f"may not see the caption (retrieval and zero-shot have none). What is left is "
                          f"text-agnostic selection: use model.vision.evit.keep_rate=0.7 (EViT) instead")
    for key in ("keep_rate", "text_keep_rate"):
        if not 0.0 < bcfg[key] <= 1.0:
            raise ConfigError(f"bad value for 'model.bus.{key}': want 0 < r <= 1 (TRIPS: 0.7), got {bcfg[key]}")
    if bcfg.pad_queries < 0 or bcfg.pad_layers < 1 or bcfg.pad_heads < 0:
        raise ConfigError(f"bad value for 'model.bus.pad_queries/pad_layers/pad_heads': want >= 0 / >= 1 / >= 0, "
                          f"got {bcfg.pad_queries}/{bcfg.pad_layers}/{bcfg.pad_heads}")
    if bcfg.ptm_weight < 0:
        raise ConfigError(f"bad value for 'model.bus.ptm_weight': must be >= 0, got {bcfg.ptm_weight}")
    if bcfg.ptm_temperature < 0:
        raise ConfigError(f"bad value for 'model.bus.ptm_temperature': must be > 0, or 0 for the model's "
                          f"contrastive temperature; got {bcfg.ptm_temperature}")
    if vcfg.kind != "timm":
        raise ConfigError(f"model.bus: the patch selectors work on a timm ViT; model.vision.kind={vcfg.kind!r} "
                          f"(tower {vcfg.pretrained or vcfg.name!r})")
    if vcfg.evit.keep_rate != 1.0:
        raise ConfigError("model.bus and model.vision.evit both drop patch tokens inside the ViT: use one "
                          "(set model.vision.evit.keep_rate=1.0, or model.bus.keep_rate for BUS's own)")
    if vcfg.locked:
        raise ConfigError("model.bus: the patch selectors train inside the ViT; model.vision.locked must be false")


def check_bus_tower(vision: nn.Module, name: str) -> None:
    """BUS's selectors, PAD and patch ranking need a timm ViT with a class token and blocks: refuse any
    other tower (Swin, ConvNeXt, ...: they feed ALBEF without BUS), naming it."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vision, VisionTransformer) or getattr(vision, "cls_token", None) is None:
        raise ConfigError(f"model.bus: BUS selects patch tokens by [CLS] attention inside a timm ViT with a class "
                          f"token; the vision tower {name!r} ({type(vision).__name__}) is not one. ALBEF "
                          f"takes it without BUS (model.bus.enabled=false)")


def add_vit_selectors(vision: nn.Module, bcfg: Any) -> nn.Module:
    """Make blocks `bcfg.blocks` of a timm VisionTransformer (in place) drop patch tokens text-agnostically,
    by [CLS] attention (EViT blocks at `bcfg.keep_rate`, no warm-up); returns it. keep_rate 1.0: none."""
    if bcfg.keep_rate < 1.0:
        replace_blocks(vision, bcfg.blocks, "model.bus", "BUS", "EViT: [3, 6, 9] of 12",
                       lambda blk: EViTBlock(blk, bcfg.keep_rate, vision.num_prefix_tokens, bcfg.fuse))
    return vision


def build_selector(bcfg: Any, vision: nn.Module, text_dim: int) -> TextPatchSelector:
    """The per-pair text-aware selector on the output tokens of the timm ViT `vision`."""
    return TextPatchSelector(int(vision.embed_dim), int(text_dim), int(vision.blocks[0].attn.head_dim),
                             bcfg.text_keep_rate, vision.num_prefix_tokens, bcfg.fuse)


def build_pad(bcfg: Any, vision: nn.Module) -> Optional[PatchAbstractionDecoder]:
    """The PAD on the timm ViT `vision`: its width, and its blocks' MLP ratio (ViT-B: 4)."""
    if not bcfg.pad_queries:
        return None
    dim = int(vision.embed_dim)
    heads = int(bcfg.pad_heads) or max(1, dim // 64)
    mlp_ratio = vision.blocks[0].mlp.fc1.out_features / dim
    return PatchAbstractionDecoder(dim, int(bcfg.pad_queries), int(bcfg.pad_layers), heads, mlp_ratio)


def kept_counts(n: int, keep_rate: float, blocks: int, fuse: bool = True) -> List[int]:
    """Patch tokens after each of `blocks` selections, starting from n (a fused token counts as a patch)."""
    out = []
    for _ in range(blocks):
        k = math.ceil(keep_rate * n)
        n = k + int(fuse) if k < n else n
        out.append(n)
    return out


__all__ = ["TextPatchSelector", "PatchAbstractionDecoder", "ptm_loss", "add_vit_selectors", "build_selector",
           "build_pad", "check_bus", "check_bus_tower", "kept_counts"]
