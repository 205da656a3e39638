"""Cost and effect of EViT and of a frozen LLM block on one dual encoder, same towers, same samples.

Trains the same tiny CLIP (timm ViT: 64 px, patch 8 -> 64 patch tokens, depth 8, width 128;
2-layer open_clip text tower) three ways on the synthetic shapes set, for the same number of steps
and samples, one rank each, then evaluates zero-shot retrieval on the held-out split:
  base       the dual encoder as is
  evit       + EViT at blocks 2/4/6 (the paper's 3/6/9 of 12, scaled to 8), keep rate 0.7
  frozen_llm + one frozen LLaMA-shaped layer (hidden 512, intermediate 1376, 8 heads: LLaMA-7B's
             layer at 1/8 width, random weights; saved in safetensors shards and loaded layer-only)
Per variant: FLOPs per training sample (`vlp.models.flops_per_sample`), training samples/s (mean
over the logged windows after the first), the process's peak RSS (one rank), retrieval recalls.
Each variant runs in its own process, so peak memory is its own.

    python benchmarks/vision_extras.py [--steps 150] [--batch-size 64] [--variants base evit frozen_llm] [--json]
    python benchmarks/vision_extras.py --paper-scale   # FLOPs/sample at CLIP ViT-B/16 scale, no training
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, ".bench", "vision_extras")
VARIANTS = {
    "base": [],
    "evit": ["model.vision.evit.keep_rate=0.7", "model.vision.evit.blocks=[2,4,6]"],
    "frozen_llm": ["model.vision.frozen_llm.name={llm}"],
}


def prepare(train_n: int, test_n: int) -> dict:
    """Synthetic train/test shards and the LLaMA-shaped checkpoint, written once under .bench/."""
    from data_pipelines.synth import write_synth

    paths = {"train": os.path.join(WORK, f"train{train_n}"), "test": os.path.join(WORK, f"test{test_n}"),
             "llm": os.path.join(WORK, "llama_shaped")}
    if not os.path.isfile(os.path.join(paths["train"], "stats.json")):
        write_synth(paths["train"], train_n, seed=0, split="train", overwrite=True)
    if not os.path.isfile(os.path.join(paths["test"], "stats.json")):
        write_synth(paths["test"], test_n, seed=1, split="test", overwrite=True)
    if not os.path.isfile(os.path.join(paths["llm"], "model.safetensors.index.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
                          vocab_size=1000, max_position_embeddings=256)
        LlamaForCausalLM(cfg).save_pretrained(paths["llm"], safe_serialization=True, max_shard_size="4MB")
    return paths


def run_variant(name: str, args: argparse.Namespace, paths: dict) -> dict:
    """Train and evaluate one variant in this process; returns its figures."""
    import torch

    from vlp.config import load_config
    from vlp.eval.evaluate import run_retrieval_eval
    from vlp.checkpoint import find_checkpoint
    from vlp.load import load_trained_model
    from vlp.models import build_model, flops_per_sample
    from vlp.train import train

    torch.set_num_threads(args.threads)
    out = os.path.join(WORK, "runs", name)
    overrides = [
        f"output_dir={out}", f"data.train_shards={paths['train']}", f"data.eval_shards={paths['test']}",
        "data.workers=1", "model.vision.kwargs={img_size: 64, patch_size: 8, embed_dim: 128, depth: 8, "
        "num_heads: 4, mlp_ratio: 2.0}", f"train.steps={args.steps}", f"train.micro_batch_size={args.batch_size}",
        f"train.warmup_steps={min(15, args.steps)}", "train.save_every=0", "train.log_every=10", "train.tensorboard=false",
        "train.resume=none", "eval.batch_size=100",
    ] + [o.format(llm=paths["llm"]) for o in VARIANTS[name]]
    cfg = load_config(os.path.join(ROOT, "configs", "demo_clip.yaml"), overrides)
    flops = flops_per_sample(build_model(cfg.model), 64, int(cfg.data.tokenizer.context_length))
    train(cfg)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    sps = [r["samples_per_s"] for r in records[1:]] or [records[0]["samples_per_s"]]
    model = load_trained_model(find_checkpoint(out), cfg)
    metrics = run_retrieval_eval(model, cfg)
    return {"variant": name, "gflops_per_sample": flops / 1e9, "samples_per_s": sum(sps) / len(sps),
            "peak_rss_mib": peak_rss, "samples_seen": records[-1]["samples_seen"], "final_loss": records[-1]["loss"],
            **{k: metrics[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "mean_recall") if k in metrics}}


def paper_scale_flops() -> list:
    """FLOPs per training sample of CLIP ViT-B/16 at 224 px (open_clip's ViT-B-16 text tower, context 77):
    as is, + EViT (blocks 3/6/9, 0.7), + a frozen layer of LLaMA-7B's shape (random weights, bf16 on disk)."""
    import torch

    from vlp.config import load_config
    from vlp.models import build_model, flops_per_sample
    from vlp.models.flops import _count

    llm = os.path.join(WORK, "llama7b_shaped")
    if not os.path.isfile(os.path.join(llm, "model.safetensors.index.json")):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                          vocab_size=128, max_position_embeddings=2048)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(llm, safe_serialization=True, max_shard_size="200MB")
    base = ["model.vision.name=vit_base_patch16_224", "model.text.name=ViT-B-16", "data.tokenizer.name=ViT-B-16",
            "data.tokenizer.context_length=77", "model.embed_dim=512"]
    rows = []
    for name, extra in (("base", []), ("evit", ["model.vision.evit.keep_rate=0.7"]),
                        ("frozen_llm", [f"model.vision.frozen_llm.name={llm}"])):
        cfg = load_config(None, base + extra)
        model = build_model(cfg.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(b.numel() for n, b in model.named_buffers() if ".layer." in n)
        with torch.enable_grad():  # vision tower forward alone, counted as flops_per_sample counts it
            vision_fwd = _count(model.eval().encode_image, torch.zeros(1, 3, 224, 224))
        rows.append({"variant": name, "gflops_per_sample": flops_per_sample(model, 224, 77) / 1e9,
                     "vision_forward_gflops": vision_fwd / 1e9,
                     "trainable_params_m": trainable / 1e6, "frozen_values_m": frozen / 1e6})
        del model
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--threads", type=int, default=2, help="torch threads per variant process")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", action="store_true", help="print one JSON line per variant instead of a table")
    p.add_argument("--paper-scale", action="store_true",
                   help="only FLOPs per sample and sizes at CLIP ViT-B/16 scale (no training)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this variant in this process
    args = p.parse_args(argv)
    if args.paper_scale:
        for row in paper_scale_flops():
            print(json.dumps(row), flush=True)
        return 0

    paths = prepare(args.train_samples, args.test_samples)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args, paths)), flush=True)
        return 0
    rows = []
    for name in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--train-samples", str(args.train_samples),
               "--test-samples", str(args.test_samples), "--threads", str(args.threads)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode or 1
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print("| variant | GFLOPs/sample | samples/s | peak RSS (MiB) | samples | i2t R@1 | t2i R@1 | mean recall |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['variant']} | {r['gflops_per_sample']:.3f} | {r['samples_per_s']:.1f} | {r['peak_rss_mib']:.0f} "
                  f"| {r['samples_seen']} | {r.get('i2t_r1', float('nan')):.3f} | {r.get('t2i_r1', float('nan')):.3f} "
                  f"| {r.get('mean_recall', float('nan')):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
