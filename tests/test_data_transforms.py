"""Image transforms: reduced-size decode, crops, uint8 CHW output, batch normalisation."""
import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from vlp.data.transforms import (CLIP_MEAN, CLIP_STD, ImageTransform, center_crop_box, decode_for_crop,
                                 normalize, random_resized_crop_box)


def _halves(h=384, w=512):
    """Left half red, right half blue."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 230
    img[:, w // 2:, 2] = 230
    return img


def _encode(img, fmt):
    if fmt == "jpg":
        return simplejpeg.encode_jpeg(img, quality=92)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def test_jpeg_decoded_at_reduced_size_when_crop_allows():
    data = _encode(_halves(), "jpg")
    img, box, factor = decode_for_crop(data, 64, center_crop_box)
    assert factor == 4.0 and img.shape == (96, 128, 3)  # 1/4 DCT scale still covers 64 px
    assert box[2] >= 64 and box[3] >= 64
    _, _, full = decode_for_crop(data, 384, center_crop_box)
    assert full == 1.0  # the output needs every pixel
    rng = np.random.default_rng(0)
    _, _, train_factor = decode_for_crop(data, 64, lambda h, w: random_resized_crop_box(h, w, (0.9, 1.0), rng))
    assert train_factor >= 2.0


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
@pytest.mark.parametrize("train", [False, True])
def test_output_is_uint8_chw_with_the_right_content(fmt, train):
    tf = ImageTransform(48, train=train, crop_scale=(0.9, 1.0), interpolation="bilinear")
    out = tf(_encode(_halves(), fmt), np.random.default_rng(1))
    assert out.shape == (3, 48, 48) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out[0, :, :16].mean() > 180 and out[2, :, :16].mean() < 40  # left stays red
    assert out[2, :, -16:].mean() > 180 and out[0, :, -16:].mean() < 40  # right stays blue


def test_train_crops_are_seeded_and_respect_scale():
    tf = ImageTransform(32, train=True, crop_scale=(0.3, 0.5))
    data = _encode(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8), "png")
    a = tf(data, np.random.default_rng(7))
    assert np.array_equal(a, tf(data, np.random.default_rng(7)))
    assert not np.array_equal(a, tf(data, np.random.default_rng(8)))
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(200, 300, (0.3, 0.5), rng)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert 0.28 <= h * w / 60000 <= 0.52 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_corrupt_bytes_raise_for_the_caller_to_count():
    tf = ImageTransform(32, train=False)
    with pytest.raises(Exception):
        tf(b"\xff\xd8\xff\xe0 not really a jpeg", None)
    with pytest.raises(Exception):
        tf(b"plain garbage", None)


def test_normalize_matches_the_definition():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 5), dtype=np.uint8)
    got = normalize(x, CLIP_MEAN, CLIP_STD)
    ref = (torch.from_numpy(x).float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.allclose(got, ref, atol=1e-5)
