"""Training step: vlp (DeepSpeed) vs open_clip_train on the same model, batch and data; ZeRO memory.

Part 1, speed (fp32, one process each, CPU or one GPU): the demo's tiny CLIP built from open_clip's
own VisionTransformer and TextTransformer on both sides (64 px, patch 8, width 128, 4 vision / 2
text layers, context 32), batch 64, the synthetic shapes set (3,000 samples, written once to
`.bench/train_step/`), 1 loader worker, AdamW, no clipping. vlp runs `vlp.train.train` (ZeRO-0 engine,
its own loader); open_clip_train runs `open_clip_train.main` with webdataset 0.2.86 from
`.octarget/` on PYTHONPATH (as in benchmarks/loader.py), its model added with
`open_clip.add_model_config`. Throughput is the mean over the logging windows after the first
(start-up excluded), data loading included on both sides; MFU = samples/s x training FLOPs per
sample (`vlp.models.flops_per_sample`, same for both) / the trainer's peak (`vlp.train.mfu.resolve_peak`:
fp32 matmuls after a warm-up, best of 1024/1536/2048, at the thread count the trainers use; measured before
and after the runs, the higher kept).

Part 2, memory (2 ranks, gloo on CPU): rank 0's live tensor storages after two steps of a larger
model (width 384, 31M parameters), split into parameters, optimizer (AdamW states + fp32 master
copies) and the rest (gradient partitions, communication buckets), for ZeRO 0/1/2/3 in fp32 and
bf16, each in its own `deepspeed --num_gpus 2` launch.

    python benchmarks/train_step.py [--steps 40] [--batch-size 64] [--repeats 1] [--skip-speed]
                                    [--skip-memory] [--memory-precisions fp32,bf16] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, ".bench", "train_step")
OCTARGET = os.path.join(ROOT, ".octarget")
N_SAMPLES = 3000


def arch(width: int = 128, vision_layers: int = 4, text_layers: int = 2) -> dict:
    heads = width // 32
    return {"embed_dim": width,
            "vision": {"image_size": 64, "patch_size": 8, "width": width, "layers": vision_layers, "heads": heads,
                       "mlp_ratio": 2.0},
            "text": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": heads,
                     "layers": text_layers, "mlp_ratio": 2.0}}


def vlp_overrides(a: dict, batch: int, steps: int, out: str) -> list:
    v = ",".join(f"{k}: {val}" for k, val in a["vision"].items())
    t = ",".join(f"{k}: {val}" for k, val in a["text"].items())
    return ["model.type=clip", f"model.embed_dim={a['embed_dim']}", "model.vision.kind=open_clip",
            f"model.vision.kwargs={{{v}}}", "model.text.kind=open_clip", f"model.text.kwargs={{{t}}}",
            "data.tokenizer.kind=open_clip", "data.tokenizer.name=ViT-B-32", "data.tokenizer.context_length=32",
            f"data.train_shards={BENCH}", "data.workers=1", "data.shuffle_buffer=500", "data.crop_scale=[0.9,1.0]",
            f"train.micro_batch_size={batch}", f"train.steps={steps}", "train.lr=5e-4", "train.warmup_steps=0",
            "train.weight_decay=0.2", "train.grad_clip=0.0", "train.log_every=10", "train.save_every=0",
            "train.keep_last=1", "train.tensorboard=false", "train.precision=fp32", f"output_dir={out}"]


OPEN_CLIP_SIDE = textwrap.dedent("""
    import json, sys
    import webdataset as wds
    assert wds.__version__ == "0.2.86", wds.__file__
    import open_clip
    from open_clip_train.main import main
    cfg_path, argv = sys.argv[1], sys.argv[2:]
    open_clip.add_model_config(cfg_path)  # registers the file's stem as a model name
    main(argv)
""")


def make_shards() -> str:
    stamp = os.path.join(BENCH, f"done-{N_SAMPLES}")
    if not os.path.exists(stamp):
        from data_pipelines.synth import write_synth

        write_synth(BENCH, n=N_SAMPLES, seed=0, split="train", samples_per_shard=250, overwrite=True)
        open(stamp, "w").close()
    return BENCH


def ensure_octarget() -> None:
    if not os.path.isdir(os.path.join(OCTARGET, "webdataset")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", OCTARGET,
                        "webdataset==0.2.86"], check=True)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_ours(a: dict, batch: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", "",
               *vlp_overrides(a, batch, steps, out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"vlp side failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            windows = [json.loads(line)["samples_per_s"] for line in f][1:]
    return sum(windows) / len(windows)


def run_open_clip(a: dict, batch: int, steps: int) -> float:
    cfg = {"embed_dim": a["embed_dim"],
           "vision_cfg": {"image_size": a["vision"]["image_size"], "patch_size": a["vision"]["patch_size"],
                          "width": a["vision"]["width"], "layers": a["vision"]["layers"],
                          "head_width": a["vision"]["width"] // a["vision"]["heads"],
                          "mlp_ratio": a["vision"]["mlp_ratio"]},
           "text_cfg": {k: a["text"][k] for k in ("context_length", "vocab_size", "width", "heads", "layers",
                                                   "mlp_ratio")}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vlp-bench-clip.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        shards = os.path.join(BENCH, "synth-train-{000000..%06d}.tar" % (N_SAMPLES // 250 - 1))
        argv = ["--model", "vlp-bench-clip", "--train-data", shards, "--dataset-type", "webdataset",
                "--train-num-samples", str(batch * steps), "--batch-size", str(batch), "--workers", "1",
                "--epochs", "1", "--lr", "5e-4", "--wd", "0.2", "--warmup", "0", "--precision", "fp32",
                "--save-frequency", "0", "--logs", tmp, "--log-every-n-steps", "10", "--report-to", "",
                "--seed", "0"]
        proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_SIDE, path, *argv], cwd=ROOT,
                              env=_env(PYTHONPATH=OCTARGET), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"open_clip_train side failed:\n{proc.stderr[-3000:]}")
        times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", proc.stdout + proc.stderr)][1:]
    return batch / (sum(times) / len(times))


def model_flops_and_peak(a: dict) -> tuple:
    from vlp.config import load_config
    from vlp.models import build_model, flops_per_sample
    from vlp.train.mfu import resolve_peak

    cfg = load_config(None, [o for o in vlp_overrides(a, 1, 1, "unused") if o.startswith("model.")])
    model = build_model(cfg.model)
    import torch

    # the trainer's own peak function, at the thread count both trainers compute with (torch's default)
    peak = resolve_peak(0.0, torch.device("cpu"), torch.float32)
    return float(flops_per_sample(model, 64, 32)), peak, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- memory
def _storages(tensors) -> dict:
    out = {}
    for t in tensors:
        try:
            st = t.untyped_storage()
        except Exception:  # meta / sparse / freed tensors
            continue
        if st.data_ptr():
            out[st.data_ptr()] = st.nbytes()
    return out


def tensor_census(model) -> dict:
    """Bytes of this process's distinct live tensor storages: the model's parameters (ZeRO-3: the
    local partitions), the optimizer's (AdamW states and the fp32 master copies it steps, when they
    are not the parameters themselves), and everything else (gradient partitions, buckets, batch)."""
    import torch

    gc.collect()
    everything = _storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    params = _storages([getattr(p, "ds_tensor", p) for p in model.parameters()]
                       + [p for p in model.parameters() if p.numel()])
    objects = gc.get_objects()
    optims = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
    # ZeRO-3 detaches its fp32 master partitions from the param groups between steps
    masters = [t for o in objects if type(o).__name__ == "DeepSpeedZeroOptimizer_Stage3"
               for t in getattr(o, "fp32_partitioned_groups_flat", [])]
    optim = _storages([t for o in optims for st in o.state.values() for t in st.values()
                       if isinstance(t, torch.Tensor)]
                      + [p for o in optims for g in o.param_groups for p in g["params"]] + masters)
    optim = {k: v for k, v in optim.items() if k not in params}
    other = {k: v for k, v in everything.items() if k not in params and k not in optim}
    return {"params": sum(params.values()), "optimizer": sum(optim.values()), "other": sum(other.values())}


class _Census:
    """Random batches; before the third fetch (two optimizer steps done) rank r records its tensor census."""

    def __init__(self, out: str, model, rank: int, batch: int):
        import torch

        g = torch.Generator().manual_seed(rank)
        self.batch = {"image": torch.randn(batch, 3, 64, 64, generator=g),
                      "text_ids": torch.randint(1, 49000, (batch, 32), generator=g),
                      "text_mask": torch.ones(batch, 32, dtype=torch.long), "key": [str(i) for i in range(batch)]}
        self.out, self.model, self.rank, self.fetched = out, model, rank, 0

    def __iter__(self):
        while True:
            self.fetched += 1
            if self.fetched == 3:
                with open(f"{self.out}.rank{self.rank}", "w") as f:
                    json.dump(tensor_census(self.model), f)
            yield self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def memory_worker(args) -> int:
    from vlp.train.cli import _shutdown_after, worker_main

    with tempfile.TemporaryDirectory() as out:
        overrides = vlp_overrides(arch(384, 6, 4), 4, 3, out) + [f"train.zero_stage={args.stage}",
                                                                 "data.workers=0",
                                                                 f"train.precision={args.precision}"]
        return _shutdown_after(worker_main(
            "", overrides, make_loader=lambda c, m, r, w: _Census(args.memory_out, m, r, 4)))


def run_memory(stage: int, precision: str) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "census")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               os.path.abspath(__file__), "--memory-worker", "--stage", str(stage), "--memory-out", out,
               "--precision", precision]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory run (ZeRO-{stage}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return [json.load(open(f"{out}.rank{r}")) for r in (0, 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="alternate the two sides this many times, keep the best")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--memory-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--memory-precisions", default="fp32,bf16",
                   help="precisions of the memory table (bf16 runs on CPU too, slowly; default fp32,bf16)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        return memory_worker(args)

    make_shards()
    result: dict = {}
    if not args.skip_speed:
        ensure_octarget()
        a = arch()
        flops, peak, n_params = model_flops_and_peak(a)
        best = {"vlp": 0.0, "open_clip_train": 0.0}
        for _ in range(args.repeats):
            best["vlp"] = max(best["vlp"], run_ours(a, args.batch_size, args.steps))
            best["open_clip_train"] = max(best["open_clip_train"], run_open_clip(a, args.batch_size, args.steps))
        # the peak again after the runs: the best of both readings (the VM's speed drifts)
        after = model_flops_and_peak(a)[1]
        peak = max(peak.flops, after.flops), (f"the higher of {peak.flops / 1e9:.0f} (before) and {after.flops / 1e9:.0f} "
                                              f"(after the runs) GFLOP/s, each the {after.how}")
        result.update(params=n_params, flops_per_sample=flops, peak_flops=peak[0], peak_how=peak[1],
                      batch_size=args.batch_size,
                      speed={k: {"samples_per_s": v, "mfu": v * flops / peak[0]} for k, v in best.items()})
    if not args.skip_memory:
        result["memory_mb_rank0"] = {
            prec: {f"zero{s}": {k: v / 2**20 for k, v in run_memory(s, prec)[0].items()} for s in (0, 1, 2, 3)}
            for prec in args.memory_precisions.split(",")}
    if args.json:
        print(json.dumps(result))
        return 0
    if "speed" in result:
        print(f"model {result['params'] / 1e6:.1f}M params, {result['flops_per_sample'] / 1e6:.0f} MFLOP/sample "
              f"(training), peak {result['peak_flops'] / 1e9:.0f} GFLOP/s ({result['peak_how']}), batch {args.batch_size}")
        print("| trainer | samples/s | MFU |\n|---|---:|---:|")
        for k, v in result["speed"].items():
            print(f"| {k} | {v['samples_per_s']:.1f} | {v['mfu']:.1%} |")
    for prec, table in result.get("memory_mb_rank0", {}).items():
        base = table["zero0"]["params"] + table["zero0"]["optimizer"]
        print(f"| ZeRO ({prec}) | params MB | optimizer MB | params+optimizer vs ZeRO-0 | other MB (grads, buckets) |")
        print("|---|---:|---:|---:|---:|")
        for k, v in table.items():
            both = v["params"] + v["optimizer"]
            print(f"| {k} | {v['params']:.0f} | {v['optimizer']:.0f} | {both:.0f} MB = {both / base:.0%} | "
                  f"{v['other']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
