"""The GPU benchmark (issue 18): samples/s, MFU and peak memory of vlp's real training path, one JSON line
per configuration, within ~8 minutes on one GPU.

    python benchmarks/gpu.py [--out gpu.jsonl] [--steps 12] [--only NAME ...]
    python benchmarks/gpu.py --tiny --out tiny.jsonl      # CPU, the same code at a tiny size (a test runs it)

Every configuration is `vlp.train.train` itself (DeepSpeed engine, bf16 autocast boundaries, fused AdamW,
the FLOP counter and MFU peak of `vlp.train.mfu`) on one process, for `--steps` optimizer steps; the
figures are the last logged window, the steps after the first `--warmup` (start-up and the first
batches stay outside it; `--steps` must be under twice `--warmup` plus the window, the default 12 and
4 log at step 8 and 12: the window is steps 9-12) and `torch.cuda.max_memory_allocated`:

- `clip_b16_mem_z{0,2,3}`: CLIP ViT-B/16 (configs/clip_vit_b16.yaml) at 256 per GPU, bf16, with one
  batch held in memory and fed again (uint8 on the device: the model's ceiling), at ZeRO 0, 2 and 3;
- `clip_b16_loader`: the same with the real loader over local JPEG shards (2,000 images, 256-512 px,
  written once by benchmarks/loader.py): does the loader keep up? (compare with `clip_b16_mem_z0`);
  `clip_b16_loader_gpu_decode` the same with `data.decode=device` (torchvision's nvJPEG decode on the GPU);
- `albef_base`, `bus_base`: ALBEF and ALBEF + BUS at the paper's geometry (ViT-B/16 at 256 px, BERT-base
  widths, 6 + 6 text/fusion layers, 64 per GPU), with a word-level vocabulary written from the shards
  instead of bert-base-uncased's (the GPU host has no network; embedding rows barely move the cost).

- `clip_b16_mem_z{0,3}_compiled`: the in-memory rows with `train.compile=true` (DeepSpeed's
  `engine.compile`, inductor); compilation happens in the first steps, outside the measured window.

With `--tiny` the models shrink to a few layers of width 64 at 32-64 px, fp32, 4 samples per step, and
the shards are the synthetic set: minutes of CPU, to keep the script working, not to measure. Each line
also lists the attention kernels one forward + backward ran (`attention_kernels`): on a GPU, flash or
memory-efficient SDPA kernels, never `_scaled_dot_product_attention_math`.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BERT_BASE = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512}
TINY_BERT = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 32}
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}


class InMemory:
    """The first batch of a loader, yielded again and again (data in memory: the model's ceiling)."""

    def __init__(self, loader):
        self.batch = next(iter(loader))
        self.pos = 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield dict(self.batch)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]


def _shards(tiny: bool, work: str) -> str:
    if tiny:
        from data_pipelines.synth import write_synth

        out = os.path.join(work, "synth")
        if not os.path.isdir(out):
            write_synth(out, n=64, seed=0, split="train", samples_per_shard=16)
        return out
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from loader import make_shards

    return make_shards()


def _vocab(shards: str, work: str) -> str:
    from data_pipelines.bert_vocab import write_bert_vocab

    out = os.path.join(work, "bert")
    if not os.path.isfile(os.path.join(out, "config.json")):
        write_bert_vocab(str(shards), out, overwrite=True)
    return out


def configurations(tiny: bool, shards: str, vocab: str):
    """name -> (config file, overrides, in-memory data?)"""
    clip = ["train.precision=bf16", "train.micro_batch_size=256", "data.workers=4"]
    if tiny:
        clip = ["train.precision=fp32", "train.micro_batch_size=4", "data.workers=1", "data.image_size=32",
                "!model.vision={kind: timm, name: vit_tiny_patch16_224, kwargs: %s}" % json.dumps(TINY_VIT),
                "!model.text={kind: open_clip, kwargs: %s}" % json.dumps(TINY_TEXT), "model.embed_dim=64",
                "data.tokenizer={kind: open_clip, name: ViT-B-32, context_length: 16}"]
    albef = [f"data.tokenizer.name={vocab}", f"model.text.name={vocab}", "data.tokenizer.kind=hf",
             "model.albef.pad_token_id=0", "model.albef.cls_token_id=2", "model.albef.sep_token_id=3",
             "model.albef.mask_token_id=4"]
    if tiny:
        albef += ["train.precision=fp32", "train.micro_batch_size=4", "data.workers=1", "data.image_size=32",
                  "model.embed_dim=32", "model.vision.kwargs=%s" % json.dumps(TINY_VIT),
                  "model.text.kwargs=%s" % json.dumps(TINY_BERT), "data.tokenizer.context_length=16",
                  "model.albef.text_layers=1", "model.albef.fusion_layers=1", "model.albef.queue_size=16"]
    else:
        albef += ["train.precision=bf16", "train.micro_batch_size=64", "data.workers=4",
                  "model.text.kwargs=%s" % json.dumps(BERT_BASE)]
    out = {f"clip_b16_mem_z{z}": ("configs/clip_vit_b16.yaml", clip + [f"train.zero_stage={z}"], True) for z in (0, 2, 3)}
    for z in (0, 3):  # torch.compile through DeepSpeed's engine.compile (train.compile), against the eager rows
        out[f"clip_b16_mem_z{z}_compiled"] = ("configs/clip_vit_b16.yaml", clip + [f"train.zero_stage={z}",
                                                                                   "train.compile=true"], True)
    out["clip_b16_loader"] = ("configs/clip_vit_b16.yaml", clip + ["train.zero_stage=0"], False)
    # the JPEGs decoded on the GPU (nvJPEG, data.decode=device): the loader's cores only read headers
    out["clip_b16_loader_gpu_decode"] = ("configs/clip_vit_b16.yaml", clip + ["train.zero_stage=0",
                                                                              "data.decode=device"], False)
    out["albef_base"] = ("configs/albef_base.yaml", albef, True)
    out["bus_base"] = ("configs/bus_base.yaml", albef + (["model.bus.pad_heads=2", "model.bus.blocks=[1]"] if tiny else []), True)
    return out


def attention_kernels(cfg) -> list:
    """The attention kernels one forward + backward of the model runs on this device (the issue asks that
    no tower silently runs SDPA's math fallback): profiler op names with 'attention' in them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vlp.data.transforms import resolve_image_cfg
    from vlp.models import build_model
    from vlp.models.flops import example_batch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(cfg.train.precision) == "bf16" else torch.float32
    model = build_model(cfg.model, pretrained=False).to(dev, dtype)
    size = int(resolve_image_cfg(model.image_cfg, cfg.data)["size"])
    batch = example_batch(model, 2, size, int(cfg.data.tokenizer.context_length))
    batch = {k: (v.to(dev, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                 v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        model(batch)["loss"].backward()
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower()})


def run_one(name: str, cfg_file: str, overrides, in_memory: bool, shards: str, steps: int, warmup: int,
            work: str) -> dict:
    import torch

    from vlp.config import load_config
    from vlp.train import train
    from vlp.train.loop import default_loader

    out_dir = os.path.join(work, "runs", name)
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = load_config(os.path.join(ROOT, cfg_file), list(overrides) + [
        f"data.train_shards={shards}", f"output_dir={out_dir}", f"train.steps={steps}", f"train.log_every={steps - warmup}",
        "train.save_every=0", "train.warmup_steps=1", "train.tensorboard=false", "train.curves=false",
        "model.init_from=''", "train.resume=none", "eval.every=0"])
    for side in ("vision", "text"):  # random towers: no pretrained download on a host without network
        cfg.model[side].pretrained = ""
    make = (lambda c, m, r, w: InMemory(default_loader(c, m, r, w))) if in_memory else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(cfg, make)
    last = result.last
    rec = {"config": name, "steps": result.step, "micro_batch": int(cfg.train.micro_batch_size),
           "precision": str(cfg.train.precision), "zero_stage": int(cfg.train.zero_stage),
           "compile": bool(cfg.train.compile),
           "data": "in memory" if in_memory else "loader", "samples_per_s": last.get("samples_per_s"),
           "mfu": last.get("mfu"), "flops_per_s": last.get("flops_per_s"), "wall_s": time.perf_counter() - t0,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        rec["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    rec["attention_kernels"] = attention_kernels(cfg)
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints of a benchmark are not kept
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized models (keeps the script working)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4, help="steps before the measured window")
    p.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    p.add_argument("--out", default="gpu_bench.jsonl")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    work = args.work or tempfile.mkdtemp(prefix="vlp_gpu_bench_")
    shards = _shards(args.tiny, work)
    vocab = _vocab(shards, work)
    confs = configurations(args.tiny, shards, vocab)
    names = args.only or list(confs)
    unknown = [n for n in names if n not in confs]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(confs)}")
    with open(args.out, "a") as f:
        for name in names:
            cfg_file, overrides, mem = confs[name]
            try:
                rec = run_one(name, cfg_file, overrides, mem, shards, args.steps, args.warmup, work)
            except Exception as e:  # one configuration failing (e.g. out of memory) must not hide the others
                rec = {"config": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            line = json.dumps(rec)
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()
    sys.stdout.flush()
    os._exit(0)  # several engines ran in this process: skip destructors of their comm threads at exit


if __name__ == "__main__":
    sys.exit(main())
