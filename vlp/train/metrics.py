"""Training metrics: `metrics.jsonl`, TensorBoard, optional Weights & Biases (the peak for MFU: vlp.train.mfu).

Only rank 0 writes. On resume the records after the checkpoint's step (written by the run that
died) are dropped, then new ones are appended, so the file holds one record per logged step.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

from vlp.config import ConfigError

log = logging.getLogger(__name__)

def check_wandb(enabled: bool) -> None:
    if enabled:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("train.wandb=true but wandb is not installed: `pip install wandb`, "
                              "or set train.wandb=false") from None


class MetricsWriter:
    """Rank 0's sinks for one record per logged step; a no-op object on other ranks."""

    def __init__(self, output_dir: str, rank: int, start_step: int, tensorboard: bool, wandb_cfg: Optional[Dict[str, Any]]):
        self.active = rank == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = self.wandb = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._drop_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=start_step + 1 if start_step else None)
        if wandb_cfg is not None:
            import wandb

            id_file = os.path.join(output_dir, "wandb_id")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else wandb.util.generate_id()
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(id=run_id, resume="allow", dir=output_dir, **wandb_cfg)

    def _drop_after(self, step: int) -> None:
        """Keep the records up to `step` (a resumed run rewrites the rest); a torn last line (the process
        was killed mid-write) is dropped with a warning instead of failing the resume."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
        keep = []
        for i, ln in enumerate(lines):
            try:
                record = json.loads(ln)
            except ValueError:
                log.warning("%s line %d is not JSON (a write cut short?): dropped", self.path, i + 1)
                continue
            if record.get("step", 0) <= step:
                keep.append(ln)
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


__all__ = ["MetricsWriter", "check_wandb"]
