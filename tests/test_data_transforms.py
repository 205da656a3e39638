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


def test_device_normalize_equals_the_cpu_normalise_and_passes_floats_through():
    """The trainer normalises the loader's uint8 batch where the model runs: the same numbers as the
    loader's CPU path (cv2, fp32) to float rounding, in the run's dtype."""
    import torch

    from vlp.data.transforms import DeviceNormalize

    x = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    norm = DeviceNormalize(CLIP_MEAN, CLIP_STD)
    got = norm(torch.from_numpy(x), torch.float32)
    torch.testing.assert_close(got, normalize(x, CLIP_MEAN, CLIP_STD), rtol=0, atol=1e-6)
    assert norm(torch.from_numpy(x), torch.bfloat16).dtype == torch.bfloat16
    done = torch.randn(2, 3, 4, 4)
    assert torch.equal(norm(done, torch.float32), done)  # a float batch is already normalised


def test_hflip_mirrors_half_the_training_images_under_a_seed():
    """data.hflip: p = 0.5 per image, from the loader's generator; off in eval and by default."""
    data = _encode(_halves(), "png")
    flipping = ImageTransform(48, train=True, crop_scale=(1.0, 1.0), hflip=True)
    rng = np.random.default_rng(3)
    outs = [flipping(data, rng) for _ in range(400)]
    mirrored = [o[2, :, :16].mean() > 180 for o in outs]  # blue on the left: mirrored
    assert all(o.shape == (3, 48, 48) and o.dtype == np.uint8 and o.flags.c_contiguous for o in outs)
    assert 0.42 < np.mean(mirrored) < 0.58
    for o, m in zip(outs[:20], mirrored):
        plain = ImageTransform(48, train=True, crop_scale=(1.0, 1.0))(data, np.random.default_rng(0))
        assert np.array_equal(o, plain[:, :, ::-1] if m else plain)  # exactly the mirror image, or untouched
    again = np.random.default_rng(3)
    assert all(np.array_equal(o, flipping(data, again)) for o in outs[:50])  # same seed, same flips
    assert not any(ImageTransform(48, train=False, hflip=True)(data, None)[2, :, :16].mean() > 180 for _ in range(5))


def test_randaugment_is_albefs_ops_seeded_and_shape_preserving():
    from PIL import ImageEnhance, ImageOps

    from vlp.data.augment import OPS, autocontrast, brightness, equalize, rand_augment, sharpness

    assert list(OPS) == ["Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                         "TranslateX", "TranslateY", "Rotate"]  # ALBEF's pretraining list
    photo = np.random.default_rng(0).integers(30, 200, (64, 80, 3), dtype=np.uint8)
    # the colour ops are PIL's
    assert np.array_equal(autocontrast(photo), np.asarray(ImageOps.autocontrast(Image.fromarray(photo))))
    assert np.array_equal(equalize(photo), np.asarray(ImageOps.equalize(Image.fromarray(photo))))
    assert np.array_equal(brightness(photo, 1.36), np.asarray(ImageEnhance.Brightness(Image.fromarray(photo)).enhance(1.36)))
    sharp = np.asarray(ImageEnhance.Sharpness(Image.fromarray(photo)).enhance(1.36)).astype(int)
    assert np.abs(sharpness(photo, 1.36).astype(int) - sharp).max() <= 1  # rounding
    rng = np.random.default_rng(0)
    for name, op in OPS.items():
        out = op(photo, 7, rng)
        assert out.shape == photo.shape and out.dtype == np.uint8, name
        assert (name == "Identity") == np.array_equal(out, photo), name
    # n ops per image, each applied with probability 1/2: 2 ops leave a quarter of the images untouched
    rng = np.random.default_rng(5)
    outs = [rand_augment(photo, 2, 7, rng) for _ in range(400)]
    untouched = np.mean([np.array_equal(o, photo) for o in outs])
    assert 0.22 <= untouched <= 0.38  # each op leaves it alone with p = 1/2 + 1/2 x 1/10 (Identity): 0.55^2 = 0.30
    rng2 = np.random.default_rng(5)
    assert all(np.array_equal(o, rand_augment(photo, 2, 7, rng2)) for o in outs)
    # through the transform: seeded, uint8 CHW, off in eval
    data = _encode(photo, "png")
    tf = ImageTransform(48, train=True, crop_scale=(0.5, 1.0), hflip=True, randaugment=(2, 7))
    a = tf(data, np.random.default_rng(11))
    assert a.shape == (3, 48, 48) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert np.array_equal(a, tf(data, np.random.default_rng(11)))
    evaluation = ImageTransform(48, train=False, hflip=True, randaugment=(2, 7))
    assert np.array_equal(evaluation(data, None), ImageTransform(48, train=False)(data, None))


def test_augmentation_options_are_typed_and_checked():
    from vlp.config import ConfigError, load_config

    cfg = load_config(None, ["data.hflip=true", "data.randaugment.n=2"])
    assert cfg.data.hflip is True and (cfg.data.randaugment.n, cfg.data.randaugment.m) == (2, 7)
    off = load_config(None)
    assert off.data.hflip is False and off.data.randaugment.n == 0
    with pytest.raises(ConfigError, match="data.randaugment"):
        load_config(None, ["data.randaugment.m=11"])
    albef = load_config("configs/albef_base.yaml")
    assert albef.data.hflip and (albef.data.randaugment.n, albef.data.randaugment.m) == (2, 7)
    assert list(albef.data.crop_scale) == [0.2, 1.0] and albef.data.interpolation == "bicubic"
