"""Video proofs (BENCHMARKS.md "Video"): does the space-time tower see motion, does joint image + video
training help, how fast does the loader decode clips.

1. motion: the synthetic moving-shapes clips (`vlp data synth --video`), trained twice with the same towers,
   samples, steps and seed: `model.video.temporal=divided` (Frozen in Time's space-time attention) and `mean`
   (the image ViT per frame, features averaged). The test split holds twin pairs, a clip and its exact
   time-reversal with every direction in the caption reversed, so the frame-average model cannot tell a pair
   apart: `twin_acc` (each clip's own caption scored above its twin's, and each caption's own clip above the
   twin clip; a tie counts one half) is 0.5 for it by construction and measures motion for the other.
2. joint: the space-time model on the same clips alone vs those clips mixed 1:1 with synthetic images (the
   image set of `vlp data synth`: the same shapes and colours, still), on the same video test split.
3. loader: `vlp data bench` clips/s and frames/s, one worker, 4 frames of 256-px 10-second 25 fps H.264 clips
   (2-second GOP, as `vlp data convert --max-side` writes) cropped to 224.

    python benchmarks/video.py [--steps 400] [--train-clips 2000] [--only motion,joint,loader] [--out DIR]

Each training run is `vlp train --config configs/demo_video.yaml --nproc 2` with overrides; prints one JSON
line per run and writes them to OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _vlp(*args: str, quiet: bool = True) -> str:
    cmd = [sys.executable, "-m", "vlp.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=quiet, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{(p.stderr or '')[-3000:]}")
    return p.stdout or ""


def twin_scores(model, loaded, test_dir: str) -> dict:
    """Retrieval metrics (text<->video, every caption a query) and twin accuracy on a twin test split."""
    import torch

    from vlp.data.video import read_clip_for_eval
    from vlp.eval.data import iter_records
    from vlp.eval.retrieval import retrieval_metrics

    clips, caps, keys, twins = [], [], [], []
    frames = int(loaded.image_cfg.get("frames", 4))
    for rec in iter_records(test_dir):
        clips.append(torch.stack([loaded.preprocess(f) for f in read_clip_for_eval(rec["mp4"], frames)]))
        caps.append(rec["txt"].decode().strip().splitlines()[0])
        keys.append(rec["__key__"])
        twins.append(json.loads(rec["json"]).get("twin"))
    with torch.no_grad():
        v = torch.cat([model.encode_image(torch.stack(clips[i:i + 64])) for i in range(0, len(clips), 64)])
        t = model.encode_text(*loaded.tokenizer(caps))
    sim = (v @ t.T).numpy()
    pos = {k: i for i, k in enumerate(keys)}
    acc = []
    for i, tw in enumerate(twins):
        if tw is None or tw not in pos:
            continue
        j = pos[tw]
        for a, b in ((sim[i, i], sim[i, j]), (sim[i, i], sim[j, i])):  # v2t, t2v within the pair
            # a frame average gives twins the same embedding up to float summation order: within 1e-5 is a tie
            acc.append(0.5 if abs(a - b) <= 1e-5 else 1.0 if a > b else 0.0)
    m = retrieval_metrics(v, t, list(range(len(keys))))
    return {"t2v_r1": m["t2i_r1"], "t2v_r5": m["t2i_r5"], "t2v_r10": m["t2i_r10"],
            "t2v_median_rank": m["t2i_median_rank"], "v2t_r1": m["i2t_r1"], "v2t_r5": m["i2t_r5"],
            "mean_recall": m["mean_recall"], "twin_acc": float(np.mean(acc)) if acc else None,
            "twin_pairs": len(acc) // 4, "clips": len(keys)}


def train_and_score(name: str, out: str, test_dir: str, overrides: list) -> dict:
    from vlp.load import load_model

    run = os.path.join(out, name)
    t0 = time.time()
    if not os.path.isfile(os.path.join(run, "checkpoints", "latest")):  # a finished run is scored again, not retrained
        _vlp("train", "--config", "configs/demo_video.yaml", "--nproc", "2", f"output_dir={run}",
             f"data.eval_shards={test_dir}", "train.resume=none", *overrides)
    seconds = time.time() - t0
    loaded = load_model(run)
    res = {"run": name, "train_s": round(seconds, 1), **twin_scores(loaded.model, loaded, test_dir),
           "overrides": overrides}
    print(json.dumps(res), flush=True)
    return res


def loader_bench(out: str, clips: int = 24) -> dict:
    """Writes 256-px 10 s clips (moving noise, so the codec has real work) and runs `vlp data bench`."""
    from data_pipelines.shards import ShardWriter
    from data_pipelines.video_convert import encode_mp4

    shard_dir = os.path.join(out, "loader_clips")
    if not os.path.isdir(shard_dir):
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)
        os.makedirs(shard_dir)
        with ShardWriter(shard_dir, "clips", samples_per_shard=clips) as w:
            for c in range(clips):
                frames = [np.ascontiguousarray(np.roll(base, (3 * i + c, 2 * i), (0, 1))[:256, :256])
                          for i in range(250)]
                w.write(f"clip{c:04d}", {"mp4": encode_mp4(frames, 25.0), "txt": b"moving noise"})
    text = _vlp("data", "bench", shard_dir, "--config", "configs/demo_video.yaml", "--workers", "1",
                "--samples", "192", "--batch-size", "16", "--json", "data.image_size=224", "data.video.curriculum=[]",
                "data.video.frames=4", "!model.vision.kwargs={img_size: 224, patch_size: 16, embed_dim: 64, depth: 1, "
                "num_heads: 2}")
    res = json.loads(text.strip().splitlines()[-1])
    res = {"run": "loader", **{k: res[k] for k in ("clips_per_s", "frames_per_s", "samples_per_s", "workers",
                                                   "image_size", "frames_per_clip", "samples")}}
    print(json.dumps(res), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_video"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train-clips", type=int, default=2000)
    ap.add_argument("--test-clips", type=int, default=200)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--only", default="motion,joint,loader")
    # 4 frames from the start: a 1-frame stage first teaches the text tower that direction words carry nothing
    # (one frame cannot tell them), and twins then sit on a symmetric saddle (BENCHMARKS.md "Video")
    ap.add_argument("--curriculum", default="[]", help="data.video.curriculum for every run (default: none)")
    ap.add_argument("--temporal", default="divided,mean", help="motion: the towers to compare")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "data")
    if not os.path.isfile(os.path.join(data, "test", "stats.json")):
        _vlp("data", "synth", data, "--video", "--train", str(args.train_clips), "--test", str(args.test_clips),
             "--train-twins", "--samples-per-shard", "16", "--overwrite")
    train, test = os.path.join(data, "train"), os.path.join(data, "test")
    # twins stay in one batch (no sample shuffle; the 16-clip shards are reshuffled every epoch): a clip's
    # time-reversal is its hardest negative, the one that makes direction matter to the contrastive loss
    common = [f"train.steps={args.steps}", "train.save_every=0", f"data.train_shards={train}", "data.shuffle_buffer=0",
              f"data.video.curriculum={args.curriculum}", *args.overrides]
    results = []
    if "motion" in only:
        for temporal in args.temporal.split(","):
            results.append(train_and_score(f"motion_{temporal}", args.out, test,
                                           common + [f"model.video.temporal={temporal}"]))
    if "joint" in only:
        images = os.path.join(data, "images")
        if not os.path.isfile(os.path.join(images, "stats.json")):
            _vlp("data", "synth", images, "--n", str(args.images), "--seed", "5", "--split", "train", "--overwrite")
        if "motion" not in only:
            results.append(train_and_score("motion_divided", args.out, test, common))
        joint = [c for c in common if not c.startswith("data.train_shards")] + [
            "data.train_shards=''", f"data.sources=[{{name: video, shards: '{train}', weight: 1.0}}, "
                                  f"{{name: image, shards: '{images}', weight: 1.0}}]"]
        results.append(train_and_score("joint_image_video", args.out, test, joint))
    if "loader" in only:
        results.append(loader_bench(args.out))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
