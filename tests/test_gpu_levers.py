"""The GPU levers that can be checked on CPU (issue 18, item 3): attention through PyTorch's fused SDPA
kernels in every tower kind (not a hand-written softmax, not silently the math kernel), fp32 loss and
logits under a bf16 model, and a fused AdamW."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vlp.config import load_config
from vlp.models import build_model

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def _ops(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def _clip(text_kwargs):
    torch.manual_seed(0)
    return build_model(load_config(overrides=[
        "model.embed_dim=32", "!model.vision={kind: timm, name: vit_tiny_patch16_224, kwargs: %s}" % TINY_VIT,
        "!model.text={kind: open_clip, kwargs: %s}" % text_kwargs]).model)


def _batch(n=2, ctx=16):
    return {"image": torch.randn(n, 3, 32, 32), "text_ids": torch.randint(1, 100, (n, ctx)),
            "text_mask": torch.ones(n, ctx, dtype=torch.long)}


@pytest.mark.parametrize("text", ["causal", "bidirectional"])
def test_timm_and_open_clip_towers_attend_with_the_flash_kernel(text):
    kwargs = {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}
    if text == "bidirectional":
        kwargs.update(no_causal_mask=True, pool_type="last")
    model = _clip(kwargs)
    ops = _ops(lambda: model(_batch())["loss"].backward())
    assert ops.get("aten::scaled_dot_product_attention") == 4  # 2 ViT blocks + 2 text blocks, each through SDPA
    assert ops.get("aten::_scaled_dot_product_flash_attention_for_cpu") == 4
    assert "aten::_scaled_dot_product_attention_math" not in ops  # not the slow fallback


def test_transformers_text_towers_attend_through_sdpa():
    """HF towers load with attn_implementation='sdpa' (transformers' default where supported) and always pass
    a mask tensor, so on CPU PyTorch dispatches them to the math backend (its CPU flash kernel takes no
    mask); on CUDA the memory-efficient kernel takes masks. The entry point is SDPA, not an eager softmax
    attention; benchmarks/gpu.py reports the kernels a GPU actually runs."""
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                num_hidden_layers=2))
    assert bert.config._attn_implementation == "sdpa"
    ids = torch.randint(1, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 10:] = 0
    ops = _ops(lambda: bert(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward())
    assert ops.get("aten::scaled_dot_product_attention") == 2


def test_a_bf16_model_keeps_logits_and_loss_in_fp32():
    model = _clip({"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2})
    batch = _batch()
    ref = model(batch)["loss"]
    half = model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the module
    seen = {}
    real = half.compute_loss

    def spy(img, txt):  # the embeddings the loss (and its logits) are computed from
        seen["dtypes"] = (img.dtype, txt.dtype)
        return real(img, txt)
    out = half(dict(batch, image=batch["image"].to(torch.bfloat16)), loss_fn=spy)
    assert seen["dtypes"] == (torch.float32, torch.float32) and out["loss"].dtype == torch.float32
    assert abs(float(out["loss"]) - float(ref)) < 0.05 * abs(float(ref))


def test_adamw_is_the_fused_kernel():
    from vlp.train.engine import build_optimizer

    cfg = load_config(overrides=[])
    p = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([{"params": [p], "weight_decay": 0.0}], cfg.train, {}, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["fused"] is True


def test_channels_last_is_chosen_for_conv_towers_and_reaches_their_convolutions():
    from vlp.data.transforms import DeviceNormalize
    from vlp.train.engine import use_channels_last

    torch.manual_seed(0)
    conv = build_model(load_config(overrides=[
        "model.embed_dim=32", "!model.vision={kind: timm, name: convnext_atto}",
        "!model.text={kind: open_clip, kwargs: {context_length: 16, vocab_size: 100, width: 64, heads: 2, layers: 1}}"
    ]).model)
    vit = _clip({"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1})
    assert use_channels_last(conv, "auto") and not use_channels_last(vit, "auto")
    assert use_channels_last(vit, "true") and not use_channels_last(conv, "false")
    norm = DeviceNormalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)
    images = norm(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.float32)
    assert images.is_contiguous(memory_format=torch.channels_last)
    seen = []
    stem = [m for m in conv.vision.modules() if isinstance(m, torch.nn.Conv2d)][0]
    stem.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    batch = _batch()
    cl = conv(dict(batch, image=images))["loss"]  # weights as DeepSpeed keeps them: contiguous
    ref = conv(dict(batch, image=images.contiguous()))["loss"]
    assert seen == [True, False]  # the stem convolution computes in the layout of the images it is given
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
