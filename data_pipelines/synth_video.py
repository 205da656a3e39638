"""A synthetic moving-shapes video set: what no single frame, nor an average of frames, can caption.

Each clip holds one or two coloured shapes (the image set's shapes, colours and sizes,
`data_pipelines.synth`), each one moving from left to right, from right to left, up, down, or staying
still, on a static background: "a small red circle moves from left to right, a large blue square stays
still". It checks that a video model uses the order of its frames (Frozen in Time's temporal
attention; Bain et al., "Frozen in Time", ICCV 2021).

Why a frame average must fail on direction: a moving object travels a straight path at constant speed
over the whole clip, and its reversed-direction twin travels the same path backwards, so the twin's
frame i is the clip's frame n-1-i. With an odd frame count, no sample time of K equal segments falls
on a frame boundary, so the K middle frames of a clip and of its twin are the same set of frames, in
reverse order; every frame is encoded on its own (all keyframes, constant quantiser), so the decoded
frames are equal too, bit for bit. The `test` split (and any split with `twins`) is written in twin
pairs on consecutive keys, each naming the other in its json `twin`; clips where nothing moves have no
twin and are not drawn there. Every clip is a function of (seed, split, index).
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_pipelines.shards import ShardWriter, prepare_out_dir, write_json_atomic
from data_pipelines.synth import COLORS, SHAPES, SIZES, _a, _background, _draw_mask
from data_pipelines.video_convert import encode_mp4

MOTIONS = ("moves from left to right", "moves from right to left", "moves up", "moves down", "stays still")
STILL = "stays still"
REVERSE = {MOTIONS[0]: MOTIONS[1], MOTIONS[1]: MOTIONS[0], MOTIONS[2]: MOTIONS[3], MOTIONS[3]: MOTIONS[2],
           STILL: STILL}
_STEP = {MOTIONS[0]: (1, 0), MOTIONS[1]: (-1, 0), MOTIONS[2]: (0, -1), MOTIONS[3]: (0, 1), STILL: (0, 0)}
STILL_FRACTION = 0.2  # per object
TWO_OBJECT_FRACTION = 0.5
TRAVEL = 0.45  # a moving object's path, as a fraction of the side
MARGIN = 0.03  # shapes stay this far (fraction of the side) inside the frame
EXTENT = 1.2  # the farthest a shape reaches from its centre, in radii (star and triangle tips)
QP = 22  # x264 constant quantiser: colours and edges stay clean at 64 px


def frame_count(seconds: float, fps: float) -> int:
    """Frames per clip: seconds x fps, made odd (one more) so that no segment middle is a frame boundary."""
    n = max(1, int(round(seconds * fps)))
    return n if n % 2 else n + 1


def _rng(seed: int, split: str, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, attempt, 7])


def _motion(rng: np.random.Generator) -> str:
    return STILL if rng.random() < STILL_FRACTION else MOTIONS[int(rng.integers(4))]


def _place(rng: np.random.Generator, motion: str, r: float) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """(start, end) centre of an object of radius r (fractions of the side): a path of TRAVEL along its
    axis (start == end when still), inside the frame."""
    lo, hi = EXTENT * r + MARGIN, 1 - EXTENT * r - MARGIN
    dx, dy = _STEP[motion]
    if motion == STILL:
        p = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        return p, p
    along0 = float(rng.uniform(lo, hi - TRAVEL))  # the path's low end along its axis
    across = float(rng.uniform(lo, hi))
    a, b = (along0, along0 + TRAVEL) if (dx + dy) > 0 else (along0 + TRAVEL, along0)
    return ((a, across), (b, across)) if dx else ((across, a), (across, b))


def _path(obj: Dict, n: int) -> np.ndarray:
    """(n, 2) centres: frame i shows the object at the middle of its display time, (i + 0.5) / n."""
    u = (np.arange(n) + 0.5) / n
    s, e = np.asarray(obj["start"]), np.asarray(obj["end"])
    return s[None] + (e - s)[None] * u[:, None]


def _apart(objs: List[Dict], n: int) -> bool:
    if len(objs) < 2:
        return True
    d = np.linalg.norm(_path(objs[0], n) - _path(objs[1], n), axis=1)
    return bool(d.min() >= EXTENT * (objs[0]["radius"] + objs[1]["radius"]) + MARGIN)


def _sample(rng: np.random.Generator, n: int, moving: bool) -> List[Dict]:
    """One scene: 1 or 2 objects of distinct (colour, shape), non-overlapping in every frame; with
    `moving`, at least one of them moves."""
    colors = list(COLORS)
    count = 2 if rng.random() < TWO_OBJECT_FRACTION else 1
    while True:
        items: List[Tuple[str, str]] = []  # a list, not a set: string hashes differ between runs
        while len(items) < count:
            item = (colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))])
            if item not in items:
                items.append(item)
        objs = []
        for color, shape in items:
            size = ("small", "large")[int(rng.integers(2))]
            objs.append({"color": color, "shape": shape, "size": size, "motion": _motion(rng),
                         "radius": SIZES[size] * float(rng.uniform(0.95, 1.05)),
                         "angle": float(rng.uniform(-0.2, 0.2)) if shape in ("square", "triangle", "star", "cross") else 0.0})
        if moving and all(o["motion"] == STILL for o in objs):
            continue
        for _ in range(50):
            for o in objs:
                o["start"], o["end"] = _place(rng, o["motion"], o["radius"])
            if _apart(objs, n):
                return objs


def _reversed(objs: List[Dict]) -> List[Dict]:
    return [dict(o, motion=REVERSE[o["motion"]], start=o["end"], end=o["start"]) for o in objs]


def caption(objs: List[Dict]) -> str:
    """'a small red circle moves from left to right, a large blue square stays still'."""
    return ", ".join(f"{_a(o['size'] + ' ' + o['color'] + ' ' + o['shape'])} {o['motion']}" for o in objs)


def _semantic(objs: List[Dict]) -> tuple:
    return tuple(sorted((o["color"], o["shape"], o["size"], o["motion"]) for o in objs))


def render(rng: np.random.Generator, objs: List[Dict], n: int, side: int) -> List[np.ndarray]:
    """n RGB uint8 frames: one static background, each object at its path's point of the frame."""
    bg = _background(rng, side)
    paths = [_path(o, n) for o in objs]
    frames = []
    for i in range(n):
        img = bg.copy()
        for o, p in zip(objs, paths):
            mask = _draw_mask(o["shape"], p[i, 0] * side, p[i, 1] * side, o["radius"] * side, o["angle"], side)
            color = np.asarray(COLORS[o["color"]], np.float32)
            img = img * (1 - mask[..., None]) + color * mask[..., None]
        frames.append(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    return frames


def num_descriptions(moving: bool = False) -> int:
    """Distinct descriptions (unordered object sets); `moving`: those where something moves."""
    items, sizes, m = len(COLORS) * len(SHAPES), len(SIZES), len(MOTIONS)
    one = items * sizes * (m - 1 if moving else m)
    pairs = items * (items - 1) // 2 * sizes ** 2
    two = pairs * (m * m - (1 if moving else 0))
    return one + two


def _meta_objects(objs: List[Dict]) -> List[Dict]:
    return [{"object": f"{o['size']} {o['color']} {o['shape']}", "color": o["color"], "shape": o["shape"],
             "size": o["size"], "direction": o["motion"], "start": [round(v, 4) for v in o["start"]],
             "end": [round(v, 4) for v in o["end"]], "radius": round(o["radius"], 4)} for o in objs]


def write_synth_video(out: str, n: int, seed: int = 0, split: str = "train", samples_per_shard: int = 128,
                      side: int = 64, seconds: float = 2.0, fps: float = 8, prefix: Optional[str] = None,
                      overwrite: bool = False, twins: Optional[bool] = None, unique: Optional[bool] = None,
                      progress: bool = False) -> dict:
    """Write `n` clips as `{prefix}-NNNNNN.tar` shards of KEY.mp4 + KEY.txt + KEY.json in OUT, and
    OUT/stats.json (returned). `twins` (default: split "test") writes reversed-direction twin pairs;
    `unique` (default: split "test") redraws until each description is new in the split."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if side < 16 or side % 2:
        raise ValueError(f"side must be an even number of pixels >= 16 (yuv420p video), got {side}")
    if not fps > 0 or not seconds > 0:
        raise ValueError(f"seconds and fps must be > 0, got seconds={seconds} fps={fps}")
    twins = (split == "test") if twins is None else twins
    unique = (split == "test") if unique is None else unique
    if twins and n % 2:
        raise ValueError(f"a split of twin pairs needs an even n, got {n}")
    if unique and n > num_descriptions(twins) // 2:
        raise ValueError(f"a unique-caption split holds at most {num_descriptions(twins) // 2} clips, asked for {n}")
    frames = frame_count(seconds, fps)
    prefix = prefix or f"synth-video-{split}"
    prepare_out_dir(out, overwrite)
    seen: set = set()
    counts = {"one_object": 0, "two_objects": 0, "still_objects": 0, "moving_objects": 0, "twin_pairs": 0}
    from tqdm import tqdm

    def key(i: int) -> str:
        return f"{prefix}-s{seed}-{i:07d}"

    def write(writer: ShardWriter, i: int, objs: List[Dict], clip: List[np.ndarray], twin: Optional[int]) -> None:
        counts["one_object" if len(objs) == 1 else "two_objects"] += 1
        still = sum(o["motion"] == STILL for o in objs)
        counts["still_objects"] += still
        counts["moving_objects"] += len(objs) - still
        text = caption(objs)
        meta = {"caption": text, "split": split, "seed": seed, "index": i, "duration": frames / fps,
                "fps": float(fps), "width": side, "height": side, "frames": frames, "motion": _meta_objects(objs)}
        if twin is not None:
            meta["twin"] = key(twin)
        writer.write(key(i), {"mp4": encode_mp4(clip, fps, intra=True, quality=QP), "txt": text.encode(),
                              "json": json.dumps(meta).encode()})

    step = 2 if twins else 1
    with ShardWriter(out, prefix, samples_per_shard) as writer:
        for j in tqdm(range(0, n, step), desc=f"synth video {split}", unit="clip" if step == 1 else "pair",
                      disable=not progress, file=sys.stderr):
            attempt = 0
            while True:
                rng = _rng(seed, split, j, attempt)
                objs = _sample(rng, frames, moving=twins)
                sems = [_semantic(objs)] + ([_semantic(_reversed(objs))] if twins else [])
                if not unique or not any(s in seen for s in sems):
                    break
                attempt += 1
            seen.update(sems)
            clip = render(rng, objs, frames, side)
            write(writer, j, objs, clip, j + 1 if twins else None)
            if twins:
                write(writer, j + 1, _reversed(objs), clip[::-1], j)
                counts["twin_pairs"] += 1
        shards = writer.close()
    stats = {
        "format": "synth_video", "split": split, "seed": seed, "side": side, "fps": float(fps),
        "frames": frames, "duration": frames / fps, "written": n, "skipped": {},
        "unique_descriptions": len(seen), **counts,
        "shards": shards, "total_bytes": sum(s["bytes"] for s in shards),
        "attributes": {"colors": list(COLORS), "shapes": list(SHAPES), "sizes": list(SIZES),
                       "motions": list(MOTIONS)},
    }
    write_json_atomic(os.path.join(out, "stats.json"), stats)
    return stats
