"""`vlp data inspect`: what is in a set of shards — counts, keys, caption lengths, a contact sheet."""
from __future__ import annotations

import io
import os
import sys
import textwrap
from collections import Counter
from typing import Dict, List, Optional

from data_pipelines.shardspec import expand_shards, iter_samples
from vlp.data.video import VIDEO_EXTS, clip_grid, read_clip_for_eval

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # and videos (VIDEO_EXTS): shown as 4 frames


def _summary(values: List[int]) -> Dict:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}


def inspect_shards(spec: str, n: int = 16, out_png: Optional[str] = None, caption_key: str = "txt",
                   progress: bool = False) -> Dict:
    """Scan every sample of SHARDS (undecoded, so it is fast); draw the first `n` into `out_png`."""
    paths = expand_shards(spec)
    per_shard: Counter = Counter()
    exts: Counter = Counter()
    keys: Counter = Counter()
    words: List[int] = []
    lines_per_sample: List[int] = []
    first: List[Dict] = []
    no_image = no_caption = 0
    from tqdm import tqdm

    skipped: Counter = Counter()
    for s in tqdm(iter_samples(paths, skipped), desc="inspect", unit="sample", disable=not progress, file=sys.stderr):
        per_shard[s["__url__"]] += 1
        keys[s["__key__"]] += 1
        exts.update(k for k in s if not k.startswith("__"))
        img = next((e for e in IMAGE_EXTS + VIDEO_EXTS if e in s), None)
        no_image += img is None
        if caption_key in s:
            caps = [c for c in s[caption_key].decode("utf-8", errors="replace").splitlines() if c.strip()]
            lines_per_sample.append(len(caps))
            words.extend(len(c.split()) for c in caps)
        else:
            no_caption += 1
            caps = []
        if len(first) < n:
            first.append({"key": s["__key__"], "image": s.get(img) if img else None, "caption": "\n".join(caps),
                          "video": img in VIDEO_EXTS})
    report = {
        "shards": [{"name": os.path.basename(p), "samples": per_shard.get(p, 0)} for p in paths],
        "samples": sum(per_shard.values()),
        "extensions": dict(sorted(exts.items())),
        "keys_sample": [f["key"] for f in first[:8]],
        "duplicate_keys": sum(c - 1 for c in keys.values() if c > 1),
        "without_image": no_image,
        "without_caption": no_caption,
        "skipped": dict(skipped),  # shards cut short or unreadable (the samples before the fault count)
        "caption_words": _summary(words),
        "captions_per_sample": _summary(lines_per_sample),
    }
    if out_png:
        contact_sheet(first, out_png)
        report["contact_sheet"] = out_png
    return report


def contact_sheet(samples: List[Dict], out_png: str, cols: int = 4) -> None:
    """A grid of images titled with (the first line of) their captions, written to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = max(1, -(-len(samples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3, rows * 3.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        if s["image"] is not None:
            try:  # a video: its 4 segment middles in a 2 x 2 grid
                data = s["image"]
                ax.imshow(clip_grid(read_clip_for_eval(data, 4)) if s.get("video")
                          else Image.open(io.BytesIO(data)).convert("RGB"))
            except Exception as e:  # show the failure on the sheet rather than stopping
                ax.text(0.5, 0.5, f"unreadable:\n{type(e).__name__}", ha="center", va="center")
        cap = s["caption"].splitlines()[0] if s["caption"] else "(no caption)"
        ax.set_title(f"{s['key']}\n" + "\n".join(textwrap.wrap(cap, 34)[:3]), fontsize=8)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out_png)


def format_report(report: Dict) -> str:
    cw, cps = report["caption_words"], report["captions_per_sample"]
    lines = [
        f"shards: {len(report['shards'])}   samples: {report['samples']}",
        "per shard: " + ", ".join(f"{s['name']}={s['samples']}" for s in report["shards"][:8])
        + (" ..." if len(report["shards"]) > 8 else ""),
        "extensions: " + ", ".join(f"{k}={v}" for k, v in report["extensions"].items()),
        "keys: " + ", ".join(report["keys_sample"]),
        f"caption words: min {cw['min']}  mean {cw['mean']}  max {cw['max']}",
        f"captions per sample: min {cps['min']}  mean {cps['mean']}  max {cps['max']}",
        f"duplicate keys: {report['duplicate_keys']}   without image: {report['without_image']}   "
        f"without caption: {report['without_caption']}",
    ]
    if report.get("skipped"):
        lines.append("shards cut short or unreadable (read up to the fault): "
                     + ", ".join(f"{k}={v}" for k, v in report["skipped"].items()))
    if report.get("contact_sheet"):
        lines.append(f"contact sheet: {report['contact_sheet']}")
    return "\n".join(lines)
