"""Learning-rate schedule: linear warm-up to `train.lr`, then cosine decay to `train.min_lr`.

DeepSpeed steps it (it is passed as the client `lr_scheduler`) once per optimizer step, and saves
and restores it with each checkpoint (`WarmupCosine.state_dict`: the step count only).
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


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """`lr_at` for every param group. Its state is the optimizer-step count alone: a resumed run
    restores the count through `load_state_dict` and follows the schedule of its *current* config
    (a longer `train.steps`, another `train.lr`), whatever the checkpoint's config said."""

    def __init__(self, optimizer: torch.optim.Optimizer, train_cfg: DictConfig):
        self.lr, self.min_lr = float(train_cfg.lr), float(train_cfg.min_lr)
        self.warmup, self.total = int(train_cfg.warmup_steps), int(train_cfg.steps)
        super().__init__(optimizer)

    def get_lr(self):
        value = lr_at(self.last_epoch, self.lr, self.min_lr, self.warmup, self.total)
        return [value] * len(self.optimizer.param_groups)

    def state_dict(self):
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: DictConfig) -> WarmupCosine:
    """The warm-up + cosine schedule of `train_cfg`, stepped once per optimizer step."""
    return WarmupCosine(optimizer, train_cfg)


__all__ = ["lr_at", "build_scheduler", "WarmupCosine"]
