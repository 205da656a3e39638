"""The little distributed glue eval needs: join the launcher's process group, gather Python objects.

Eval runs as a world of one without a launcher; under `deepspeed --num_gpus N --module vlp.eval ...`
(or torchrun) every rank encodes its share and `all_gather_object` brings the pieces together.
"""
from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def init_from_env() -> Tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the env:// process group when a launcher set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def gather_objects(obj: Any, world_size: int) -> List[Any]:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
