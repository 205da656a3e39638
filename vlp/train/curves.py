"""Training curves without a TensorBoard server: `output_dir/curves.png`, and `vlp report RUN [RUN_B]`.

The trainer (rank 0) redraws `curves.png` from `metrics.jsonl` at checkpoints and at the end;
`vlp report RUN_DIR` redraws it for any run, finished or not, and `vlp report RUN_A RUN_B` overlays
two runs (A solid, B dashed) in one figure for comparison. The panels: vlp.plots.draw_curves.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from vlp.plots import draw_curves, read_evals, read_metrics


def write_run_curves(run_dir: str) -> Optional[str]:
    """Redraw `run_dir/curves.png` from its metrics; None (and no file) when nothing was logged yet."""
    records = read_metrics(run_dir)
    if not records:
        return None
    out = os.path.join(run_dir, "curves.png")
    draw_curves([(os.path.basename(os.path.normpath(run_dir)) or run_dir, records)], out, evals=[read_evals(run_dir)])
    return out


def _report(args: argparse.Namespace) -> int:
    runs = []
    for d in args.runs:
        try:
            records = read_metrics(d)
        except FileNotFoundError as e:
            print(f"vlp report: {e}", file=sys.stderr)
            return 2
        if not records:
            print(f"vlp report: {d}/metrics.jsonl holds no logged step yet", file=sys.stderr)
            return 2
        runs.append((os.path.basename(os.path.normpath(d)) or d, records))
    out = args.out or os.path.join(args.runs[0], "curves.png" if len(runs) == 1 else "curves_compare.png")
    draw_curves(runs, out, evals=[read_evals(d) for d in args.runs])
    print("vlp report:")
    for name, records in runs:
        last = records[-1]
        figures = ", ".join(f"{k}={last[k]:.4g}" for k in ("loss", "eval/mean_recall", "samples_per_s", "mfu")
                            if isinstance(last.get(k), (int, float)))
        print(f"  {name}: {len(records)} logged steps, last step {last['step']}: {figures}")
    print(f"  curves: {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="draw a run's training curves (or two runs overlaid) from metrics.jsonl",
                       description="Redraw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl; with two run "
                                   "directories, overlay them (first solid, second dashed) in "
                                   "RUN_A/curves_compare.png.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="vlp run directories (train.output_dir)")
    p.add_argument("--out", default="", help="PNG path (default: in the first run directory)")
    p.set_defaults(func=_report)


__all__ = ["write_run_curves", "register"]
