"""Resume a checkpoint on another layout: per-parameter training state out of any checkpoint, into any engine.

A checkpoint written by N ranks at ZeRO stage s is resumed on M ranks at stage s' (`vlp.checkpoint.load`
reports a layout change whenever the world size or the ZeRO stage differ, and the trainer then calls
`load_resharded`; with both unchanged DeepSpeed's own `load_checkpoint` restores the engine bit for
bit). Two steps:

1. `read_training_state(ckpt_dir)`: the state of every parameter as whole tensors, independent of how it
   was partitioned: fp32 master weights (`vlp.checkpoint.consolidated_state_dict`, which also gives
   buffers such as ALBEF's queues and momentum towers), AdamW's `exp_avg`/`exp_avg_sq` and the step
   count. The moments are cut out of DeepSpeed's files with the layout the file itself records: stage 0
   (torch's optimizer state, one entry per parameter), ZeRO-1/2 and DeepSpeed's BF16_Optimizer (each
   rank's flat fp32 partition and the fragment of every parameter in it, `param_slice_mappings`), ZeRO-3
   (each parameter split in `ceil(numel / world)` pieces, one per rank, laid end to end in each rank's
   flat groups, in the order of `param_shapes`).
2. `apply_training_state(engine, state)`: every rank gives DeepSpeed the whole tensors and DeepSpeed's
   own partitioning keeps this rank's part: the module's weights and buffers (under ZeRO-3 one parameter
   at a time through `GatheredParameters`), the fp32 masters (`safe_set_full_fp32_param`; under ZeRO-3
   the same partition, padded first: see `_set_zero3_piece`), and the moments written into the
   optimizer's state at the place DeepSpeed's fragment mapping gives.

Why not DeepSpeed's universal checkpoint (`ds_to_universal` + `checkpoint.load_universal`)? It covers
ZeRO 1-3 on both sides but not stage 0 (torch's optimizer, our default for small models) on either, it
writes a second full copy of the checkpoint to disk before loading, and it has to be chosen in the
DeepSpeed config before the engine exists. The reader here needs no conversion step and covers 0-3 in
both directions; the partitioning itself is still DeepSpeed's.

What is not carried over: fp16's dynamic loss scale (it restarts from the configured initial scale), and
DeepSpeed's CPU-offloaded optimizer (ZeRO-Offload) as a target is refused (its state lives in DeepSpeed's
C++ Adam). Each rank holds one full fp32 copy of the weights and the two moments while loading.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from vlp.checkpoint import (MASTER_NAMES, OPTIMIZER_NAMES, CheckpointError, _load_deepspeed_file,
                            _masters_from_config, _zero_rank, consolidated_state_dict)
from vlp.train.engine import _unfused_masters

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainingState:
    """A checkpoint's training state, one whole tensor per name."""
    weights: Dict[str, torch.Tensor]  # fp32 masters of trained parameters, frozen parameters and buffers
    moments: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> exp_avg, exp_avg_sq
    step: int = 0  # AdamW's step count (bias correction)
    layout: str = ""  # how the checkpoint was partitioned, in words


def _step_of(entry: Dict[str, Any]) -> int:
    s = entry.get("step", 0)
    return int(s.item() if isinstance(s, torch.Tensor) else s)


def _stage0_moments(ckpt_dir: str, states: Dict[str, Any]) -> TrainingState:
    """torch's optimizer state inside `mp_rank_00_model_states.pt` (stage 0): its parameters are numbered
    across groups in group order; the names come from the checkpoint (OPTIMIZER_NAMES, or MASTER_NAMES for
    DeepSpeed's fp16/bf16 wrapper) or, for older checkpoints, from the groups rebuilt from its config."""
    opt = states.get("optimizer")
    if not isinstance(opt, dict):
        raise CheckpointError(f"{ckpt_dir}: no optimizer state in mp_rank_00_model_states.pt")
    inner = opt.get("optimizer_state_dict", opt)  # FP16_UnfusedOptimizer wraps torch's state dict
    if "state" not in inner or "param_groups" not in inner:
        raise CheckpointError(f"{ckpt_dir}: optimizer state of an unknown kind ({sorted(opt)[:6]}): vlp reads "
                              "torch's AdamW state and DeepSpeed's fp16/bf16 wrapper of it")
    names = states.get(OPTIMIZER_NAMES) or states.get(MASTER_NAMES) or _masters_from_config(ckpt_dir)
    flat = [n for g in names for n in g]
    ids = [i for g in inner["param_groups"] for i in g["params"]]
    if len(ids) != len(flat):
        raise CheckpointError(f"{ckpt_dir}: the optimizer holds {len(ids)} parameters, the names recorded for "
                              f"its groups {len(flat)}")
    moments, step = {}, 0
    for name, i in zip(flat, ids):
        entry = inner["state"].get(i, {})
        if all(k in entry for k in MOMENTS):
            moments[name] = {k: entry[k] for k in MOMENTS}
            step = max(step, _step_of(entry))
    return TrainingState({}, moments, step)


def _partitioned_moments(ckpt_dir: str, files: List[str]) -> TrainingState:
    """ZeRO-1/2 and BF16_Optimizer files: per rank, per group, a flat partition and each parameter's
    fragment in it; a parameter is its fragments in rank order."""
    pieces: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    step = 0
    for path in sorted(files, key=_zero_rank):
        osd = _load_deepspeed_file(path)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state")
        if not isinstance(base, dict) or "state" not in base:
            raise CheckpointError(f"{path}: base optimizer state is not a state dict (an elastic checkpoint?): "
                                  "vlp cannot cut it per parameter")
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            entry = base["state"].get(g, {})
            if not all(k in entry for k in MOMENTS):
                continue
            step = max(step, _step_of(entry))
            for name, frag in mapping.items():
                for k in MOMENTS:
                    pieces.setdefault(name, {}).setdefault(k, []).append(entry[k].narrow(0, frag.start, frag.numel))
    moments = {name: {k: torch.cat(v) for k, v in parts.items()} for name, parts in pieces.items()}
    return TrainingState({}, moments, step)


def _zero3_moments(ckpt_dir: str, files: List[str]) -> TrainingState:
    """ZeRO-3 files: each rank's flat groups laid end to end hold, for every parameter in `param_shapes`
    order, its `ceil(numel / world)` elements of this rank (as DeepSpeed's zero_to_fp32 reads them)."""
    files = sorted(files, key=_zero_rank)
    world = len(files)
    model_files = sorted(glob.glob(os.path.join(ckpt_dir, "zero_pp_rank_*_mp_rank_*_model_states.pt")),
                         key=_zero_rank)
    if not model_files:
        raise CheckpointError(f"{ckpt_dir}: ZeRO-3 optimizer files without zero_pp_rank_*_model_states.pt")
    shapes = torch.load(model_files[0], map_location="cpu", weights_only=False)["param_shapes"]
    order = [(name, torch.Size(shape).numel()) for group in shapes for name, shape in group.items()]
    flats: Dict[str, List[torch.Tensor]] = {k: [] for k in MOMENTS}
    step = 0
    for path in files:
        osd = _load_deepspeed_file(path)["optimizer_state_dict"]
        if int(osd.get("partition_count", world)) != world:
            raise CheckpointError(f"{ckpt_dir}: {world} ZeRO-3 optimizer files for {osd['partition_count']} ranks")
        state = osd["optimizer_state_dict"]["state"]
        entries = [state[i] for i in sorted(state)]
        if not entries or not all(k in e for e in entries for k in MOMENTS):
            return TrainingState({}, {}, 0)  # saved before the first optimizer step
        step = max(step, _step_of(entries[0]))
        for k in MOMENTS:
            flats[k].append(torch.cat([e[k].reshape(-1) for e in entries]))
    moments: Dict[str, Dict[str, torch.Tensor]] = {}
    offset = 0
    for name, numel in order:
        part = math.ceil(numel / world)
        moments[name] = {k: torch.cat([f.narrow(0, offset, part) for f in flats[k]])[:numel] for k in MOMENTS}
        offset += part
    return TrainingState({}, moments, step)


def read_training_state(ckpt_dir: str) -> TrainingState:
    """Whole fp32 weights, buffers, AdamW moments and step count of the checkpoint in `ckpt_dir`."""
    optim = glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt"))
    if optim:
        first = _load_deepspeed_file(optim[0]).get("optimizer_state_dict", {})
        stage = int(first.get("zero_stage", 0))
        if stage == 3:
            state, layout = _zero3_moments(ckpt_dir, optim), f"ZeRO-3 over {len(optim)} ranks"
        else:
            state = _partitioned_moments(ckpt_dir, optim)
            layout = (f"ZeRO-{stage} over {len(optim)} ranks" if stage else
                      f"DeepSpeed's BF16_Optimizer over {len(optim)} ranks")
    else:
        path = os.path.join(ckpt_dir, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{ckpt_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
        state, layout = _stage0_moments(ckpt_dir, _load_deepspeed_file(path)), "stage 0 (no ZeRO)"
    state.weights = consolidated_state_dict(ckpt_dir)
    state.layout = layout
    for name, m in state.moments.items():
        w = state.weights.get(name)
        if w is None or any(v.numel() != w.numel() for v in m.values()):
            raise CheckpointError(f"{ckpt_dir}: the optimizer moments of {name} do not match its weight "
                                  f"({None if w is None else tuple(w.shape)})")
        state.moments[name] = {k: v.reshape(w.shape).float() for k, v in m.items()}
    return state


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, BF16_Optimizer, the fp16 unfused one)."""
    seen = optimizer
    for _ in range(4):
        if isinstance(seen, torch.optim.Optimizer) and not hasattr(seen, "optimizer"):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise CheckpointError(f"cannot find the torch optimizer inside {type(optimizer).__name__}")


def _ensure_state(opt: torch.optim.Optimizer, wrapper: Any, step: int) -> None:
    """AdamW creates its state at the first step; a resumed one needs it now (zeros, then filled). ZeRO-3
    shows the optimizer one flat sub-group per group at a time, so its flats come from the wrapper."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if isinstance(opt, DeepSpeedCPUAdam):
        raise CheckpointError("resuming on another layout into DeepSpeed's CPU Adam (ZeRO-Offload) is not "
                              "supported: resume with the checkpoint's world size and ZeRO stage, or without offload")
    on_device = bool(opt.param_groups[0].get("fused") or opt.param_groups[0].get("capturable"))
    tensors = [p for group in opt.param_groups for p in group["params"]]
    tensors += [p for p in getattr(wrapper, "fp32_partitioned_groups_flat", []) if all(p is not q for q in tensors)]
    for p in tensors:
        st = opt.state[p]
        for k in MOMENTS:
            if k not in st:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")


def _set_zero3_piece(p: torch.Tensor, value: torch.Tensor, key: Optional[str]) -> None:
    """This rank's piece of `value` into ZeRO-3's fp32 partition of `p` (key None) or its optimizer state
    `key`. DeepSpeed's own `safe_set_full_fp32_param` cuts the piece at `rank * piece` without padding, so on
    the last rank of a parameter whose size the world size does not divide it reads past the end; this
    pads first and otherwise takes the same partition DeepSpeed's setter writes to."""
    opt = p._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n = part.numel()
    start = n * opt._get_param_partition_rank(p)
    flat = value.reshape(-1).float()
    piece = flat[start:start + n]
    if piece.numel() < n:
        piece = torch.cat([piece, piece.new_zeros(n - piece.numel())])
    part.data.copy_(piece)


@torch.no_grad()
def apply_training_state(engine, state: TrainingState, rank: int) -> None:
    """Collective: load `state` into a freshly built engine, each rank keeping what its partition holds."""
    from deepspeed.utils import safe_set_full_fp32_param

    module = engine.module
    params = dict(module.named_parameters())
    persistent = set(module.state_dict().keys())  # buffers a module keeps out of its state (masks) are rebuilt
    buffers = {n: b for n, b in module.named_buffers() if n in persistent}
    have, need = set(state.weights), set(params) | set(buffers)
    if need - have or have - need:
        raise CheckpointError(f"the checkpoint's weights do not fit this model: missing {sorted(need - have)[:5]}, "
                              f"unexpected {sorted(have - need)[:5]} (did model.* change?)")
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    if zero3:
        import deepspeed

        for name, p in params.items():  # the same order on every rank: each is a collective
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(state.weights[name].reshape(p.shape))
        for name, b in buffers.items():
            b.copy_(state.weights[name])
    else:
        module.load_state_dict(state.weights, strict=True)

    opt = _torch_optimizer(engine.optimizer)
    _ensure_state(opt, engine.optimizer, state.step)
    masters = _unfused_masters(engine.optimizer)
    for name, p in params.items():
        if not p.requires_grad:
            continue
        w, m = state.weights[name], state.moments.get(name)
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's piece of the fp32 partition and of each moment
            _set_zero3_piece(p, w, None)
            for k in MOMENTS:
                _set_zero3_piece(p, m[k] if m else torch.zeros_like(w), k)
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, BF16_Optimizer: this rank's fragment of the flat partition
            safe_set_full_fp32_param(p, w)
            hp = p._hp_mapping
            if hp is None:
                continue  # no fragment of this parameter lives on this rank
            flat = opt.param_groups[hp.param_group_index]["params"][0]
            lp, dst = hp.lp_fragment_address, hp.hp_fragment_address
            for k in MOMENTS:
                value = (m[k] if m else torch.zeros_like(w)).reshape(-1).narrow(0, lp.start, lp.numel)
                opt.state[flat][k].narrow(0, dst.start, dst.numel).copy_(value)
        else:  # stage 0: the parameter (fp32) or its fp32 master (fp16/bf16) is what torch's AdamW updates
            master = masters.get(id(p), p)
            master.data.copy_(w.reshape(master.shape))
            for k in MOMENTS:
                opt.state[master][k].copy_((m[k] if m else torch.zeros_like(w)).reshape(master.shape))


def load_resharded(engine, path: str, rank: int) -> None:
    """Collective: checkpoint `path` into an engine of another world size or ZeRO stage, with the engine's
    own counters and LR schedule from the checkpoint's model states file."""
    apply_training_state(engine, read_training_state(path), rank)
    model_files = sorted(glob.glob(os.path.join(path, "*mp_rank_00_model_states.pt")))
    states = torch.load(model_files[0], map_location="cpu", weights_only=False)
    engine.global_steps = int(states.get("global_steps", 0))
    engine.global_samples = int(states.get("global_samples", 0))
    engine.skipped_steps = int(states.get("skipped_steps", 0))
    if engine.lr_scheduler is not None and states.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])


__all__ = ["TrainingState", "read_training_state", "apply_training_state", "load_resharded"]
