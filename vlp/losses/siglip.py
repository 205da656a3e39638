"""Pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", §3.1-3.2).

Every image/text pair is an independent binary problem, logit z_ij = t·<x_i, y_j> + b with label
+1 on the diagonal and -1 elsewhere; the loss is −Σ_ij log σ(label_ij · z_ij) / |B|. Across ranks
each rank scores its own images against the gathered texts (the paper's chunked ring exchange
computes the same sum); after the trainer's gradient averaging this equals the loss over the
concatenated global batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.dist import gather_with_grad, rank_and_world


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Sigmoid loss of L2-normalised (B, D) features; `logit_scale` is t (not log t), `logit_bias` is b."""
    rank, _ = rank_and_world(group)
    batch = image_features.shape[0]
    all_text = gather_with_grad(text_features, group)
    logits = logit_scale * image_features @ all_text.T + logit_bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(batch, device=logits.device)
    labels[rows, rows + rank * batch] = 1.0
    return -F.logsigmoid(labels * logits).sum() / batch
