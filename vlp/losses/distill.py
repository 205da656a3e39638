"""Image-text contrastive loss with momentum distillation and a feature queue (ALBEF's ITC).

Li et al. 2021, "Align before Fuse: Vision and Language Representation Learning with Momentum
Distillation" (§3.2 eq. 1-2, §3.3 eq. 4): each online feature is scored against the momentum features
of the batch and a queue of earlier momentum features; the targets mix the one-hot positive with the
momentum model's own softmax, weighted by alpha. We write the distillation term as KL(q_m || p), as
the paper does; the reference code's soft cross-entropy differs from it by the (constant) entropy of
q_m, so values differ and gradients are the same. Here the batch columns are the momentum features of
the *global* batch (gathered), so the loss equals the one-process loss on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """Distillation weight after `step` optimizer steps: linear from 0 to `alpha` over `warmup_steps`
    (ALBEF: over the first epoch, `alpha * min(1, i / len(loader))`), then constant."""
    if warmup_steps <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, step / warmup_steps)


def distilled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                            alpha: float) -> torch.Tensor:
    """(1 - alpha) * CE(logits, labels) + alpha * KL(softmax(teacher) || softmax(logits)), row means."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_p, labels)
    if alpha == 0:
        return ce
    q = F.softmax(teacher_logits.float(), dim=-1)
    kl = F.kl_div(log_p, q, reduction="batchmean")
    return (1.0 - alpha) * ce + alpha * kl


def itc_distill_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                     text_feat_m: torch.Tensor, image_queue: torch.Tensor, text_queue: torch.Tensor,
                     temp: torch.Tensor, alpha: float, offset: int = 0) -> torch.Tensor:
    """Mean of image->text and text->image losses for this rank's rows.

    image_feat/text_feat: (B, D) online, L2-normalised, this rank's rows. image_feat_m/text_feat_m:
    (N, D) momentum features of the global batch (no grad); row `offset + i` is the positive of row i.
    image_queue/text_queue: (Q, D) earlier momentum features. temp: the (clamped) temperature.
    """
    b = image_feat.shape[0]
    labels = torch.arange(b, device=image_feat.device) + offset
    text_cols = torch.cat([text_feat_m, text_queue]).float()
    image_cols = torch.cat([image_feat_m, image_queue]).float()
    sim_i2t = image_feat.float() @ text_cols.T / temp
    sim_t2i = text_feat.float() @ image_cols.T / temp
    with torch.no_grad():
        rows = slice(offset, offset + b)
        sim_i2t_m = image_feat_m[rows].float() @ text_cols.T / temp
        sim_t2i_m = text_feat_m[rows].float() @ image_cols.T / temp
    loss_i2t = distilled_cross_entropy(sim_i2t, labels, sim_i2t_m, alpha)
    loss_t2i = distilled_cross_entropy(sim_t2i, labels, sim_t2i_m, alpha)
    return (loss_i2t + loss_t2i) / 2


__all__ = ["alpha_at", "distilled_cross_entropy", "itc_distill_loss"]
