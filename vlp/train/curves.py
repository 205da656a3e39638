"""Training curves without a TensorBoard server: `output_dir/curves.png`, and `vlp report RUN [RUN_B]`.

The trainer (rank 0) redraws `curves.png` from `metrics.jsonl` at each checkpoint and at the end;
`vlp report RUN_DIR` redraws it for any run, finished or not, and `vlp report RUN_A RUN_B` overlays
two runs (A solid, B dashed) in one figure for comparison. Six panels: the total and per-objective
losses (log scale), the learning rate, throughput (samples/s, and MFU on the right axis), in-training
retrieval recall (`eval.every`; and the `vlp eval retrieval` results saved in the run directory, one
point per evaluated checkpoint: ITC, ITM re-ranked, ITM + ITC, held-out ITM accuracy), the fusion models' ITM head (accuracy and mean match probability of
positives and negatives) or the contrastive temperature, and skipped samples per reason. Panels
with nothing to show say so instead of staying blank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

Run = Tuple[str, List[Dict[str, float]]]


def read_metrics(run_dir: str) -> List[Dict[str, float]]:
    """The records of `run_dir/metrics.jsonl` (a torn last line, from a run killed mid-write, is skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (give a vlp run directory: the train.output_dir "
                                "of a run that logged at least one step)")
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def read_evals(run_dir: str) -> List[Tuple[int, Dict]]:
    """(checkpoint step, result) of the `vlp eval retrieval` JSON files saved in `run_dir` (e.g.
    `--out RUN/eval_0001000.json`), by step; files that are not such results are ignored."""
    out = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(run_dir, name)) as f:
                res = json.load(f)
            step = int(res["model"]["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(res, dict) and res.get("task") == "retrieval" and isinstance(res.get("metrics"), dict):
            out.append((step, res))
    return sorted(out, key=lambda x: x[0])


def _smooth(ys: List[float]) -> List[float]:
    """An exponential moving average whose span is ~1/20 of the curve (none for short curves)."""
    if len(ys) < 30:
        return ys
    a = 2.0 / (len(ys) / 20 + 1)
    out, m = [], ys[0]
    for y in ys:
        m = a * y + (1 - a) * m
        out.append(m)
    return out


def _series(records: List[Dict[str, float]], key: str) -> Tuple[List[int], List[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _keys(runs: Sequence[Run], pred) -> List[str]:
    seen: List[str] = []
    for _, records in runs:
        for r in records:
            for k in r:
                if pred(k) and k not in seen:
                    seen.append(k)
    return seen


_LOSSES = lambda k: k == "loss" or (k.endswith("_loss") and "/" not in k)  # noqa: E731
_EVAL = ("eval/mean_recall", "eval/i2t_r1", "eval/t2i_r1")
_ITM = ("itm_acc", "itm_pos_prob", "itm_neg_prob")
_EVAL_JSON = [  # (label, value of a `vlp eval retrieval` result)
    ("ITC mean recall (eval)", lambda r: r["metrics"].get("mean_recall")),
    ("ITM re-ranked mean recall", lambda r: (r.get("reranked") or {}).get("mean_recall")),
    ("ITM + ITC re-ranked", lambda r: (r.get("reranked_itc") or {}).get("mean_recall")),
    ("held-out ITM accuracy", lambda r: (r.get("itm") or {}).get("balanced_acc")),
]
_NICE = {"loss": "total loss", "eval/mean_recall": "mean recall", "eval/i2t_r1": "image→text R@1",
         "eval/t2i_r1": "text→image R@1", "itm_acc": "ITM accuracy", "itm_pos_prob": "P(match) positives",
         "itm_neg_prob": "P(match) negatives", "samples_per_s": "samples/s", "mfu": "MFU", "lr": "learning rate",
         "temperature": "temperature", "logit_scale": "logit scale"}


def draw_curves(runs: Sequence[Run], out_png: str, title: Optional[str] = None,
                evals: Optional[Sequence[List[Tuple[int, Dict]]]] = None):
    """Draw the six panels for one run or several overlaid (solid, dashed, dotted) into `out_png`
    (written to a temporary file, then renamed). Returns the matplotlib figure (closed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4), dpi=100)
    (ax_loss, ax_lr, ax_speed), (ax_eval, ax_head, ax_skip) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    multi = len(runs) > 1

    def plot(ax, key, i, color, scale=1.0, label=None, smooth=True):
        label = label or _NICE.get(key, key)
        xs, ys = _series(runs[i][1], key)
        if not xs:
            return False
        ys = [y * scale for y in ys]
        fit = _smooth(ys) if smooth else ys
        if fit is not ys:  # the raw values faint behind their moving average
            ax.plot(xs, ys, styles[i % len(styles)], color=color, lw=0.8, alpha=0.25)
        ax.plot(xs, fit, styles[i % len(styles)], color=color, lw=1.8,
                marker="o" if len(xs) <= 12 else None, ms=3,
                label=f"{label} ({runs[i][0]})" if multi else label)
        return True

    def empty(ax, text):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=11)

    for i in range(len(runs)):
        for j, k in enumerate(_keys(runs, _LOSSES)):
            plot(ax_loss, k, i, colors[j % len(colors)])
        plot(ax_lr, "lr", i, colors[0], smooth=False)
        plot(ax_speed, "samples_per_s", i, colors[0])
    ax_loss.set_title("loss (total and per objective)")
    if any(line.get_ydata().min() > 0 for line in ax_loss.get_lines()):
        ax_loss.set_yscale("log")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_speed.set_title("throughput")
    ax_speed.set_ylabel("samples/s")
    ax_speed.set_ylim(bottom=0)
    # MFU is samples/s times a constant per run (FLOPs per sample / peak): a second scale, not a second line
    ratios = {round(r["mfu"] / r["samples_per_s"], 12) for _, recs in runs for r in recs[-1:]
              if r.get("mfu") and r.get("samples_per_s")}
    if len(ratios) == 1:
        per = 100.0 * ratios.pop()
        ax_speed.secondary_yaxis("right", functions=(lambda x, c=per: x * c, lambda y, c=per: y / c)).set_ylabel("MFU (%)")

    ax_eval.set_title("held-out retrieval" + (" and ITM" if any(
        (res.get("itm") or {}) for run_evals in (evals or []) for _, res in run_evals) else ""))
    got_eval = [plot(ax_eval, k, i, colors[j], scale=100.0, smooth=False)
                for i in range(len(runs)) for j, k in enumerate(_EVAL)]
    for i, run_evals in enumerate(evals or []):  # checkpoints evaluated with `vlp eval retrieval`, saved in the run
        for j, (label, get) in enumerate(_EVAL_JSON):
            pts = [(step, get(res)) for step, res in run_evals if get(res) is not None]
            if pts:
                got_eval.append(True)
                ax_eval.plot([p[0] for p in pts], [100 * p[1] for p in pts], styles[i % len(styles)],
                             color=colors[(j + 3) % len(colors)], marker="s", ms=5, lw=1.6,
                             label=f"{label} ({runs[i][0]})" if multi else label)
    if any(got_eval):
        ax_eval.set_ylabel("%")
    else:
        empty(ax_eval, "no in-training eval logged\n(set eval.every and data.eval_shards)")

    head_keys = [k for k in _ITM if _keys(runs, lambda x, k=k: x == k)]
    if head_keys:
        ax_head.set_title("ITM head (training pairs)")
        for i in range(len(runs)):
            for j, k in enumerate(head_keys):
                plot(ax_head, k, i, colors[j])
        ax_head.axhline(2 / 3, color="0.5", lw=1, ls=":", label="accuracy of always \"no match\" (1:2)")
        ax_head.set_ylim(0, 1)
    else:
        temp = next((k for k in ("temperature", "logit_scale") if _keys(runs, lambda x, k=k: x == k)), None)
        ax_head.set_title(_NICE.get(temp, "temperature") if temp else "temperature")
        if temp:
            for i in range(len(runs)):
                plot(ax_head, temp, i, colors[0])
        else:
            empty(ax_head, "no temperature logged")

    ax_skip.set_title("skipped samples (cumulative, per reason)")
    skip_keys = [k for k in _keys(runs, lambda x: x.startswith("data/skipped/"))
                 if any(_series(r, k)[1] and max(_series(r, k)[1]) > 0 for _, r in runs)]
    for i in range(len(runs)):
        for j, k in enumerate(skip_keys):
            plot(ax_skip, k, i, colors[j % len(colors)], label=k.split("/")[-1])
    if not skip_keys:
        empty(ax_skip, "no sample skipped")

    last_step = max((r["step"] for _, recs in runs for r in recs), default=1)
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.get_lines():
            ax.set_xlim(0, last_step * 1.02)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles, labels, fontsize=8, loc="best")
    names = " vs ".join(f"{name} ({styles[i % len(styles)]})" if multi else name for i, (name, _) in enumerate(runs))
    last = {name: (records[-1]["step"] if records else 0) for name, records in runs}
    fig.suptitle(title or f"training curves: {names}; last step " +
                 ", ".join(str(v) for v in last.values()), fontsize=13)
    fig.tight_layout()
    tmp = f"{out_png}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, out_png)
    plt.close(fig)
    return fig


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


__all__ = ["read_metrics", "draw_curves", "write_run_curves", "register"]
