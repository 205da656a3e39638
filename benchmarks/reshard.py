"""Time to resume a checkpoint on another layout (`vlp.reshard`) next to DeepSpeed's own same-layout load.

For each model: build the engine at ZeRO-2 on this one process, take one AdamW step (so the moments
exist), save a vlp checkpoint, then (a) load it into a fresh ZeRO-2 engine with DeepSpeed's
`load_checkpoint` (the same-layout path, the anchor) and (b) into a fresh ZeRO-3 engine, which
changes the stage and so takes vlp's re-partitioning path (`vlp.train.reshard`): read whole per-parameter weights, moments
and step from the files, hand them to the new partitioning. Both are timed in the same run; the
ratio is what re-partitioning costs over a plain resume. Models: the demo CLIP (configs/demo_clip.yaml)
and a CLIP ViT-B/16 of the open_clip shape (configs/clip_vit_b16.yaml), both built randomly on CPU.

    python benchmarks/reshard.py [--models demo vit_b16] [--dir /tmp/vlp_reshard]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {"demo": "configs/demo_clip.yaml", "vit_b16": "configs/clip_vit_b16.yaml"}


def _engine(cfg, stage: int, info):
    import torch

    from vlp.models import build_model, param_groups
    from vlp.train.ds_config import deepspeed_config
    from vlp.train.engine import build_engine

    cfg.train.zero_stage = stage
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    engine, _, _ = build_engine(model, param_groups(model, 0.1), cfg, deepspeed_config(cfg, 1), info.device)
    return engine


def measure(name: str, workdir: str, info) -> dict:
    import torch

    from vlp import checkpoint as ckpt
    from vlp.config import load_config, to_yaml
    from vlp.models.flops import example_batch
    from vlp.train.reshard import load_resharded

    cfg = load_config(os.path.join(ROOT, CONFIGS[name]), ["train.micro_batch_size=2", "train.grad_accum=1",
                                                          f"output_dir={workdir}/{name}"])
    engine = _engine(cfg, 2, info)
    size = int(cfg.data.image_size or engine.module.image_cfg["size"])
    batch = example_batch(engine.module, 2, size, int(cfg.data.tokenizer.context_length))
    out = engine(batch)
    engine.backward(out["loss"])
    engine.step()
    path = ckpt.save(engine, cfg.output_dir, 1, 2, {}, to_yaml(cfg), 0, 1, keep_last=0)
    n_params = sum(p.numel() for p in engine.module.parameters())
    files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    del engine
    res = {"model": name, "params_M": n_params / 1e6, "checkpoint_MB": files / 2**20}
    for label, stage in (("same_layout_load_s", 2), ("reshard_load_s", 3)):
        engine = _engine(cfg, stage, info)
        t0 = time.perf_counter()
        _, state = ckpt.load(engine, path, 0, 1, info.device)
        if state["reshard"]:
            load_resharded(engine, path, 0)
        res[label] = time.perf_counter() - t0
        assert state["reshard"] == (stage != 2)
        del engine
    res["ratio"] = res["reshard_load_s"] / res["same_layout_load_s"]
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--dir", default="/tmp/vlp_reshard_bench")
    args = p.parse_args(argv)
    from vlp.dist import setup_distributed

    info = setup_distributed(600)
    os.makedirs(args.dir, exist_ok=True)
    print("| model | parameters | checkpoint | DeepSpeed load, same layout (ZeRO-2 -> 2) | vlp re-partitioned load "
          "(ZeRO-2 -> 3) | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.dir, info)
        print(f"| {r['model']} | {r['params_M']:.1f} M | {r['checkpoint_MB']:.0f} MB | {r['same_layout_load_s']:.2f} s | "
              f"{r['reshard_load_s']:.2f} s | {r['ratio']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
