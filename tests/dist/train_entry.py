"""Test support for the training engine: a tiny CLIP config and loader wrappers, plus a rank entry.

As a script it is what `deepspeed --num_gpus 2 tests/dist/train_entry.py` runs on each rank: the
real `vlp.train.train` with the real model and DeepSpeed, fed either fixed global batches from a
file (`--fixed`, each rank takes its slice, so only the distribution differs from one rank) for
one or more ZeRO stages (`--stages`), or the real data pipeline with a fault injected on one rank
(`--fault kill|term:RANK:BATCH`).
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> Dict[str, str]:
    """This environment without the test process's own env:// variables, one thread per rank, offline."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def deepspeed_launch(script: str, *args: Any, timeout: int = 400) -> Tuple[int, str]:
    """`deepspeed --num_gpus 2 SCRIPT ARGS` from the repository root -> (returncode, stdout + stderr)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           script, *map(str, args)]
    try:
        proc = subprocess.run(cmd, cwd=_ROOT, env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    finally:
        # a rank killed on purpose (--fault kill) cannot release its DeepSpeed CPU all-reduce buffer
        # (~66 MB of RAM in /dev/shm); every rank of this job is gone now, so drop this port's buffers
        for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            os.unlink(leftover)
    return proc.returncode, proc.stdout + proc.stderr


TINY_YAML = """\
model:
  type: clip
  embed_dim: 64
  vision:
    kind: timm
    name: vit_tiny_patch16_224
    kwargs: {img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2, mlp_ratio: 2.0}
  text:
    kind: open_clip
    kwargs: {context_length: 16, vocab_size: 49408, width: 64, heads: 2, layers: 2, mlp_ratio: 2.0}
data:
  workers: 0
  shuffle_buffer: 64
  image_size: 32
  tokenizer: {kind: open_clip, name: ViT-B-32, context_length: 16}
train:
  steps: 30
  micro_batch_size: 32
  lr: 5.0e-4
  warmup_steps: 3
  weight_decay: 0.1
  log_every: 1
  tensorboard: false
  curves: false                # drawn and checked in tests/test_curves.py
"""


def two_steps_and_save(cfg, info, dtype=None):
    """A DeepSpeed engine for `cfg` (model seeded 0) after two steps on a fixed 8-pair batch split over
    two ranks, its checkpoint saved as step 2 in cfg.output_dir: what the export tests consolidate."""
    from vlp import checkpoint as ckpt
    from vlp.config import to_yaml
    from vlp.data.tokenizers import build_tokenizer
    from vlp.models import build_model, param_groups
    from vlp.train.ds_config import deepspeed_config
    from vlp.train.engine import build_engine

    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine, _, _ = build_engine(model, param_groups(model, 0.1), cfg, deepspeed_config(cfg, info.world_size),
                                info.device)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images = images.to(dtype) if dtype is not None else images
    ids, mask = build_tokenizer(cfg.data.tokenizer)([f"a photo of {i} red cubes" for i in range(8)])
    part = slice(4 * info.rank, 4 * info.rank + 4)
    for _ in range(2):
        res = engine({"image": images[part], "text_ids": ids[part], "text_mask": mask[part], "key": []})
        engine.backward(res["loss"])
        engine.step()
    ckpt.save(engine, cfg.output_dir, 2, 16, {"rank": info.rank}, to_yaml(cfg), info.rank, info.world_size,
              keep_last=0)
    return engine


def write_tiny_config(path: str) -> str:
    with open(path, "w") as f:
        f.write(TINY_YAML)
    return path


class Wrapped:
    """A loader that delegates state and stats to `inner`; subclasses change what it yields."""

    def __init__(self, inner):
        self.inner = inner
        self.fetched = 0

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd)

    def set_frames(self, k):  # video models' frame curriculum
        return self.inner.set_frames(k)

    def stats(self):
        return self.inner.stats() if hasattr(self.inner, "stats") else {}

    def __iter__(self):
        for batch in self.inner:
            self.fetched += 1
            yield self.change(batch)

    def change(self, batch):
        return batch


class Fault(Wrapped):
    """Send `signum` to this process when fetching batch number `at` (1-based) of this run."""

    def __init__(self, inner, signum: int, at: int):
        super().__init__(inner)
        self.signum, self.at = signum, at

    def change(self, batch):
        if self.fetched == self.at:
            os.kill(os.getpid(), self.signum)
        return batch


class NaNAt(Wrapped):
    """Batch number `at` (1-based) gets NaN pixels."""

    def __init__(self, inner, at: int):
        super().__init__(inner)
        self.at = at

    def change(self, batch):
        if self.fetched == self.at:
            batch = dict(batch, image=torch.full(batch["image"].shape, float("nan")))  # float: taken as normalised
        return batch


class FixedBatches:
    """Global batches from a `torch.save`d list. Rank r of w takes rows [r*B/w, (r+1)*B/w) of each
    and yields them as `chunks` consecutive micro-batches (one optimizer step's accumulation)."""

    def __init__(self, path: str, rank: int, world_size: int, chunks: int = 1):
        self.batches: List[Dict[str, Any]] = torch.load(path, weights_only=False)
        self.rank, self.world, self.chunks, self.pos = rank, world_size, chunks, 0

    def __iter__(self):
        while True:
            batch = self.batches[self.pos // self.chunks % len(self.batches)]
            n = len(batch["key"]) // (self.world * self.chunks)
            lo = (self.rank * self.chunks + self.pos % self.chunks) * n
            self.pos += 1
            yield {k: v[lo:lo + n] for k, v in batch.items()}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]

    def load_states(self, states):
        """Any layout: every rank has read the same number of global batches (a resume on other ranks)."""
        self.pos = states[0]["pos"]


def fixed(path: str):
    """A `make_loader` for `vlp.train.train` over the global batches in `path`."""
    return lambda cfg, model, rank, world: FixedBatches(path, rank, world, int(cfg.train.grad_accum))


def write_fixed_batches(cfg, path: str, n: int, global_batch: int) -> None:
    """`n` global batches of the real pipeline (one rank), saved for `FixedBatches`."""
    from vlp.data import build_train_loader, build_tokenizer
    from vlp.models import build_model

    model = build_model(cfg.model)
    loader = build_train_loader(cfg, model.image_cfg, build_tokenizer(cfg.data.tokenizer), 0, 1, batch_size=global_batch)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    torch.save(batches, path)


def main(argv=None) -> int:
    from vlp.config import load_config
    from vlp.train.cli import _shutdown_after, worker_main
    from vlp.train.loop import default_loader

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("--fixed", help="file of global batches (FixedBatches)")
    p.add_argument("--runs", default="zero0:train.zero_stage=0",
                   help="with --fixed: NAME:key=value,key=value ... runs one after the other into OUTPUT_DIR/NAME "
                        "(a NAME starting with 'data' reads the real data pipeline instead of the fixed batches)")
    p.add_argument("--fault", default="", help="kill|term|int:RANK:BATCH")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    if args.fixed:
        base = load_config(args.config, args.overrides)
        for run in args.runs.split():
            name, _, extra = run.partition(":")
            overrides = args.overrides + [kv for kv in extra.split(",") if kv] + [f"output_dir={base.output_dir}/{name}"]
            rc = worker_main(args.config, overrides, make_loader=None if name.startswith("data") else fixed(args.fixed))
            if rc:
                return rc
        rc = _shutdown_after(0)
        # Several engines ran in this one process; at interpreter exit a C++ thread left by an
        # earlier run's process group has aborted the process once ("terminate called without an
        # active exception", rc -6) after all work was done. Skip those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    kind, fault_rank, at = args.fault.split(":")
    signum = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[kind]

    def make(c, m, r, w):
        inner = default_loader(c, m, r, w)
        return Fault(inner, signum, int(at)) if r == int(fault_rank) else inner

    return _shutdown_after(worker_main(args.config, args.overrides, make_loader=make))


if __name__ == "__main__":
    sys.exit(main())
