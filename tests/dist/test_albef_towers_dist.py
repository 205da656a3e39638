"""ALBEF with non-ViT vision towers (issue 21): a timm Swin (its (B, H, W, C) map) and a timm ConvNeXt
(its (B, C, H, W) map) feed the fusion encoder as [pooled vector, H*W positions] and train for a few
steps on 2 ranks under ZeRO-2 through the real trainer and launcher: every logged loss is finite and
the ITC and ITM losses move."""
import json
import math
import os

import pytest

from tests.dist.albef_tiny import write_tiny_albef, write_vocab
from tests.dist.train_entry import deepspeed_launch, write_fixed_batches

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow
STEPS = 4
VIT = ("name: vit_tiny_patch16_224\n    kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, "
       "mlp_ratio: 2.0}")
SWIN = ("name: swin_tiny_patch4_window7_224\n    kwargs: {img_size: 64, patch_size: 4, embed_dim: 16, "
        "depths: [1, 1], num_heads: [1, 2], window_size: 4}")


def test_albef_trains_with_swin_and_convnext_towers_on_two_ranks_under_zero2(synth_train, tmp_path):
    from vlp.config import load_config

    yaml = write_tiny_albef(str(tmp_path / "tiny.yaml"), write_vocab(synth_train, str(tmp_path / "bert")))
    with open(yaml) as f:
        text = f.read()
    assert VIT in text
    with open(yaml, "w") as f:  # a Swin at 64 px (16 x 16, then 8 x 8 positions); data at 64 px
        f.write(text.replace(VIT, SWIN).replace("image_size: 32", "image_size: 64"))
    common = [f"data.train_shards={synth_train}", f"train.steps={STEPS}", "train.save_every=0", "train.zero_stage=2",
              "train.lr=3e-3", "train.min_lr=3e-3",
              "train.peak_flops=1e12"]  # no matmul peak measurement: MFU is not under test
    batches = str(tmp_path / "batches.pt")
    write_fixed_batches(load_config(yaml, common), batches, n=STEPS, global_batch=8)
    # convnext_atto at its own widths: a 2 x 2 map at 64 px
    runs = "swin: convnext:model.vision.name=convnext_atto,!model.vision.kwargs={}"
    rc, log = deepspeed_launch(os.path.join(HERE, "train_entry.py"), "--config", yaml, "--fixed", batches,
                               "--runs", runs, *common, f"output_dir={tmp_path / 'runs'}", "train.micro_batch_size=4",
                               timeout=400)
    assert rc == 0, log[-4000:]
    for run in ("swin", "convnext"):
        with open(tmp_path / "runs" / run / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), run
        for r in records:
            assert all(math.isfinite(r[k]) for k in ("loss", "itc_loss", "itm_loss", "mlm_loss")), (run, r)
        for k in ("itc_loss", "itm_loss"):
            assert records[-1][k] != records[0][k], (run, k, [r[k] for r in records])
