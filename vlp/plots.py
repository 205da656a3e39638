"""Pictures drawn from plain results, shared by training (`curves.png`, `vlp report`), evaluation (the
retrieval report's recall bars) and export (the model card's figures): training curves from
`metrics.jsonl` records and checkpoint evals, recall@K bars from a retrieval result.

`draw_curves` draws six panels: the total and per-objective losses (log scale), the learning rate,
throughput (samples/s, MFU as a second scale), held-out retrieval (in-training `eval.every`, and the
`vlp eval retrieval` results saved in the run directory, one point per evaluated checkpoint: ITC, ITM
re-ranked, ITM + ITC, held-out ITM accuracy), the fusion models' ITM head (accuracy and mean match
probability of positives and negatives) or the contrastive temperature, and skipped samples per
reason. Panels with nothing to show say so instead of staying blank. Several runs overlay (solid,
dashed, dotted).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    """(checkpoint step, result) of the `vlp eval retrieval` JSON files saved in `run_dir` or under
    `run_dir/eval/` (e.g. `--out RUN/eval/step_1000.json`), by step; other JSON files are ignored."""
    import glob

    out = []
    paths = sorted(glob.glob(os.path.join(run_dir, "*.json")) +
                   glob.glob(os.path.join(run_dir, "eval", "**", "*.json"), recursive=True))
    for path in paths:
        try:
            with open(path) as f:
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
        ax_eval.set_ylim(0, 100)
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
    return save_figure(fig, out_png)


def save_figure(fig, path: str, dpi: Optional[int] = None):
    """Save a matplotlib figure as PNG to a temporary name, then rename it (a reader never sees half a
    file), and close it. Returns the figure."""
    import matplotlib.pyplot as plt

    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, format="png", dpi=dpi or fig.dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return fig


def recall_bars(ax, result: Dict[str, Any]) -> None:
    """Recall@K bars of a retrieval result: ITC, and ITM / ITM + ITC re-ranked when present."""
    import numpy as np

    ks = sorted({int(k.split("_r")[1]) for k in result["metrics"] if k.startswith("i2t_r")})
    series = [("ITC", result["metrics"])] + ([("ITM re-ranked", result["reranked"])] if "reranked" in result else []) \
        + ([("ITM + ITC re-ranked", result["reranked_itc"])] if "reranked_itc" in result else [])
    labels = [f"{d} R@{k}" for d in ("i2t", "t2i") for k in ks]
    width = 0.8 / len(series)
    x = np.arange(len(labels))
    for i, (name, m) in enumerate(series):
        vals = [100 * m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("recall (%)")
    ax.legend(fontsize=8, loc="upper left")


def draw_recall(result: Dict[str, Any], out_png: str, title: str = ""):
    """Recall@K bars of one retrieval result as a picture of its own (the model card's figure); written to a
    temporary file, then renamed. Returns the (closed) figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    recall_bars(ax, result)
    ax.set_title(title or "zero-shot retrieval", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_png)


__all__ = ["read_metrics", "read_evals", "draw_curves", "recall_bars", "draw_recall", "save_figure"]
