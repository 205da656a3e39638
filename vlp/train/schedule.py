"""Learning-rate schedule: linear warm-up to `train.lr`, then cosine decay to `train.min_lr`.

DeepSpeed steps it (it is passed as the client `lr_scheduler`) once per optimizer step, and saves
and restores it with each checkpoint (`WarmupCosine.state_dict`).

The schedule runs on samples seen, counted in steps of the run's *reference* global batch (the one
it started with): `train.warmup_steps` and `train.steps` mean that many reference batches. While the
global batch (`micro_batch_size x grad_accum x world size`) stays the same this is the plain step
schedule. A run resumed with another global batch continues the same curve by samples and ends after
the same number of samples (`total_samples`), in more or fewer optimizer steps.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


def lr_at(step: float, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based, fractional after a change of global batch): warm-up
    reaches `lr` at step warmup-1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """`lr_at` for every param group, at the position `samples / ref_batch`. Its state is the
    optimizer-step count, the samples seen and the reference batch: a resumed run restores them through
    `load_state_dict` and follows the schedule of its *current* config (a longer `train.steps`, another
    `train.lr`), whatever the checkpoint's config said."""

    def __init__(self, optimizer: torch.optim.Optimizer, train_cfg: DictConfig, global_batch: int = 1):
        self.lr, self.min_lr = float(train_cfg.lr), float(train_cfg.min_lr)
        self.warmup, self.total = int(train_cfg.warmup_steps), int(train_cfg.steps)
        self.batch = self.ref_batch = int(global_batch)  # this run's global batch; the schedule's unit
        self.base_epoch, self.base_samples = 0, 0  # the step and samples seen at the resume point
        super().__init__(optimizer)

    @property
    def samples(self) -> int:
        """Samples seen before the coming optimizer step."""
        return self.base_samples + (self.last_epoch - self.base_epoch) * self.batch

    @property
    def total_samples(self) -> int:
        """Samples the whole run trains on: `train.steps` reference batches."""
        return self.total * self.ref_batch

    def get_lr(self):
        value = lr_at(self.samples / self.ref_batch, self.lr, self.min_lr, self.warmup, self.total)
        return [value] * len(self.optimizer.param_groups)

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "samples": self.samples, "ref_batch": self.ref_batch}

    def load_state_dict(self, state_dict) -> None:
        self.last_epoch = self.base_epoch = int(state_dict["last_epoch"])
        self.ref_batch = int(state_dict.get("ref_batch", self.batch))  # checkpoints before: steps of this batch
        self.base_samples = int(state_dict.get("samples", self.last_epoch * self.ref_batch))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: DictConfig, global_batch: int = 1) -> WarmupCosine:
    """The warm-up + cosine schedule of `train_cfg`, stepped once per optimizer step of `global_batch` samples."""
    return WarmupCosine(optimizer, train_cfg, global_batch)


__all__ = ["lr_at", "build_scheduler", "WarmupCosine"]
