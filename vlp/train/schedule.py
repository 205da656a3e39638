"""Learning-rate schedule: linear warm-up to `train.lr`, then cosine decay to `train.min_lr`.

DeepSpeed steps it (it is passed as the client `lr_scheduler`) once per optimizer step, and saves
and restores it with each checkpoint.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): warm-up reaches `lr` at step warmup-1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group; the groups' base lr must be `train.lr`.

    The factor is a plain function, so a checkpoint stores only the step count: a resumed run
    follows the schedule of its current config (e.g. a longer `train.steps`).
    """
    lr, min_lr, warmup, total = float(train_cfg.lr), float(train_cfg.min_lr), int(train_cfg.warmup_steps), int(train_cfg.steps)

    def factor(step: int) -> float:
        return lr_at(step, lr, min_lr, warmup, total) / lr if lr > 0 else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["lr_at", "build_scheduler"]
