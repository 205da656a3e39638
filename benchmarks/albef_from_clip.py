"""ALBEF vs CLIP from the same CLIP checkpoint: the second protocol of the ALBEF vs dual encoder comparison.

benchmarks/albef_vs_dual.py trains both models from random towers, a regime ALBEF was not designed for
(the paper starts from pretrained encoders). Here both start from the same pretrained towers:
  1. a CLIP dual encoder with ALBEF's towers (`albef_vs_dual.dual_encoder_overrides`: the same timm ViT,
     the same mean-pooled BERT text tower with ALBEF's text layers, tokenizer and 128-d space) trains
     `--steps` S from scratch with `vlp train`;
  2. from that run, `model.init_from=<its run dir>` starts two fresh runs of `--continue-steps` N, each with
     a fresh optimizer and the same schedule (warm-up N/10, cosine to min_lr), global batch and data order:
       clip   the same CLIP, continued;
       albef  configs/demo_albef.yaml as it is: ViT, text tower and both projections from the CLIP run;
              the fusion encoder (no source layers beyond the CLIP's text layers), ITM and MLM heads and
              the temperature stay as built, the momentum copies restart from the loaded weights;
  3. `vlp eval retrieval` on the held-out split: ITC metrics for all three checkpoints (the start point
     too), and for ALBEF the ITM re-ranked metrics (top `--rerank-k`) and the held-out ITM accuracy
     (balanced: positives vs the hardest ITC negatives).
The table adds the init_from report of each continued arm (`vlp train` prints it; what was loaded, what
stayed random). samples/s is the trainer's own figure (mean over the logged windows after the first).

    python benchmarks/albef_from_clip.py [--steps 300] [--continue-steps 200] [--nproc 2] [--micro-batch 32]
                                         [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from albef_vs_dual import dual_encoder_overrides, evaluate, prepare_data, train  # noqa: E402


def _pct(d, key: str) -> str:
    return f"{100 * d[key]:.1f}" if d and key in d else "–"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="CLIP pre-training steps from scratch (default 300)")
    p.add_argument("--continue-steps", type=int, default=200, help="steps of each arm from the CLIP run (default 200)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--micro-batch", type=int, default=32, help="per-rank batch (default 32); the ALBEF queue "
                   "(256) must be a multiple of micro-batch x nproc")
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--rerank-k", type=int, default=16, help="ITM re-ranks the top K ITC candidates (default 16)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, ".bench", "albef_from_clip"))
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    if args.steps < 1 or args.continue_steps < 1:
        p.error("--steps and --continue-steps must be >= 1")
    args.work_dir = os.path.abspath(args.work_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet = args.json
    paths = prepare_data(args.work_dir, args.train_samples, args.test_samples, quiet)
    clip = dual_encoder_overrides()

    start = train("clip_pretrain", clip, args, paths, steps=args.steps)
    start.update(evaluate(start["run"], paths, 0, quiet))
    init = [f"model.init_from={start['run']}"]
    arms = {"clip": clip + init, "albef": init}
    results = {"clip_start": start}
    for name, overrides in arms.items():
        r = train(f"{name}_from_clip", overrides, args, paths, steps=args.continue_steps)
        r.update(evaluate(r["run"], paths, args.rerank_k if name == "albef" else 0, quiet))
        results[name] = r
    summary = {"steps": args.steps, "continue_steps": args.continue_steps, "nproc": args.nproc,
               "global_batch": args.micro_batch * args.nproc, "train_samples": args.train_samples,
               "test_samples": args.test_samples, "rerank_k": args.rerank_k, "arms": results}
    if not args.json:
        s, n = args.steps, args.continue_steps
        labels = {"clip_start": f"CLIP, {s} steps (start point)", "clip": f"CLIP {s} + CLIP {n}",
                  "albef": f"CLIP {s} + ALBEF {n}"}
        print("| arm | ITC i2t R@1 | t2i R@1 | mean recall | ITM re-ranked i2t R@1 | t2i R@1 | mean recall | "
              "held-out ITM acc | samples/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in results.items():
            itc, rr, itm = r["itc"], r["reranked"], r["itm"]
            print(f"| {labels[name]} | {_pct(itc, 'i2t_r1')} | {_pct(itc, 't2i_r1')} | {_pct(itc, 'mean_recall')} | "
                  f"{_pct(rr, 'i2t_r1')} | {_pct(rr, 't2i_r1')} | {_pct(rr, 'mean_recall')} | "
                  f"{_pct(itm, 'balanced_acc')} | {r['samples_per_s']:.1f} |")
        for name in arms:
            print(f"\ninit_from report, {labels[name]} (model.init_from={start['run']}):")
            log = os.path.join(results[name]["run"], "train.log")
            for line in results[name]["init_from"] or [f"(no report in {log})"]:
                print(f"  {line}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
