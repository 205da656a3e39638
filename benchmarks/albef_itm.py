"""Why ALBEF's ITM head learns or not, from scratch: a leave-one-out ablation of the ITM settings.

Each variant trains the tiny ALBEF of configs/demo_albef.yaml (or --config) in one process (plain
AdamW, the config's lr, warm-up and clipping; batches drawn at random from the decoded train split, so
every variant sees the same samples) and reports, over the last 25 steps, the training ITM accuracy
(1/3 of the pairs are positives: "always no match" scores 0.667) and the mean match probability of
positives and negatives, then on the held-out split the balanced ITM accuracy (every image with its
caption, and with its hardest ITC negative caption and image) and ITC R@1. Training is in-process
rather than `vlp train` so that many variants fit in one run; the losses and the model are the real ones.

    python benchmarks/albef_itm.py [--steps 300] [--variants recipe no_mean ...] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlp.config import load_config  # noqa: E402
from vlp.data.transforms import eval_transform  # noqa: E402
from vlp.data.tokenizers import build_tokenizer  # noqa: E402
from vlp.models import build_model  # noqa: E402
from vlp.eval.data import EvalDataset  # noqa: E402
from vlp.train.engine import clamp_parameters  # noqa: E402

# The demo recipe and what each leave-one-out variant sets back to the paper's choice.
VARIANTS = {
    "recipe": [],
    "cls_pool": ["model.albef.itm_pool=cls"],
    "torch_init": ["model.albef.cross_attention_init_std=0"],
    "itm_weight_1": ["model.albef.itm_weight=1"],
    "no_curriculum": ["model.albef.hard_negative_warmup_steps=0"],
    "paper": ["model.albef.itm_pool=cls", "model.albef.cross_attention_init_std=0", "model.albef.itm_weight=1",
              "model.albef.hard_negative_warmup_steps=0"],
}


def prepare(work: str) -> dict:
    paths = {k: os.path.join(work, "data", k) for k in ("train", "test", "bert")}
    for split, n, seed in (("train", 3000, 0), ("test", 500, 1)):
        if not os.path.isfile(os.path.join(paths[split], "stats.json")):
            subprocess.run([sys.executable, "-m", "vlp.cli", "data", "synth", paths[split], "--n", str(n), "--seed",
                            str(seed), "--split", split, "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    if not os.path.isfile(os.path.join(paths["bert"], "config.json")):
        subprocess.run([sys.executable, "-m", "vlp.cli", "data", "bert-vocab", paths["train"], "--out", paths["bert"],
                        "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return paths


def decode(shards: str, cfg, tokenizer):
    size = {"size": int(cfg.data.image_size or cfg.model.vision.kwargs.get("img_size", 224)),
            "interpolation": cfg.data.interpolation, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    items = [it for it in EvalDataset(shards, eval_transform(size)) if "skip" not in it]
    ids, mask = tokenizer([it["captions"][0] for it in items])
    return torch.stack([it["image"] for it in items]), ids, mask


@torch.no_grad()
def heldout(model, images, ids, mask) -> dict:
    """Balanced held-out ITM accuracy (positives vs hardest ITC negatives, both ways) and ITC R@1."""
    model.eval()
    img = torch.cat([model.encode_image(images[i:i + 256]) for i in range(0, len(images), 256)])
    txt = torch.cat([model.encode_text(ids[i:i + 256], mask[i:i + 256]) for i in range(0, len(ids), 256)])
    sim = img @ txt.T
    n = len(images)
    every = torch.arange(n)
    r1_i2t, r1_t2i = float((sim.argmax(1) == every).float().mean()), float((sim.argmax(0) == every).float().mean())
    sim.fill_diagonal_(float("-inf"))

    def score(i, t):
        return torch.cat([model.match_scores(images[i[s:s + 128]], ids[t[s:s + 128]], mask[t[s:s + 128]])
                          for s in range(0, len(i), 128)])

    pos = score(every, every)
    neg = torch.cat([score(every, sim.argmax(1)), score(sim.argmax(0), every)])
    model.train()
    pos_acc, neg_acc = float((pos > 0).float().mean()), float((neg <= 0).float().mean())
    return {"heldout_itm_acc": (pos_acc + neg_acc) / 2, "heldout_pos_acc": pos_acc, "heldout_neg_acc": neg_acc,
            "itc_i2t_r1": r1_i2t, "itc_t2i_r1": r1_t2i}


def train_variant(config: str, overrides: list, steps: int, data: dict, batch: int, seed: int) -> dict:
    cfg = load_config(config, [f"data.tokenizer.name={data['bert']}", f"model.text.name={data['bert']}"] + overrides)
    tok = build_tokenizer(cfg.data.tokenizer)
    train, test = decode(data["train"], cfg, tok), decode(data["test"], cfg, tok)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    g = torch.Generator().manual_seed(seed)
    hist, t0 = [], time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * min(1.0, (step + 1) / max(1, cfg.train.warmup_steps))
        idx = torch.randperm(len(train[0]), generator=g)[:batch]
        out = model({"image": train[0][idx], "text_ids": train[1][idx], "text_mask": train[2][idx]})
        opt.zero_grad()
        out["loss"].backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        clamp_parameters(model)  # the temperature's range, as the trainer keeps it
        model.after_step()
        hist.append({k: float(out[k]) for k in ("itm_loss", "itm_acc", "itm_pos_prob", "itm_neg_prob")})
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in hist[-1].items())
                  + f" ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    last = {k: sum(h[k] for h in hist[-25:]) / len(hist[-25:]) for k in hist[-1]}
    return {**last, **heldout(model, *test), "seconds": time.time() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo_albef.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="pairs per step (the demo's global batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", default=os.path.join(ROOT, ".bench", "albef_itm"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = prepare(args.work)
    rows = {}
    for name in args.variants:
        print(f"{name}: {' '.join(VARIANTS[name]) or '(the config as it is)'}", file=sys.stderr, flush=True)
        rows[name] = train_variant(args.config, VARIANTS[name], args.steps, data, args.batch, args.seed)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"| variant ({args.steps} steps x {args.batch}) | overrides | train itm_acc | P(match) pos | P(match) neg "
          "| held-out ITM acc (balanced) | ITC i2t R@1 | t2i R@1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {' '.join(VARIANTS[name]) or '–'} | {r['itm_acc']:.3f} | {r['itm_pos_prob']:.3f} | "
              f"{r['itm_neg_prob']:.3f} | {r['heldout_itm_acc']:.3f} | {100 * r['itc_i2t_r1']:.1f} | "
              f"{100 * r['itc_t2i_r1']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
