"""Image-text retrieval metrics from embeddings: recall@K, mean recall, median and mean rank.

Texts are tied to images by `txt2img` (the image index of each text), so an image may have several
captions (COCO/Flickr30k: 5). A query's rank is the 1-based position of its best-scoring positive.

Tie rule (pessimistic): rank = 1 + the number of *negative* candidates scoring >= the best positive,
so a model that gives everything the same score gets rank N, never rank 1. With real-valued
embeddings ties almost never occur and the numbers equal CLIP_benchmark's, whose `topk` breaks ties
arbitrarily. Similarities are computed in row chunks, so COCO 5k x 25k fits in little memory.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
_CHUNK_ELEMENTS = 1 << 24  # similarity entries per chunk (64 MiB in fp32)


def _check(emb: torch.Tensor, name: str) -> torch.Tensor:
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) matrix, got shape {tuple(emb.shape)}")
    if not torch.isfinite(emb).all():
        raise ValueError(f"{name}: embeddings contain NaN or Inf; the model output is broken")
    return emb.float()


def query_ranks(queries: torch.Tensor, gallery: torch.Tensor, query_ids: torch.Tensor,
                gallery_ids: torch.Tensor, topk: int = 0,
                chunk_size: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pessimistic rank of the best positive for each query, and optionally its top-k gallery indices.

    A gallery item j is a positive of query i when `gallery_ids[j] == query_ids[i]`; every query needs
    at least one positive. Scores are dot products (cosine similarity for normalised embeddings).
    """
    queries, gallery = _check(queries, "queries"), _check(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"embedding widths differ: queries {queries.shape[1]}, gallery {gallery.shape[1]}")
    query_ids, gallery_ids = torch.as_tensor(query_ids).long(), torch.as_tensor(gallery_ids).long()
    n_q, n_g = queries.shape[0], gallery.shape[0]
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // n_g)
    k = min(topk, n_g)
    ranks = torch.empty(n_q, dtype=torch.long)
    top = torch.empty(n_q, k, dtype=torch.long) if k else None
    for s in range(0, n_q, chunk):
        sims = queries[s:s + chunk] @ gallery.T
        pos = query_ids[s:s + chunk, None] == gallery_ids[None, :]
        missing = (~pos.any(1)).nonzero()
        if len(missing):
            raise ValueError(f"query {s + int(missing[0])} has no positive in the gallery")
        best = sims.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        ranks[s:s + chunk] = 1 + ((sims >= best) & ~pos).sum(1)
        if top is not None:
            top[s:s + chunk] = sims.topk(k, dim=1).indices
    return ranks, top


def retrieval_ranks(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt2img: Sequence[int], topk: int = 0,
                    chunk_size: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """Ranks (and top-k candidates) both ways: image->text (`i2t`) and text->image (`t2i`)."""
    txt2img = torch.as_tensor(txt2img).long()
    if txt2img.shape != (txt_emb.shape[0],):
        raise ValueError(f"txt2img has {txt2img.numel()} entries for {txt_emb.shape[0]} texts")
    if len(txt2img) and (txt2img.min() < 0 or txt2img.max() >= img_emb.shape[0]):
        raise ValueError(f"txt2img indices must lie in [0, {img_emb.shape[0]})")
    img_ids = torch.arange(img_emb.shape[0])
    i2t, i2t_top = query_ranks(img_emb, txt_emb, img_ids, txt2img, topk, chunk_size)
    t2i, t2i_top = query_ranks(txt_emb, img_emb, txt2img, img_ids, topk, chunk_size)
    return {"i2t_ranks": i2t, "t2i_ranks": t2i, "i2t_topk": i2t_top, "t2i_topk": t2i_top}


def metrics_from_ranks(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor,
                       ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """R@K as fractions in [0, 1], `mean_recall` over all of them, and median/mean ranks (1-based).

    The median of an even count is the mean of the two middle ranks (numpy's convention).
    """
    out: Dict[str, float] = {}
    recalls = []
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = float((ranks <= k).double().mean())
            recalls.append(out[f"{name}_r{k}"])
    out["mean_recall"] = float(np.mean(recalls))
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        out[f"{name}_median_rank"] = float(np.median(ranks.numpy()))
        out[f"{name}_mean_rank"] = float(ranks.double().mean())
    return out


def retrieval_metrics(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt2img: Sequence[int],
                      ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 0) -> Dict[str, float]:
    """Image<->text retrieval metrics for embeddings; see the module docstring for the tie rule."""
    r = retrieval_ranks(img_emb, txt_emb, txt2img, chunk_size=chunk_size)
    return metrics_from_ranks(r["i2t_ranks"], r["t2i_ranks"], ks)


def reranked_ranks(candidates: torch.Tensor, scores: torch.Tensor, query_ids: torch.Tensor,
                   gallery_ids: torch.Tensor, itc_ranks: torch.Tensor) -> torch.Tensor:
    """Ranks after re-ordering each query's top-k ITC candidates by a second score (ITM).

    The re-scored candidates come first, the rest keep their ITC order behind them (ALBEF, Li et al.
    2021, Sec. 4): a positive among the candidates gets its pessimistic rank among them, a positive
    outside keeps its ITC rank (already > k).
    """
    pos = torch.as_tensor(gallery_ids).long()[candidates] == torch.as_tensor(query_ids).long()[:, None]
    scores = scores.float()
    if not torch.isfinite(scores).all():
        raise ValueError("match scores contain NaN or Inf")
    best = scores.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
    inside = 1 + ((scores >= best) & ~pos).sum(1)
    return torch.where(pos.any(1), inside, itc_ranks)
