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


def _training_step_flops(model: nn.Module, batch: dict) -> int:
    """FLOPs of one real training forward + backward on a batch, leaving the model as it was: run in eval
    mode (no dropout draws from the global RNG); buffers (queues, pointers, step counters), gradients,
    the global RNG state and ALBEF's micro-step counter restored afterwards."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    micro = getattr(model, "_micro", None)
    rng = torch.get_rng_state()
    try:
        with torch.enable_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
            model(batch)["loss"].backward()
        return counter.get_total_flops()
    finally:
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        if micro is not None:
            model._micro = micro
        torch.set_rng_state(rng)


def flops_per_sample(model: nn.Module, image_size: Optional[int] = None,
                     context_length: Optional[int] = None) -> float:
    """FLOPs of one training sample: 3x forward (forward + backward) for trainable towers, 1x for locked ones.

    Fusion models (ALBEF: they have `example_batch`) run much more than one pass of each tower per
    sample (momentum copies, the fusion encoder on positive and negative pairs, MLM): for them one real
    training forward + backward of the model's 2-sample example batch is counted and halved.

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
    if callable(getattr(model, "example_batch", None)):
        try:
            return float(_training_step_flops(model, model.example_batch(2, image_size, context_length, param))) / 2
        finally:
            model.train(was_training)
    try:
        with torch.enable_grad():  # torch's module tracker fails on parameter views made under no_grad
            vision = _count(model.encode_image, images)
            text = _count(model.encode_text, ids, mask)
    finally:
        model.train(was_training)
    return float((1 if locked.get("vision") else 3) * vision + (1 if locked.get("text") else 3) * text)
