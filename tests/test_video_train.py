"""Video through the training loader and trainer: clips and images mix in one batch (an image is a 1-frame
clip), skips are counted, the position resumes exactly, the frame curriculum changes K without losing or
repeating a sample, and a space-time run stopped mid-way resumes to the uninterrupted losses."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from tests.dist.train_entry import Fault, write_tiny_config
from vlp.config import load_config


@pytest.fixture(scope="module", autouse=True)
def _own_process_group(own_process_group):
    """train() runs in this process: see conftest.own_process_group."""


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """48 synthetic moving-shapes clips (32 px) in 3 shards, plus a shard with a corrupt video."""
    from data_pipelines.shards import ShardWriter
    from data_pipelines.synth_video import write_synth_video

    out = tmp_path_factory.mktemp("clips")
    write_synth_video(str(out / "ok"), n=48, seed=0, split="train", samples_per_shard=16, side=32)
    good = _first_mp4(out / "ok")
    os.makedirs(out / "bad")
    with ShardWriter(str(out / "bad"), "bad", samples_per_shard=8) as w:
        for i in range(8):
            w.write(f"bad{i}", {"mp4": os.urandom(500) if i < 2 else good, "txt": b"a red circle moves up"})
    return out


def _first_mp4(d):
    import tarfile

    tar = sorted(p for p in os.listdir(d) if p.endswith(".tar"))[0]
    with tarfile.open(os.path.join(d, tar)) as t:
        m = next(m for m in t.getmembers() if m.name.endswith(".mp4"))
        return t.extractfile(m).read()


@pytest.fixture(scope="module")
def video_yaml(tmp_path_factory):
    return write_tiny_config(str(tmp_path_factory.mktemp("cfg") / "tiny.yaml"))


VIDEO = ["model.video.enabled=true", "model.video.max_frames=3", "data.video.frames=3", "data.crop_scale=[0.9,1.0]"]


def _loader(cfg, batch=8):
    from vlp.data import build_train_loader, build_tokenizer
    from vlp.models import build_model

    return build_train_loader(cfg, build_model(cfg.model).image_cfg, build_tokenizer(cfg.data.tokenizer),
                              batch_size=batch)


def _mixed_cfg(video_yaml, clips, synth_train, tmp_path, *extra):
    sources = (f"data.sources=[{{name: video, shards: '{clips / 'ok'}', weight: 1.0}}, "
               f"{{name: image, shards: '{synth_train}', weight: 1.0}}]")
    return load_config(video_yaml, [sources, f"output_dir={tmp_path}", *VIDEO, *extra])


def test_clips_and_images_mix_in_one_batch_and_resume_exactly(video_yaml, clips, synth_train, tmp_path):
    cfg = _mixed_cfg(video_yaml, clips, synth_train, tmp_path)
    loader = _loader(cfg)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    b = first[0]
    assert b["video"].shape == (8, 3, 3, 32, 32) and b["video"].dtype == torch.uint8 and "image" not in b
    frames = torch.cat([x["video_frames"] for x in first])
    keys = [k for x in first for k in x["key"]]
    assert set(frames.tolist()) == {1, 3}
    moving = 0
    for x in first:
        for row, n in enumerate(x["video_frames"].tolist()):
            assert not x["video"][row, n:].any()  # an image's absent frames are zeros
            moving += n == 3 and bool(x["video"][row, 0].ne(x["video"][row, 2]).any())
    assert moving > 0  # clips carry frames at different times
    assert any(k.startswith("synth-video") for k in keys) and any(not k.startswith("synth-video") for k in keys)
    state = json.loads(json.dumps(loader.state_dict()))
    ref = [next(it) for _ in range(2)]
    again = _loader(cfg)
    again.load_state_dict(state)
    got = [x for _, x in zip(range(2), again)]
    for a, r in zip(got, ref):
        assert a["key"] == r["key"] and torch.equal(a["video"], r["video"])


def test_the_frame_curriculum_changes_k_mid_epoch_without_losing_a_sample(video_yaml, clips, tmp_path):
    cfg = load_config(video_yaml, [f"data.train_shards={clips / 'ok'}", f"output_dir={tmp_path}", *VIDEO,
                                   "data.video.curriculum=[[0,1],[2,3]]", "data.workers=2"])
    loader = _loader(cfg)
    assert loader.frames == 1 and loader.batches_per_epoch == 6
    it = iter(loader)
    early = [next(it) for _ in range(2)]
    assert loader.set_frames(3) and not loader.set_frames(3)
    it = iter(loader)  # a new iterator: the workers restart at the exact position, decoding 3 frames
    late = [next(it) for _ in range(4)]
    assert [x["video"].shape[1] for x in early + late] == [1, 1, 3, 3, 3, 3]
    keys = [k for x in early + late for k in x["key"]]
    assert len(keys) == 48 and len(set(keys)) == 48


def test_corrupt_videos_are_skipped_and_counted(video_yaml, clips, tmp_path):
    cfg = load_config(video_yaml, [f"data.train_shards={clips / 'bad'}", f"output_dir={tmp_path}", *VIDEO,
                                   "data.max_corrupt_fraction=0.5", "data.shuffle_buffer=0"])
    loader = _loader(cfg, batch=2)
    batch = next(iter(loader))  # in shard order: the two corrupt clips come first
    assert batch["key"] == ["bad2", "bad3"] and batch["video"].shape == (2, 3, 3, 32, 32)
    assert loader.stats()["skipped"]["unreadable_video"] == 2


def test_space_time_run_with_curriculum_resumes_to_the_uninterrupted_losses(video_yaml, clips, tmp_path):
    from vlp.train import train

    def cfg(out):
        return load_config(video_yaml, [f"data.train_shards={clips / 'ok'}", f"output_dir={out}", *VIDEO,
                                        "data.video.curriculum=[[0,1],[3,3]]", "train.steps=7", "train.save_every=2",
                                        "train.micro_batch_size=8", "data.workers=1"])

    ref = tmp_path / "ref"
    train(cfg(ref))
    out = tmp_path / "cut"
    stopped = train(cfg(out), lambda c, m, r, w: Fault(_default(c, m, r, w), signal.SIGINT, 5))
    assert stopped.stopped_by == signal.SIGINT and stopped.step == 5
    resumed = train(cfg(out))
    assert resumed.step == 7

    def records(d):
        with open(d / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    got, want = records(out), records(ref)
    assert [r["step"] for r in got] == list(range(1, 8))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)
    # MFU follows the frame count: 3-frame steps cost more FLOPs per sample than 1-frame ones
    flops = {r["step"]: r["flops_per_s"] / r["samples_per_s"] for r in want}
    assert flops[5] > 2 * flops[1] and "mfu" in want[-1]


def _default(c, m, r, w):
    from vlp.train.loop import default_loader

    return default_loader(c, m, r, w)
