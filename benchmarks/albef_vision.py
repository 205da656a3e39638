"""ALBEF vs ALBEF + BUS vs ALBEF + EViT vs ALBEF + a frozen LLM block, same towers, same samples.

Every variant trains with the real `vlp train` (DeepSpeed, `--nproc` ranks) from
`configs/demo_albef.yaml` for the same steps, global batch, schedule and data order, then
`vlp eval retrieval` on the held-out synthetic split (ITC ranking, and ITM re-ranking of the top
`--rerank-k`). Variants (`configs/demo_bus.yaml` holds the BUS one):
  albef       as configured (ViT 4 x 128, patch 8: 64 patch tokens at 64 px)
  bus         + BUS: text-agnostic selection in the ViT at blocks 1, 2, 3 keeping 0.5, then per (image,
              caption) pair the text-aware selector keeping 0.7 of the ViT's output patches, a 1-layer
              PAD with 8 summary tokens, PTM
  bus_no_ptm  the same without the patch-text matching loss (ablation)
  evit        + EViT at blocks 1 and 2, keep rate 0.7 ([CLS]-attention ranking, no text)
  evit_bus    + EViT at BUS's blocks 1, 2, 3, keep rate 0.5: BUS's in-ViT stage alone (no per-pair
              selection, PAD or PTM)
  frozen_llm  + one frozen LLaMA-shaped layer after the ViT (hidden 512, 8 heads, random weights,
              loaded layer-only from safetensors shards)
Per variant: training FLOPs per sample (`vlp.models.flops_per_sample`: one real ALBEF forward +
backward counted with torch's FLOP counter, momentum passes, ITM and MLM included), the trainer's
samples/s (mean over the logged windows after the first), the largest peak RSS over the rank processes
(VmHWM: host memory), retrieval. `--image-size 128` gives the ViT-B/16-at-256 grid of 256 patches;
`--image-size 224 --patch-size 16` the paper's own geometry (ViT-B/16 at 224 px: 196 patches).
`--paper-scale` only counts FLOPs per sample at the paper's size (ViT-B/16 at 256 px, BERT-base 6 + 6
layers, 25 tokens; configs/albef_base.yaml and bus_base.yaml settings), with no training.
`--step-time ROUNDS` only times training steps (forward, backward, AdamW, momentum update) of every
variant in one process, alternating 2-step bursts for ROUNDS rounds on one fixed batch of
`--micro-batch` with a rank's share of the cores: on a machine shared with other jobs, where the
load changes between two `vlp train` runs, load drift then hits every variant alike (median
samples/s per variant).

    python benchmarks/albef_vision.py [--steps 300] [--nproc 2] [--image-size 64] [--patch-size 8]
                                      [--variants ...] [--json]
    python benchmarks/albef_vision.py --paper-scale
    python benchmarks/albef_vision.py --step-time 10 --image-size 224 --patch-size 16 --variants albef bus
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
from albef_vs_dual import CONFIG, evaluate, prepare_data, train  # noqa: E402

BUS = ["model.bus.enabled=true", "model.bus.blocks=[1,2,3]", "model.bus.keep_rate=0.5", "model.bus.text_keep_rate=0.7",
       "model.bus.pad_queries=8", "model.bus.pad_layers=1"]  # configs/demo_bus.yaml's
VARIANTS = {
    "albef": [],
    "bus": BUS,
    "bus_no_ptm": BUS + ["model.bus.ptm_weight=0"],
    "evit": ["model.vision.evit.keep_rate=0.7", "model.vision.evit.blocks=[1,2]"],
    "evit_bus": ["model.vision.evit.keep_rate=0.5", "model.vision.evit.blocks=[1,2,3]"],
    "frozen_llm": ["model.vision.frozen_llm.name={llm}"],
}


def llama_shaped(work: str, name: str = "llama_shaped", hidden: int = 512, intermediate: int = 1376,
                 heads: int = 8, dtype: str = "float32") -> str:
    """A 2-layer LLaMA of the given shape with random weights, saved as safetensors shards (once)."""
    out = os.path.join(work, name)
    if not os.path.isfile(os.path.join(out, "model.safetensors.index.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                          num_attention_heads=heads, vocab_size=128, max_position_embeddings=512)
        LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True,
                                                                        max_shard_size="100MB")
    return out


def model_figures(cfg) -> dict:
    from vlp.models import build_model, flops_per_sample

    model = build_model(cfg.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(b.numel() for n, b in model.named_buffers() if ".layer." in n and not n.startswith("momentum"))
    size = int(cfg.data.image_size or model.image_cfg["size"])
    return {"gflops_per_sample": flops_per_sample(model, size, int(cfg.data.tokenizer.context_length)) / 1e9,
            "trainable_params_m": trainable / 1e6, "frozen_llm_values_m": frozen / 1e6}


def paper_scale(work: str, vocab: str) -> list:
    """FLOPs per training sample at ALBEF's pretraining size for each variant (random weights, no download)."""
    from vlp.config import load_config

    llm = llama_shaped(work, "llama7b_shaped", 4096, 11008, 32, "bfloat16")
    bert = ("model.text.kwargs={hidden_size: 768, num_attention_heads: 12, intermediate_size: 3072, "
            "vocab_size: 30522, max_position_embeddings: 512}")
    base = [f"model.text.name={vocab}", f"data.tokenizer.name={vocab}", bert, "model.vision.pretrained=''",
            "model.text.pretrained=''", "model.albef.pad_token_id=0", "model.albef.cls_token_id=2",
            "model.albef.sep_token_id=3", "model.albef.mask_token_id=4"]
    rows = []
    for name, path, extra in (("albef", "albef_base.yaml", []), ("bus", "bus_base.yaml", []),
                              ("evit", "albef_base.yaml", ["model.vision.evit.keep_rate=0.7"]),
                              ("frozen_llm", "albef_base.yaml", [f"model.vision.frozen_llm.name={llm}"])):
        cfg = load_config(os.path.join(ROOT, "configs", path), base + extra)
        rows.append({"variant": name, **model_figures(cfg)})
    return rows


def step_time(args, paths: dict, size: list) -> dict:
    """Median training samples/s of each variant over `args.step_time` rounds of alternating 2-step bursts."""
    import statistics
    import time

    import torch

    from vlp.config import load_config
    from vlp.models import build_model

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    runs = {}
    for name in args.variants:
        cfg = load_config(CONFIG, [f"model.text.name={paths['bert']}", f"data.tokenizer.name={paths['bert']}",
                                   f"model.albef.queue_size={8 * args.micro_batch}", *size, *VARIANTS[name]])
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        g = torch.Generator().manual_seed(0)
        batch = model.example_batch(args.micro_batch, args.image_size, int(cfg.data.tokenizer.context_length),
                                    next(model.parameters()))
        batch["image"] = torch.randn(batch["image"].shape, generator=g)
        batch["text_ids"][:, 1:-1] = torch.randint(5, model.vocab_size, batch["text_ids"][:, 1:-1].shape, generator=g)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), batch, [])

    def steps(model, opt, batch, n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
            opt.step()
            model.after_step()

    for model, opt, batch, _ in runs.values():  # warm-up
        steps(model, opt, batch, 1)
    for _ in range(args.step_time):
        for model, opt, batch, rates in runs.values():
            t = time.perf_counter()
            steps(model, opt, batch, 2)
            rates.append(2 * args.micro_batch / (time.perf_counter() - t))
    return {name: {"samples_per_s": statistics.median(r[3]), "rounds": r[3]} for name, r in runs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per variant (default 300)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--micro-batch", type=int, default=32, help="per-rank batch (default 32); the queue (256) "
                   "must be a multiple of micro-batch x nproc")
    p.add_argument("--image-size", type=int, default=64, help="pixels (default 64: 64 patch tokens; 128: 256)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch size (default 8; 16 with --image-size 224: "
                   "196 patch tokens, ViT-B/16's grid at 224 px)")
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--rerank-k", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work-dir", default=os.path.join(ROOT, ".bench", "albef_vision"))
    p.add_argument("--paper-scale", action="store_true", help="only FLOPs per sample at the paper's size")
    p.add_argument("--step-time", type=int, default=0, metavar="ROUNDS",
                   help="only time training steps in one process, variants alternating, for ROUNDS rounds")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet = args.json
    paths = prepare_data(args.work_dir, args.train_samples, args.test_samples, quiet)
    if args.paper_scale:
        rows = paper_scale(args.work_dir, paths["bert"])
        if not args.json:
            print("| variant | GFLOPs / training sample | vs ALBEF | trainable params (M) | frozen LLM values (M) |")
            print("|---|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['variant']} | {r['gflops_per_sample']:.1f} | "
                      f"{r['gflops_per_sample'] / rows[0]['gflops_per_sample']:.2f} | {r['trainable_params_m']:.1f} | "
                      f"{r['frozen_llm_values_m']:.1f} |")
        print(json.dumps(rows))
        return 0

    from vlp.config import load_config

    llm = llama_shaped(args.work_dir)
    size = [f"data.image_size={args.image_size}", f"model.vision.kwargs.img_size={args.image_size}",
            f"model.vision.kwargs.patch_size={args.patch_size}"]
    if args.step_time:
        VARIANTS["frozen_llm"] = [o.format(llm=llm) for o in VARIANTS["frozen_llm"]]
        times = step_time(args, paths, size)
        if not args.json:
            base = times.get("albef")
            print("| variant | samples/s (median) | vs ALBEF |")
            print("|---|---:|---:|")
            for name, r in times.items():
                ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}" if base else "–"
                print(f"| {name} | {r['samples_per_s']:.1f} | {ratio} |")
        print(json.dumps({"image_size": args.image_size, "patch_size": args.patch_size,
                          "micro_batch": args.micro_batch, "rounds": args.step_time, "variants": times}))
        return 0
    tag = f"{args.image_size}px" + (f"_p{args.patch_size}" if args.patch_size != 8 else "")
    results = {}
    for name in args.variants:
        overrides = size + [o.format(llm=llm) for o in VARIANTS[name]]
        cfg = load_config(CONFIG, [f"model.text.name={paths['bert']}", f"data.tokenizer.name={paths['bert']}",
                                   *overrides])
        r = model_figures(cfg)
        r.update(train(f"{name}_{tag}", overrides, args, paths))
        r.update(evaluate(r["run"], paths, args.rerank_k, quiet))
        results[name] = r
    summary = {"steps": args.steps, "nproc": args.nproc, "global_batch": args.micro_batch * args.nproc,
               "image_size": args.image_size, "patch_size": args.patch_size, "train_samples": args.train_samples,
               "test_samples": args.test_samples, "rerank_k": args.rerank_k, "variants": results}
    if not args.json:
        base = results.get("albef")
        print("| variant | GFLOPs/sample | samples/s | vs ALBEF | peak RSS/rank (GiB) | ITC i2t R@1 | t2i R@1 | "
              "mean recall | ITM re-ranked i2t R@1 | t2i R@1 | mean recall |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in results.items():
            itc, rr = r["itc"], r["reranked"] or {}
            ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}" if base else "–"
            print(f"| {name} | {r['gflops_per_sample']:.3f} | {r['samples_per_s']:.1f} | {ratio} | "
                  f"{r['peak_rss_gib']:.2f} | {100 * itc['i2t_r1']:.1f} | {100 * itc['t2i_r1']:.1f} | "
                  f"{100 * itc['mean_recall']:.1f} | " +
                  " | ".join(f"{100 * rr[k]:.1f}" if k in rr else "–" for k in ("i2t_r1", "t2i_r1", "mean_recall")) + " |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
