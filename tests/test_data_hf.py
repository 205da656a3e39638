"""Hugging Face `datasets` as a training source (`data.sources[i].kind: hf`): a local parquet dataset written
by `datasets` itself, opened with `load_dataset(path, streaming=True)` (the call a Hub name takes), split
over ranks and workers with `split_dataset_by_node`, resumed exactly, mixed with tar shards by weight."""
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.test_data_loader import BASE
from vlp.config import ConfigError, load_config
from vlp.data import build_tokenizer, build_train_loader

datasets = pytest.importorskip("datasets", reason="the hf source needs datasets (pip install 'vlp[hf]')")

ROWS, FILES = 160, 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """160 image-caption rows (JPEG bytes in a datasets Image column) in 4 parquet files, as push_to_hub writes."""
    from PIL import Image as PILImage

    out = tmp_path_factory.mktemp("hf_dataset")
    images = []
    for i in range(ROWS):
        buf = io.BytesIO()
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        PILImage.fromarray(pixels).save(buf, format="JPEG")
        images.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": images, "text": [f"a picture number {i}" for i in range(ROWS)],
                                     "id": [f"row{i:03d}" for i in range(ROWS)]}).cast_column("image", datasets.Image())
    os.makedirs(out / "data")
    for k in range(FILES):
        ds.shard(FILES, k, contiguous=True).to_parquet(str(out / "data" / f"train-{k:05d}-of-{FILES:05d}.parquet"))
    return out


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(load_config(overrides=BASE).data.tokenizer)


def _cfg(tmp, sources, *overrides):
    path = os.path.join(tmp, "cfg.yaml")
    with open(path, "w") as f:
        f.write(OmegaConf.to_yaml({"data": {"sources": sources}}))
    return load_config(path, BASE + list(overrides))


def _hf(hf_dir, **kw):
    return {"kind": "hf", "path": str(hf_dir), "caption_column": "text", "key_column": "id", "name": "hf", **kw}


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_ranks_and_workers_read_disjoint_parts_covering_the_dataset(hf_dir, tok, tmp_path):
    cfg = _cfg(str(tmp_path), [_hf(hf_dir)], f"data.samples_per_epoch={ROWS}")
    loaders = [build_train_loader(cfg, None, tok, r, 2) for r in range(2)]  # 2 ranks x 2 workers x 4
    assert {ld.batches_per_epoch for ld in loaders} == {20}  # 10 batches per slot: one 40-row file each
    keys = [k for ld in loaders for b in _take(ld, 20) for k in b["key"]]
    assert Counter(keys) == Counter(f"row{i:03d}" for i in range(ROWS)), "each row once per epoch"
    batch = _take(loaders[0], 1)[0]
    assert tuple(batch["image"].shape) == (4, 3, 32, 32) and batch["text_ids"].shape[0] == 4


def test_resume_continues_exactly(hf_dir, tok, tmp_path):
    """Stopped after 36 batches (72 rows per worker): the shuffle buffer is refilled from the dataset state saved
    at row 64 (`MARK_EVERY`), the stream continues from the state saved with the position."""
    from vlp.data.hf_source import MARK_EVERY

    cfg = _cfg(str(tmp_path), [_hf(hf_dir)], f"data.samples_per_epoch={ROWS}", "data.shuffle_buffer=8")
    whole = [b["key"] for b in _take(build_train_loader(cfg, None, tok, 0, 1), 40)]
    first = build_train_loader(cfg, None, tok, 0, 1)
    head = [b["key"] for b in _take(first, 36)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored: plain JSON
    marks = [s["stream"]["extra"][0]["mark"] for s in state["workers"].values()]
    assert [m[1] for m in marks] == [MARK_EVERY, MARK_EVERY] and all(m[2] for m in marks)  # the dataset's own state
    again = build_train_loader(cfg, None, tok, 0, 1)
    again.load_state_dict(state)
    assert head + [b["key"] for b in _take(again, 4)] == whole


def test_mixes_with_tar_shards_by_weight(hf_dir, synth_train, tok, tmp_path):
    sources = [_hf(hf_dir, weight=1.0), {"name": "tar", "shards": str(synth_train), "weight": 3.0}]
    cfg = _cfg(str(tmp_path), sources, "data.samples_per_epoch=256", "data.workers=1")
    loader = build_train_loader(cfg, None, tok, 0, 1)
    batches = _take(loader, 64)
    assert all(len(b["key"]) == 4 for b in batches)
    counts = loader.stats()["mix_counts"]
    assert counts["hf"] + counts["tar"] == 256 and 0.15 < counts["hf"] / 256 < 0.35


def test_bad_hf_sources_name_what_to_fix(hf_dir, tok, tmp_path):
    with pytest.raises(ConfigError, match=r"caption_column='caption' is not a column of .*columns: \['image', 'text', 'id'\]"):
        cfg = _cfg(str(tmp_path), [_hf(hf_dir, caption_column="caption")], "data.samples_per_epoch=160")
        build_train_loader(cfg, None, tok, 0, 1)
    with pytest.raises(ConfigError, match=r"does not say how many rows .* set data.samples_per_epoch"):
        build_train_loader(_cfg(str(tmp_path), [_hf(hf_dir)]), None, tok, 0, 1)
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].path' is empty"):
        _cfg(str(tmp_path), [{"kind": "hf"}])
    with pytest.raises(ConfigError, match=r"datasets cannot open it"):
        cfg = _cfg(str(tmp_path), [_hf(tmp_path / "nothing_here")], "data.samples_per_epoch=48")
        build_train_loader(cfg, None, tok, 0, 1)


def test_vlp_train_trains_on_an_hf_source(hf_dir, tmp_path, own_process_group):
    from tests.dist.train_entry import write_tiny_config
    from vlp.train import train

    yaml = write_tiny_config(str(tmp_path / "tiny.yaml"))
    cfg_path = tmp_path / "cfg.yaml"
    base = OmegaConf.load(yaml)
    base.data.sources = [_hf(hf_dir)]
    cfg_path.write_text(OmegaConf.to_yaml(base))
    cfg = load_config(str(cfg_path), ["train.steps=3", "train.micro_batch_size=8", "data.samples_per_epoch=48",
                                      f"output_dir={tmp_path / 'run'}", "train.log_keys=true"])
    result = train(cfg)
    assert result.step == 3 and result.samples_seen == 24
    with open(tmp_path / "run" / "keys" / "rank0.jsonl") as f:
        keys = [k for rec in map(json.loads, f) for k in rec["keys"]]
    assert len(keys) == len(set(keys)) == 24 and all(k.startswith("row") for k in keys)
