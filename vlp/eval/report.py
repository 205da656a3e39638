"""Eval outputs: results JSON (written atomically) and a PNG report (matplotlib).

The PNG shows recall@K bars (image->text, text->image, and ITM re-ranked when present) and, for a few
text queries, their top-5 retrieved images with the correct one framed in green. Its title states
how many images and texts were evaluated and how many samples were skipped.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from typing import Any, Dict, Optional

from vlp.data.video import VIDEO_EXTS, clip_grid, read_clip_for_eval
from vlp.eval.data import IMAGE_KEYS, decode_image, iter_records
from vlp.plots import recall_bars, save_figure


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
            video = next((rec[k] for k in VIDEO_EXTS if k in rec), None)
            if video is not None:  # a clip: 4 segment middles in a 2 x 2 grid, left to right, top to bottom
                try:
                    out[idx] = clip_grid(read_clip_for_eval(video, 4))
                except Exception:  # unreadable: the cell says "(image not found)"
                    out[idx] = None
            else:
                out[idx], _ = decode_image(rec, keys)
            if len(out) == len(wanted):
                break
    return out


THUMB_PX = 160  # every thumbnail's longer side in the saved PNG (issue: >= 128 px whatever the source size)
DPI = 100
CELL_IN = 1.95  # inches per grid column; a thumbnail fills THUMB_PX of it
GREEN, ORANGE, GREY = "#1a9641", "#e66101", "#bbbbbb"


def _thumb(img, px: int = THUMB_PX):
    """The image scaled so its longer side is `px`: small sources are upscaled without smoothing (each
    source pixel a crisp block), large ones downscaled with antialiasing."""
    from PIL import Image

    w, h = img.size
    scale = px / max(w, h)
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    return img.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _wrap(text: str, width: int = 28, lines: int = 4) -> str:
    import textwrap

    out = textwrap.wrap(text, width)
    return "\n".join(out[:lines - 1] + [_short(" ".join(out[lines - 1:]), width)] if len(out) > lines else out)


def _ranks_text(ex: Dict[str, Any]) -> str:
    ranks = ex.get("ranks") or {"ITC": ex["rank"]}
    return " · ".join(f"{k} rank {v}" for k, v in ranks.items())


def _image_cell(ax, img, label: str, frame: str, width: float, px: int = THUMB_PX) -> None:
    """One thumbnail, drawn at exactly `px` pixels on its longer side in the saved figure."""
    ax.set_xticks([])
    ax.set_yticks([])
    if img is not None:
        t = _thumb(img, px)
        ax.imshow(t, interpolation="nearest")
        ax.set_xlim(-0.5, t.size[0] - 0.5)
        ax.set_ylim(t.size[1] - 0.5, -0.5)
    else:
        ax.text(0.5, 0.5, "(image not found)", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    for side in ax.spines.values():
        side.set_edgecolor(frame)
        side.set_linewidth(width)
    ax.set_xlabel(label, fontsize=8)


def _text_cell(ax, text: str, **kw) -> None:
    ax.axis("off")
    ax.text(0.0, 0.5, text, ha="left", va="center", transform=ax.transAxes, **{"fontsize": 9, **kw})


def _place(fig, row_top_in: float, col: int, height_in: float, width_in: float = CELL_IN,
           pad_in: float = 0.0):
    """An axes at absolute inches: column `col`, its top `row_top_in` below the figure's top."""
    W, H = fig.get_size_inches()
    left = 0.25 + col * CELL_IN + pad_in
    return fig.add_axes([left / W, 1 - (row_top_in + height_in) / H, width_in / W, height_in / H])


def write_report_png(result: Dict[str, Any], path: str, data: str, images_dir: Optional[str] = None,
                     split: str = "test", image_key: str = IMAGE_KEYS):
    """Recall bars, then text->image rows (query, its top 5, the true image framed green, or shown at
    the right framed orange when it is not in the top 5), image->text rows (the image, its top-5
    captions, the true one marked) and the hardest failures, every thumbnail THUMB_PX pixels on its
    longer side. Ranks under each method the model has (ITC, ITM re-ranked, ITM + ITC) stand side by
    side in each row. Written to a temp name, then renamed; returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [("Text → image: the query, its top 5 by ITC (true image framed green; shown at the right, "
                 "framed orange, when not in the top 5)", "t2i", result.get("examples", [])),
                ("Image → text: the image, its top 5 captions by ITC (✓ = a true caption)", "i2t",
                 result.get("examples_i2t", [])),
                ("Hardest failures: the text queries whose true image ranked worst", "t2i", result.get("hardest_t2i", [])),
                ("Hardest failures: the images whose true caption ranked worst", "i2t", result.get("hardest_i2t", []))]
    if result.get("unit") == "clips":  # a video set: each cell shows 4 frames, read left to right, top to bottom
        words = (("Text → image", "Text → clip"), ("Image → text: the image", "Clip → text: the clip (4 frames, "
                 "left to right, top to bottom)"), ("true image", "true clip"), ("the images", "the clips"))
        for a, b in words:
            sections = [(t.replace(a, b), k, r) for t, k, r in sections]
    sections = [s for s in sections if s[2]]
    idx = set()
    for _, kind, rows in sections:
        for ex in rows:
            idx.add(ex["image_stream_index"])
            if kind == "t2i":
                idx.update(ex["top_stream_index"])
    images = fetch_images(data, idx, images_dir, split, image_key) if idx else {}

    thumb_in = THUMB_PX / DPI
    row_in, header_in, bars_in, top_in = thumb_in + 0.55, 0.45, 3.2, 0.7
    n_rows = sum(len(rows) for _, _, rows in sections)
    height = top_in + bars_in + len(sections) * header_in + n_rows * row_in + 0.2
    fig = plt.figure(figsize=(0.5 + 7 * CELL_IN, height), dpi=DPI)
    bars = fig.add_axes([0.6 / fig.get_size_inches()[0], 1 - (top_in + bars_in - 0.45) / height,
                         1 - 1.0 / fig.get_size_inches()[0], (bars_in - 0.9) / height])
    recall_bars(bars, result)
    y = top_in + bars_in
    thumbs = []
    for title, kind, rows in sections:
        fig.text(0.25 / fig.get_size_inches()[0], 1 - (y + 0.3) / height, title, fontsize=11, weight="bold")
        y += header_in
        for ex in rows:
            pad = (CELL_IN - thumb_in) / 2
            if kind == "t2i":
                _text_cell(_place(fig, y, 0, thumb_in), f"“{_wrap(ex['text'])}”\n\n{_ranks_text(ex)}".replace(" · ", "\n"))
                for c, (si, key, ok) in enumerate(zip(ex["top_stream_index"], ex["top_keys"], ex["top_correct"])):
                    ax = _place(fig, y, c + 1, thumb_in, thumb_in, pad)
                    _image_cell(ax, images.get(si), ("✓ " if ok else f"{c + 1}. ") + str(key)[-24:],
                                GREEN if ok else GREY, 5 if ok else 1)
                    thumbs.append(ax)
                if not any(ex["top_correct"]):
                    ax = _place(fig, y, 6, thumb_in, thumb_in, pad)
                    _image_cell(ax, images.get(ex["image_stream_index"]), f"true {'clip' if result.get('unit') == 'clips' else 'image'}: rank {ex['rank']}", ORANGE, 5)
                    thumbs.append(ax)
            else:
                ax = _place(fig, y, 0, thumb_in, thumb_in, pad)
                _image_cell(ax, images.get(ex["image_stream_index"]), str(ex["image_key"])[-24:], GREY, 1)
                thumbs.append(ax)
                lines = [("✓ " if ok else f"{c + 1}. ") + _short(t, 75) for c, (t, ok) in
                         enumerate(zip(ex["top_texts"], ex["top_correct"]))]
                if not any(ex["top_correct"]) and ex.get("true_texts"):
                    lines.append(f"true (rank {ex['rank']}): " + _short(ex["true_texts"][0], 62))
                text_ax = _place(fig, y, 1, thumb_in, 4 * CELL_IN)
                text_ax.axis("off")
                for k, line in enumerate(lines):
                    ok = line.startswith("✓")
                    colour = GREEN if ok else (ORANGE if line.startswith("true") else "black")
                    text_ax.text(0.0, 1 - (k + 0.5) / 6, line, transform=text_ax.transAxes, fontsize=9, va="center",
                                 color=colour, weight="bold" if ok else "normal")
                _text_cell(_place(fig, y, 5, thumb_in, 2 * CELL_IN, 0.3), _ranks_text(ex).replace(" · ", "\n"))
            y += row_in
    fig.suptitle(f"{os.path.basename(str(data).rstrip('/'))}: {result['n_images']} {result.get('unit', 'images')}, {result['n_texts']} texts "
                 f"evaluated; {result['n_skipped']} samples skipped", fontsize=13, y=1 - 0.25 / height)
    save_figure(fig, path, dpi=DPI)
    fig.thumbnail_axes = thumbs
    return fig


def write_zeroshot_png(result: Dict[str, Any], path: str, data: str):
    """Per-class top-1 accuracy (sorted, worst at the top) beside the row-normalised confusion matrix
    (counts in the cells up to 15 classes), with the most confused pairs named underneath. Class names label the matrix up to 40 classes.
    Written to a temp name, then renamed; returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = result["metrics"]
    names = list(m["per_class_accuracy"])
    n = len(names)
    acc = [m["per_class_accuracy"][c] for c in names]
    mat = np.asarray(result["confusion"], dtype=float)
    norm = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    pairs = result.get("most_confused", [])[:8]
    side = min(max(5.0, 0.28 * n + 2.5), 14.0)
    fig = plt.figure(figsize=(6.0 + side, side + 0.4 + 0.25 * len(pairs)), dpi=DPI)
    grid = fig.add_gridspec(2, 2, width_ratios=[5.0, side], height_ratios=[side, 0.4 + 0.25 * len(pairs)])
    ax = fig.add_subplot(grid[0, 0])
    order = sorted(range(n), key=lambda i: (acc[i] is None, -(acc[i] or 0.0)))
    shown = order[-30:] if n > 30 else order  # the 30 worst when there are many classes
    ys = np.arange(len(shown))
    vals = [100 * (acc[i] or 0.0) for i in shown]
    bars = ax.barh(ys, vals, color=["#1a9641" if v >= 100 * m["top1"] else "#e66101" for v in vals])
    ax.bar_label(bars, fmt="%.0f%%", fontsize=8, padding=2)
    ax.set_yticks(ys, [f"{_short(names[i], 22)} ({m['per_class_count'][names[i]]})" for i in shown], fontsize=8)
    ax.axvline(100 * m["top1"], color="0.3", ls="--", lw=1, label=f"overall top-1 {100 * m['top1']:.1f}%")
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title("per-class accuracy" + (" (30 worst)" if n > 30 else "") + "; (n) = samples", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    cm = fig.add_subplot(grid[0, 1])
    im = cm.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    cm.set_title("confusion matrix (rows: true class, share of its samples)", fontsize=10)
    cm.set_xlabel("predicted class")
    cm.set_ylabel("true class")
    if n <= 15:  # counts in the cells
        for t in range(n):
            for p in range(n):
                if mat[t, p]:
                    cm.text(p, t, f"{int(mat[t, p])}", ha="center", va="center", fontsize=8,
                            color="white" if norm[t, p] > 0.5 else "black")
    if n <= 40:
        cm.set_xticks(range(n), [_short(c, 14) for c in names], rotation=90, fontsize=7)
        cm.set_yticks(range(n), [_short(c, 14) for c in names], fontsize=7)
    fig.colorbar(im, ax=cm, fraction=0.046, pad=0.02)
    txt = fig.add_subplot(grid[1, :])
    txt.axis("off")
    lines = ["most confused (true → predicted: share of the true class's samples):"] + [
        f"  {p['true']} → {p['predicted']}: {100 * p['share']:.0f}% ({p['count']})" for p in pairs]
    txt.text(0.0, 1.0, "\n".join(lines if pairs else ["no confusions: every sample classified correctly"]),
             va="top", ha="left", fontsize=9, transform=txt.transAxes, family="monospace")
    fig.suptitle(f"{os.path.basename(str(data).rstrip('/'))}: zero-shot top-1 {100 * m['top1']:.1f}%, "
                 f"{result['n_samples']} images, {n} classes, {result['n_skipped']} skipped", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI)
