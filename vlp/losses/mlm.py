"""Masked language modelling conditioned on the image, with momentum distillation (ALBEF §3.2, §3.3).

BERT's recipe (Devlin et al. 2019, §3.1): 15% of the tokens are chosen; of those 80% become [MASK],
10% a random token and 10% stay. Padding and special tokens ([CLS], [SEP], [PAD], [MASK]) are never
chosen. The loss is (1 - alpha) * CE + alpha * KL(momentum prediction || prediction) over the chosen
tokens, computed on those positions only (the vocabulary projection of the others would be wasted).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE = -100


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, u_select: torch.Tensor, u_kind: torch.Tensor,
                random_ids: torch.Tensor, prob: float, special_ids: Iterable[int],
                mask_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (input ids with masking applied, labels: the original id where chosen, else -100).

    u_select, u_kind: (B, L) uniforms in [0, 1); random_ids: (B, L) replacement ids. The caller draws
    them, so one seeded draw over the global batch gives every rank its own rows of it.
    """
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), device=ids.device, dtype=ids.dtype)
    eligible = attention.bool() & ~torch.isin(ids, special)
    chosen = eligible & (u_select < prob)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    out = torch.where(chosen & (u_kind < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (u_kind >= 0.8) & (u_kind < 0.9), random_ids.to(ids.dtype), out)
    return out, labels


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor], alpha: float,
             denominator: float) -> torch.Tensor:
    """Distilled MLM loss of the chosen tokens: logits (M, V), targets (M,), teacher_logits (M, V).

    Sums over the M tokens and divides by `denominator` (the global number of chosen tokens divided by
    the number of ranks), so the mean over ranks equals the mean over all chosen tokens of the global
    batch, however unevenly the chosen tokens fall across ranks.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    total = F.nll_loss(log_p, targets, reduction="sum")
    if alpha and teacher_logits is not None:
        q = F.softmax(teacher_logits.float(), dim=-1)
        kl = F.kl_div(log_p, q, reduction="sum")
        total = (1.0 - alpha) * total + alpha * kl
    return total / max(float(denominator), 1e-12)


__all__ = ["IGNORE", "mask_tokens", "mlm_loss"]
