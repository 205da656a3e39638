"""A space-time video CLIP on two CPU ranks under DeepSpeed ZeRO-3, clips and images mixed by weight with a
frame curriculum (ranks whose batches hold only images still run every module: ZeRO-3 would hang
otherwise), then the user's path after it: text<->video retrieval with median rank and a report, zero-shot
on video classes, a vlp export read back by `vlp.load_pretrained`, and image layouts refused with the
reason unless the image path alone is asked for."""
import json
import os

import pytest
import torch

from tests.dist.train_entry import deepspeed_launch, write_tiny_config

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", autouse=True)
def _own_process_group(own_process_group):
    """eval and export run in this process: see conftest.own_process_group."""


class _Ran:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _vlp(*args):
    """`vlp ARGS` in this process (the CLI's own entry; no DeepSpeed launch for eval and export)."""
    import contextlib
    import io

    from vlp.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in args])
    return _Ran(rc, err.getvalue())


def test_video_clip_on_two_ranks_zero3_then_eval_and_export(synth_train, tmp_path):
    from data_pipelines.synth_video import write_synth_video

    train, test = tmp_path / "clips", tmp_path / "twins"
    write_synth_video(str(train), n=32, seed=0, split="train", samples_per_shard=8, side=32)
    write_synth_video(str(test), n=16, seed=1, split="test", samples_per_shard=8, side=32)
    cfg = write_tiny_config(str(tmp_path / "tiny.yaml"))
    out = tmp_path / "run"
    sources = (f"data.sources=[{{name: video, shards: '{train}', weight: 1.0}}, "
               f"{{name: image, shards: '{synth_train}', weight: 1.0}}]")
    rc, log = deepspeed_launch(os.path.join(ROOT, "launch", "pretrain.py"), "--config", cfg, sources,
                               f"output_dir={out}", "model.video.enabled=true", "model.video.max_frames=3",
                               "data.video.frames=3", "data.video.curriculum=[[0,1],[2,3]]", "train.zero_stage=3",
                               "train.steps=4", "train.micro_batch_size=4", "data.workers=1", "train.save_every=0",
                               timeout=400)
    assert rc == 0, log[-4000:]
    assert "step 2: clips of 3 frame(s) from here on" in log
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all("mfu" in r for r in records)

    res = _vlp("eval", "retrieval", "--checkpoint", out, "--data", test, "--out", tmp_path / "r.json",
               "--report", tmp_path / "r.png")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["n_images"] == 16 and got["n_texts"] == 16 and got["n_skipped"] == 0
    assert {"t2i_r1", "t2i_r5", "t2i_r10", "t2i_median_rank", "i2t_median_rank"} <= set(got["metrics"])
    assert (tmp_path / "r.png").stat().st_size > 10_000

    # zero-shot on video classes: each clip labelled by its first object's motion
    motions = ["moves from left to right", "moves from right to left", "moves up", "moves down", "stays still"]
    (tmp_path / "classes.txt").write_text("\n".join(motions) + "\n")
    res = _vlp("eval", "zeroshot", "--checkpoint", out, "--data", test, "--classnames", tmp_path / "classes.txt",
               "--label-key", "motion.0.direction", "--templates", "a shape {}", "--out", tmp_path / "z.json")
    assert res.returncode == 0, res.stderr[-3000:]
    z = json.loads((tmp_path / "z.json").read_text())
    assert z["n_samples"] == 16 and z["n_classes"] == 5

    res = _vlp("export", "--checkpoint", out, "--format", "vlp", "--out", tmp_path / "vlp")
    assert res.returncode == 0, res.stderr[-3000:]
    import vlp
    from vlp.load import load_model

    exported, trained = vlp.load_pretrained(str(tmp_path / "vlp")), load_model(str(out)).model
    clips = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(clips), trained.encode_image(clips), rtol=0, atol=1e-5)

    res = _vlp("export", "--checkpoint", out, "--format", "hf", "--out", tmp_path / "hf")
    assert res.returncode != 0 and "export.image_only=true" in res.stderr and "--format vlp" in res.stderr
    res = _vlp("export", "--checkpoint", out, "--format", "hf", "--out", tmp_path / "hf", "--image-only")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()
