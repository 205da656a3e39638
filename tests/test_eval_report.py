"""The retrieval report PNG: every thumbnail readable (>= 128 px on its longer side in the saved file)
for tiny and large source images; text->image and image->text rows, hardest failures, true matches."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.shards import ShardWriter
from vlp.config import TokenizerConfig
from vlp.data.tokenizers import build_tokenizer
from vlp.data.transforms import eval_transform
from vlp.eval.evaluate import evaluate_retrieval
from vlp.eval.report import THUMB_PX, write_report_png
from vlp.models import build_model

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "cyan", "magenta"]


def _shards(path, size: int, n: int = 12) -> str:
    os.makedirs(path, exist_ok=True)
    w = ShardWriter(str(path), "rep", samples_per_shard=n)
    for i in range(n):
        img = Image.new("RGB", (size, size), (120, 120, 120))
        block = size // 4
        img.paste(Image.new("RGB", (block, block), COLORS[i]), ((i % 3) * block, (i // 3 % 3) * block))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        w.write(f"s{i:03d}", {"jpg": buf.getvalue(), "txt": f"a {COLORS[i]} square, sample {i}".encode(),
                              "cls": str(i % 4).encode()})
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def model_and_tools():
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = build_model(dict(
        type="clip", embed_dim=16,
        vision=dict(kind="timm", name="vit_tiny_patch16_224",
                    kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2)),
        text=dict(kind="open_clip", kwargs=dict(width=16, layers=1, heads=2, context_length=16, vocab_size=49408))))
    tok = build_tokenizer(OmegaConf.structured(TokenizerConfig(kind="open_clip", name="ViT-B-32", context_length=16)))
    return model, tok, eval_transform({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"})


@pytest.mark.parametrize("size", [64, 512])
def test_every_thumbnail_is_readable_whatever_the_source_size(tmp_path, model_and_tools, size):
    model, tok, preprocess = model_and_tools
    data = _shards(tmp_path / "shards", size)
    res = evaluate_retrieval(model, tok, preprocess, data, batch_size=8, progress=False, n_examples=3)
    assert len(res["examples"]) == 3 and len(res["examples_i2t"]) == 3
    assert res["hardest_t2i"] and res["hardest_i2t"]  # a random model fails somewhere
    assert all(ex["rank"] > 1 for ex in res["hardest_t2i"] + res["hardest_i2t"])
    png = tmp_path / "report.png"
    fig = write_report_png(res, str(png), data)
    saved = Image.open(png)
    assert saved.size == tuple(round(v) for v in fig.get_size_inches() * fig.dpi)
    # text->image rows: 5 thumbnails, plus the true image when it is not in the top 5; image->text rows: 1
    t2i = res["examples"] + res["hardest_t2i"]
    expected = sum(5 + (not any(ex["top_correct"])) for ex in t2i) + len(res["examples_i2t"] + res["hardest_i2t"])
    assert len(fig.thumbnail_axes) == expected
    pixels = np.asarray(saved.convert("RGB")).astype(int)
    for ax in fig.thumbnail_axes:
        box = ax.get_window_extent()
        assert min(box.width, box.height) >= 128 and max(box.width, box.height) >= THUMB_PX - 1, box
        # the cell shows the image: its centre region holds the grey background and a coloured block
        x0, x1 = int(box.x0) + 8, int(box.x1) - 8
        y0, y1 = saved.size[1] - int(box.y1) + 8, saved.size[1] - int(box.y0) - 8
        cell = pixels[y0:y1, x0:x1]
        assert cell.std() > 10, "thumbnail cell is blank"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_zeroshot_report_names_the_most_confused_pairs(tmp_path, model_and_tools):
    from vlp.eval.report import write_zeroshot_png
    from vlp.eval.zeroshot import evaluate_zeroshot

    model, tok, preprocess = model_and_tools
    data = _shards(tmp_path / "shards", 64)
    classes = ["top row", "middle row", "bottom row", "anywhere"]
    res = evaluate_zeroshot(model, tok, preprocess, data, classes, ["a photo of the {}."], batch_size=8, progress=False)
    mat = np.asarray(res["confusion"])
    assert mat.shape == (4, 4) and mat.sum() == 12 and (mat.sum(1) == 3).all()
    assert np.trace(mat) / 12 == pytest.approx(res["metrics"]["top1"])
    shares = [p["share"] for p in res["most_confused"]]
    assert shares == sorted(shares, reverse=True) and all(p["true"] != p["predicted"] for p in res["most_confused"])
    assert sum(p["count"] for p in res["most_confused"]) == 12 - np.trace(mat)
    res.update(task="zeroshot")
    fig = write_zeroshot_png(res, str(tmp_path / "zs.png"), data)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("per-class accuracy") for t in titles) and any(t.startswith("confusion matrix") for t in titles)
    text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    top = res["most_confused"][0]
    assert f"{top['true']} → {top['predicted']}" in text
    assert Image.open(tmp_path / "zs.png").size[0] >= 1000
