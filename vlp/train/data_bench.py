"""`vlp data bench`: stream the full training loader over shards and report samples/s (and, for a video
model's config, clips/s and frames/s).

It lives with training because it measures the training loader as `vlp train` builds it: the
image size, mean and std come from the model a config names. Timing starts when the first batch arrives, so worker start-up (reported separately as
`startup_s`) does not count. Without `--config` the images are 224 px with CLIP's mean/std.
"""
from __future__ import annotations

import json
import sys
import time

from tqdm import tqdm

from vlp.config import load_config
from vlp.data.pipeline import build_train_loader
from vlp.data.tokenizers import build_tokenizer
from vlp.models import build_model

DEFAULT_SAMPLES = 2000


def _image_cfg(cfg, from_config: bool):
    """The model's image_cfg when a config names a model (building it on CPU), else CLIP defaults."""
    if from_config:
        return dict(build_model(cfg.model).image_cfg)
    return None  # transforms.resolve_image_cfg: 224 px, CLIP mean/std


def run_bench(args) -> int:
    cfg = load_config(args.config, list(args.overrides or []))
    cfg.data.train_shards = args.shards  # set directly: braces/colons are not override-safe
    cfg.data.sources = []
    if args.workers is not None:
        cfg.data.workers = int(args.workers)
    batch = int(args.batch_size or cfg.train.micro_batch_size)
    target = int(args.samples or DEFAULT_SAMPLES)
    loader = build_train_loader(cfg, _image_cfg(cfg, bool(args.config)), build_tokenizer(cfg.data.tokenizer),
                                rank=0, world_size=1, batch_size=batch)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    done = frames = clips = 0
    with tqdm(total=target, unit="sample", desc="loader", file=sys.stderr, disable=bool(args.json) and not sys.stderr.isatty()) as bar:
        while done < target:
            got = next(it)
            n = len(got["key"])
            if "video_frames" in got:  # a video model's loader: clips (K frames) and images (1 frame)
                counts = got["video_frames"]
                frames += int(counts.sum())
                clips += int((counts > 1).sum()) if got["video"].shape[1] > 1 else n
            done += n
            bar.update(n)
    seconds = time.perf_counter() - start
    stats = loader.stats()
    result = {"samples_per_s": round(done / seconds, 1), "samples": done, "seconds": round(seconds, 3),
              "startup_s": round(start - t0, 3), "workers": int(cfg.data.workers), "batch_size": batch,
              "image_size": loader.image_cfg["size"], "interpolation": cfg.data.interpolation,
              "skipped": stats["skipped"], "shards": args.shards}
    video = ""
    if frames:
        result.update(clips_per_s=round(clips / seconds, 1), frames_per_s=round(frames / seconds, 1),
                      frames_per_clip=loader.frames)
        video = f", {result['clips_per_s']} clips/s, {result['frames_per_s']} frames/s ({loader.frames} per clip)"
    print(f"{done} samples in {seconds:.2f} s: {result['samples_per_s']} samples/s{video} "
          f"({result['workers']} workers, batch {batch}, {result['image_size']} px, startup {result['startup_s']} s)")
    if args.json:
        print(json.dumps(result))
    return 0
