"""ALBEF vs a dual encoder with the same towers: training throughput, memory per rank, and zero-shot
retrieval after the same number of samples on the synthetic set.

Both models train with the real `vlp train` (DeepSpeed, `--nproc` ranks) from `configs/demo_albef.yaml`:
ALBEF as configured, and a CLIP dual encoder (`model.type=clip`) with the same timm ViT, the same BERT
width and tokenizer, and as many text layers as ALBEF's text encoder (`model.albef.text_layers`), so
the ITC paths are the same towers and the difference is ALBEF's fusion encoder, momentum copies, queue,
ITM and MLM. Same steps, global batch, learning-rate schedule and data order. Then `vlp eval retrieval`
on the held-out split: ITC metrics for both, and ITM re-ranked metrics (top `--rerank-k`) for ALBEF.

samples/s is the trainer's own figure (mean over the logged windows after the first); memory is the
largest peak resident set size (VmHWM, read from /proc while training, so Linux only) over the rank
processes: host RAM; on GPUs device memory is not counted.

    python benchmarks/albef_vs_dual.py [--steps 300] [--nproc 2] [--micro-batch 32] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_albef.yaml")



def _rank_peaks(marker: str) -> dict:
    """VmHWM (peak resident set, KiB) of each live rank process whose command line holds `marker`."""
    peaks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            if "pretrain.py" not in cmd or marker not in cmd:
                continue
            with open(f"/proc/{pid}/status") as f:
                peaks[pid] = max(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, ValueError):  # the process ended meanwhile
            continue
    return peaks


def run_and_watch(cmd: list, marker: str, log: str = "") -> tuple:
    """Run `cmd` (its stdout and stderr to the file `log`, else dropped); poll its rank processes' peak
    RSS (Linux /proc) until it ends -> (exit code, max KiB)."""
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        peaks: dict = {}
        while proc.poll() is None:
            for pid, kib in _rank_peaks(marker).items():
                peaks[pid] = max(kib, peaks.get(pid, 0))
            time.sleep(0.5)
    return proc.returncode, max(peaks.values(), default=0)


def free_port() -> int:
    """A TCP port free now, for the ranks' rendezvous (DeepSpeed's default 29500 may be another run's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vlp(*args: str) -> list:
    return [sys.executable, "-m", "vlp.cli", *args]


def _run(cmd: list, quiet: bool) -> None:
    if not quiet:
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if quiet else sys.stderr)


def prepare_data(work: str, train_samples: int, test_samples: int, quiet: bool) -> dict:
    paths = {k: os.path.join(work, "data", k) for k in ("train", "test", "bert")}
    for split, n, seed in (("train", train_samples, 0), ("test", test_samples, 1)):
        stats = os.path.join(paths[split], "stats.json")
        if not (os.path.isfile(stats) and json.load(open(stats))["written"] == n):
            _run(_vlp("data", "synth", paths[split], "--n", str(n), "--seed", str(seed), "--split", split,
                      "--overwrite"), quiet)
    if not os.path.isfile(os.path.join(paths["bert"], "config.json")):
        _run(_vlp("data", "bert-vocab", paths["train"], "--out", paths["bert"], "--overwrite"), quiet)
    return paths


def dual_encoder_overrides() -> list:
    """`vlp train` overrides that turn CONFIG's ALBEF into a CLIP dual encoder with the same towers: the
    same ViT, BERT width, tokenizer and 128-d space, and as many text layers as ALBEF's text encoder."""
    from vlp.config import load_config

    text_layers = int(load_config(CONFIG).model.albef.text_layers)
    return ["model.type=clip", f"model.text.kwargs.num_hidden_layers={text_layers}"]


_INIT_FROM = "vlp train: init_from "  # rank 0's stderr: one line per part of the model.init_from report


def train(name: str, overrides: list, args, paths: dict, steps: int = 0) -> dict:
    """One `vlp train` run (from scratch, or from `model.init_from` in `overrides`) of `steps` (default
    `args.steps`) into `args.work_dir/name`, its output in `train.log` there; returns throughput, peak
    RSS of the largest rank and the init_from report lines (empty without init_from)."""
    steps = steps or args.steps
    out = os.path.join(args.work_dir, name)
    subprocess.run(["rm", "-rf", out], check=True)
    os.makedirs(out)
    log = os.path.join(out, "train.log")
    cmd = _vlp("train", "--config", CONFIG, "--nproc", str(args.nproc), "--master-port", str(free_port()),
               f"output_dir={out}",
               f"data.train_shards={paths['train']}", f"data.tokenizer.name={paths['bert']}",
               f"model.text.name={paths['bert']}", f"train.steps={steps}",
               f"train.micro_batch_size={args.micro_batch}", f"train.warmup_steps={max(1, steps // 10)}",
               f"train.log_every={max(1, steps // 10)}", "train.save_every=0", "train.tensorboard=false",
               "train.resume=none", *overrides)
    if not args.json:
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    rc, peak_kib = run_and_watch(cmd, f"output_dir={out}\0", log)  # \0 ends the argument: not a prefix match
    if rc != 0:
        raise SystemExit(f"benchmark: training {name} failed (exit {rc}); its output: {log}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    windows = [r["samples_per_s"] for r in records[1:]] or [records[-1]["samples_per_s"]]
    with open(log, errors="replace") as f:  # "vlp train: init_from PATH: LINE" -> LINE
        init = [line.rstrip("\n")[len(_INIT_FROM):].split(": ", 1)[-1] for line in f if line.startswith(_INIT_FROM)]
    return {"run": out, "samples_per_s": sum(windows) / len(windows), "peak_rss_gib": peak_kib / 2**20,
            "samples_seen": records[-1]["samples_seen"], "final_loss": records[-1]["loss"], "init_from": init}


def evaluate(run: str, paths: dict, rerank_k: int, quiet: bool) -> dict:
    out = os.path.join(run, "retrieval.json")
    _run(_vlp("eval", "retrieval", "--checkpoint", run, "--data", paths["test"], "--out", out,
              "--rerank-k", str(rerank_k), "--workers", "1"), quiet)
    with open(out) as f:
        res = json.load(f)
    return {"itc": res["metrics"], "reranked": res.get("reranked"), "itm": res.get("itm")}


def parameter_counts(overrides: dict, paths: dict) -> dict:
    """Trainable parameters and momentum/queue buffer elements of each model (millions)."""
    from vlp.config import load_config
    from vlp.models import build_model

    counts = {}
    for name, extra in overrides.items():
        cfg = load_config(CONFIG, [f"model.text.name={paths['bert']}", f"data.tokenizer.name={paths['bert']}", *extra])
        model = build_model(cfg.model)
        counts[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                        "buffers_m": sum(b.numel() for b in model.buffers() if b.is_floating_point()) / 1e6}
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per model (default 300)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--micro-batch", type=int, default=32, help="per-rank batch (default 32); the ALBEF queue "
                   "(1024) must be a multiple of micro-batch x nproc")
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--rerank-k", type=int, default=16, help="ITM re-ranks the top K ITC candidates (default 16)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, ".bench", "albef_vs_dual"))
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet = args.json
    paths = prepare_data(args.work_dir, args.train_samples, args.test_samples, quiet)
    models = {"albef": [], "dual_encoder": dual_encoder_overrides()}
    counts = parameter_counts(models, paths)
    results = {}
    for name, overrides in models.items():
        r = train(name, overrides, args, paths)
        r.update(counts[name])
        r.update(evaluate(r["run"], paths, args.rerank_k if name == "albef" else 0, quiet))
        results[name] = r
    summary = {"steps": args.steps, "nproc": args.nproc, "global_batch": args.micro_batch * args.nproc,
               "train_samples": args.train_samples, "test_samples": args.test_samples, "rerank_k": args.rerank_k,
               "models": results}
    if not args.json:
        print("| model | params (M) | samples/s | peak RSS per rank (GiB) | i2t R@1 | t2i R@1 | mean recall |"
              " ITM re-ranked i2t R@1 | t2i R@1 | mean recall |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in results.items():
            itc, rr = r["itc"], r["reranked"]
            tail = " | ".join(f"{100 * rr[k]:.1f}" for k in ("i2t_r1", "t2i_r1", "mean_recall")) if rr else "– | – | –"
            print(f"| {name} | {r['params_m']:.2f} | {r['samples_per_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                  f"{100 * itc['i2t_r1']:.1f} | {100 * itc['t2i_r1']:.1f} | {100 * itc['mean_recall']:.1f} | {tail} |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
