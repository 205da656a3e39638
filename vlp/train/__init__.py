"""Training: DeepSpeed engine from our config, the step loop, checkpoints with exact resume, logs.

`train(cfg)` is what each rank runs (see `launch/pretrain.py`); `deepspeed_config(cfg, world)`
derives DeepSpeed's config from ours; `lr_at` is the warm-up + cosine schedule.
"""
from vlp.train.ds_config import deepspeed_config, resolve_precision
from vlp.train.schedule import lr_at


def train(cfg, make_loader=None):
    """See `vlp.train.loop.train` (imported lazily: it pulls in DeepSpeed and the models)."""
    from vlp.train.loop import train as _train

    return _train(cfg, make_loader)


__all__ = ["train", "deepspeed_config", "resolve_precision", "lr_at"]
