"""Symmetric InfoNCE over image/text embeddings, with the negatives of every rank.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", §2.3 and Fig. 3): cross-entropy over cosine similarities scaled by a learnable
temperature, averaged over both directions. ALIGN (Jia et al. 2021, §3.2 eqs. 1-3) sums the two
directions and uses label smoothing 0.1.

Two distributed forms, both giving the gradients of the loss on the concatenated global batch
once the trainer averages gradients over ranks:
- full (default): every rank scores the gathered (N, N) matrix, N = world × B;
- local (open_clip's `local_loss`): each rank scores its B rows against all N columns with labels
  offset by rank × B; (B, N) memory instead of (N, N). The per-rank value differs from the global
  loss; its mean over ranks equals it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.dist import gather_with_grad, rank_and_world


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = False,
    label_smoothing: float = 0.0,
    sum_directions: bool = False,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """InfoNCE of L2-normalised (B, D) features; `logit_scale` is the multiplier (1/T), not its log.

    Row i of `image_features` matches row i of `text_features`; every rank passes the same B.
    """
    rank, world = rank_and_world(group)
    batch = image_features.shape[0]
    all_image = gather_with_grad(image_features, group)
    all_text = gather_with_grad(text_features, group)
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(batch, device=image_features.device) + rank * batch
    else:
        logits_per_image = logit_scale * all_image @ all_text.T
        logits_per_text = logits_per_image.T
        labels = torch.arange(batch * world, device=image_features.device)
    loss_i = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    loss_t = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return loss_i + loss_t if sum_directions else (loss_i + loss_t) / 2
