"""Find a training checkpoint and consolidate its weights, whatever the ZeRO stage and world size.

Layout read (written by `vlp.train.checkpoint`): `RUN/checkpoints/step_XXXXXXX/` holds DeepSpeed's
files, `config.yaml` (the resolved run config) and `vlp_state.json` (written last: a checkpoint is
complete only with it); `RUN/checkpoints/latest` names the newest complete one.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

CHECKPOINTS, LATEST, STATE_FILE, CONFIG_FILE = "checkpoints", "latest", "vlp_state.json", "config.yaml"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointNotFound(FileNotFoundError):
    """No complete checkpoint where the user pointed: the message lists what is there."""


@dataclass
class Checkpoint:
    path: str  # the step directory
    run_dir: Optional[str]  # the run directory above checkpoints/, when the layout has one
    state: Dict[str, Any] = field(default_factory=dict)  # vlp_state.json
    step: int = 0


def _complete_steps(root: str) -> List[int]:
    steps = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _TAG.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            steps.append(int(m.group(1)))
    return sorted(steps)


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
            ckpt_dir = os.path.join(root, f"step_{step:07d}")
        else:
            marker = os.path.join(root, LATEST)
            tag = open(marker).read().strip() if os.path.isfile(marker) else ""
            if tag and os.path.isfile(os.path.join(root, tag, STATE_FILE)):
                ckpt_dir = os.path.join(root, tag)
            elif steps:
                ckpt_dir = os.path.join(root, f"step_{steps[-1]:07d}")
            else:
                raise CheckpointNotFound(
                    f"--checkpoint {path}: no complete checkpoint (a checkpoints/step_XXXXXXX directory with "
                    f"{STATE_FILE}); give a training run directory, its checkpoints/ directory or one step directory")
    with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
        state = json.load(f)
    run_dir = os.path.dirname(root) if os.path.basename(root) == CHECKPOINTS else None
    m = _TAG.match(os.path.basename(ckpt_dir))
    return Checkpoint(ckpt_dir, run_dir, state, int(state.get("step", m.group(1) if m else 0)))


def checkpoint_config(ckpt: Checkpoint):
    """The validated run config stored with the checkpoint (its config.yaml, else the run's)."""
    from omegaconf import OmegaConf

    from vlp.config import ConfigError, from_dict

    candidates = [os.path.join(ckpt.path, CONFIG_FILE)]
    if ckpt.run_dir:
        candidates.append(os.path.join(ckpt.run_dir, CONFIG_FILE))
    for cand in candidates:
        if os.path.isfile(cand):
            data = OmegaConf.to_container(OmegaConf.load(cand), resolve=True)
            break
    else:
        data = ckpt.state.get("config")
        if not isinstance(data, dict):
            raise ConfigError(f"{ckpt.path}: no {CONFIG_FILE} (nor a 'config' entry in {STATE_FILE})")
    data.setdefault("train", {})["resume"] = "none"  # the stored resume path may be gone; export never resumes
    return from_dict(data)


def consolidated_state_dict(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """One fp32 state dict: ZeRO 1-3 (any world size) through DeepSpeed's `zero_to_fp32`; stage 0
    from the module dict DeepSpeed saved whole (`mp_rank_00_model_states.pt`)."""
    if glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # its progress prints must not mix with our output
            sd = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir), tag=os.path.basename(ckpt_dir))
    else:
        files = sorted(glob.glob(os.path.join(ckpt_dir, "mp_rank_*_model_states.pt")))
        if not files:
            raise CheckpointNotFound(f"{ckpt_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
        if len(files) > 1:
            raise NotImplementedError(f"{ckpt_dir}: {len(files)} model-parallel shards; export supports data "
                                      "parallelism (with any ZeRO stage) only")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def load_trained_model(ckpt: Checkpoint, cfg) -> torch.nn.Module:
    """The run's model built from its config, with the consolidated weights, in eval mode on CPU."""
    from vlp.export.build import build_without_pretrained

    model = build_without_pretrained(cfg.model)
    sd = consolidated_state_dict(ckpt.path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt.path}: the weights do not fit the model built from its config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


__all__ = ["Checkpoint", "CheckpointNotFound", "find_checkpoint", "checkpoint_config", "consolidated_state_dict",
           "load_trained_model"]
