"""All-gather across data-parallel ranks, with gradient, for losses that need the global batch.

Uses `torch.distributed._functional_collectives.all_gather_single`, whose backward is a
reduce-scatter (sum): each rank's features receive the gradient every rank's loss sends them.
(`torch.distributed.nn.functional.all_gather` is deprecated in torch 2.14.) Without an initialised
process group, or with one rank, the tensors pass through unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def rank_and_world(group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    group = group or dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group)


def gather_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Concatenate `x` (B, ...) from every rank along dim 0, rank order; differentiable.

    Every rank must pass the same shape (drop partial batches: gloo raises, NCCL hangs).
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    from torch.distributed import _functional_collectives as fc

    out = fc.all_gather_single(x.contiguous(), 0, group or dist.group.WORLD)
    return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out
