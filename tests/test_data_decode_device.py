"""data.decode=device: the workers read only JPEG headers (crop box and flip drawn as the loader path draws
them), the trainer decodes with torchvision.io.decode_jpeg where the model runs (nvJPEG on CUDA; here
the CPU kernel, the same call), and the pixels match the loader path's."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.dist.train_entry import write_tiny_config
from vlp.config import ConfigError, load_config


@pytest.fixture(scope="module", autouse=True)
def _own_process_group(own_process_group):
    """train() runs in this process: see conftest.own_process_group."""


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    return write_tiny_config(str(tmp_path_factory.mktemp("cfg") / "tiny.yaml"))


@pytest.fixture(scope="module")
def mixed_shards(synth_train, tmp_path_factory):
    """The synthetic JPEG shards plus one shard of PNGs (decoded in the workers either way)."""
    from data_pipelines.shards import ShardWriter

    out = tmp_path_factory.mktemp("png")
    rng = np.random.default_rng(0)
    with ShardWriter(str(out), "png", samples_per_shard=16) as w:
        for i in range(16):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buf, "PNG")
            w.write(f"png{i:02d}", {"png": buf.getvalue(), "txt": b"noise"})
    return f"{synth_train}::" + "::".join(str(out / f) for f in sorted(os.listdir(out)) if f.endswith(".tar"))


def _first(cfg):
    from vlp.data import build_tokenizer, build_train_loader

    return next(iter(build_train_loader(cfg, {"size": 32}, build_tokenizer(cfg.data.tokenizer), batch_size=40)))


def test_device_decode_gives_the_loader_paths_crops_flips_and_pixels(tiny_yaml, mixed_shards):
    from vlp.data.transforms import decode_on_device

    common = [f"data.train_shards={mixed_shards}", "data.hflip=true", "data.crop_scale=[0.4,1.0]"]
    ref = _first(load_config(tiny_yaml, common))
    got = _first(load_config(tiny_yaml, common + ["data.decode=device"]))
    assert got["key"] == ref["key"]
    jpeg_rows = got["jpeg_index"].tolist()
    png_rows = [i for i, k in enumerate(got["key"]) if k.startswith("png")]
    assert png_rows and set(jpeg_rows).isdisjoint(png_rows) and len(jpeg_rows) + len(png_rows) == 40
    assert got["jpeg_flip"].any() and not got["jpeg_flip"].all()  # flips drawn, as on the loader path
    assert torch.equal(got["image"][png_rows], ref["image"][png_rows])  # decoded in the worker
    assert not got["image"][jpeg_rows].any()  # not yet: bytes only
    out = decode_on_device(got, torch.device("cpu"), "bilinear")
    assert "jpeg" not in out and out["image"].dtype == torch.uint8 and out["image"].shape == (40, 3, 32, 32)
    diff = (out["image"].float() - ref["image"].float()).abs()
    # libjpeg's DCT-scaled decode + OpenCV resize vs a full decode + antialiased torch resize: < 3 levels on average
    assert float(diff[jpeg_rows].mean()) < 3.0
    for r in jpeg_rows:  # and each image is its own (a wrong crop or flip would be far off)
        others = [float((out["image"][r].float() - ref["image"][o].float()).abs().mean()) for o in jpeg_rows if o != r]
        assert float(diff[r].mean()) < min(others)


def test_device_decode_refuses_what_it_cannot_apply(tiny_yaml, synth_train):
    with pytest.raises(ConfigError, match=r"data\.randaugment\.n"):
        load_config(tiny_yaml, [f"data.train_shards={synth_train}", "data.decode=device", "data.randaugment.n=2"])
    with pytest.raises(ConfigError, match=r"data\.decode"):
        load_config(tiny_yaml, [f"data.train_shards={synth_train}", "data.decode=gpu"])


def test_training_with_device_decode(tiny_yaml, synth_train, tmp_path):
    import json

    from vlp.train import train

    res = train(load_config(tiny_yaml, [f"data.train_shards={synth_train}", f"output_dir={tmp_path}",
                                        "data.decode=device", "train.steps=3", "train.micro_batch_size=16"]))
    assert res.step == 3
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and all(np.isfinite(losses))
