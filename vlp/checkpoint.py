"""The checkpoint directory, one owner: writing, finding, reading and ZeRO consolidation.

Layout under `output_dir/checkpoints/`:

    step_0000100/            DeepSpeed's model/optimizer/scheduler files (`save_latest=False`)
        vlp_rank{r}.pt       rank r's data-loader position and RNG states (torch, cuda, numpy, python)
        config.yaml          the resolved config of the run
        vlp_state.json       step, samples seen, world size, every rank's loader state; written by
                             rank 0 after a barrier, so its presence marks the directory complete
    latest                   name of the newest complete checkpoint, written last by rename

DeepSpeed keeps no RNG state and, under ZeRO 0-2, gives every rank rank 0's `client_state`, so
per-rank state lives in our own files. Training writes (`save`, `prune`) and resumes (`find_resume`,
`load`); evaluation, export and `model.init_from` find a checkpoint (`find_checkpoint`), read its
config (`checkpoint_config`) and consolidate its fp32 master weights whatever the precision, ZeRO
stage and world size (`consolidated_state_dict`). Without ZeRO, DeepSpeed saves fp16/bf16 runs' fp32
masters unnamed, so `save` records their names in its client state (`MASTER_NAMES`).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from vlp.config import ConfigError, from_dict
from vlp.dist import all_reduce_sum, barrier, gather_objects
from vlp.models import build_model, param_groups

log = logging.getLogger(__name__)
CHECKPOINTS, LATEST, STATE_FILE, CONFIG_FILE = "checkpoints", "latest", "vlp_state.json", "config.yaml"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (incomplete, another world size, missing files)."""


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where the user pointed: the message lists what is there."""

def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: str) -> int:
    """The step number in a `step_XXXXXXX` directory name."""
    return int(_TAG.match(os.path.basename(path.rstrip("/"))).group(1))


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(path: str) -> None:
    """fsync every file under `path`, then the directories: a checkpoint survives a power cut once
    `latest` names it (rename is atomic, but only fsync makes the data and the names durable)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the files are synced
        pass
    finally:
        os.close(fd)


def rng_state() -> Dict[str, Any]:
    """Every RNG's state in types `torch.load(weights_only=True)` reads: tensors, numbers, strings, tuples."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(ckpt_root: str) -> List[str]:
    """Complete checkpoint directories under `ckpt_root`, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _TAG.match(name)
        if m and os.path.isfile(os.path.join(ckpt_root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(ckpt_root, name)))
    return [p for _, p in sorted(found)]


def find_resume(output_dir: str, resume: str) -> Optional[str]:
    """The checkpoint to resume from: `none` -> None; `auto` -> `latest` (else the newest complete
    one, else None); a path -> that checkpoint, which must be complete."""
    if resume == "none":
        return None
    if resume != "auto":
        path = resume.rstrip("/")
        if os.path.isfile(os.path.join(path, LATEST)) and not os.path.isfile(os.path.join(path, STATE_FILE)):
            path = os.path.join(path, open(os.path.join(path, LATEST)).read().strip())
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise CheckpointError(f"train.resume={resume!r}: {path} is not a complete vlp checkpoint "
                                  f"(no {STATE_FILE}); give a checkpoints/step_XXXXXXX directory")
        return path
    root = os.path.join(output_dir, CHECKPOINTS)
    marker = os.path.join(root, LATEST)
    if os.path.isfile(marker):
        path = os.path.join(root, open(marker).read().strip())
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    done = complete_checkpoints(root)
    return done[-1] if done else None


LOCK_FILE = ".vlp_train.lock"


class RunLock:
    """An exclusive `flock` on OUTPUT_DIR/.vlp_train.lock, held by one process of a training job (rank 0,
    or `vlp train` itself before it starts the ranks): a second job on the same output_dir is refused,
    not interleaved with the first. The kernel drops the lock when the holder exits, however it exits.
    (Multi-node runs need output_dir on a shared filesystem; flock works on local disks and NFSv4.)"""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def in_use_error(self) -> "CheckpointError":
        holder = ""
        try:
            holder = f" (process {open(self.path).read().strip()})"
        except OSError:
            pass
        return CheckpointError(f"output_dir {os.path.dirname(self.path)} is in use by another training job{holder}: "
                               "two jobs would interleave their checkpoints. Wait for it, stop it, or use another "
                               "output_dir")


def check_run_dir(output_dir: str, resume_from: Optional[str]) -> None:
    """A run writes only into a checkpoints/ directory that is its own: a fresh start (`resume_from`
    None) needs it empty of complete checkpoints, a resume needs every checkpoint there to be at or
    before the step it resumes from. Otherwise its own saves would move `latest` backwards and
    `prune` would delete the other (newer) checkpoints, or a later `resume=auto`, export or eval would
    silently take another run's weights. Raises CheckpointError naming what is there and the ways out."""
    root = os.path.join(output_dir, CHECKPOINTS)
    done = complete_checkpoints(root)
    named = resume_from is not None and _TAG.match(os.path.basename(resume_from.rstrip("/")))
    start = step_of(resume_from) if named else -1  # a resume from elsewhere counts as a fresh start here
    ahead = [p for p in done if step_of(p) > start]
    if not ahead:
        return
    names = ", ".join(os.path.basename(p) for p in ahead[:3]) + (", ..." if len(ahead) > 3 else "")
    if resume_from is None:
        raise CheckpointError(
            f"output_dir {output_dir} already holds checkpoints of another run ({names}) and this run starts "
            "fresh (train.resume=none, or a resume path elsewhere): it would prune or mix with them. Use a new "
            "output_dir, continue that run with train.resume=auto, or move its checkpoints away yourself")
    raise CheckpointError(
        f"train.resume={resume_from} is at step {start}, but output_dir {output_dir} holds later checkpoints "
        f"({names}): saving from step {start} on would prune them or mix the two histories. Resume into a "
        "new output_dir (train.resume=PATH output_dir=NEW), or move the later checkpoints away yourself")


def save(engine, output_dir: str, step: int, samples_seen: int, loader_state: Any, config_yaml: str,
         rank: int, world_size: int, keep_last: int) -> str:
    """Collective: every rank calls it at the same step boundary. Returns the checkpoint directory."""
    root = os.path.join(output_dir, CHECKPOINTS)
    tag = step_tag(step)
    path = os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(path):  # a leftover from a run that died while saving this step
            shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(root, tag=tag, client_state={"vlp_step": step, **_master_names(engine),
                                                        **optimizer_names(engine)}, save_latest=False)
    torch.save({"rank": rank, "loader": loader_state, "rng": rng_state()},
               os.path.join(path, f"vlp_rank{rank}.pt.tmp"))
    os.replace(os.path.join(path, f"vlp_rank{rank}.pt.tmp"), os.path.join(path, f"vlp_rank{rank}.pt"))
    loader_states = gather_objects(loader_state)  # also the barrier after every rank's files
    if rank == 0:
        write_atomic(os.path.join(path, "config.yaml"), config_yaml.encode())
        state = {"step": step, "samples_seen": samples_seen, "world_size": world_size,
                 "zero_stage": int(engine.zero_optimization_stage()), "time": time.time(), "loader": loader_states}
        write_atomic(os.path.join(path, STATE_FILE), json.dumps(state, indent=1, default=str).encode())
        fsync_tree(path)  # every rank's files are complete (the gather above was the barrier)
        write_atomic(os.path.join(root, LATEST), tag.encode())
        _fsync_dir(root)
        prune(root, keep_last)
    barrier()
    return path


def prune(ckpt_root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete older ones (0 keeps all)."""
    if keep_last <= 0:
        return
    done = complete_checkpoints(ckpt_root)
    keep = set(done[-keep_last:])
    newest = step_of(done[-1]) if done else -1
    for name in os.listdir(ckpt_root):
        m = _TAG.match(name)
        full = os.path.join(ckpt_root, name)
        if m and full not in keep and int(m.group(1)) < newest:
            shutil.rmtree(full, ignore_errors=True)


def load_own_state(path: str) -> Dict[str, Any]:
    """A `vlp_rank{r}.pt` with `torch.load(weights_only=True)`: nothing in it can run code. Files from
    before the RNG state was stored as tensors hold numpy arrays, allowed by name (numpy's array
    reconstructor, ndarray, dtype: data, not code)."""
    legacy = [np.ndarray, np.dtype, getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]
    legacy += [type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(legacy):
        return torch.load(path, map_location="cpu", weights_only=True)


def _saved_zero_stage(path: str, state: Dict[str, Any]) -> int:
    """The ZeRO stage a checkpoint was written with (recorded since resume-anywhere; before, its config's)."""
    if "zero_stage" in state:
        return int(state["zero_stage"])
    try:
        from omegaconf import OmegaConf

        return int(OmegaConf.load(os.path.join(path, CONFIG_FILE)).train.zero_stage)
    except Exception:
        return -1


def _read_own(path: str, rank: int, world_size: int, zero_stage: int) -> Dict[str, Any]:
    """This rank's part of our state in checkpoint `path` (no collective). With the world size and ZeRO stage
    of the checkpoint, that is this rank's loader position and RNG states (`reshard` False); on another
    layout there is no "this rank's" part: every rank gets all ranks' loader states (`loaders`) and no RNG
    state, and the caller loads the engine with `vlp.train.reshard.load_resharded` (`reshard` True)."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    saved_stage = _saved_zero_stage(path, state)
    out = {"step": state["step"], "samples_seen": state["samples_seen"], "loaders": state.get("loader", []),
           "world_size": int(state["world_size"]), "zero_stage": saved_stage, "loader": None, "rng": None,
           "reshard": state["world_size"] != world_size or saved_stage != zero_stage}
    if out["reshard"]:
        if len(out["loaders"]) != int(state["world_size"]):
            raise CheckpointError(f"{path}/{STATE_FILE} holds {len(out['loaders'])} loader states for "
                                  f"{state['world_size']} ranks: the checkpoint is incomplete")
        return out
    mine = os.path.join(path, f"vlp_rank{rank}.pt")
    if not os.path.isfile(mine):
        raise CheckpointError(f"{path} has no {os.path.basename(mine)}: the checkpoint is incomplete")
    try:
        ours = load_own_state(mine)
    except Exception as e:  # torn or corrupt file: the caller may fall back
        raise CheckpointError(f"{mine} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    out.update(loader=ours["loader"], rng=ours["rng"])
    return out


def load(engine, path: str, rank: int, world_size: int, device: torch.device, fallback: bool = False
         ) -> Tuple[str, Dict[str, Any]]:
    """Collective: restore engine (model, optimizer, LR schedule) from checkpoint `path` and return (the
    checkpoint loaded, our state for this rank). Every rank reads its own files first and the ranks agree
    before DeepSpeed loads. A checkpoint of another world size or ZeRO stage is not loaded here: our
    state says so (`reshard`), holds every rank's loader position and no RNG state, and the caller
    loads the engine with `vlp.train.reshard.load_resharded`. With `fallback` (train.resume=auto), a
    checkpoint some rank cannot read is set aside (renamed `step_N.unreadable`: nothing is deleted) with a warning and the previous complete one
    is tried; otherwise the error is raised."""
    root = os.path.dirname(path.rstrip("/"))
    older = [p for p in reversed(complete_checkpoints(root)) if step_of(p) < step_of(path)] \
        if fallback and _TAG.match(os.path.basename(path.rstrip("/"))) else []
    stage = int(engine.zero_optimization_stage())
    for cand in [path] + older:
        try:
            ours, err = _read_own(cand, rank, world_size, stage), None
        except CheckpointError as e:
            ours, err = None, e
        if all_reduce_sum({"unreadable": float(err is not None)}, device)["unreadable"] == 0:
            if ours["reshard"]:
                return cand, ours
            load_path, _ = engine.load_checkpoint(root, tag=os.path.basename(cand), load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {cand}")
            return cand, ours
        if not fallback:
            raise err or CheckpointError(f"{cand}: another rank cannot read its part of this checkpoint")
        if rank == 0:
            log.warning("checkpoint %s cannot be read on every rank (%s); set aside as %s.unreadable, trying the "
                        "previous one", cand, err or "another rank's files", os.path.basename(cand))
            os.replace(cand, cand + ".unreadable")
        barrier()
    raise CheckpointError(f"no checkpoint under {root} can be read on every rank (tried {len(older) + 1})")


@dataclass
class Checkpoint:
    path: str  # the step directory
    run_dir: Optional[str]  # the run directory above checkpoints/, when the layout has one
    state: Dict[str, Any] = field(default_factory=dict)  # vlp_state.json
    step: int = 0


def _complete_steps(root: str) -> List[int]:
    return [step_of(p) for p in complete_checkpoints(root)]


def find_checkpoint(path: str, step: Optional[int] = None) -> Checkpoint:
    """A run dir, its checkpoints/ dir or a step dir (+ optional step number) -> the checkpoint."""
    path = os.path.abspath(path.rstrip("/") or "/")
    if not os.path.isdir(path):
        raise CheckpointNotFound(f"--checkpoint {path}: no such directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)):  # a step directory
        root = os.path.dirname(path)
        found = _TAG.match(os.path.basename(path))
        if step is not None and (not found or int(found.group(1)) != step):
            raise CheckpointNotFound(f"--checkpoint {path} is one checkpoint; --step {step} does not match it "
                                     "(give the run directory to pick a step)")
        ckpt_dir = path
    else:
        root = path if os.path.basename(path) == CHECKPOINTS or not os.path.isdir(
            os.path.join(path, CHECKPOINTS)) else os.path.join(path, CHECKPOINTS)
        steps = _complete_steps(root)
        if step is not None:
            if step not in steps:
                have = ", ".join(map(str, steps)) or "none"
                raise CheckpointNotFound(f"--step {step}: {root} has no complete checkpoint step_{step:07d} "
                                         f"(complete steps: {have})")
            ckpt_dir = os.path.join(root, step_tag(step))
        else:
            marker = os.path.join(root, LATEST)
            tag = open(marker).read().strip() if os.path.isfile(marker) else ""
            if tag and os.path.isfile(os.path.join(root, tag, STATE_FILE)):
                ckpt_dir = os.path.join(root, tag)
            elif steps:
                ckpt_dir = os.path.join(root, step_tag(steps[-1]))
            else:
                raise CheckpointNotFound(
                    f"--checkpoint {path}: no complete checkpoint (a checkpoints/step_XXXXXXX directory with "
                    f"{STATE_FILE}); give a training run directory, its checkpoints/ directory or one step directory")
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        state = json.load(f)
    run_dir = os.path.dirname(root) if os.path.basename(root) == CHECKPOINTS else None
    m = _TAG.match(os.path.basename(ckpt_dir))
    return Checkpoint(ckpt_dir, run_dir, state, int(state.get("step", m.group(1) if m else 0)))


_RUN_ONLY = ("data.train_shards", "data.eval_shards", "data.sources", "train.", "eval.", "output_dir")


def _resolved(conf, path: str) -> Dict[str, Any]:
    """A stored config with its interpolations resolved, for building, evaluating and exporting the model.
    Configs are stored with `${oc.env:VAR}` unresolved, so secrets stay in the environment. Here a string
    read from the environment for a run-only setting (shards, train.*, eval.*, output_dir) becomes "":
    nothing downstream needs it, and an export must not publish it. Elsewhere (model.*) it is resolved; an
    unset variable there becomes "" with a warning naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    raw = OmegaConf.to_container(conf, resolve=False)
    missing: List[str] = []

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "${oc.env:" in node:
            if key.startswith(_RUN_ONLY):
                return ""
            try:
                return OmegaConf.to_container(OmegaConf.create({"v": node}), resolve=True)["v"]
            except InterpolationResolutionError:
                missing.append(key)
                return ""
        return node

    data = OmegaConf.to_container(OmegaConf.create(walk(raw, "")), resolve=True)
    if missing:
        log.warning("%s: %s read from environment variables that are not set now; left empty", path,
                    ", ".join(missing))
    return data


def checkpoint_config(ckpt: Checkpoint):
    """The validated run config stored with the checkpoint (its config.yaml, else the run's)."""
    from omegaconf import OmegaConf

    candidates = [os.path.join(ckpt.path, CONFIG_FILE)]
    if ckpt.run_dir:
        candidates.append(os.path.join(ckpt.run_dir, CONFIG_FILE))
    for cand in candidates:
        if os.path.isfile(cand):
            data = _resolved(OmegaConf.load(cand), cand)
            break
    else:
        data = ckpt.state.get("config")
        if not isinstance(data, dict):
            raise ConfigError(f"{ckpt.path}: no {CONFIG_FILE} (nor a 'config' entry in {STATE_FILE})")
    data.setdefault("train", {})["resume"] = "none"  # the stored resume path may be gone; export never resumes
    return from_dict(data)


MASTER_NAMES = "vlp_fp32_master_names"  # client-state key: names of DeepSpeed's unnamed fp32 master copies
OPTIMIZER_NAMES = "vlp_optimizer_param_names"  # client-state key: parameter names per torch optimizer group
_ZERO_RANK = re.compile(r"zero_pp_rank_(\d+)_")


def _master_names(engine) -> Dict[str, Any]:
    """Client state naming the fp32 master weights when DeepSpeed stores them unnamed: fp16/bf16 without
    ZeRO (its FP16_UnfusedOptimizer saves `fp32_groups`, lists of tensors per parameter group, in
    `mp_rank_00_model_states.pt`, while the module's own weights there are rounded to 16 bits)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        return {}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {MASTER_NAMES: [[names[id(p)] for p in group] for group in engine.optimizer.fp16_groups]}


def optimizer_names(engine) -> Dict[str, Any]:
    """Client state naming the parameters of each optimizer group at stage 0 (torch's optimizer state
    numbers them only): what `vlp.train.reshard` needs to resume the moments on another layout."""
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "optimizer"):
        return {}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {OPTIMIZER_NAMES: [[names.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]}


def _load_deepspeed_file(path: str) -> Dict[str, Any]:
    """A DeepSpeed optimizer file: it pickles DeepSpeed's own classes (loss scaler, fragment addresses), so
    it is read as DeepSpeed's `zero_to_fp32` reads it (not `weights_only`), memory-mapped."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _zero_rank(path: str) -> int:
    return int(_ZERO_RANK.search(os.path.basename(path)).group(1))


def _masters_from_config(ckpt_dir: str) -> List[List[str]]:
    """The parameter names of the optimizer's groups, rebuilt as training built them (the model from the
    checkpoint's config, `param_groups`): for checkpoints written before vlp recorded MASTER_NAMES."""
    cfg = checkpoint_config(find_checkpoint(ckpt_dir))
    model = build_model(cfg.model, pretrained=False)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, float(cfg.train.weight_decay))]


def _unfused_masters(ckpt_dir: str, path: str, states: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The module dict of a fp16/bf16 checkpoint without ZeRO with its 16-bit parameters replaced by the
    optimizer's fp32 masters (`fp32_groups`), named by MASTER_NAMES. Older checkpoints lack the names: the
    parameter groups are rebuilt from the config, and then each master must also round to its saved 16-bit
    weight (a check that the groups line up, not only their shapes)."""
    sd = dict(states["module"])
    groups = states["optimizer"]["fp32_groups"]
    recorded = states.get(MASTER_NAMES)
    names = recorded or _masters_from_config(ckpt_dir)

    def mismatch() -> Optional[str]:
        if [len(g) for g in names] != [len(g) for g in groups]:
            return f"{[len(g) for g in groups]} masters per group for {[len(g) for g in names]} parameters"
        for name, master in zip((n for g in names for n in g), (m for g in groups for m in g)):
            low = sd.get(name)
            if low is None or low.shape != master.shape or (
                    not recorded and not torch.equal(master.to(low.dtype), low)):
                return f"parameter {name} differs"
        return None

    bad = mismatch()
    if bad:
        how = ("the names recorded with them" if recorded else
               "the parameter groups of the model built from its config.yaml (the checkpoint predates vlp "
               "recording their names)")
        raise CheckpointError(
            f"{path}: its fp32 master weights (DeepSpeed's fp16/bf16 optimizer without ZeRO) do not line up with "
            f"{how}: {bad}. Exporting its 16-bit weights instead would lose precision; resume the run for one "
            "step with this vlp (it then records the names) and use that checkpoint")
    sd.update(zip((n for g in names for n in g), (m for g in groups for m in g)))
    return sd


def _bf16_optimizer_masters(ckpt_dir: str, files: List[str]) -> Dict[str, torch.Tensor]:
    """DeepSpeed's BF16_Optimizer (bf16 with ZeRO-1-like partitioned fp32 masters, used e.g. with
    `data_types.grad_accum_dtype: fp32`) writes `bf16_zero_pp_rank_*` files that `zero_to_fp32` rejects
    (no ZeRO stage in them). Each rank's file holds its flat fp32 partition per group and the fragment of
    each parameter in it (`param_slice_mappings`): the fragments in rank order are the parameter."""
    model_file = os.path.join(ckpt_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(model_file):
        raise CheckpointError(f"{ckpt_dir}: BF16_Optimizer files ({os.path.basename(files[0])}) without "
                              "mp_rank_00_model_states.pt: the checkpoint is incomplete")
    states = torch.load(model_file, map_location="cpu", weights_only=True)
    parts = [_load_deepspeed_file(f)["optimizer_state_dict"] for f in sorted(files, key=_zero_rank)]
    counts = parts[0]["partition_count"]
    world = max(counts) if isinstance(counts, (list, tuple)) else int(counts)
    if world != len(files):
        raise CheckpointError(f"{ckpt_dir}: {len(files)} BF16_Optimizer files for {world} ranks: the checkpoint "
                              "is incomplete")
    pieces: Dict[str, List[torch.Tensor]] = {}
    for part in parts:
        for flat, mapping in zip(part["single_partition_of_fp32_groups"], part["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    sd = dict(states["module"])  # buffers and frozen parameters
    for group in states["param_shapes"]:
        for name, shape in group.items():
            full = torch.cat(pieces.get(name, [torch.empty(0)]))
            if full.numel() != torch.Size(shape).numel():
                raise CheckpointError(f"{files[0]}: the fp32 fragments of {name} hold {full.numel()} values, its "
                                      f"shape {tuple(shape)} needs {torch.Size(shape).numel()}")
            sd[name] = full.view(shape)
    return sd


def consolidated_state_dict(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """One fp32 state dict of the fp32 master weights, whatever the precision and ZeRO stage: ZeRO 1-3
    (`zero_pp_rank_*` / `bf16_zero_pp_rank_*` files, any world size) through DeepSpeed's `zero_to_fp32`;
    DeepSpeed's BF16_Optimizer files from their fp32 fragments; stage 0 from the module dict DeepSpeed saved
    whole (`mp_rank_00_model_states.pt`), whose parameters are 16-bit in fp16/bf16 runs: then the
    optimizer's fp32 masters saved beside them replace them. Frozen parameters and buffers are what the
    module held (DeepSpeed keeps no fp32 copy of frozen parameters)."""
    optim = glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt"))
    if optim:
        first = _load_deepspeed_file(optim[0]).get("optimizer_state_dict", {})
        if "zero_stage" not in first and "param_slice_mappings" in first:
            sd = _bf16_optimizer_masters(ckpt_dir, optim)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(sys.stderr):  # its progress prints must not mix with our output
                sd = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir),
                                                              tag=os.path.basename(ckpt_dir))
    else:
        files = sorted(glob.glob(os.path.join(ckpt_dir, "mp_rank_*_model_states.pt")))
        if not files:
            raise CheckpointNotFound(f"{ckpt_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
        if len(files) > 1:
            raise NotImplementedError(f"{ckpt_dir}: {len(files)} model-parallel shards; export supports data "
                                      "parallelism (with any ZeRO stage) only")
        states = torch.load(files[0], map_location="cpu", weights_only=True)  # tensors and plain data only
        opt = states.get("optimizer")
        if isinstance(opt, dict) and "fp32_groups" in opt:
            sd = _unfused_masters(ckpt_dir, files[0], states)
        elif isinstance(opt, dict) and "fp32_groups_flat" in opt:
            raise CheckpointError(
                f"{files[0]}: the fp32 master weights of DeepSpeed's fused FP16_Optimizer (DeepSpeed's FusedAdam) "
                "are stored flat and unnamed: vlp cannot tell which is which. Export needs the fp32 masters; train "
                "with vlp's optimizer (torch AdamW) or with ZeRO (train.zero_stage >= 1)")
        else:
            sd = states["module"]  # fp32 training: the module's weights are the masters
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


__all__ = ["CheckpointError", "CheckpointNotFound", "Checkpoint", "write_atomic", "find_resume", "save", "load",
           "prune", "complete_checkpoints", "RunLock", "check_run_dir", "fsync_tree", "step_tag", "step_of",
           "rng_state", "set_rng_state", "find_checkpoint", "checkpoint_config", "consolidated_state_dict",
           "CHECKPOINTS", "LATEST", "STATE_FILE", "CONFIG_FILE", "MASTER_NAMES", "OPTIMIZER_NAMES"]
