"""Raw sample -> (uint8 image, caption) or the reason it is skipped; decoded samples -> a batch."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vlp.data.transforms import ImageTransform

# every reason a sample (or shard part) is skipped, in training and in evaluation; training stats report
# all of them, zeros included
SKIP_REASONS = ("unreadable_image", "missing_image", "missing_caption", "bad_text",
                "truncated_tar", "read_error", "short_shard")
# and the two only zero-shot classification has (a sample's label in its json metadata)
LABEL_SKIP_REASONS = ("missing_label", "bad_json")


def image_keys(spec: str) -> List[str]:
    """`jpg;jpeg;png;webp` -> ['jpg', 'jpeg', 'png', 'webp'] (first present wins)."""
    return [k.strip().lower() for k in spec.split(";") if k.strip()]


def decode_sample(sample: Dict, img_keys: Sequence[str], caption_key: str, transform: ImageTransform,
                  rng: Optional[np.random.Generator]) -> Union[str, Tuple[np.ndarray, str]]:
    """(CHW uint8 image, raw caption) or a skip reason. The caption is checked first: it is cheap."""
    raw = sample.get(caption_key)
    if raw is None:
        return "missing_caption"
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError:
        return "bad_text"
    if not text.strip():
        return "missing_caption"
    data = next((sample[k] for k in img_keys if k in sample), None)
    if data is None:
        return "missing_image"
    try:
        return transform(data, rng), text
    except Exception:  # any decoder failure: corrupt or unsupported bytes
        return "unreadable_image"


def pick_caption(text: str, rng: Optional[np.random.Generator]) -> str:
    """One caption from a field holding one per line: a random one in training, else the first."""
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    if len(lines) > 1 and rng is not None:
        return lines[int(rng.integers(len(lines)))]
    return lines[0]


def collate(images: List[np.ndarray], captions: List[str], keys: List[str], tokenizer) -> Dict:
    """The training batch dict: uint8 (B,3,H,W) images, tokenised captions (one call), keys. Images are
    normalised where the model runs (`vlp.data.transforms.DeviceNormalize`, by the trainer)."""
    import torch

    ids, mask = tokenizer(captions)
    return {"image": torch.from_numpy(np.stack(images)), "text_ids": ids, "text_mask": mask, "key": list(keys)}
