"""Training FLOPs per sample, for model-FLOPs utilisation (MFU)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU one: count it the same way
_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}


def _count(fn, *args) -> int:
    with FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
        fn(*args)
    return counter.get_total_flops()


def flops_per_sample(model: nn.Module, image_size: Optional[int] = None,
                     context_length: Optional[int] = None) -> float:
    """FLOPs of one training sample: 3x forward (forward + backward) for trainable towers, 1x for locked ones.

    Counts the matmul/conv/attention FLOPs torch's FlopCounterMode sees in one forward of one sample,
    in eval mode (all patches: patch dropout's saving is not counted; nor is the loss's B x B matrix).
    Pass the data's image size and tokenizer context length (defaults: the towers' own, 512 for
    BERT). Call it on the unwrapped model, before ZeRO-3 partitions the weights.
    """
    image_size = image_size or model.image_cfg["size"]
    context_length = context_length or model.text_cfg["context_length"]
    param = next(model.parameters())
    images = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    ids = torch.zeros(1, context_length, dtype=torch.long, device=param.device)
    mask = torch.ones_like(ids)
    locked = getattr(model, "locked", {})
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # torch's module tracker fails on parameter views made under no_grad
            vision = _count(model.encode_image, images)
            text = _count(model.encode_text, ids, mask)
    finally:
        model.train(was_training)
    return float((1 if locked.get("vision") else 3) * vision + (1 if locked.get("text") else 3) * text)
