"""SigLIP's loss memory (issue 18, item 6): gathered logits vs the ring of ranks (`model.siglip_chunked`).

For each per-rank batch B and world size W, W gloo CPU ranks each compute `vlp.losses.siglip_loss` forward
and backward on their own (B, D) unit-norm features: gathered, every rank builds its B x (W*B) logits block
(and its sigmoid and gradient); chunked, the texts travel round the ring and only one B x B block lives at a
time. Peak memory = each rank process's maximum resident set minus its resident set just before the loss
(the features themselves and library code are not counted), the largest over ranks; every point is its own
set of processes. Also prints the difference of the two mean-over-ranks losses (equal: tests/dist/test_gather_grad.py).

    python benchmarks/siglip_memory.py [--batches 512,1024,2048,4096] [--worlds 2,4] [--png docs/images/siglip_memory.png]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from cost_curves import _rss_mib  # noqa: E402  (the same resident-set reading as the cost curves)

DIM = 256


def _rank(rank: int, world: int, port: int, batch: int, chunked: bool, queue) -> None:
    from vlp.losses import siglip_loss

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    img = F.normalize(torch.randn(batch, DIM, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(batch, DIM, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    # a small warm-up loss first: the first call's one-off allocations (kernels, gloo buffers) stay out of the peak
    w_img, w_txt = img[:8].detach().clone().requires_grad_(), txt[:8].detach().clone().requires_grad_()
    siglip_loss(w_img, w_txt, scale, bias, chunked=chunked).backward()
    dist.barrier()
    base = _rss_mib()
    loss = siglip_loss(img, txt, scale, bias, chunked=chunked)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((rank, float(loss.detach()), max(0.0, peak - base)))
    dist.barrier()
    dist.destroy_process_group()


def point(world: int, batch: int, chunked: bool) -> dict:
    from vlp.dist import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, batch, chunked, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=900) for _ in procs)  # by rank
    for p in procs:
        p.join(timeout=60)
    return {"world": world, "batch_per_rank": batch, "global_batch": world * batch, "chunked": chunked,
            "loss": sum(g[1] for g in got) / world, "peak_mib": max(g[2] for g in got),
            "logits_block_mib": batch * (batch if chunked else world * batch) * 4 / 2 ** 20}


def draw(rows, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlp.plots import save_figure

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for world in sorted({r["world"] for r in rows}):
        for chunked, style in ((False, "-o"), (True, "--s")):
            pts = sorted((r["global_batch"], r["peak_mib"]) for r in rows if r["world"] == world and r["chunked"] == chunked)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                    label=f"{world} ranks, {'ring (siglip_chunked)' if chunked else 'gathered'}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("global batch (pairs)")
    ax.set_ylabel("peak memory of the loss per rank (MiB)")
    ax.set_title("SigLIP loss, forward + backward, per rank (CPU, fp32, D = 256)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, png)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="512,1024,2048,4096", help="per-rank batch sizes")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "siglip_memory.json"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "images", "siglip_memory.png"))
    args = ap.parse_args()
    rows = []
    for world in map(int, args.worlds.split(",")):
        for batch in map(int, args.batches.split(",")):
            pair = [point(world, batch, chunked) for chunked in (False, True)]
            for r in pair:
                r["loss_diff"] = abs(pair[0]["loss"] - pair[1]["loss"])
                print(json.dumps(r), flush=True)
            rows += pair
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    draw(rows, args.png)
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
