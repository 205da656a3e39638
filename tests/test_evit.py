"""EViT token reorganization on timm ViTs: token counts, what is kept and fused, gradients, schedule."""
import math

import pytest
import torch

from vlp.config import ConfigError, load_config

TINY_TEXT = "model.text.kwargs={context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1, mlp_ratio: 2.0}"


def _model_cfg(vit_kwargs, *extra):
    return load_config(None, ["model.vision.name=vit_tiny_patch16_224", f"model.vision.kwargs={vit_kwargs}",
                              TINY_TEXT, "model.embed_dim=32", *extra]).model


def test_vit_b16_token_counts_at_224():
    """ViT-B/16's token grid (14x14 at 224 px, 12 blocks) at a tiny width: 196 -> 139 -> 99 -> 71 at 0.7."""
    from vlp.models import build_model
    from vlp.models.evit import EViTBlock, token_counts

    model = build_model(_model_cfg("{embed_dim: 32, depth: 12, num_heads: 2, mlp_ratio: 1.0}",
                                   "model.vision.evit.keep_rate=0.7"))
    vit = model.vision
    assert [i for i, b in enumerate(vit.blocks) if isinstance(b, EViTBlock)] == [3, 6, 9]
    counts = token_counts(vit, 224)  # patch tokens entering blocks 0..11, then the final norm
    assert counts == [196] * 4 + [139] * 3 + [99] * 3 + [71] * 3
    # the reference's rule: k = ceil(rate * n) kept, plus one fused token
    assert math.ceil(0.7 * 196) + 1 == 139 and math.ceil(0.7 * 139) + 1 == 99 and math.ceil(0.7 * 99) + 1 == 71
    assert set(model.state_dict()) >= {"vision.blocks.3.attn.qkv.weight", "vision.blocks.3.evit_step"}


def test_reorganize_keeps_cls_and_top_tokens_and_fuses_the_rest():
    from vlp.models.evit import reorganize

    torch.manual_seed(0)
    B, n, C = 3, 10, 4
    x = torch.randn(B, 1 + n, C)
    attn = torch.rand(B, n).softmax(-1)
    out, kept = reorganize(x, attn, 0.7)
    k = math.ceil(0.7 * n)
    assert out.shape == (B, 1 + k + 1, C) and kept.shape == (B, k)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # [CLS] first, unchanged
    for b in range(B):
        idx = kept[b].tolist()
        assert len(set(idx)) == k and all(0 <= i < n for i in idx)
        assert set(idx) == set(attn[b].argsort(descending=True)[:k].tolist())
        torch.testing.assert_close(out[b, 1:1 + k], x[b, 1:][kept[b]])
        dropped = [i for i in range(n) if i not in idx]
        fused = (x[b, 1:][dropped] * attn[b, dropped, None]).sum(0)
        torch.testing.assert_close(out[b, -1], fused)
    out2, kept2 = reorganize(x, attn, 0.7, fuse=False)
    assert out2.shape == (B, 1 + k, C) and torch.equal(kept2, kept)
    same, none = reorganize(x, attn, 0.95)  # ceil(9.5) = 10: everything kept
    assert none is None and same is x
    # register tokens stay with [CLS]
    out3, _ = reorganize(x, attn[:, 2:], 0.5, num_prefix=3)
    torch.testing.assert_close(out3[:, :3], x[:, :3])
    assert out3.shape[1] == 3 + math.ceil(0.5 * (n - 2)) + 1


def test_gradients_reach_dropped_tokens_and_attention_only_through_the_fused_token():
    from vlp.models.evit import reorganize

    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, requires_grad=True)
    attn = torch.rand(2, 8).softmax(-1).requires_grad_(True)
    out, kept = reorganize(x, attn, 0.5)
    out.sum().backward()
    dropped = torch.ones(2, 8, dtype=torch.bool).scatter(1, kept, False)
    gx = x.grad[:, 1:].abs().sum(-1)
    assert (gx > 0).all()  # kept tokens directly, dropped ones through the fused token
    assert (attn.grad[dropped] != 0).all() and (attn.grad[~dropped] == 0).all()  # top-k itself is not differentiable

    x.grad = None
    out, _ = reorganize(x, attn.detach(), 0.5, fuse=False)
    out.sum().backward()
    assert (x.grad[:, 1:].abs().sum(-1)[dropped] == 0).all()  # without fusion, dropped tokens are gone


def test_cls_attention_matches_timm_attention():
    """Same output as timm's Attention, and the [CLS] row of the explicit attention map, head-averaged."""
    from timm.layers import Attention

    from vlp.models.evit import attention_with_cls

    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 6, 16)
    out, cls = attention_with_cls(attn, x, num_prefix=1)
    torch.testing.assert_close(out, attn(x))
    q, k, _ = attn.qkv(x).reshape(2, 6, 3, 4, 4).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    torch.testing.assert_close(cls, probs[:, :, 0, 1:].mean(1))


def test_block_gradients_reach_qk_through_the_fusion_weights(monkeypatch):
    """The fused token's weights are attention probabilities: the loss reaches the qkv weights through
    them too (the reference doesn't detach them); detaching them changes the gradient."""
    from timm.models.vision_transformer import Block

    import vlp.models.evit as evit

    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    torch.manual_seed(1)
    blk = evit.EViTBlock(Block(16, 4, qkv_bias=True), keep_rate=0.5, num_prefix=1)
    blk(x).pow(2).sum().backward()
    with_weights = blk.attn.qkv.weight.grad.clone()

    real = evit.reorganize
    monkeypatch.setattr(evit, "reorganize", lambda x, a, *r, **kw: real(x, a.detach(), *r, **kw))
    blk.zero_grad()
    blk(x).pow(2).sum().backward()
    assert not torch.allclose(with_weights, blk.attn.qkv.weight.grad)


def test_keep_rate_schedule_follows_the_reference():
    from vlp.models.evit import keep_rate_at

    assert keep_rate_at(0, 0.7, 10, 100) == 1.0 and keep_rate_at(9, 0.7, 10, 100) == 1.0
    assert keep_rate_at(10, 0.7, 10, 100) == pytest.approx(1.0)
    assert keep_rate_at(60, 0.7, 10, 100) == pytest.approx(0.85)  # half-way down the half-cosine
    assert keep_rate_at(110, 0.7, 10, 100) == 0.7 and keep_rate_at(10_000, 0.7, 10, 100) == 0.7
    assert keep_rate_at(0, 0.7, 0, 0) == 0.7


def test_model_after_step_advances_the_warm_up():
    """Training starts at keep rate 1.0 (all tokens), shrinks with optimizer steps (the trainer calls
    `model.after_step()`); eval mode always uses the target rate."""
    from vlp.models import build_model

    model = build_model(_model_cfg("{img_size: 32, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
                                   "model.vision.evit.keep_rate=0.5", "model.vision.evit.blocks=[0]",
                                   "model.vision.evit.shrink_start=1", "model.vision.evit.shrink_steps=2"))
    seen = []
    model.vision.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1] - 1))
    images = torch.randn(2, 3, 32, 32)
    model.train()
    for _ in range(4):
        model.encode_image(images)
        model.after_step()
    model.eval()
    model.encode_image(images)
    # 64 patches: rate 1.0, 1.0 (start), 0.75 (cosine mid-way) -> 48 + 1, then 0.5 -> 32 + 1; eval 0.5
    assert seen == [64, 64, 49, 33, 33]
    assert int(model.state_dict()["vision.blocks.0.evit_step"]) == 4


def test_errors_name_the_key():
    from vlp.models import build_model

    vit = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"
    with pytest.raises(ConfigError, match=r"model.vision.evit.blocks.*2 blocks"):
        build_model(_model_cfg(vit, "model.vision.evit.keep_rate=0.7"))  # default [3, 6, 9]
    with pytest.raises(ConfigError, match="model.vision.evit.keep_rate"):
        build_model(_model_cfg(vit, "model.vision.evit.keep_rate=0.0", "model.vision.evit.blocks=[0]"))
    no_cls = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, class_token: false, global_pool: avg}"
    with pytest.raises(ConfigError, match="class token"):
        build_model(_model_cfg(no_cls, "model.vision.evit.keep_rate=0.7", "model.vision.evit.blocks=[0]"))
    with pytest.raises(ConfigError, match="model.text.evit.*timm"):
        build_model(_model_cfg(vit, "model.text.evit.keep_rate=0.7"))
