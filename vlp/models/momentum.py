"""Momentum (EMA) copies of online modules, held as fp32 *buffers* rather than parameters.

MoCo (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning", §3.2) and
ALBEF (Li et al. 2021, §3.3): a slowly moving copy θ_m ← m·θ_m + (1−m)·θ of the encoders gives stable
targets. The copy's tensors are buffers so that they are saved and restored with the module's state
dict (and DeepSpeed's checkpoints, any ZeRO stage) while staying outside what DeepSpeed manages:
ZeRO-3 partitions every *parameter* of the engine's module (an EMA written into a partitioned copy is
silently lost) and bf16 mode casts parameters, not buffers, to bf16 (an EMA with m=0.995 in bf16 lags).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator, List, Tuple

import torch
import torch.nn as nn

Slot = Tuple[nn.Module, str]  # (module, attribute name) of one momentum buffer


def buffer_copy(module: nn.Module) -> Tuple[nn.Module, List[Slot]]:
    """A deep copy of `module` whose parameters are fp32 buffers, and the slots of those buffers in the
    order of `module.parameters()` (tied parameters stay tied: one buffer, one slot)."""
    twin = copy.deepcopy(module)
    converted = {}
    slots: List[Slot] = []
    for sub in twin.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            if id(p) not in converted:
                converted[id(p)] = p.detach().clone().float()
                slots.append((sub, name))
            sub.register_buffer(name, converted[id(p)])
    twin.requires_grad_(False)
    if len(slots) != len(list(module.parameters())):
        raise RuntimeError(f"momentum copy of {type(module).__name__}: {len(slots)} buffers for "
                           f"{len(list(module.parameters()))} parameters")
    return twin, slots


def _chunks(params: List[torch.nn.Parameter], max_numel: int) -> Iterator[List[int]]:
    """Index runs of `params` holding at most `max_numel` elements each (the full size under ZeRO-3)."""
    run, size = [], 0
    for i, p in enumerate(params):
        n = int(getattr(p, "ds_numel", p.numel()))
        if run and size + n > max_numel:
            yield run
            run, size = [], 0
        run.append(i)
        size += n
    if run:
        yield run


def _gathered(params: List[torch.nn.Parameter]):
    """Read-only access to ZeRO-3 partitioned parameters; a no-op for ordinary ones.

    No `modifier_rank`: nothing is written back to the parameters (the EMA writes into buffers outside
    the partitioned set), so every rank gathers, reads and releases. Collective: every rank calls it.
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


@torch.no_grad()
def ema_update(online: Iterable[torch.nn.Parameter], slots: List[Slot], momentum: float,
               max_numel: int = 1 << 26) -> None:
    """θ_m ← m·θ_m + (1−m)·θ for each online parameter and its momentum buffer (same order).

    Frozen parameters (requires_grad False, e.g. a frozen LLM block) are skipped: their copy already
    equals them, and gathering them under ZeRO-3 would cost traffic for nothing. Under ZeRO-3 the online
    parameters are gathered in runs of at most `max_numel` elements, in the same order on every rank, so
    peak memory stays bounded and all ranks issue the same collectives.
    """
    params = list(online)
    if len(params) != len(slots):
        raise RuntimeError(f"momentum update: {len(params)} online parameters for {len(slots)} momentum buffers")
    trained = [i for i, p in enumerate(params) if p.requires_grad]
    params, slots = [params[i] for i in trained], [slots[i] for i in trained]
    for run in _chunks(params, max_numel):
        group = [params[i] for i in run]
        with _gathered(group):
            for i, p in zip(run, group):
                mod, name = slots[i]
                buf = getattr(mod, name)
                if buf.shape != p.shape:
                    raise RuntimeError(f"momentum buffer {name} has shape {tuple(buf.shape)}, online parameter "
                                       f"{tuple(p.shape)}")
                buf.mul_(momentum).add_(p.detach().to(buf.dtype), alpha=1.0 - momentum)


@torch.no_grad()
def copy_to_momentum(online: nn.Module, twin: nn.Module) -> None:
    """θ_m ← θ for every parameter of `online` and its buffer in `twin` (a `buffer_copy` of it): restarts
    the EMA from weights loaded after the copy was made (`model.init_from`)."""
    for name, p in online.named_parameters():
        buf = twin.get_buffer(name)
        if buf.shape != p.shape:
            raise RuntimeError(f"momentum buffer {name} has shape {tuple(buf.shape)}, online parameter "
                               f"{tuple(p.shape)}")
        buf.copy_(p.detach().to(buf.dtype))


__all__ = ["buffer_copy", "ema_update", "copy_to_momentum"]
