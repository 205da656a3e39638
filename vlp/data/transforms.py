"""Fast image transforms: decode at reduced size, crop and resize in uint8, normalise per batch.

Train: RandomResizedCrop (Szegedy et al. 2015's "Inception" crop, as torchvision samples it)
with `data.crop_scale`, then optionally ALBEF's horizontal flip and RandAugment (`vlp.data.augment`,
`data.hflip`, `data.randaugment`), all drawn from the loader's numpy generator. Eval: resize the shorter side and center crop, done as a center square
crop followed by one resize. The crop box is chosen from the JPEG header before decoding, so a
JPEG is decoded with libjpeg-turbo's DCT scaling (simplejpeg `min_height/min_width`) to the
smallest size that still covers the output resolution; PNG/WebP (and JPEGs simplejpeg refuses,
e.g. CMYK) go through PIL, with `draft` for JPEG. Resizing uses OpenCV in uint8; the output is
uint8 CHW, and `normalize` turns a whole batch into float once.

`eval_transform(image_cfg)` is the PIL-image form of the eval protocol (torchvision's resize and center
crop, the operations open_clip's eval transform applies), for a model evaluated outside our loader: the
numbers then match tools built on open_clip (CLIP_benchmark). `resize_mode` "shortest" (default)
resizes the shorter side then crops; "squash" resizes both sides to the target.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import cv2

# OpenCV's own thread pool stays off in every process that decodes: a pool started in a parent (a
# loader with workers=0, an in-process eval) makes forked DataLoader workers deadlock in their first
# cv2 call (found by running the transform tests before the loader tests in one process). Workers run
# one thread each anyway; parallelism comes from the workers.
cv2.setNumThreads(1)
import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision import transforms as tvt

from vlp.data.augment import hflip, rand_augment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
                  "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}

Box = Tuple[int, int, int, int]  # top, left, height, width in full-resolution pixels


def random_resized_crop_box(h: int, w: int, scale: Sequence[float], rng: np.random.Generator,
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Box:
    """A random crop box covering `scale` of the area with aspect ratio in `ratio` (torchvision's rule)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h: int, w: int) -> Box:
    """The central square: resize-shorter-side-then-center-crop as one crop + resize."""
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def dct_factor(box: Box, size: int) -> int:
    """Largest of 8, 4, 2 by which the crop can shrink and still cover `size` px; else 1.

    Only powers of two: libjpeg-turbo's 1/2, 1/4, 1/8 IDCTs are fast, its other m/8 scales can be
    slower than a full decode.
    """
    for f in (8, 4, 2):
        if box[2] // f >= size and box[3] // f >= size:
            return f
    return 1


def decode_for_crop(data: bytes, size: int, box_fn: Callable[[int, int], Box]) -> Tuple[np.ndarray, Box, float]:
    """Decode just large enough for the crop: returns (RGB HWC uint8, box in decoded pixels, factor).

    `factor` is full size / decoded size (1.0 when decoded at full resolution).
    """
    if _is_jpeg(data):
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            box = box_fn(h, w)
            f = dct_factor(box, size)
            if f > 1:  # the smallest output >= h/f x w/f is exactly the 1/f scale
                img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // f), min_width=-(-w // f))
            else:
                img = simplejpeg.decode_jpeg(data, colorspace="RGB")
            return img, _scale_box(box, img.shape[0] / h, img.shape[1] / w), h / img.shape[0]
        except ValueError:
            pass  # e.g. CMYK or progressive oddities: PIL below
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        box = box_fn(h, w)
        f = dct_factor(box, size)
        if im.format == "JPEG" and f > 1:
            im.draft("RGB", (-(-w // f), -(-h // f)))
        img = np.asarray(im.convert("RGB"))
    return img, _scale_box(box, img.shape[0] / h, img.shape[1] / w), h / img.shape[0]


def _scale_box(box: Box, sy: float, sx: float) -> Box:
    if sy == 1.0 and sx == 1.0:
        return box
    top, left = int(box[0] * sy), int(box[1] * sx)
    return top, left, max(1, int(round(box[2] * sy))), max(1, int(round(box[3] * sx)))


class ImageTransform:
    """bytes -> uint8 CHW (3, size, size): random resized crop (train) or center crop (eval); in
    training then a horizontal flip with probability 0.5 (`hflip`) and RandAugment with `randaugment`
    = (ops per image, magnitude of 10); (0, m) is off."""

    def __init__(self, size: int, train: bool, crop_scale: Sequence[float] = (0.9, 1.0),
                 interpolation: str = "bilinear", hflip: bool = False, randaugment: Tuple[int, float] = (0, 0)):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        self.size, self.train = int(size), train
        self.crop_scale = tuple(crop_scale)
        self.interpolation = interpolation
        self.hflip = bool(hflip)
        self.randaugment = (int(randaugment[0]), float(randaugment[1]))

    def plan(self, data: bytes, rng: Optional[np.random.Generator] = None) -> Optional[Tuple[Box, bool]]:
        """For decoding on the device (`data.decode=device`): the crop box (full-resolution pixels) and flip
        of a JPEG, read from its header alone, drawn from `rng` exactly as `__call__` draws them; None for
        other formats (decoded here) and for headers simplejpeg cannot read."""
        if not _is_jpeg(data):
            return None
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        box = random_resized_crop_box(h, w, self.crop_scale, rng) if self.train else center_crop_box(h, w)
        return box, bool(self.train and self.hflip and rng.random() < 0.5)

    def __call__(self, data: bytes, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        if self.train:
            box_fn = lambda h, w: random_resized_crop_box(h, w, self.crop_scale, rng)  # noqa: E731
        else:
            box_fn = center_crop_box
        img, (top, left, ch, cw), _ = decode_for_crop(data, self.size, box_fn)
        crop = img[top:top + ch, left:left + cw]
        if crop.shape[:2] != (self.size, self.size):
            crop = cv2.resize(crop, (self.size, self.size), interpolation=INTERPOLATIONS[self.interpolation])
        if self.train and self.hflip and rng.random() < 0.5:
            crop = hflip(crop)
        if self.train and self.randaugment[0]:
            crop = rand_augment(np.ascontiguousarray(crop), *self.randaugment, rng)
        return np.ascontiguousarray(crop.transpose(2, 0, 1))


def normalize(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 CHW images (a list or a (B,3,H,W) array) -> float32 (B,3,H,W), (x/255 - mean) / std.

    One fused scale-and-shift pass per plane (OpenCV), straight into the batch tensor.
    """
    n, (c, h, w) = len(images), images[0].shape
    out = np.empty((n, c, h, w), np.float32)
    alpha = [1.0 / (255.0 * s) for s in std]
    gamma = [-m / s for m, s in zip(mean, std)]
    for i, img in enumerate(images):
        for k in range(c):
            cv2.addWeighted(img[k], alpha[k], img[k], 0.0, gamma[k], dst=out[i, k], dtype=cv2.CV_32F)
    return torch.from_numpy(out)


class DeviceNormalize:
    """uint8 (B,3,H,W) images -> `dtype`, (x/255 - mean) / std, computed where the batch already is (the
    GPU after a non-blocking copy of the pinned uint8 batch: 4x fewer bytes over PCIe than float32, and
    no per-sample normalise on the loader's CPU cores). Float images pass through: they are taken to
    be normalised already (a loader of the user's own). The arithmetic runs in fp32 and is cast once."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        self.channels_last = channels_last  # conv towers: NHWC activations from the first layer on
        self.scale = [1.0 / (255.0 * s) for s in std]
        self.shift = [-m / s for m, s in zip(mean, std)]
        self._cached: dict = {}

    def __call__(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if images.dtype != torch.uint8:
            images = images.to(dtype)
            return images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.dim() == 4 else images
        key = images.device
        if key not in self._cached:
            self._cached[key] = (torch.tensor(self.scale, device=key).view(1, -1, 1, 1),
                                 torch.tensor(self.shift, device=key).view(1, -1, 1, 1))
        scale, shift = self._cached[key]
        out = torch.addcmul(shift, images.float(), scale).to(dtype)  # clips (B,K,3,H,W) broadcast alike
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last and out.dim() == 4 else out


def decode_on_device(batch: Dict[str, Any], device: torch.device, interpolation: str = "bilinear") -> Dict[str, Any]:
    """`data.decode=device`: the batch's JPEG bytes (`jpeg`, a list of uint8 tensors, with `jpeg_index` rows,
    `jpeg_box` (top, left, height, width) and `jpeg_flip`) decoded by `torchvision.io.decode_jpeg` on
    `device` (nvJPEG, batched, on CUDA; libjpeg on CPU), cropped, resized (antialiased) and flipped into the
    rows of the uint8 `image` batch, which stays uint8 for `DeviceNormalize`. Frees the loader's cores of the
    decode, the dominant per-sample cost. A JPEG the device decoder refuses is decoded by PIL on the host."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = batch.pop("jpeg")
    rows, boxes, flips = batch.pop("jpeg_index").tolist(), batch.pop("jpeg_box").tolist(), batch.pop("jpeg_flip").tolist()
    images = batch["image"].to(device, non_blocking=True)
    if not raw:
        batch["image"] = images
        return batch
    try:
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad or exotic file fails the batched call: each on its own, PIL for refusals
        decoded = []
        for r in raw:
            try:
                decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                with Image.open(io.BytesIO(r.numpy().tobytes())) as im:
                    decoded.append(torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()).to(device))
    size = images.shape[-1]
    mode = {"nearest": "nearest", "area": "area"}.get(interpolation, interpolation)
    for row, img, (top, left, h, w), flip in zip(rows, decoded, boxes, flips):
        crop = img[:, top:top + h, left:left + w].float()[None]
        if crop.shape[-2:] != (size, size):
            crop = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode,
                                                   antialias=mode in ("bilinear", "bicubic"),
                                                   **({"align_corners": False} if mode in ("bilinear", "bicubic") else {}))
        out = crop[0].round_().clamp_(0, 255).to(torch.uint8)
        images[row] = out.flip(-1) if flip else out
    batch["image"] = images
    return batch


def resolve_image_cfg(image_cfg: Optional[dict], data_cfg=None) -> dict:
    """Size/mean/std/interpolation: `data.image_size/mean/std` override the model's `image_cfg`."""
    image_cfg = dict(image_cfg or {})
    size = int(image_cfg.get("size") or 224)
    mean = tuple(image_cfg.get("mean") or CLIP_MEAN)
    std = tuple(image_cfg.get("std") or CLIP_STD)
    interpolation = image_cfg.get("interpolation") or "bicubic"
    if data_cfg is not None:
        size = int(data_cfg.image_size) or size
        mean = tuple(data_cfg.mean) or mean
        std = tuple(data_cfg.std) or std
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"
    return dict(size=size, mean=mean, std=std, interpolation=interpolation)


_TV_INTERP = {"nearest": tvt.InterpolationMode.NEAREST, "bilinear": tvt.InterpolationMode.BILINEAR,
              "bicubic": tvt.InterpolationMode.BICUBIC, "area": tvt.InterpolationMode.BOX,
              "box": tvt.InterpolationMode.BOX, "lanczos": tvt.InterpolationMode.LANCZOS}


def eval_transform(image_cfg: Dict[str, Any]) -> Callable:
    """PIL RGB image -> normalised float tensor (3, size, size)."""
    size = int(image_cfg["size"] if not isinstance(image_cfg["size"], (list, tuple)) else image_cfg["size"][-1])
    interp = str(image_cfg.get("interpolation", "bicubic")).lower()
    if interp not in _TV_INTERP:
        raise ValueError(f"image_cfg interpolation {interp!r} unknown; valid: {', '.join(_TV_INTERP)}")
    mode = image_cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        resize = [tvt.Resize(size, interpolation=_TV_INTERP[interp]), tvt.CenterCrop(size)]
    elif mode == "squash":
        resize = [tvt.Resize((size, size), interpolation=_TV_INTERP[interp])]
    else:
        raise ValueError(f"image_cfg resize_mode {mode!r} unsupported; valid: shortest, squash")
    return tvt.Compose(resize + [tvt.ToTensor(), tvt.Normalize(list(image_cfg["mean"]), list(image_cfg["std"]))])
