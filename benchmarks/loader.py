"""Loader throughput: vlp's training loader vs open_clip_train's `get_wds_dataset`, same shards.

Generates ~2,000 photo-like JPEGs of 256-512 px into `.bench/loader/` (once), then times both
loaders side by side with the same worker count (default 1), batch size, RandomResizedCrop to 224
(scale 0.9-1.0) and tokenizer context length (77). Each side runs in its own subprocess; the
open_clip side runs with `PYTHONPATH=.octarget`, where webdataset 0.2.86 is pip-installed
(`--target`, no deps) because open_clip_train's tar grouper breaks on newer webdataset, so the
two webdataset versions never meet. Timing starts after the first batch (worker start-up and
shuffle-buffer fill excluded) on both sides. Runs alternate; the best of `--repeats` is kept. Also
timed: reading and decoding the same JPEGs and nothing else (the limit of any CPU loader here).
vlp's batches are uint8 (normalised later on the device), open_clip's float32 normalised.

    python benchmarks/loader.py [--workers 1] [--samples 1536] [--batch-size 64] [--repeats 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, ".bench", "loader")
OCTARGET = os.path.join(ROOT, ".octarget")
N_IMAGES, PER_SHARD = 2000, 250

OPEN_CLIP_SIDE = textwrap.dedent("""
    import json, sys, time, argparse
    import webdataset as wds
    assert wds.__version__ == "0.2.86", wds.__file__
    import open_clip
    from open_clip_train.data import get_wds_dataset
    shards, workers, batch, samples, total = sys.argv[1], *map(int, sys.argv[2:6])
    args = argparse.Namespace(train_data=shards, train_num_samples=total, dataset_resampled=False, seed=0,
                              batch_size=batch, workers=workers, world_size=1, train_data_upsampling_factors=None)
    preprocess = open_clip.image_transform(224, is_train=True)  # RandomResizedCrop(0.9-1.0) bicubic
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=77)
    loader = get_wds_dataset(args, preprocess, True, epoch=0, tokenizer=tokenizer).dataloader
    it = iter(loader)
    images, texts = next(it)
    assert images.shape[1:] == (3, 224, 224) and texts.shape[1] == 77
    start, done = time.perf_counter(), 0
    while done < samples:
        done += len(next(it)[0])
    seconds = time.perf_counter() - start
    print(json.dumps({"samples_per_s": done / seconds, "samples": done, "seconds": seconds}))
""")


def make_shards() -> str:
    """~2,000 JPEGs (256-512 px sides, smooth colour fields + shapes + noise) with captions."""
    stamp = os.path.join(BENCH, f"done-{N_IMAGES}-420")
    if os.path.exists(stamp):
        return BENCH
    import cv2
    import simplejpeg
    import webdataset as wds

    os.makedirs(BENCH, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(N_IMAGES // PER_SHARD):
        with wds.TarWriter(os.path.join(BENCH, f"bench-{s:06d}.tar")) as w:
            for i in range(PER_SHARD):
                h, wd = (int(v) for v in rng.integers(256, 513, 2))
                img = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (wd, h),
                                 interpolation=cv2.INTER_CUBIC)
                for _ in range(int(rng.integers(2, 6))):
                    centre = (int(rng.integers(0, wd)), int(rng.integers(0, h)))
                    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                    cv2.circle(img, centre, int(rng.integers(10, 120)), colour, -1)
                img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
                w.write({"__key__": f"b{s:03d}{i:04d}", "jpg": simplejpeg.encode_jpeg(img, quality=90, colorsubsampling="420"),
                         "txt": f"a picture with {i % 7 + 2} coloured circles, number {s * PER_SHARD + i}".encode()})
    open(stamp, "w").close()
    return BENCH


def ensure_octarget() -> None:
    if os.path.isdir(os.path.join(OCTARGET, "webdataset")):
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", OCTARGET,
                    "webdataset==0.2.86"], check=True)


def run_ours(shards: str, workers: int, batch: int, samples: int, interpolation: str) -> dict:
    cmd = [sys.executable, "-m", "vlp.cli", "data", "bench", shards, "--workers", str(workers),
           "--batch-size", str(batch), "--samples", str(samples), "--json", "data.image_size=224",
           f"data.interpolation={interpolation}", "data.tokenizer.context_length=77"]
    return _run(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"})


def run_open_clip(shards: str, workers: int, batch: int, samples: int) -> dict:
    pattern = os.path.join(shards, "bench-{%06d..%06d}.tar" % (0, N_IMAGES // PER_SHARD - 1))
    env = {**os.environ, "PYTHONPATH": OCTARGET, "HF_HUB_OFFLINE": "1"}
    return _run([sys.executable, "-c", OPEN_CLIP_SIDE, pattern, str(workers), str(batch), str(samples),
                 str(N_IMAGES)], env)


def decode_only(shards: str, samples: int) -> dict:
    """The physical limit of a CPU loader on these files: read each JPEG from the tars and decode it
    (simplejpeg, libjpeg-turbo, full size, RGB), nothing else, one thread; samples/s."""
    import glob
    import tarfile
    import time

    import simplejpeg

    blobs = []
    for path in sorted(glob.glob(os.path.join(shards, "bench-*.tar"))):
        with tarfile.open(path) as tar:
            blobs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    blobs = (blobs * (samples // max(1, len(blobs)) + 1))[:samples]
    start = time.perf_counter()
    for b in blobs:
        simplejpeg.decode_jpeg(b, colorspace="RGB")
    seconds = time.perf_counter() - start
    return {"samples_per_s": len(blobs) / seconds, "samples": len(blobs), "seconds": seconds}


def _run(cmd, env) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=1536, help="samples timed per run (after the first batch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    shards = make_shards()
    ensure_octarget()
    best = {"ours_bicubic": 0.0, "ours_bilinear": 0.0, "open_clip": 0.0, "decode_only": 0.0}
    for _ in range(args.repeats):
        best["decode_only"] = max(best["decode_only"], decode_only(shards, args.samples)["samples_per_s"])
        for interp in ("bicubic", "bilinear"):
            r = run_ours(shards, args.workers, args.batch_size, args.samples, interp)
            best[f"ours_{interp}"] = max(best[f"ours_{interp}"], r["samples_per_s"])
        r = run_open_clip(shards, args.workers, args.batch_size, args.samples)
        best["open_clip"] = max(best["open_clip"], r["samples_per_s"])
    result = {k: round(v, 1) for k, v in best.items()}
    result.update(workers=args.workers, batch_size=args.batch_size, samples=args.samples, images=N_IMAGES,
                  ratio_bicubic=round(best["ours_bicubic"] / best["open_clip"], 2),
                  ratio_bilinear=round(best["ours_bilinear"] / best["open_clip"], 2),
                  of_decode_bicubic=round(best["ours_bicubic"] / best["decode_only"], 2),
                  of_decode_bilinear=round(best["ours_bilinear"] / best["decode_only"], 2))
    print(f"loader samples/s with {args.workers} worker(s), batch {args.batch_size}, 256-512 px JPEGs -> 224:")
    print(f"  open_clip_train get_wds_dataset (PIL, bicubic): {result['open_clip']:8.1f}")
    print(f"  vlp, bicubic (same interpolation):              {result['ours_bicubic']:8.1f}  "
          f"x{result['ratio_bicubic']}")
    print(f"  vlp, bilinear (vlp default):                    {result['ours_bilinear']:8.1f}  "
          f"x{result['ratio_bilinear']}")
    print(f"  JPEG decode only (full size, 1 thread):          {result['decode_only']:8.1f}  "
          f"(vlp reaches x{result['of_decode_bicubic']} / x{result['of_decode_bilinear']} of it)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
