"""Pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", §3.1-3.2).

Every image/text pair is an independent binary problem, logit z_ij = t·<x_i, y_j> + b with label
+1 on the diagonal and -1 elsewhere; the loss is −Σ_ij log σ(label_ij · z_ij) / |B|. Across ranks
each rank scores its own images against the gathered texts (the paper's chunked ring exchange
computes the same sum); after the trainer's gradient averaging this equals the loss over the
concatenated global batch.

`chunked=True` is the paper's ring (§3.3, and open_clip's `SigLipLoss(bidir=False)`): the text blocks
travel rank to rank (`vlp.dist.ring_shift`, one neighbour exchange per step, gradients sent back the
same way) and each step scores the local images against one block of B texts, with its logits
recomputed in the backward pass (`torch.utils.checkpoint`). Peak memory for the loss is then
O(B x B + B x D) per rank instead of O(B x N) logits plus the N x D gathered texts; the sum, and so
the loss and every gradient, is the same (tests/dist/test_siglip_ring.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from vlp.dist import gather_with_grad, rank_and_world, ring_shift


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    chunked: bool = False,
) -> torch.Tensor:
    """Sigmoid loss of L2-normalised (B, D) features; `logit_scale` is t (not log t), `logit_bias` is b."""
    rank, world = rank_and_world(group)
    if chunked and world > 1:
        return _ring(image_features, text_features, logit_scale, logit_bias, group, world)
    batch = image_features.shape[0]
    all_text = gather_with_grad(text_features, group)
    logits = logit_scale * image_features @ all_text.T + logit_bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(batch, device=logits.device)
    labels[rows, rows + rank * batch] = 1.0
    return -F.logsigmoid(labels * logits).sum() / batch


def _block(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
           positive: bool) -> torch.Tensor:
    logits = scale * image @ text.T + bias
    if positive:  # the rank's own texts: +1 on the diagonal, -1 elsewhere
        labels = 2 * torch.eye(len(image), device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * logits).sum()
    return -F.logsigmoid(-logits).sum()


def _ring(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, group,
          world: int) -> torch.Tensor:
    loss = checkpoint(_block, image, text, scale, bias, True, use_reentrant=False)
    block = text
    for _ in range(world - 1):
        block = ring_shift(block, 1, group)  # the previous rank's current block
        loss = loss + checkpoint(_block, image, block, scale, bias, False, use_reentrant=False)
    return loss / image.shape[0]
