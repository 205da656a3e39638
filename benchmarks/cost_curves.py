"""Cost curves (issue 18, item 5): step time and peak memory per rank of a tiny CLIP on CPU, against

- the global contrastive batch, 64 -> 4,096 (micro-batch 64, GradCache over 1-64 micro-batches);
- the image tokens kept (EViT keep rate 1.0, 0.7, 0.5 at blocks 1 and 2 of a 4-block ViT, 64 px / 8 px patches);
- the world size, 1 -> 2 CPU ranks (gloo; per-rank throughput and the gather's share).

Each point is its own process (`--point`) training 4 steps through `vlp.train.train` with one batch held in
memory; time = the mean step of steps 3-4, peak memory = the process's maximum resident set minus the
same process's resident set before training (so library code is not counted). From the FLOP counter
(`vlp.models.flops_per_sample`) the script also derives the step time a GPU would need for the same
work at a given MFU: FLOPs per step / (peak x MFU) — an estimate, not a measurement.

    python benchmarks/cost_curves.py [--out benchmarks/cost_curves.json] [--png docs/images/cost_curves.png]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}
H100_BF16 = 989e12  # dense bf16 FLOP/s of an H100 SXM (vlp.train.mfu's table)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def point(kind: str, value: float, work: str) -> dict:
    from gpu import InMemory

    from vlp.config import load_config
    from vlp.models import build_model, flops_per_sample
    from vlp.train import train
    from vlp.train.loop import default_loader

    micro, accum, keep = 64, 1, 1.0
    if kind == "batch":
        accum = int(value) // micro
    elif kind == "tokens":
        keep = float(value)
    out = os.path.join(work, f"{kind}_{value}_{os.environ.get('RANK', '0')}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (its final checkpoint is deleted below)
    over = [f"data.train_shards={work}/synth", "train.precision=fp32", f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}", f"train.grad_cache={'true' if accum > 1 else 'false'}", "data.workers=0",
            "data.image_size=64", "model.embed_dim=64", "train.steps=4", "train.log_every=2", "train.save_every=0",
            "train.warmup_steps=1", "train.tensorboard=false", "train.curves=false", "eval.every=0",
            f"output_dir={out}", "model.init_from=''", "train.resume=none",
            "!model.vision={kind: timm, name: vit_tiny_patch16_224, kwargs: %s}" % json.dumps(VIT),
            "!model.text={kind: open_clip, kwargs: %s}" % json.dumps(TEXT),
            "data.tokenizer={kind: open_clip, name: ViT-B-32, context_length: 16}"]
    if keep < 1.0:
        over += [f"model.vision.evit.keep_rate={keep}", "model.vision.evit.blocks=[1,2]"]
    cfg = load_config(os.path.join(ROOT, "configs/clip_vit_b16.yaml"), over)
    for side in ("vision", "text"):
        cfg.model[side].pretrained = ""
    flops = float(flops_per_sample(build_model(cfg.model, pretrained=False), 64, 16))
    base = _rss_mib()
    result = train(cfg, lambda c, m, r, w: InMemory(default_loader(c, m, r, w)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(out, ignore_errors=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sps = result.last["samples_per_s"]
    global_batch = micro * accum * world
    step_s = global_batch / sps
    # per step: the model's fwd+bwd per sample (GradCache adds one embedding forward, ~1/3 of it) + the
    # N x N similarity and its gradient (2 N^2 D multiply-adds forward, twice that backward)
    n, d = global_batch, 64
    step_flops = flops * global_batch * (4 / 3 if accum > 1 else 1.0) + 6 * 2 * n * n * d
    return {"kind": kind, "value": value, "world": world, "global_batch": global_batch, "keep_rate": keep,
            "step_s": step_s, "samples_per_s": sps, "samples_per_s_per_rank": sps / world,
            "peak_rss_mib_over_start": max(0.0, peak - base), "flops_per_step": step_flops,
            "h100_step_s_at_45pct": step_flops / (H100_BF16 * 0.45)}


def _run_point(kind, value, work, world=1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if world > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK"):
        env.pop(k, None)
    args = [os.path.abspath(__file__), "--point", kind, str(value), "--work", work]
    if world > 1:
        from vlp.dist import free_port

        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
               str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{") or "] {" in ln]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"point {kind}={value} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(ln[ln.index("{"):]) for ln in lines]
    rec = recs[0]
    rec["peak_rss_mib_over_start"] = max(r["peak_rss_mib_over_start"] for r in recs)
    return rec


def draw(rows, png):
    from vlp.plots import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    groups = [("batch", "global contrastive batch (GradCache)", "global_batch", True),
              ("tokens", "EViT keep rate (share of image tokens kept)", "keep_rate", False),
              ("world", "ranks (gloo, CPU)", "world", False)]
    for ax, (kind, label, key, log) in zip(axes, groups):
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r[key])
        xs = [r[key] for r in pts]
        ax.plot(xs, [r["step_s"] for r in pts], "o-", color="tab:blue", label="CPU step time (s)")
        if kind == "world":
            ax.set_xticks(xs)
            for i, r in enumerate(pts):
                ax.annotate(f"{r['samples_per_s_per_rank']:.0f} samples/s per rank", (r[key], r["step_s"]),
                            textcoords="offset points", xytext=(8, -14) if i == 0 else (-150, 6), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per optimizer step (CPU)")
        if log:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=max(r["step_s"] for r in pts) * 1.3)
        ax2 = ax.twinx()
        ax2.plot(xs, [r["peak_rss_mib_over_start"] for r in pts], "^:", color="tab:red", label="peak memory (MiB)")
        ax2.set_ylim(bottom=0, top=max(r["peak_rss_mib_over_start"] for r in pts) * 1.3)
        ax2.set_ylabel("peak resident memory over start (MiB)", color="tab:red")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        if not log:
            ax.set_ylim(0, max(r["step_s"] for r in pts) * 1.3)
    fig.suptitle("vlp cost curves, tiny CLIP (ViT 4 x 64 at 64 px, text 2 x 64), fp32 on a 2-core CPU", fontsize=11)
    fig.tight_layout()
    save_figure(fig, png)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", nargs=2, metavar=("KIND", "VALUE"))
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "cost_curves.json"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "images", "cost_curves.png"))
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.out) as f:
            draw(json.load(f), args.png)
        return 0
    if args.point:
        print(json.dumps(point(args.point[0], float(args.point[1]), args.work)), flush=True)
        sys.stdout.flush()
        os._exit(0)
    work = args.work or tempfile.mkdtemp(prefix="vlp_cost_")
    from data_pipelines.synth import write_synth

    if not os.path.isdir(os.path.join(work, "synth")):
        write_synth(os.path.join(work, "synth"), n=256, seed=0, split="train", samples_per_shard=64)
    rows = []
    for n in (64, 256, 1024, 4096):
        rows.append(_run_point("batch", n, work))
        print(json.dumps(rows[-1]), flush=True)
    for keep in (1.0, 0.7, 0.5):
        rows.append(_run_point("tokens", keep, work))
        print(json.dumps(rows[-1]), flush=True)
    for world in (1, 2):
        rows.append(_run_point("world", world, work, world))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    draw(rows, args.png)
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
