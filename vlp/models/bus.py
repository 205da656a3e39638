"""BUS: bottom-up patch summarization of the image tokens, guided by the paired text.

Jiang, Xu, Ye, Ye, Li, Yan, Bi, Zhang, Huang, Huang, ICCV 2023, "BUS: Efficient and Effective
Vision-language Pre-training with Bottom-Up Patch Summarization" (arXiv 2307.08504). What the paper
states (abstract; Fig. 2 "(a) Overview of our VLP model BUS. (b) The details of the Bottom-Up Patch
Summarization"): a Text-Semantics-Aware Patch Selector (TSPS) *inside* the ViT backbone does a
coarse, bottom-level extraction of text-relevant patches; a light Transformer-based Patch
Abstraction Decoder (PAD) *on top of* the backbone abstracts the kept patches into a short sequence
for the fusion encoder; an auxiliary Patch-Text Matching (PTM) objective teaches the selector which
patches match the text; ~50% higher training efficiency at maintained quality. The method section
(score formula, layers, keep ratio, number of summary tokens, how PTM gets its labels) was not
available to us (no official code; ALGORITHM_NOTES.md, BUS), so every formula and default below is
our proposal, built on the same authors' TRIPS (Jiang et al., EMNLP 2022, arXiv 2305.04474, the
text-relevant patch selection BUS extends) and on EViT's token fusion:

- TSPS (`TSPSBlock`, at `model.bus.blocks`, default 0-based 4 and 9 of 12 = TRIPS's layers 5 and 10,
  keep rate 0.7 as TRIPS): each patch's score is the mean of two distributions over the patches: the
  image [CLS]'s attention (the block's own, averaged over heads: what EViT ranks by) and a
  text-relevance head, softmax_n <W_q t, W_k p_n> / sqrt(d) with the text feature t and the block's
  normalised patch inputs p_n (d = the block's head width; W_q zero-initialised, so the selector
  starts as EViT's ranking). The top ceil(keep_rate * n) patches stay; the rest are fused into one
  token weighted by their scores (TRIPS, EViT), so the main losses reach the scores through the fused
  token. Without a text (`guide=None`) the relevance is uniform and the ranking is exactly the
  text-agnostic [CLS] attention. The head reads the text feature and the patch features detached: it
  trains itself, not the encoders. (TRIPS instead sends the text [CLS] through the block's own query
  projection; measured here, any auxiliary loss through the block's shared q/k, as PTM is, degraded
  retrieval badly, BENCHMARKS.md "BUS", so the selector got its own head.)
- PAD (`PatchAbstractionDecoder`, `model.bus.pad_queries` learnable queries, `pad_layers` pre-norm
  decoder layers: self-attention among queries, cross-attention to the ViT's output tokens, MLP): the
  fusion encoder reads [CLS] followed by the query outputs instead of every kept patch. ITC keeps the
  ViT's [CLS] itself.
- PTM (`ptm_loss`): the paper's labels are unknown to us and there are no boxes in image-text data,
  so PTM here is a matching task between the patches each text selects and that text. At every TSPS
  block, for every image i and every text j of the local batch, the relevance head scores image i's
  patches under text j; the relevance-weighted mean of those (detached) patches, projected to the ITC
  space, must match text j (its ITC feature, detached) better than it matches the other texts, and
  better than the patches other images offer text j: a symmetric InfoNCE over the B x B pairs at the
  model's contrastive temperature (detached; `model.bus.ptm_temperature` fixes another). The pooled
  features are convex combinations of image patches only, so the loss can fall only by steering the
  relevance towards the patches that identify the text. It trains the relevance head and its
  projection only. The pairs are each rank's own batch, not the gathered one.

Evaluation: image embeddings for ITC ranking must not depend on the text they are compared with (one
image pass per query text would make retrieval O(N^2) ViT passes), so `encode_image` runs the
text-agnostic selector ([CLS] attention only, the same module path with a zero text). ALBEF's ITM
re-ranking, which already runs one fusion pass per candidate pair, re-encodes each image under its
candidate text (`match_scores`), as in training.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.config import ConfigError
from vlp.models.evit import attention_with_cls, reorganize, replace_blocks


class TSPSBlock(nn.Module):
    """A timm ViT `Block` that keeps the text-relevant patch tokens between attention and MLP.

    It takes over the block's submodules under their names (state-dict keys unchanged) and adds the
    text-relevance head: `text_q` (text width -> d, no bias, zero init) and `patch_k` (ViT width -> d,
    no bias), d = the block's head width. Set the text for one forward with
    `text_guidance(vision, texts, ptm=...)`.
    """

    def __init__(self, block: nn.Module, keep_rate: float, num_prefix: int, text_dim: int, fuse: bool = True):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        dim, d = block.norm1.normalized_shape[0], block.attn.head_dim
        self.text_q = nn.Linear(text_dim, d, bias=False)
        nn.init.zeros_(self.text_q.weight)
        self.patch_k = nn.Linear(dim, d, bias=False)
        nn.init.trunc_normal_(self.patch_k.weight, std=dim ** -0.5)
        self.keep_rate, self.num_prefix, self.fuse = float(keep_rate), int(num_prefix), bool(fuse)
        self.text_dim = int(text_dim)
        self.guide: Optional[torch.Tensor] = None  # (B, text_dim) texts of this forward, or None
        self.ptm = False  # also score every image under every text of the batch (PTM)
        self.ptm_pooled: Optional[torch.Tensor] = None  # (B_img, B_txt, D) after a PTM forward

    def relevance(self, texts: torch.Tensor, patches: torch.Tensor, pairs: bool = False) -> torch.Tensor:
        """Text-relevance distribution over patches: softmax_n <text_q t, patch_k p_n> / sqrt(d).
        texts (T, text_dim), patches (B, n, D) -> (B, n) with T = B (image i under text i), or with
        `pairs` (B, T, n) (image i under text j). Patch features enter detached: the head reads them."""
        q = self.text_q(texts.detach().to(patches.dtype))  # (T, d)
        k = self.patch_k(patches.detach())  # (B, n, d)
        scale = q.shape[-1] ** -0.5
        if pairs:
            logits = torch.einsum("td,bnd->btn", q, k)
        else:
            logits = torch.einsum("bd,bnd->bn", q, k)
        return (logits.float() * scale).softmax(dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("TSPS blocks take no attention mask: patch selection changes the sequence")
        B = x.shape[0]
        h = self.norm1(x)
        texts = self.guide
        if texts is None:  # text-agnostic: the same modules run on a zero text -> uniform relevance
            texts = h.new_zeros(B, self.text_dim)
        elif texts.shape[0] != B:
            raise ValueError(f"TSPS: {texts.shape[0]} texts for {B} images")
        out, cls_attn = attention_with_cls(self.attn, h, self.num_prefix)
        patches = h[:, self.num_prefix:]
        if self.ptm:
            grid = self.relevance(texts, patches, pairs=True)  # (B, B, n)
            rel = grid.diagonal(dim1=0, dim2=1).T  # (B, n): image i under its own text i
            # the patch values are evidence, not trained by PTM: its gradient reaches the relevance head
            self.ptm_pooled = torch.einsum("ijn,ind->ijd", grid.to(h.dtype), patches.detach())
        else:
            rel = self.relevance(texts, patches)
        scores = 0.5 * (cls_attn + rel)
        x = x + self.drop_path1(self.ls1(out))
        x, _ = reorganize(x, scores, self.keep_rate, self.num_prefix, self.fuse)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}, num_prefix={self.num_prefix}, text_dim={self.text_dim}"


def tsps_blocks(vision: nn.Module) -> List[TSPSBlock]:
    return [m for m in vision.modules() if isinstance(m, TSPSBlock)]


@contextlib.contextmanager
def text_guidance(vision: nn.Module, texts: Optional[torch.Tensor], ptm: bool = False) -> Iterator[None]:
    """Within the block, the TSPS blocks of `vision` select patches under `texts` (B, text_dim), one
    text per image (None: text-agnostic); with `ptm`, they also pool every image under every text."""
    blocks = tsps_blocks(vision)
    for b in blocks:
        b.guide, b.ptm, b.ptm_pooled = texts, bool(ptm and texts is not None), None
    try:
        yield
    finally:
        for b in blocks:
            b.guide, b.ptm = None, False


def ptm_loss(vision: nn.Module, proj: nn.Module, text_emb: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Patch-text matching over the pooled features the TSPS blocks kept from the last PTM forward.

    For pair (image i, text j): z_ij = normalize(proj(pooled_ij)), logit_ij = <z_ij, t_j> / temperature
    with t_j = `text_emb` (unit-norm ITC text features, detached). Symmetric cross-entropy with the
    diagonal as targets, averaged over the TSPS blocks. Local batch (no cross-rank gather): each rank's
    B x B pairs.
    """
    losses = []
    t = text_emb.detach().float()
    temp = temperature.detach().float()
    for block in tsps_blocks(vision):
        pooled = block.ptm_pooled
        block.ptm_pooled = None
        if pooled is None:
            raise RuntimeError("ptm_loss: no pooled features; run the vision tower inside "
                               "text_guidance(vision, texts, ptm=True) first")
        z = F.normalize(proj(pooled).float(), dim=-1)  # (B_img, B_txt, E)
        logits = torch.einsum("ije,je->ij", z, t) / temp
        labels = torch.arange(logits.shape[0], device=logits.device)
        losses.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- patch abstraction decoder
class _Attention(nn.Module):
    """Multi-head attention from queries to a key/value sequence, plain Linear modules (ZeRO-3 safe)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, Q, D = x.shape
        q = self.q(x).reshape(B, Q, self.heads, D // self.heads).transpose(1, 2)
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
    layers; returns [CLS] followed by the summaries: (B, 1 + queries, D)."""

    def __init__(self, dim: int, queries: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.bus.pad_heads={heads} does not divide the ViT width {dim}")
        self.queries = nn.Parameter(torch.empty(1, queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.layers = nn.ModuleList([_DecoderLayer(dim, heads, mlp_ratio) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.queries.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        for layer in self.layers:
            x = layer(x, tokens)
        return torch.cat([tokens[:, :1], self.norm(x)], dim=1)


# ------------------------------------------------------------------------------------------ building
def check_bus(bcfg: Any, family: str, vcfg: Any) -> None:
    """Range and compatibility checks of `model.bus` that need no model."""
    if not 0.0 < bcfg.keep_rate <= 1.0:
        raise ConfigError(f"bad value for 'model.bus.keep_rate': want 0 < r <= 1 (TRIPS: 0.7), got {bcfg.keep_rate}")
    if bcfg.pad_queries < 0 or bcfg.pad_layers < 1 or bcfg.pad_heads < 0:
        raise ConfigError(f"bad value for 'model.bus.pad_queries/pad_layers/pad_heads': want >= 0 / >= 1 / >= 0, "
                          f"got {bcfg.pad_queries}/{bcfg.pad_layers}/{bcfg.pad_heads}")
    if bcfg.ptm_weight < 0:
        raise ConfigError(f"bad value for 'model.bus.ptm_weight': must be >= 0, got {bcfg.ptm_weight}")
    if bcfg.ptm_temperature < 0:
        raise ConfigError(f"bad value for 'model.bus.ptm_temperature': must be > 0, or 0 for the model's "
                          f"contrastive temperature; got {bcfg.ptm_temperature}")
    if family != "albef" and bcfg.pad_queries:
        raise ConfigError(f"model.bus.pad_queries={bcfg.pad_queries}: the Patch Abstraction Decoder feeds a fusion "
                          f"encoder, which model.type={family} has none of; set it to 0 (TSPS and PTM still apply)")
    if vcfg.kind != "timm":
        raise ConfigError(f"model.bus: the patch selector goes inside a timm ViT; model.vision.kind={vcfg.kind!r}")
    if vcfg.evit.keep_rate != 1.0:
        raise ConfigError("model.bus and model.vision.evit both drop patch tokens inside the ViT: use one "
                          "(set model.vision.evit.keep_rate=1.0 or model.bus.enabled=false)")
    if vcfg.locked:
        raise ConfigError("model.bus: the patch selector trains inside the ViT; model.vision.locked must be false")


def add_tsps(vision: nn.Module, bcfg: Any, text_dim: int) -> nn.Module:
    """Replace blocks `bcfg.blocks` of a timm VisionTransformer (in place) by TSPS blocks; returns it."""
    replace_blocks(vision, bcfg.blocks, "model.bus", "TSPS", "TRIPS: [4, 9] of 12",
                   lambda blk: TSPSBlock(blk, bcfg.keep_rate, vision.num_prefix_tokens, text_dim, bcfg.fuse))
    return vision


def build_pad(bcfg: Any, dim: int) -> Optional[PatchAbstractionDecoder]:
    if not bcfg.pad_queries:
        return None
    heads = int(bcfg.pad_heads) or max(1, dim // 64)
    return PatchAbstractionDecoder(dim, int(bcfg.pad_queries), int(bcfg.pad_layers), heads)


def kept_counts(n: int, keep_rate: float, blocks: int, fuse: bool = True) -> List[int]:
    """Patch tokens after each of `blocks` TSPS blocks, starting from n (a fused token counts as a patch)."""
    out = []
    for _ in range(blocks):
        k = math.ceil(keep_rate * n)
        n = k + int(fuse) if k < n else n
        out.append(n)
    return out


__all__ = ["TSPSBlock", "PatchAbstractionDecoder", "text_guidance", "ptm_loss", "add_tsps", "build_pad",
           "check_bus", "tsps_blocks", "kept_counts"]
