"""Training FLOPs per sample, for model-FLOPs utilisation (MFU), counted as the model runs.

One real training forward + backward of a 2-sample batch is run under torch's FlopCounterMode and
halved, so what is counted is what runs: a trainable layer costs forward + weight gradient + input
gradient (3x), a frozen layer inside a trainable tower (the frozen LLM block) forward + input gradient
(2x), a locked tower at the input forward only (1x), and the patch embedding no input gradient (2x).
EViT and BUS count the tokens each block really sees (eval mode: the target keep rate), and fusion
models their momentum passes, ITM pairs and MLM. The CPU flash-attention kernels, which the counter
does not know, are counted with its own attention formulas, and a convolution's backward as twice its
forward (torch's formula ignores groups: depthwise convolutions would count as dense ones). Not counted: the contrastive loss's
B x B matrix (B = 2 here), elementwise work and GradCache's second forward (model FLOPs, not
hardware FLOPs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """The input gradient and the weight gradient each cost the forward's multiply-adds. torch's own
    formula ignores `groups` in the weight gradient and counts a depthwise convolution (ConvNeXt's 7x7)
    as a dense one: ConvNeXt-atto's backward came out 7x its forward."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# torch counts the CUDA attention kernels but not the CPU ones: count them the same way
_EXTRA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
          torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
          torch.ops.aten.convolution_backward: _conv_backward}


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


def example_batch(model: nn.Module, n: int, image_size: int, context_length: int) -> dict:
    """The model's own example batch when it has one (fusion models need real token ids), else `n` zero
    images and full-length captions."""
    param = next(model.parameters())
    if callable(getattr(model, "example_batch", None)):
        return model.example_batch(n, image_size, context_length, param)
    ids = torch.ones(n, context_length, dtype=torch.long, device=param.device)
    return {"image": torch.zeros(n, 3, image_size, image_size, device=param.device, dtype=param.dtype),
            "text_ids": ids, "text_mask": torch.ones_like(ids)}


def flops_per_sample(model: nn.Module, image_size: Optional[int] = None,
                     context_length: Optional[int] = None) -> float:
    """FLOPs of one training sample: one counted forward + backward of a 2-sample batch, halved.

    Runs in eval mode (no dropout draws, all patches: patch dropout's saving is not counted, EViT at its
    target keep rate) and leaves the model as it was (see `_training_step_flops`). Pass the data's image
    size and tokenizer context length (defaults: the towers' own). Call it on the unwrapped model, before
    ZeRO-3 partitions the weights; with several ranks every rank must call it (the loss gathers).
    """
    image_size = image_size or model.image_cfg["size"]
    context_length = context_length or model.text_cfg["context_length"]
    was_training = model.training
    model.eval()
    try:
        return float(_training_step_flops(model, example_batch(model, 2, image_size, context_length))) / 2
    finally:
        model.train(was_training)
