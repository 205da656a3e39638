"""ITM re-ranking for fusion models: re-score each query's top-k ITC candidates with `match_scores`.

ALBEF (Li et al., "Align before Fuse", NeurIPS 2021, Sec. 4 / appendix) retrieves the top-k
candidates by image-text contrastive similarity and orders them by the image-text matching head.
BLIP (Li et al., ICML 2022) and LAVIS's ALBEF evaluation order them by the ITM score plus the ITC
similarity instead; both orders come from the same ITM pass: `reranked` (ITM log-odds alone, ALBEF) and
`reranked_itc` (ITM log-odds + the ITC logit sim/temperature, a product of the two experts' odds).
Each (image, text) pair is scored once, by the rank that holds the image's pixels (images stay where
they were decoded; the captions are small and known everywhere), then the scores are gathered.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from vlp.dist import gather_objects
from vlp.eval.encode import autocast
from vlp.eval.retrieval import reranked_ranks


@torch.no_grad()
def pair_scores(model, tokenizer, pairs: torch.Tensor, owner_of_image: torch.Tensor, pixels: Dict[int, torch.Tensor],
                stream_index: List[int], texts: List[str], rank: int, world_size: int, device: torch.device,
                batch_size: int) -> torch.Tensor:
    """ITM score of each (image position, text position) pair in `pairs` (P, 2), computed by the rank
    owning the image and gathered."""
    mine = (owner_of_image[pairs[:, 0]] == rank).nonzero().flatten().tolist()
    scores: Dict[int, float] = {}
    for s in range(0, len(mine), batch_size):
        rows = mine[s:s + batch_size]
        images = torch.stack([pixels[stream_index[int(pairs[r, 0])]] for r in rows]).to(device)
        ids, mask = tokenizer([texts[int(pairs[r, 1])] for r in rows])
        with autocast(device):
            out = model.match_scores(images, ids.to(device), mask.to(device)).float().cpu()
        scores.update(zip(rows, out.flatten().tolist()))
    merged: Dict[int, float] = {}
    for part in gather_objects(scores, world_size):
        merged.update(part)
    if len(merged) != len(pairs):
        raise RuntimeError(f"ITM scores for {len(merged)} of {len(pairs)} pairs: a rank lacks image pixels")
    return torch.tensor([merged[i] for i in range(len(pairs))])


def hardest_negatives(top: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
    """(Q, 2) (query, gallery) index pairs: each query with its best-ranked non-matching candidate in `top`
    (Q, k) ITC order; queries whose k candidates all match are left out."""
    wrong = gallery_ids[top] != query_ids[:, None]
    has = wrong.any(1)
    first = wrong.float().argmax(1)
    q = torch.arange(top.shape[0])[has]
    return torch.stack([q, top[has, first[has]]], -1)


def itm_accuracy(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> Dict[str, float]:
    """Held-out ITM accuracy from log-odds scores (> 0 = "match"): balanced over positives and negatives,
    so a head that always answers "no match" scores 0.5 whatever the pair mix."""
    pos_acc, neg_acc = float((pos_scores > 0).double().mean()), float((neg_scores <= 0).double().mean())
    return {"balanced_acc": (pos_acc + neg_acc) / 2, "pos_acc": pos_acc, "neg_acc": neg_acc,
            "n_pos": int(pos_scores.numel()), "n_neg": int(neg_scores.numel())}


def itc_logit_scale(model) -> float:
    """1 / the model's ITC temperature (ALBEF's `temperature()`, or CLIP's `logit_scale.exp()`)."""
    if hasattr(model, "temperature"):
        return float(1.0 / model.temperature().detach().float().reshape(-1)[0])
    return float(model.logit_scale.detach().float().exp().reshape(-1)[0])


def rerank(model, tokenizer, ranks: Dict[str, torch.Tensor], txt2img: torch.Tensor, pixels: Dict[int, torch.Tensor],
           stream_index: List[int], texts: List[str], rank: int, world_size: int, device: torch.device,
           batch_size: int, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> Dict[str, torch.Tensor]:
    """i2t/t2i ranks after ITM re-ranking of the `i2t_topk`/`t2i_topk` candidates in `ranks` (`i2t_ranks`,
    `t2i_ranks`: ITM alone; `i2t_ranks_itc`, `t2i_ranks_itc`: ITM log-odds + ITC logit, from the
    normalised embeddings `img_emb`/`txt_emb`), and the held-out ITM accuracy (`itm`) on balanced pairs:
    every text with its image (positives), every text with its hardest ITC negative image and every image
    with its hardest ITC negative text (negatives)."""
    i2t_top, t2i_top = ranks["i2t_topk"], ranks["t2i_topk"]
    n_img, n_txt = i2t_top.shape[0], t2i_top.shape[0]
    img_ids = torch.arange(n_img)
    txt2img = torch.as_tensor(txt2img).long()
    i2t_pairs = torch.stack([torch.arange(n_img)[:, None].expand_as(i2t_top), i2t_top], -1).reshape(-1, 2)
    t2i_pairs = torch.stack([t2i_top, torch.arange(n_txt)[:, None].expand_as(t2i_top)], -1).reshape(-1, 2)
    pos_pairs = torch.stack([txt2img, torch.arange(n_txt)], -1)
    neg_i2t = hardest_negatives(i2t_top, img_ids, txt2img)  # (image, text)
    neg_t2i = hardest_negatives(t2i_top, txt2img, img_ids).flip(1)  # (text, image) -> (image, text)
    groups = [i2t_pairs, t2i_pairs, pos_pairs, neg_i2t, neg_t2i]
    codes, inverse = torch.unique(torch.cat(groups) @ torch.tensor([n_txt, 1]), return_inverse=True)
    pairs = torch.stack([codes // n_txt, codes % n_txt], -1)
    owner = torch.tensor(stream_index) % world_size
    flat = pair_scores(model, tokenizer, pairs, owner, pixels, stream_index, texts, rank, world_size, device,
                       batch_size)[inverse]
    i2t_scores, t2i_scores, pos, neg_a, neg_b = flat.split([len(g) for g in groups])
    i2t_scores, t2i_scores = i2t_scores.view_as(i2t_top), t2i_scores.view_as(t2i_top)
    scale = itc_logit_scale(model)
    img_emb, txt_emb = img_emb.float().cpu(), txt_emb.float().cpu()
    i2t_itc = (img_emb[:, None, :] * txt_emb[i2t_top]).sum(-1) * scale
    t2i_itc = (txt_emb[:, None, :] * img_emb[t2i_top]).sum(-1) * scale
    return {"i2t_ranks": reranked_ranks(i2t_top, i2t_scores, img_ids, txt2img, ranks["i2t_ranks"]),
            "t2i_ranks": reranked_ranks(t2i_top, t2i_scores, txt2img, img_ids, ranks["t2i_ranks"]),
            "i2t_ranks_itc": reranked_ranks(i2t_top, i2t_scores + i2t_itc, img_ids, txt2img, ranks["i2t_ranks"]),
            "t2i_ranks_itc": reranked_ranks(t2i_top, t2i_scores + t2i_itc, txt2img, img_ids, ranks["t2i_ranks"]),
            "itm": itm_accuracy(pos, torch.cat([neg_a, neg_b]))}
