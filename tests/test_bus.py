"""BUS patch summarization: TSPS token counts and selection, PAD, PTM, gradients, eval paths, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, load_config

TINY_TEXT = "model.text.kwargs={context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1, mlp_ratio: 2.0}"


def _clip_cfg(vit_kwargs, *extra):
    return load_config(None, ["model.vision.name=vit_tiny_patch16_224", f"model.vision.kwargs={vit_kwargs}",
                              TINY_TEXT, "model.embed_dim=32", "model.bus.enabled=true", *extra]).model


def _tiny_clip(*extra, seed=0):
    from vlp.models import build_model

    torch.manual_seed(seed)
    return build_model(_clip_cfg("{img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2, mlp_ratio: 2.0}",
                                 "model.bus.blocks=[0,1]", *extra))


def _batch(n=4, seed=0, size=32, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, length), generator=g)
    return {"image": torch.randn(n, 3, size, size, generator=g), "text_ids": ids,
            "text_mask": torch.ones(n, length, dtype=torch.long)}


def _randomize_text_q(model, seed=1):
    from vlp.models.bus import tsps_blocks

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in tsps_blocks(model.vision):
            b.text_q.weight.copy_(torch.randn(b.text_q.weight.shape, generator=g))


def test_vit_b16_token_counts_at_224_with_trips_defaults():
    """ViT-B/16's grid (196 patches, 12 blocks) at a tiny width, selectors at blocks 4 and 9 keeping 0.7:
    196 -> 139 -> 99 patch tokens (ceil(0.7 n) kept + 1 fused), text-guided or not."""
    from vlp.models import build_model
    from vlp.models.bus import TSPSBlock, kept_counts, text_guidance
    from vlp.models.evit import token_counts

    model = build_model(_clip_cfg("{embed_dim: 32, depth: 12, num_heads: 2, mlp_ratio: 1.0}"))
    vit = model.vision
    assert [i for i, b in enumerate(vit.blocks) if isinstance(b, TSPSBlock)] == [4, 9]
    assert token_counts(vit, 224) == [196] * 5 + [139] * 5 + [99] * 2 + [99]  # blocks 0-11, then the final norm
    assert kept_counts(196, 0.7, 2) == [139, 99] and math.ceil(0.7 * 196) + 1 == 139
    seen = []
    hook = vit.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad(), text_guidance(vit, torch.randn(2, 32)):
        vit(torch.zeros(2, 3, 224, 224))
    hook.remove()
    assert seen == [1 + 99]  # [CLS] + patches, under a text too
    assert "vision.blocks.4.text_q.weight" in model.state_dict()


def _manual_scores(block, h, texts):
    """The selector's patch scores by hand from the block's weights: the mean of the [CLS] attention
    row (qkv's q/k rows, softmax over all tokens, mean over heads, patch columns) and the text
    relevance softmax_n <W_q t, W_k p_n> / sqrt(d)."""
    attn = block.attn
    D = h.shape[-1]
    H, hd = attn.num_heads, attn.head_dim
    wq, bq = attn.qkv.weight[:D], attn.qkv.bias[:D]
    wk, bk = attn.qkv.weight[D:2 * D], attn.qkv.bias[D:2 * D]
    q = (h[:, 0] @ wq.T + bq).reshape(-1, H, hd)
    k = (h @ wk.T + bk).reshape(h.shape[0], h.shape[1], H, hd)
    cls_attn = (torch.einsum("bhd,bnhd->bhn", q, k) * hd ** -0.5).softmax(-1).mean(1)[:, 1:]
    tq = texts @ block.text_q.weight.T
    pk = h[:, 1:] @ block.patch_k.weight.T
    rel = (torch.einsum("bd,bnd->bn", tq, pk) * tq.shape[-1] ** -0.5).softmax(-1)
    return 0.5 * (cls_attn + rel)


def test_selection_follows_text_scores_keeps_cls_and_fuses_the_rest(monkeypatch):
    import vlp.models.bus as bus
    from vlp.models.bus import text_guidance, tsps_blocks

    model = _tiny_clip()
    _randomize_text_q(model)
    block = tsps_blocks(model.vision)[0]
    seen = {}
    real = bus.reorganize

    def spy(x, scores, keep_rate, num_prefix, fuse):
        out, kept = real(x, scores, keep_rate, num_prefix, fuse)
        seen.update(x=x, scores=scores, out=out, kept=kept)
        return out, kept

    monkeypatch.setattr(bus, "reorganize", spy)
    torch.manual_seed(0)
    x = torch.randn(3, 17, 32)
    texts = torch.randn(3, 32)
    block.guide = texts
    with torch.no_grad():
        block(x)
    block.guide = None
    expected = _manual_scores(block, block.norm1(x), texts)
    torch.testing.assert_close(seen["scores"], expected, rtol=1e-4, atol=1e-6)
    k = math.ceil(0.7 * 16)
    out, kept = seen["out"], seen["kept"]
    assert out.shape == (3, 1 + k + 1, 32) and kept.shape == (3, k)
    torch.testing.assert_close(out[:, 0], seen["x"][:, 0])  # [CLS] first, unchanged
    for b in range(3):
        assert set(kept[b].tolist()) == set(expected[b].argsort(descending=True)[:k].tolist())
        assert all(0 <= i < 16 for i in kept[b].tolist())
        dropped = [i for i in range(16) if i not in kept[b].tolist()]
        fused = (seen["x"][b, 1:][dropped] * seen["scores"][b, dropped, None]).sum(0)
        torch.testing.assert_close(out[b, -1], fused)
    # a different text selects differently; no text is the text-agnostic [CLS] ranking (EViT's)
    block.guide = torch.randn(3, 32) * 5
    with torch.no_grad():
        block(x)
    assert not torch.equal(seen["kept"], kept)
    block.guide = None
    with torch.no_grad(), text_guidance(model.vision, None):
        block(x)
    from vlp.models.evit import attention_with_cls

    _, cls_attn = attention_with_cls(block.attn, block.norm1(x), 1)
    torch.testing.assert_close(seen["scores"], 0.5 * (cls_attn + 1.0 / 16))  # uniform relevance: EViT's ranking


def test_ptm_grid_diagonal_is_the_paired_selection():
    """In a PTM forward every image is scored under every text; image i under text i is what selects."""
    from vlp.models.bus import text_guidance

    model = _tiny_clip()
    _randomize_text_q(model)
    batch = _batch(4)
    texts = torch.randn(4, 32)
    with torch.no_grad():
        with text_guidance(model.vision, texts):
            plain = model.vision(batch["image"])
        with text_guidance(model.vision, texts, ptm=True):
            grid = model.vision(batch["image"])
        pooled = model.vision.blocks[1].ptm_pooled  # the second selector
    torch.testing.assert_close(grid, plain, rtol=1e-5, atol=1e-6)
    assert pooled.shape == (4, 4, 32)


def test_ptm_loss_is_symmetric_infonce_over_pooled_pairs():
    from vlp.models.bus import ptm_loss, text_guidance, tsps_blocks

    model = _tiny_clip()
    _randomize_text_q(model)
    batch = _batch(4)
    with torch.no_grad():
        texts = model._text_features(batch["text_ids"], batch["text_mask"])
        t = F.normalize(model.text_proj(texts), dim=-1)
        with text_guidance(model.vision, texts, ptm=True):
            model.vision(batch["image"])
        pooled = [b.ptm_pooled for b in tsps_blocks(model.vision)]
        got = ptm_loss(model.vision, model.ptm_proj, t, torch.tensor([0.07]))
    expected = []
    for p in pooled:
        logits = torch.einsum("ije,je->ij", F.normalize(model.ptm_proj(p), dim=-1), t) / 0.07
        y = torch.arange(4)
        expected.append((F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2)
    torch.testing.assert_close(got, torch.stack(expected).mean())
    with pytest.raises(RuntimeError, match="ptm=True"):  # consumed: a second call has nothing to read
        ptm_loss(model.vision, model.ptm_proj, t, torch.tensor([0.07]))


def test_gradients_reach_the_selector_through_fusion_and_ptm_only():
    """The top-k choice is discrete: the selector's text projection learns through the fused token's
    score weights and through PTM; with neither (fuse off, PTM off) it gets no gradient."""
    from vlp.models.bus import tsps_blocks

    def grads(*extra):
        model = _tiny_clip(*extra)
        _randomize_text_q(model)
        model(_batch(4))["loss"].backward()
        return [b.text_q.weight.grad for b in tsps_blocks(model.vision)]

    assert all(g is not None and g.abs().sum() > 0 for g in grads("model.bus.ptm_weight=0"))  # via fusion
    assert all(g is not None and g.abs().sum() > 0 for g in grads("model.bus.fuse=false"))  # via PTM
    assert all(g is None or g.abs().sum() == 0 for g in grads("model.bus.fuse=false", "model.bus.ptm_weight=0"))


def test_dual_encoder_logs_ptm_and_encodes_images_without_text():
    model = _tiny_clip()
    _randomize_text_q(model)
    batch = _batch(4)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["ptm_loss"] > 0
    torch.testing.assert_close(out["loss"].detach(), out["contrastive_loss"] + out["ptm_loss"])
    model.eval()
    with torch.no_grad():
        a = model.encode_image(batch["image"])
        b = model.encode_image(batch["image"][:2])  # batch-independent: no text involved
    torch.testing.assert_close(a[:2], b, rtol=1e-5, atol=1e-6)


def _tiny_albef(tmp_path, synth_train, *extra):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
    from albef_tiny import write_tiny_albef, write_vocab
    from vlp.models import build_model

    vocab = write_vocab(synth_train, str(tmp_path / "bert"))
    yaml = write_tiny_albef(str(tmp_path / "tiny.yaml"), vocab)
    cfg = load_config(yaml, ["model.albef.queue_size=8", "model.bus.enabled=true", "model.bus.blocks=[0]",
                             "model.bus.pad_queries=3", "model.bus.pad_layers=1", *extra])
    torch.manual_seed(0)
    return build_model(cfg.model)


def test_albef_with_pad_feeds_the_fusion_encoder_cls_plus_summaries(tmp_path, synth_train):
    from vlp.models.bus import PatchAbstractionDecoder, tsps_blocks

    model = _tiny_albef(tmp_path, synth_train)
    assert isinstance(model.pad, PatchAbstractionDecoder) and "pad" in model.momentum_models
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (4, 16), generator=g)
    ids[:, 0] = 2
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "text_ids": ids,
             "text_mask": torch.ones(4, 16, dtype=torch.long)}
    seen = []
    hook = model.fusion.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[2].shape)))
    out = model(batch)
    hook.remove()
    assert seen and all(s[1] == 1 + 3 for s in seen)  # [CLS] + 3 summaries, not 1 + 16 patches
    assert out["ptm_loss"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.pad.queries.grad.abs().sum() > 0
    assert all(b.text_q.weight.grad.abs().sum() > 0 for b in tsps_blocks(model.vision))
    model.after_step()  # the momentum PAD follows the online one
    torch.testing.assert_close(model.momentum_models["pad"].queries, model.pad.queries)  # no step taken yet

    # the PAD keeps the ViT's [CLS] as the first token: ITC features are the ViT's own
    tokens = model._image(batch["image"])
    with torch.no_grad():
        raw = model.vision(batch["image"])
    torch.testing.assert_close(tokens[:, 0], raw[:, 0])
    # ITM re-ranking selects patches under the candidate text; ITC embeddings use no text
    _randomize_text_q(model)
    model.eval()
    with torch.no_grad():
        s1 = model.match_scores(batch["image"], ids, batch["text_mask"])
        ids2 = ids.clone()
        ids2[:, 1:] = ids[:, 1:].roll(1, 0)
        s2 = model.match_scores(batch["image"], ids2, batch["text_mask"])
        with torch.no_grad():
            t1 = model._text_feature(model._text(ids, batch["text_mask"]), batch["text_mask"])
            t2 = model._text_feature(model._text(ids2, batch["text_mask"]), batch["text_mask"])
        assert not torch.allclose(model._image(batch["image"], texts=t1), model._image(batch["image"], texts=t2))
        e1, e2 = model.encode_image(batch["image"]), model.encode_image(batch["image"][:2])
    assert s1.shape == s2.shape == (4,)
    torch.testing.assert_close(e1[:2], e2, rtol=1e-5, atol=1e-6)


def test_errors_name_the_key(tmp_path):
    from vlp.export.sides import check_dual_encoder
    from vlp.export.transformer_ir import Unsupported
    from vlp.models import build_model

    vit = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}"
    with pytest.raises(ConfigError, match=r"model\.bus\.pad_queries=4.*fusion encoder"):
        build_model(_clip_cfg(vit, "model.bus.blocks=[1]", "model.bus.pad_queries=4"))
    with pytest.raises(ConfigError, match=r"model\.bus\.blocks.*3 blocks"):
        build_model(_clip_cfg(vit, "model.bus.blocks=[5]"))
    with pytest.raises(ConfigError, match=r"model\.bus\.keep_rate"):
        build_model(_clip_cfg(vit, "model.bus.blocks=[1]", "model.bus.keep_rate=0"))
    with pytest.raises(ConfigError, match=r"model\.vision\.evit"):
        build_model(_clip_cfg(vit, "model.bus.blocks=[1]", "model.vision.evit.keep_rate=0.7"))
    with pytest.raises(ConfigError, match=r"model\.vision\.locked"):
        build_model(_clip_cfg(vit, "model.bus.blocks=[1]", "model.vision.locked=true"))
    with pytest.raises(Unsupported, match=r"model\.bus.*--format vlp"):
        check_dual_encoder(_tiny_clip())
    from vlp.train.grad_cache import check_model

    with pytest.raises(ConfigError, match=r"train\.grad_cache.*model\.bus\.enabled"):
        check_model(_tiny_clip())


def test_albef_flops_count_a_real_training_step_and_leave_the_model_untouched(tmp_path, synth_train):
    """ALBEF's FLOPs per sample come from one counted forward + backward (momentum passes, ITM pairs,
    MLM); counting changes no buffer, gradient, step counter or global RNG draw. BUS's selectors and
    PAD make the counted step cheaper than plain ALBEF's at the same towers."""
    from vlp.models.flops import _count, flops_per_sample

    bus = _tiny_albef(tmp_path, synth_train, "model.bus.pad_queries=2")
    plain = _tiny_albef(tmp_path, synth_train, "model.bus.enabled=false")
    for model in (bus, plain):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        flops = flops_per_sample(model, 32, 16)
        assert torch.equal(torch.get_rng_state(), rng) and model.training and model._micro == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
        with torch.enable_grad():
            towers = _count(model.eval().encode_image, torch.zeros(1, 3, 32, 32)) + \
                _count(model.encode_text, torch.full((1, 16), 5), torch.ones(1, 16, dtype=torch.long))
        model.train()
        assert flops > 3 * towers  # more than forward + backward of the two encoders alone
    assert flops_per_sample(bus, 32, 16) < flops_per_sample(plain, 32, 16)


def test_ptm_trains_the_relevance_head_only():
    """PTM's gradient reaches the selector's text-relevance head and PTM projection, never the ViT's own
    weights (the block's q/k are shared with its attention) nor the text tower."""
    from vlp.models.bus import ptm_loss, text_guidance

    model = _tiny_clip()
    _randomize_text_q(model)
    batch = _batch(4)
    texts = model._text_features(batch["text_ids"], batch["text_mask"])
    t = F.normalize(model.text_proj(texts), dim=-1)
    with text_guidance(model.vision, texts, ptm=True):
        model.vision(batch["image"])
    ptm_loss(model.vision, model.ptm_proj, t, torch.tensor([0.07])).backward()
    head = {n for n, _ in model.named_parameters() if ".text_q." in n or ".patch_k." in n or n.startswith("ptm_proj.")}
    assert len(head) == 6  # 2 selectors x (text_q, patch_k) + ptm_proj weight and bias
    for name, p in model.named_parameters():
        if name in head:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, name
