"""A synthetic compositional image-caption set: coloured shapes with sizes and positions.

Each image holds one object ("a large red circle on the left") or two objects in a spatial
relation ("a red circle left of a green triangle"), drawn anti-aliased on a plain or lightly
textured grey background. The attributes are chosen to stay visually clear at 64 px so that a tiny
CLIP learns them on a CPU in minutes, which makes the set a real end-to-end check of training and
retrieval. Every sample is a function of (seed, split, index), so a run is reproducible; the
`test` split never repeats a description, so retrieval has one right answer per query.
"""
from __future__ import annotations

import io
import json
import os
import sys
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.shards import ShardWriter, prepare_out_dir, write_json_atomic

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 25), "yellow": (240, 220, 40),
    "green": (35, 165, 55), "blue": (35, 70, 215), "purple": (135, 45, 185),
    "pink": (245, 125, 195), "brown": (125, 75, 35), "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES = {"small": 0.10, "large": 0.18}  # radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
             "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
WHERE = {"left": ("on the left",), "right": ("on the right",), "top": ("at the top",),
         "bottom": ("at the bottom",), "center": ("in the center", "in the middle")}
PAIR_RADIUS = 0.14  # both objects of a two-object scene share one size, not named in the caption
TWO_OBJECT_FRACTION = 0.4
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: clean edges at 64 px


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _single_caption(rng: np.random.Generator, color: str, shape: str, size: str, pos: str) -> str:
    where = WHERE[pos][rng.integers(len(WHERE[pos]))]
    thing = f"{size} {color} {shape}"
    templates = (f"{_a(thing)} {where}", f"there is {_a(thing)} {where}",
                 f"a photo of {_a(thing)} {where}", f"{where}, {_a(thing)}",
                 f"the {thing} is {where}")
    return templates[rng.integers(len(templates))]


def _pair_caption(rng: np.random.Generator, first: str, second: str, axis: str) -> str:
    """`first` is left of (axis 'h') or above (axis 'v') `second`; the phrasing picks a subject."""
    f, s = _a(first), _a(second)
    if axis == "h":
        templates = (f"{f} left of {s}", f"{f} to the left of {s}", f"{s} right of {f}",
                     f"{s} to the right of {f}", f"there is {f} on the left and {s} on the right")
    else:
        templates = (f"{f} above {s}", f"{s} below {f}", f"{s} under {f}",
                     f"there is {f} at the top and {s} at the bottom", f"{f} over {s}")
    return templates[rng.integers(len(templates))]


def _draw_mask(shape: str, cx: float, cy: float, r: float, angle: float, side: int) -> np.ndarray:
    """Anti-aliased coverage mask (float32 in [0, 1], side x side) of one shape."""
    k = SUPERSAMPLE
    big = Image.new("L", (side * k, side * k), 0)
    d = ImageDraw.Draw(big)
    cx, cy, r = cx * k, cy * k, r * k

    def poly(radii: List[float], start: float) -> List[Tuple[float, float]]:
        n = len(radii)
        return [(cx + rr * np.cos(start + 2 * np.pi * i / n), cy + rr * np.sin(start + 2 * np.pi * i / n))
                for i, rr in enumerate(radii)]

    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "square":
        d.polygon(poly([r * 1.15] * 4, np.pi / 4 + angle), fill=255)
    elif shape == "triangle":
        d.polygon(poly([r * 1.2] * 3, -np.pi / 2 + angle), fill=255)
    elif shape == "star":
        d.polygon(poly([r * 1.2, r * 0.5] * 5, -np.pi / 2 + angle), fill=255)
    elif shape == "cross":
        w = r * 0.32
        d.polygon([
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)], fill=255)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)
    small = big.resize((side, side), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Grey background, plain or lightly textured (noise, stripes or a gradient)."""
    base = rng.uniform(105, 150) + rng.uniform(-8, 8, size=3)
    img = np.broadcast_to(base, (side, side, 3)).astype(np.float32)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == 1:
        img = img + rng.normal(0, 6, size=(side, side, 1))
    elif kind == 2:
        theta, freq = rng.uniform(0, np.pi), rng.uniform(4, 10)
        img = img + 7 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))[..., None]
    elif kind == 3:
        theta = rng.uniform(0, 2 * np.pi)
        img = img + 20 * ((xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta))[..., None]
    return img


def _render(rng: np.random.Generator, objects: List[Dict], side: int) -> bytes:
    img = _background(rng, side)
    for obj in objects:
        angle = rng.uniform(-0.2, 0.2) if obj["shape"] in ("square", "triangle", "star", "cross") else 0.0
        mask = _draw_mask(obj["shape"], obj["cx"] * side, obj["cy"] * side, obj["r"] * side, angle, side)
        color = np.asarray(COLORS[obj["color"]], dtype=np.float32)
        img = img * (1 - mask[..., None]) + color * mask[..., None]
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _sample(rng: np.random.Generator) -> Tuple[tuple, List[Dict], str]:
    """Draw one scene: (semantic key, objects with geometry, caption)."""
    colors, jitter = list(COLORS), 0.03
    if rng.random() >= TWO_OBJECT_FRACTION:
        color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
        size = ("small", "large")[rng.integers(2)]
        pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
        cx, cy = POSITIONS[pos]
        obj = {"color": color, "shape": shape, "size": size, "position": pos,
               "cx": cx + rng.uniform(-jitter, jitter), "cy": cy + rng.uniform(-jitter, jitter),
               "r": SIZES[size] * rng.uniform(0.92, 1.08)}
        return ("one", color, shape, size, pos), [obj], _single_caption(rng, color, shape, size, pos)
    while True:
        a = (colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))])
        b = (colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))])
        if a != b:
            break
    axis = ("h", "v")[rng.integers(2)]
    off = rng.uniform(-0.08, 0.08)
    places = [((0.28, 0.5 + off), (0.72, 0.5 + off)), ((0.5 + off, 0.28), (0.5 + off, 0.72))][axis == "v"]
    pos_names = ("left", "right") if axis == "h" else ("top", "bottom")
    objs = [{"color": c, "shape": s, "size": "medium", "position": p,
             "cx": x + rng.uniform(-jitter, jitter), "cy": y + rng.uniform(-jitter, jitter),
             "r": PAIR_RADIUS * rng.uniform(0.92, 1.08)}
            for (c, s), (x, y), p in zip((a, b), places, pos_names)]
    caption = _pair_caption(rng, f"{a[0]} {a[1]}", f"{b[0]} {b[1]}", axis)
    return ("two", axis, a, b), objs, caption


def _rng(seed: int, split: str, index: int, attempt: int) -> np.random.Generator:
    # crc32 of the split name keeps train/test streams apart and stable across Python runs
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, attempt])


def num_descriptions() -> int:
    """How many distinct descriptions exist: the most samples a unique-caption split can hold."""
    items = len(COLORS) * len(SHAPES)
    return items * len(SIZES) * len(POSITIONS) + 2 * items * (items - 1)


def write_synth(out: str, n: int, seed: int = 0, split: str = "train", samples_per_shard: int = 256,
                image_size: int = 64, prefix: Optional[str] = None, overwrite: bool = False,
                unique: Optional[bool] = None, progress: bool = False) -> dict:
    """Write `n` synthetic samples as `{prefix}-NNNNNN.tar` shards in OUT; returns (and writes) stats.

    Samples hold `jpg`, `txt` (caption) and `json` (objects, positions, caption). `unique`
    (default: True for split "test") redraws a sample until its description is new in the split.
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 px, got {image_size}")
    unique = (split == "test") if unique is None else unique
    if unique and n > num_descriptions() // 2:
        raise ValueError(f"a unique-caption split holds at most {num_descriptions() // 2} samples "
                         f"(of {num_descriptions()} descriptions), asked for {n}")
    prefix = prefix or f"synth-{split}"
    prepare_out_dir(out, overwrite)
    seen = set()
    counts = {"one_object": 0, "two_objects": 0}
    from tqdm import tqdm

    with ShardWriter(out, prefix, samples_per_shard) as writer:
        for i in tqdm(range(n), desc=f"synth {split}", unit="sample", disable=not progress, file=sys.stderr):
            attempt = 0
            while True:
                rng = _rng(seed, split, i, attempt)
                sem, objs, caption = _sample(rng)
                if not unique or sem not in seen:
                    break
                attempt += 1
            seen.add(sem)
            counts["one_object" if len(objs) == 1 else "two_objects"] += 1
            meta = {"caption": caption, "split": split, "seed": seed, "index": i,
                    "objects": [{k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in o.items()}
                                for o in objs]}
            writer.write(f"{prefix}-s{seed}-{i:07d}", {
                "jpg": _render(rng, objs, image_size),
                "txt": caption.encode(),
                "json": json.dumps(meta).encode(),
            })
        shards = writer.close()
    stats = {
        "format": "synth", "split": split, "seed": seed, "image_size": image_size,
        "written": n, "skipped": {}, "unique_descriptions": len(seen), **counts,
        "shards": shards, "total_bytes": sum(s["bytes"] for s in shards),
        "attributes": {"colors": list(COLORS), "shapes": list(SHAPES), "sizes": list(SIZES),
                       "positions": list(POSITIONS)},
    }
    write_json_atomic(os.path.join(out, "stats.json"), stats)
    return stats
