"""Raw sample -> (uint8 image, caption) or the reason it is skipped; decoded samples -> a batch."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vlp.data.transforms import ImageTransform
from vlp.data.video import TooShortVideo

# every reason a sample (or shard part) is skipped, in training and in evaluation; training stats report
# all of them, zeros included
SKIP_REASONS = ("unreadable_image", "missing_image", "missing_caption", "bad_text",
                "truncated_tar", "read_error", "short_shard", "unreadable_video", "too_short_video")
# and the two only zero-shot classification has (a sample's label in its json metadata)
LABEL_SKIP_REASONS = ("missing_label", "bad_json")


def image_keys(spec: str) -> List[str]:
    """`jpg;jpeg;png;webp` -> ['jpg', 'jpeg', 'png', 'webp'] (first present wins)."""
    return [k.strip().lower() for k in spec.split(";") if k.strip()]


def _caption(sample: Dict, caption_key: str) -> str:
    """The raw caption, or (prefixed with '!') the reason there is none."""
    raw = sample.get(caption_key)
    if raw is None:
        return "!missing_caption"
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError:
        return "!bad_text"
    return text if text.strip() else "!missing_caption"


def decode_sample(sample: Dict, img_keys: Sequence[str], caption_key: str, transform: ImageTransform,
                  rng: Optional[np.random.Generator], defer: bool = False) -> Union[str, Tuple[Any, str]]:
    """(CHW uint8 image, raw caption) or a skip reason. The caption is checked first: it is cheap. `defer`
    (`data.decode=device`): a JPEG comes back as (its bytes, crop box, flip), drawn as the decode would draw
    them, to be decoded where the model runs (`vlp.data.transforms.decode_on_device`)."""
    text = _caption(sample, caption_key)
    if text.startswith("!"):
        return text[1:]
    data = next((sample[k] for k in img_keys if k in sample), None)
    if data is None:
        return "missing_image"
    plan = transform.plan(data, rng) if defer else None
    if plan is not None:
        return (bytes(data), plan[0], plan[1]), text
    try:
        return transform(data, rng), text
    except Exception:  # any decoder failure: corrupt or unsupported bytes
        return "unreadable_image"


def decode_clip_sample(sample: Dict, video_keys: Sequence[str], img_keys: Sequence[str], caption_key: str,
                       video_transform, transform: ImageTransform,
                       rng: Optional[np.random.Generator]) -> Union[str, Tuple[np.ndarray, int, str]]:
    """For video models: ((K,3,H,W) uint8 clip, real frames, raw caption) or a skip reason. A video field
    gives K frames (`vlp.data.video.VideoTransform`); an image gives a 1-frame clip, zero-padded to K (the
    model reads the padded frames as absent). video2dataset writes failed downloads without a video: an
    image-less, video-less sample is `missing_image`."""
    text = _caption(sample, caption_key)
    if text.startswith("!"):
        return text[1:]
    k = video_transform.frames
    data = next((sample[key] for key in video_keys if key in sample), None)
    if data is not None:
        try:
            return video_transform(data, rng), k, text
        except TooShortVideo:
            return "too_short_video"
        except Exception:  # any decoder failure: corrupt or unsupported container/codec
            return "unreadable_video"
    out = decode_sample(sample, img_keys, caption_key, transform, rng)
    if isinstance(out, str):
        return out
    clip = np.zeros((k,) + out[0].shape, np.uint8)
    clip[0] = out[0]
    return clip, 1, text


def pick_caption(text: str, rng: Optional[np.random.Generator]) -> str:
    """One caption from a field holding one per line: a random one in training, else the first."""
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    if len(lines) > 1 and rng is not None:
        return lines[int(rng.integers(len(lines)))]
    return lines[0]


def collate(images: List[Any], captions: List[str], keys: List[str], tokenizer,
            frames: Optional[List[int]] = None, size: int = 0) -> Dict:
    """The training batch dict: uint8 (B,3,H,W) images, tokenised captions (one call), keys. Images are
    normalised where the model runs (`vlp.data.transforms.DeviceNormalize`, by the trainer). With `frames`
    (video models) the images are (K,3,H,W) clips: `video` (B,K,3,H,W) and `video_frames` (B,) instead."""
    import torch

    ids, mask = tokenizer(captions)
    batch = {"text_ids": ids, "text_mask": mask, "key": list(keys)}
    if frames is None and size:  # data.decode=device: JPEGs travel as bytes with their crop and flip
        jpeg = [i for i, im in enumerate(images) if isinstance(im, tuple)]
        stack = np.zeros((len(images), 3, size, size), np.uint8)
        for i, im in enumerate(images):
            if not isinstance(im, tuple):
                stack[i] = im
        batch.update(image=torch.from_numpy(stack), jpeg_index=torch.tensor(jpeg, dtype=torch.long),
                     jpeg=[torch.frombuffer(bytearray(images[i][0]), dtype=torch.uint8) for i in jpeg],
                     jpeg_box=torch.tensor([images[i][1] for i in jpeg], dtype=torch.long).reshape(-1, 4),
                     jpeg_flip=torch.tensor([images[i][2] for i in jpeg], dtype=torch.bool))
    elif frames is None:
        batch["image"] = torch.from_numpy(np.stack(images))
    else:
        batch["video"] = torch.from_numpy(np.stack(images))
        batch["video_frames"] = torch.tensor(frames, dtype=torch.long)
    return batch
