"""Image-text matching (ITM) with contrastive hard negatives (ALBEF §3.2, "ITM").

For every image one negative text and for every text one negative image are drawn from the softmax of
their contrastive similarities, so pairs that look alike are chosen more often. As in LAVIS/BLIP the
positive gets -inf before the softmax and the weights are computed in fp32: adding a small constant
and zeroing the diagonal (the original code) underflows in half precision or at small temperatures,
and `multinomial` then fails with "invalid multinomial distribution".
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def negative_weights(sim: torch.Tensor, hardness: float = 1.0) -> torch.Tensor:
    """(N, N) similarities (row i's positive at column i) -> row-stochastic fp32 sampling weights with a
    zero diagonal: `hardness` x softmax(sim) + (1 - hardness) x uniform over the other columns."""
    n = sim.shape[0]
    if n < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 pairs "
                         "(train.micro_batch_size x ranks >= 2)")
    w = sim.detach().float().clone()
    w.fill_diagonal_(float("-inf"))
    w = F.softmax(w, dim=1)
    if hardness < 1.0:
        uniform = torch.full_like(w, 1.0 / (n - 1)).fill_diagonal_(0.0)
        w = hardness * w + (1.0 - hardness) * uniform
    return w


def hardness_at(step: int, warmup_steps: int) -> float:
    """Share of the ITM negative drawn by similarity after `step` optimizer steps: a linear curriculum
    from uniform random negatives (0) to ALBEF's contrastive hard negatives (1) over `warmup_steps`."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


@torch.no_grad()
def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, generator: Optional[torch.Generator] = None,
                   hardness: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One negative per row of the global batch: (text index for each image, image index for each text).

    `sim_i2t` (N, N) scores images (rows) against texts; `sim_t2i` texts against images. Drawing with a
    generator seeded alike on every rank gives every rank the same N draws: each keeps its own rows,
    and the result does not depend on how the batch is split across ranks.
    """
    neg_text = torch.multinomial(negative_weights(sim_i2t, hardness), 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(negative_weights(sim_t2i, hardness), 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def itm_labels(batch: int, device: torch.device) -> torch.Tensor:
    """[1] * B positives, then [0] * 2B negatives (text with a negative image, image with a negative text)."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(2 * batch, dtype=torch.long, device=device)])


def itm_loss(logits: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(3B, 2) logits in the order of `itm_labels` -> (cross-entropy, metrics).

    Metrics (detached): `itm_acc` over the 3B pairs (1/3 of them positive, so "always no match" scores
    0.667), `itm_pos_prob` / `itm_neg_prob`, the mean match probability of the positives / negatives:
    at the label-prior plateau both sit near 1/3.
    """
    labels = itm_labels(logits.shape[0] // 3, logits.device)
    loss = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        p = logits.detach().float().softmax(1)[:, 1]
        b = logits.shape[0] // 3
        metrics = {"itm_acc": (logits.detach().argmax(1) == labels).float().mean(),
                   "itm_pos_prob": p[:b].mean(), "itm_neg_prob": p[b:].mean()}
    return loss, metrics


__all__ = ["negative_weights", "hardness_at", "hard_negatives", "itm_labels", "itm_loss"]
