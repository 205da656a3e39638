"""Shard specs, sample counts and slice reading (vlp.data.shards)."""
import json
import os
import shutil

import pytest

from vlp.config import ConfigError
from vlp.data.shards import count_samples, expand_shards, read_shard, resolve_shards


def _keys(url, start=0, end=None):
    errors = []
    out = [(i, s["__key__"]) for i, s in read_shard(url, lambda *a: errors.append(a), start, end)]
    assert not errors
    return out


def test_expand_directory_brace_and_list(synth_train, synth_test):
    tars = sorted(str(p) for p in synth_train.glob("*.tar"))
    assert len(tars) == 4
    assert expand_shards(str(synth_train)) == tars
    brace = os.path.join(str(synth_train), "synth-train-{000001..000002}.tar")
    assert expand_shards(brace) == tars[1:3]
    test_tars = sorted(str(p) for p in synth_test.glob("*.tar"))
    assert expand_shards(f"{tars[0]}::{synth_test}") == [tars[0]] + test_tars
    assert expand_shards("pipe:curl -s http://example.invalid/a.tar::https://h/b-{0..1}.tar") == [
        "pipe:curl -s http://example.invalid/a.tar", "https://h/b-0.tar", "https://h/b-1.tar"]


def test_expand_errors_name_the_key_and_path(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_shards.*does not exist"):
        expand_shards(str(tmp_path / "nope-{0..2}.tar"), "data.eval_shards")
    with pytest.raises(ConfigError, match="no \\*.tar shards"):
        expand_shards(str(tmp_path))
    with pytest.raises(ConfigError, match="is empty"):
        expand_shards("  ")


def test_counts_from_stats_json_and_header_scan_agree(synth_train, tmp_path):
    with_stats = resolve_shards(str(synth_train))
    assert [s.samples for s in with_stats] == [16, 16, 16, 16]
    # a copy without stats.json is counted by scanning tar headers; a stats.json that lies wins
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in synth_train.glob("*.tar"):
        shutil.copy(p, bare / p.name)
    assert [s.samples for s in resolve_shards(str(bare))] == [16, 16, 16, 16]
    first = sorted(p.name for p in bare.glob("*.tar"))[0]
    (bare / "stats.json").write_text(json.dumps({"shards": [{"name": first, "samples": 3}]}))
    assert [s.samples for s in resolve_shards(str(bare))] == [3, 16, 16, 16]


def test_img2dataset_sidecar_stats(synth_test, tmp_path):
    src = sorted(synth_test.glob("*.tar"))[0]
    shutil.copy(src, tmp_path / "00000.tar")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 7, "count": 9}))
    assert resolve_shards(str(tmp_path))[0].samples == 7


def test_slice_reading_local_seek_and_pipe(synth_train):
    url = sorted(str(p) for p in synth_train.glob("*.tar"))[1]
    full = _keys(url)
    assert [i for i, _ in full] == list(range(16)) and count_samples(url) == 16
    assert _keys(url, 5, 9) == full[5:9]  # local: entered by seeking to sample 5's header
    assert _keys(f"pipe:cat {url}", 5, 9) == full[5:9]  # streamed: skipped without decoding
    assert _keys(url, 14) == full[14:]
    assert _keys(url, 16) == []
