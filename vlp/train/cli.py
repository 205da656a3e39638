"""`vlp train`: validate the config, then start the ranks with DeepSpeed's launcher.

`vlp train --config CFG --nproc N k=v ...` runs `deepspeed --num_gpus N launch/pretrain.py
--config CFG k=v ...` (one process per GPU, or N CPU processes with gloo on a CPU-only host);
with `--nproc 1` it trains in this process. Each rank runs `worker_main`.

Exit codes: 0 done, 1 a rank failed, 2 config/checkpoint problem, 3 non-finite loss,
128+signal when SIGINT/SIGTERM stopped the run (after saving a checkpoint; rerun to resume).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from typing import Callable, List, Optional

from vlp.dist import launcher_command, release_shm_buffer, run_forwarding_signals

EXIT_FAILED, EXIT_CONFIG, EXIT_NONFINITE = 1, 2, 3

_EPILOG = """\
examples:
  vlp train --config configs/demo_clip.yaml --nproc 2
  vlp train --config configs/demo_clip.yaml train.steps=200 train.lr=1e-3 output_dir=runs/try2

Overrides are dotted keys of the config (see README's config reference). The run writes
OUTPUT_DIR/config.yaml, metrics.jsonl, tb/ (TensorBoard) and checkpoints/step_XXXXXXX/; with
train.resume=auto (the default) rerunning the same command continues from the newest complete
checkpoint. Ctrl-C (or SIGTERM) saves a checkpoint at the next step boundary, then exits.
Multi-node: see launch/slurm/pretrain.sbatch and launch/hostfile.example.
"""


def _launch_script() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "launch", "pretrain.py"))
    return path if os.path.isfile(path) else None


def worker_main(config: str, overrides: List[str], make_loader: Optional[Callable] = None) -> int:
    """One rank's whole run, errors mapped to exit codes with a message on stderr.

    `make_loader`: see `vlp.train.loop.train` (default: the data pipeline)."""
    from vlp.config import ConfigError, load_config
    from vlp.checkpoint import CheckpointError

    rank = os.environ.get("RANK", "0")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"vlp train: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    import deepspeed

    from vlp.train.loop import NonFiniteLossError, train

    deepspeed.utils.logger.setLevel(logging.WARNING)
    t0 = time.time()
    try:
        result = train(cfg, make_loader)  # validates and checks the shards before any work
    except ConfigError as e:
        print(f"vlp train [rank {rank}]: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except CheckpointError as e:
        print(f"vlp train [rank {rank}]: checkpoint error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as e:
        print(f"vlp train [rank {rank}]: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print(f"vlp train [rank {rank}]: interrupted twice, exiting without a checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # a collective failing usually means another rank died first
        traceback.print_exc()
        print(f"vlp train [rank {rank}]: failed: {type(e).__name__}: {e}\n"
              "  (if this is a communication error, another rank probably died first: look for its error above)",
              file=sys.stderr)
        return EXIT_FAILED
    if result.stopped_by:
        if rank == "0":
            print(f"vlp train: stopped by signal {result.stopped_by} at step {result.step}; checkpoint "
                  f"{result.checkpoint}. Run the same command again to resume.", file=sys.stderr)
        return 128 + int(result.stopped_by)
    if rank == "0":
        _summary(cfg, result, time.time() - t0)
    return 0


def _summary(cfg, result, seconds: float) -> None:
    """The end-of-run block: steps, loss, speed, held-out recall, where the files are."""
    from vlp.console import duration, summary

    last, out = result.last, cfg.output_dir
    curves = os.path.join(out, "curves.png")
    summary("vlp train: done", [
        ("steps", f"{result.step} of {cfg.train.steps} ({result.samples_seen:,} samples) in {duration(seconds)}"),
        ("loss", f"{last['loss']:.4f}" if "loss" in last else None),
        ("speed", f"{last['samples_per_s']:.1f} samples/s" + (f", MFU {100 * last['mfu']:.1f}%" if "mfu" in last else "")
         if "samples_per_s" in last else None),
        ("held-out", f"mean recall {100 * last['eval/mean_recall']:.1f}" if "eval/mean_recall" in last else None),
        ("run", out),
        ("checkpoint", result.checkpoint),
        ("curves", curves if os.path.isfile(curves) else None),
        ("next", f"vlp eval retrieval --checkpoint {out} --data DATA --out {out}/eval/DATA.json --report "
                 f"{out}/eval/DATA.png"),
    ])


def train_command(config: str, overrides: List[str], nproc: int, master_port: Optional[int] = None) -> List[str]:
    """The `deepspeed` launcher command line that starts `nproc` local ranks of this config (see
    `vlp.dist.launcher_command`)."""
    script = _launch_script()
    target = [script] if script else ["--module", "vlp.train.cli"]
    return launcher_command(nproc, target + ["--config", config] + list(overrides), master_port)


def _cmd(args: argparse.Namespace) -> int:
    from vlp.checkpoint import CheckpointError
    from vlp.config import load_config
    from vlp.train.loop import check_before_work

    try:
        check_before_work(load_config(args.config, args.overrides))  # fail before starting processes
    except CheckpointError as e:
        print(f"vlp train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.nproc < 1:
        print("vlp train: --nproc must be >= 1", file=sys.stderr)
        return EXIT_CONFIG
    if args.nproc == 1:
        return _shutdown_after(worker_main(args.config, args.overrides))
    return run_forwarding_signals(train_command(args.config, args.overrides, args.nproc, args.master_port))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain a model with DeepSpeed (1..N local processes)",
        description="Train the model of CONFIG on its shards with DeepSpeed: ZeRO 0-3, bf16 on capable GPUs, "
                    "fp32 on CPU; logs, checkpoints and exact resume.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo_clip.yaml")
    p.add_argument("--nproc", type=int, default=1,
                   help="local processes: one per GPU, or CPU ranks (gloo) on a CPU-only host (default 1: "
                        "train in this process)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port for --nproc > 1 (default: a free port of this host)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=1e-3")
    p.set_defaults(func=_cmd)


def pretrain_main(argv: Optional[List[str]] = None) -> int:
    """A rank's entry: `launch/pretrain.py` or `python -m vlp.train.cli` with `--config CFG
    [--local_rank N] k=v ...` (the DeepSpeed launcher appends --local_rank)."""
    parser = argparse.ArgumentParser(prog="vlp-pretrain")
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    return _shutdown_after(worker_main(args.config, args.overrides))


def _shutdown_after(rc: int) -> int:
    """Leave the process group cleanly after a run that ended in agreement (not after a failure,
    where a peer may be gone)."""
    import torch.distributed as dist

    if (rc in (0, EXIT_NONFINITE) or rc > 128) and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached world group
    release_shm_buffer()  # also when a caller ends with os._exit, which skips atexit
    return rc


if __name__ == "__main__":
    sys.exit(pretrain_main())
