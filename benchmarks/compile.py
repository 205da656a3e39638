"""`train.compile=true` (torch.compile through DeepSpeed's `engine.compile`) against eager, on CPU (issue 18, item 2).

    python benchmarks/compile.py [--stages 0 2 3] [--speed demo vit_b16] [--steps 6]

1. Correctness, per ZeRO stage: a tiny CLIP trained 4 steps compiled; the same run stopped after 2 and
   resumed to 4 (exact resume); and 4 steps eager. Prints the losses: compiled resumed must equal compiled
   uninterrupted exactly, compiled must follow eager to float rounding.
2. Speed: samples/s of the demo CLIP (configs/demo_clip.yaml) and a CLIP ViT-B/16 (configs/clip_vit_b16.yaml,
   random init), fp32, batch `--batch`, eager and compiled side by side in one run: the mean of the steps
   after the first two (compilation happens there), and the compile time (the first steps' extra wall time).

One process, one rank (the 2-rank path is the same engine code); checkpoints are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _train(cfg_file, overrides, work, name):
    from gpu import InMemory

    from vlp.config import load_config
    from vlp.train import train
    from vlp.train.loop import default_loader

    out = os.path.join(work, name)
    cfg = load_config(os.path.join(ROOT, cfg_file), list(overrides) + [
        f"output_dir={out}", "train.tensorboard=false", "train.curves=false", "train.log_every=1", "eval.every=0"])
    for side in ("vision", "text"):
        cfg.model[side].pretrained = ""
    t0 = time.perf_counter()
    train(cfg, lambda c, m, r, w: InMemory(default_loader(c, m, r, w)))
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records, wall


def correctness(stages, work, shards):
    from gpu import TINY_TEXT, TINY_VIT

    tiny = [f"data.train_shards={shards}", "train.precision=fp32", "train.micro_batch_size=4", "data.workers=0",
            "data.image_size=32", "model.embed_dim=64", "train.lr=1e-3", "train.min_lr=1e-3", "train.warmup_steps=1",
            "!model.vision={kind: timm, name: vit_tiny_patch16_224, kwargs: %s}" % json.dumps(TINY_VIT),
            "!model.text={kind: open_clip, kwargs: %s}" % json.dumps(TINY_TEXT),
            "data.tokenizer={kind: open_clip, name: ViT-B-32, context_length: 16}", "model.init_from=''"]
    rows = []
    for z in stages:
        base = tiny + [f"train.zero_stage={z}"]
        full, _ = _train("configs/clip_vit_b16.yaml", base + ["train.compile=true", "train.steps=4"], work, f"c{z}")
        _train("configs/clip_vit_b16.yaml", base + ["train.compile=true", "train.steps=2"], work, f"r{z}")
        resumed, _ = _train("configs/clip_vit_b16.yaml", base + ["train.compile=true", "train.steps=4"], work, f"r{z}")
        eager, _ = _train("configs/clip_vit_b16.yaml", base + ["train.steps=4"], work, f"e{z}")
        last = {r["step"]: r["loss"] for r in resumed}
        comp = {r["step"]: r["loss"] for r in full}
        eag = {r["step"]: r["loss"] for r in eager}
        row = {"zero_stage": z, "compiled": [comp[s] for s in range(1, 5)], "resumed": [last[s] for s in range(1, 5)],
               "eager": [eag[s] for s in range(1, 5)],
               "resume_exact": all(comp[s] == last[s] for s in range(1, 5)),
               "max_rel_vs_eager": max(abs(comp[s] - eag[s]) / abs(eag[s]) for s in range(1, 5))}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for n in (f"c{z}", f"r{z}", f"e{z}"):
            shutil.rmtree(os.path.join(work, n), ignore_errors=True)
    return rows


def speed(models, work, shards, steps, batch):
    cfgs = {"demo": "configs/demo_clip.yaml", "vit_b16": "configs/clip_vit_b16.yaml"}
    rows = []
    for m in models:
        common = [f"data.train_shards={shards}", "train.precision=fp32", f"train.micro_batch_size={batch}",
                  "data.workers=0", f"train.steps={steps}", "train.zero_stage=0", "model.init_from=''"]
        res = {}
        for label, extra in (("eager", []), ("compiled", ["train.compile=true"])):
            recs, wall = _train(cfgs[m], common + extra, work, f"{m}_{label}")
            timed = [r["samples_per_s"] for r in recs if r["step"] > 2]
            res[label] = {"samples_per_s": sum(timed) / len(timed), "wall_s": wall,
                          "first_two_steps_s": sum(batch / r["samples_per_s"] for r in recs if r["step"] <= 2)}
            shutil.rmtree(os.path.join(work, f"{m}_{label}"), ignore_errors=True)
        row = {"model": m, "batch": batch, **{f"{k}_{q}": v[q] for k, v in res.items() for q in v},
               "speedup": res["compiled"]["samples_per_s"] / res["eager"]["samples_per_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, nargs="*", default=[0, 2, 3])
    p.add_argument("--speed", nargs="*", default=["demo", "vit_b16"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    from gpu import _shards

    work = tempfile.mkdtemp(prefix="vlp_compile_bench_")
    shards = _shards(True, work)
    if args.stages:
        correctness(args.stages, work, shards)
    if args.speed:
        speed(args.speed, work, shards, args.steps, args.batch)
    shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)  # several engines ran in this process: skip their comm threads' destructors


if __name__ == "__main__":
    sys.exit(main())
