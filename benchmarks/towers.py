"""FLOPs and CPU speed of the seed vision towers (README "Vision towers") in a CLIP, at native size.

Each timm tower at its registered widths and input size (random init), in a CLIP with a 1-layer
open_clip text tower of width 64 and context 16, so the numbers are the vision tower's: training
GFLOPs per sample (`vlp.models.flops_per_sample`: forward + backward, exact counts) and CPU training
samples/s (fp32, SGD, batch `--batch-size`, mean of `--steps` steps after one warm-up step, on the
threads torch is given). Prints a Markdown table.

    python benchmarks/towers.py [--batch-size 4] [--steps 3] [--threads 2] [--towers NAME ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOWERS = ["vit_small_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto", "maxvit_nano_rw_256",
          "crossvit_tiny_240", "tnt_s_patch16_224", "volo_d1_224"]
TEXT = {"kind": "open_clip", "kwargs": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                                        "layers": 1}}


def measure(name: str, batch_size: int, steps: int) -> dict:
    import torch

    from vlp.config import from_dict
    from vlp.models import build_model, flops_per_sample
    from vlp.models.flops import example_batch

    cfg = from_dict({"model": {"type": "clip", "embed_dim": 256, "vision": {"kind": "timm", "name": name},
                               "text": TEXT},
                     "data": {"tokenizer": {"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}},
                     "train": {"resume": "none"}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    size = int(model.image_cfg["size"])
    vision_params = sum(p.numel() for p in model.vision.parameters())
    flops = flops_per_sample(model)
    batch = example_batch(model, batch_size, size, 16)
    batch["image"] = torch.randn_like(batch["image"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
    return {"tower": name, "size": size, "params": vision_params, "gflops": flops / 1e9,
            "samples_s": batch_size * len(times) / sum(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--towers", nargs="*", default=TOWERS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print("| tower | input px | vision params | training GFLOPs/sample | CPU samples/s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.towers:
        r = measure(name, args.batch_size, args.steps)
        print(f"| `{r['tower']}` | {r['size']} | {r['params'] / 1e6:.1f} M | {r['gflops']:.2f} | "
              f"{r['samples_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
