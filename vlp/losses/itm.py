"""Image-text matching (ITM) with contrastive hard negatives (ALBEF §3.2, "ITM").

For every image one negative text and for every text one negative image are drawn from the softmax of
their contrastive similarities, so pairs that look alike are chosen more often. As in LAVIS/BLIP the
positive gets -inf before the softmax and the weights are computed in fp32: adding a small constant
and zeroing the diagonal (the original code) underflows in half precision or at small temperatures,
and `multinomial` then fails with "invalid multinomial distribution".
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def negative_weights(sim: torch.Tensor) -> torch.Tensor:
    """(N, N) similarities (row i's positive at column i) -> row-stochastic fp32 sampling weights with a
    zero diagonal."""
    if sim.shape[0] < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 pairs "
                         "(train.micro_batch_size x ranks >= 2)")
    w = sim.detach().float().clone()
    w.fill_diagonal_(float("-inf"))
    return F.softmax(w, dim=1)


@torch.no_grad()
def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One negative per row of the global batch: (text index for each image, image index for each text).

    `sim_i2t` (N, N) scores images (rows) against texts; `sim_t2i` texts against images. Drawing with a
    generator seeded alike on every rank gives every rank the same N draws: each keeps its own rows,
    and the result does not depend on how the batch is split across ranks.
    """
    neg_text = torch.multinomial(negative_weights(sim_i2t), 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(negative_weights(sim_t2i), 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def itm_labels(batch: int, device: torch.device) -> torch.Tensor:
    """[1] * B positives, then [0] * 2B negatives (text with a negative image, image with a negative text)."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(2 * batch, dtype=torch.long, device=device)])


def itm_loss(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(3B, 2) logits in the order of `itm_labels` -> (cross-entropy, accuracy)."""
    labels = itm_labels(logits.shape[0] // 3, logits.device)
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(1) == labels).float().mean()
    return loss, acc


__all__ = ["negative_weights", "hard_negatives", "itm_labels", "itm_loss"]
