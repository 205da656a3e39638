"""Eval outputs: results JSON (written atomically) and a PNG report (matplotlib).

The PNG shows recall@K bars (image->text, text->image, and ITM re-ranked when present) and, for a few
text queries, their top-5 retrieved images with the correct one framed in green. Its title states
how many images and texts were evaluated and how many samples were skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Dict, List, Optional

from vlp.eval.data import IMAGE_KEYS, decode_image, iter_records


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def git_commit() -> Optional[str]:
    """HEAD of the vlp source tree (with `-dirty` for local changes), None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fetch_images(data: str, stream_indices, images_dir: Optional[str] = None, split: str = "test",
                 image_key: str = IMAGE_KEYS) -> Dict[int, Any]:
    """PIL images of the samples at these global stream indices (one more pass over the set's records)."""
    wanted, out = set(stream_indices), {}
    keys = [k.strip().lower() for k in image_key.split(";") if k.strip()]
    for idx, rec in enumerate(iter_records(data, images_dir, split)):
        if idx in wanted:
            out[idx], _ = decode_image(rec, keys)
            if len(out) == len(wanted):
                break
    return out


def _recall_bars(ax, result: Dict[str, Any]) -> None:
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


def write_report_png(result: Dict[str, Any], path: str, data: str, images_dir: Optional[str] = None,
                     split: str = "test", image_key: str = IMAGE_KEYS) -> None:
    """Recall bars plus text->image examples; written to a temp name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples: List[Dict[str, Any]] = result.get("examples", [])
    idx = {i for ex in examples for i in ex["top_stream_index"]}
    images = fetch_images(data, idx, images_dir, split, image_key) if idx else {}
    cols = 5
    fig = plt.figure(figsize=(2.2 * cols, 3.2 + 2.4 * len(examples)))
    grid = fig.add_gridspec(1 + len(examples), cols, height_ratios=[1.6] + [1.0] * len(examples))
    _recall_bars(fig.add_subplot(grid[0, :]), result)
    for r, ex in enumerate(examples):
        for c, (si, key, ok) in enumerate(zip(ex["top_stream_index"], ex["top_keys"], ex["top_correct"])):
            ax = fig.add_subplot(grid[r + 1, c])
            if images.get(si) is not None:
                ax.imshow(images[si])
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("limegreen" if ok else "lightgray")
                side.set_linewidth(5 if ok else 1)
            ax.set_xlabel(("✓ " if ok else "") + str(key)[-24:], fontsize=7)
            if c == 0:
                text = ex["text"] if len(ex["text"]) <= 90 else ex["text"][:87] + "..."
                ax.set_title(f"“{text}” (correct image at rank {ex['rank']})", fontsize=9, loc="left")
    fig.suptitle(f"{os.path.basename(str(data).rstrip('/'))}: {result['n_images']} images, {result['n_texts']} texts "
                 f"evaluated; {result['n_skipped']} samples skipped", fontsize=11)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
