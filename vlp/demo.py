"""`vlp demo`: the main job end to end on the built-in synthetic data.

synth shards -> `vlp train` (DeepSpeed, N ranks) -> zero-shot retrieval on the held-out split ->
export to the Hugging Face and open_clip layouts. Each stage is the same CLI command a user runs,
so the demo exercises exactly the user's path. Rerunning resumes/reuses what is already done.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import List

from vlp.dist import run_forwarding_signals

_CONFIGS = {"clip": "configs/demo_clip.yaml", "albef": "configs/demo_albef.yaml", "bus": "configs/demo_bus.yaml",
            "video": "configs/demo_video.yaml"}


def _default_nproc() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:  # torch import problems surface in the training step with a full message
        pass
    return 2


def _run(cmd: List[str]) -> None:
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    rc = run_forwarding_signals(cmd)
    if rc != 0:
        raise SystemExit(f"vlp demo: step failed with exit code {rc}: {' '.join(cmd)}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = args.config or os.path.join(root, _CONFIGS[args.model])
    if not os.path.isfile(config):
        print(f"vlp demo: config {config} not found (model '{args.model}' has no demo config yet)", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out or os.path.join("runs", f"demo_{args.model}" if args.model != "clip" else "demo"))
    vlp = [sys.executable, "-m", "vlp.cli"]
    train_dir, test_dir = os.path.join(out, "data", "train"), os.path.join(out, "data", "test")
    t0 = time.time()
    if args.model == "video":  # moving-shapes clips: train, and a test split of time-reversed twins
        if not (os.path.isfile(os.path.join(train_dir, "stats.json")) and os.path.isfile(os.path.join(test_dir, "stats.json"))):
            _run(vlp + ["data", "synth", os.path.dirname(train_dir), "--video", "--train", str(args.train_samples),
                        "--test", str(args.test_samples), "--overwrite"])
    elif not os.path.isfile(os.path.join(train_dir, "stats.json")):
        _run(vlp + ["data", "synth", train_dir, "--n", str(args.train_samples), "--seed", "0", "--split", "train",
                    "--overwrite"])
    if args.model != "video" and not os.path.isfile(os.path.join(test_dir, "stats.json")):
        _run(vlp + ["data", "synth", test_dir, "--n", str(args.test_samples), "--seed", "1", "--split", "test",
                    "--overwrite"])
    nproc = args.nproc or _default_nproc()
    overrides = [f"output_dir={out}", f"data.train_shards={train_dir}", f"data.eval_shards={test_dir}"]
    if args.model in ("albef", "bus"):  # MLM needs a BERT tokenizer: a word-level one from the captions, offline
        vocab_dir = os.path.join(out, "data", "bert")
        if not os.path.isfile(os.path.join(vocab_dir, "config.json")):
            _run(vlp + ["data", "bert-vocab", train_dir, "--out", vocab_dir, "--overwrite"])
        overrides += [f"data.tokenizer.name={vocab_dir}", f"model.text.name={vocab_dir}"]
    _run(vlp + ["train", "--config", config, "--nproc", str(nproc)] + overrides + list(args.overrides))
    eval_dir = os.path.join(out, "eval")
    results, report = os.path.join(eval_dir, "retrieval.json"), os.path.join(eval_dir, "retrieval.png")
    _run(vlp + ["eval", "retrieval", "--checkpoint", out, "--data", test_dir, "--out", results, "--report", report])
    exports = {}
    formats = ["hf", "open_clip"] if args.model == "clip" else ["vlp"]
    for fmt in formats:
        exports[fmt] = os.path.join(out, "export", fmt)
        _run(vlp + ["export", "--checkpoint", out, "--format", fmt, "--out", exports[fmt], "--overwrite"])
    from vlp.console import duration, summary
    from vlp.train.curves import write_run_curves

    curves = write_run_curves(out)  # again, now with the held-out evaluation as points
    with open(results) as f:
        full = json.load(f)

    def line(m):
        return f"i2t R@1 {100 * m['i2t_r1']:.1f}  t2i R@1 {100 * m['t2i_r1']:.1f}  mean recall {100 * m['mean_recall']:.1f}"

    rows = [("open first", f"{report}  (what was retrieved for which query, and why the numbers are what they are)"),
            ("held-out", f"{full['n_images']} {'clips' if args.model == 'video' else 'images'}: "
                         f"ITC {line(full['metrics'])}")]
    if full.get("reranked"):  # fusion models: the ITC top-k re-ordered by the ITM head
        rows += [("ITM re-ranked", line(full["reranked"])), ("ITM + ITC (BLIP)", line(full["reranked_itc"])),
                 ("held-out ITM", f"balanced accuracy {100 * full['itm']['balanced_acc']:.1f} (positives and "
                                  "hardest ITC negatives)")]
    rows += [("curves", curves), ("results", results), ("metrics", os.path.join(out, "metrics.jsonl")),
             ("TensorBoard", f"tensorboard --logdir {os.path.join(out, 'tb')}")]
    rows += [(f"export ({fmt})", path) for fmt, path in exports.items()]
    summary(f"vlp demo ({args.model}): done in {duration(time.time() - t0)}", rows)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="end-to-end demo on built-in synthetic data: shards, train, evaluate, export",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(_CONFIGS), default="clip", help="which demo config to train")
    p.add_argument("--config", default=None, help="use this config instead of the model's demo config")
    p.add_argument("--nproc", type=int, default=0, help="ranks to launch (default: GPUs, or 2 CPU ranks)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo)")
    p.add_argument("--train-samples", type=int, default=3000, help="synthetic training samples")
    p.add_argument("--test-samples", type=int, default=500, help="held-out samples for retrieval")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to training")
    p.set_defaults(func=run_demo)
