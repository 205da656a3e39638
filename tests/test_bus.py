"""BUS patch summarization in ALBEF: text-agnostic selection in the ViT, the per-pair text-aware selector,
PAD, PTM, gradients, and that training never sees what evaluation does not have (ITC, MLM, ITM)."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.dist.albef_tiny import write_tiny_albef, write_vocab
from vlp.config import ConfigError, load_config


def _cfg(tmp_path, synth_train, *extra):
    vocab = write_vocab(synth_train, str(tmp_path / "bert"))
    yaml = write_tiny_albef(str(tmp_path / "tiny.yaml"), vocab)
    return load_config(yaml, ["model.albef.queue_size=8", "model.text.pool=mean", "model.bus.enabled=true",
                              "model.bus.blocks=[0]", "model.bus.pad_queries=3", "model.bus.pad_layers=1", *extra])


def _tiny_albef(tmp_path, synth_train, *extra):
    """ViT of 1 block at 32 px, patch 8: 16 patches -> 13 after the block's text-agnostic selection ->
    ceil(0.7 * 13) = 10 + 1 fused per pair -> PAD [CLS] + 3 summaries."""
    from vlp.models import build_model

    torch.manual_seed(0)
    return build_model(_cfg(tmp_path, synth_train, *extra).model)


def _batch(n=4, seed=0, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n, length), generator=g)  # 0-4: [PAD] [UNK] [CLS] [SEP] [MASK]
    ids[:, 0], ids[:, -1] = 2, 3
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text_ids": ids,
            "text_mask": torch.ones(n, length, dtype=torch.long)}


def _sharpen_selector(model, seed=1):
    """A relevance head whose choice clearly depends on the caption (trained heads get there; a fresh
    one over a random text tower barely tells captions apart)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sel in (model.selector, model.momentum_models["selector"]):
            sel.text_q.weight.copy_(4 * torch.randn(sel.text_q.weight.shape, generator=g))


class _Calls:
    """The (text, mask, image tokens) arguments of every call of a fusion encoder."""

    def __init__(self, module):
        self.calls = []
        self._hook = module.register_forward_pre_hook(lambda m, a: self.calls.append([x.detach().clone() for x in a]))

    def remove(self):
        self._hook.remove()


def test_vit_b16_token_counts_at_224_with_the_default_in_vit_selection():
    """ViT-B/16's grid (196 patches, 12 blocks) at a tiny width, BUS's default in-ViT selection at blocks
    3, 6 and 9 keeping 0.7 (text-agnostic: EViT blocks): 196 -> 139 -> 99 -> 71 patch tokens
    (ceil(0.7 n) + 1 fused), EViT's own counts."""
    import timm

    from vlp.models.bus import add_vit_selectors, kept_counts
    from vlp.models.evit import EViTBlock, token_counts

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=12, num_heads=2,
                            mlp_ratio=1.0, global_pool="")
    add_vit_selectors(vit, load_config(None, ["model.bus.enabled=true"]).model.bus)
    assert [i for i, b in enumerate(vit.blocks) if isinstance(b, EViTBlock)] == [3, 6, 9]
    assert token_counts(vit, 224) == [196] * 4 + [139] * 3 + [99] * 3 + [71] * 2 + [71]  # blocks 0-11, final norm
    assert kept_counts(196, 0.7, 3) == [139, 99, 71] and math.ceil(0.7 * 196) + 1 == 139


def test_selector_keeps_the_most_relevant_patches_and_fuses_the_rest():
    from vlp.models.bus import TextPatchSelector

    torch.manual_seed(0)
    sel = TextPatchSelector(dim=32, text_dim=24, head_dim=16, keep_rate=0.7, num_prefix=1)
    tokens, texts = torch.randn(3, 1 + 13, 32), torch.randn(3, 24)
    with torch.no_grad():
        out = sel(tokens, texts)
        q, k = texts @ sel.text_q.weight.T, tokens[:, 1:] @ sel.patch_k.weight.T
        rel = (torch.einsum("bd,bnd->bn", q, k) / 4).softmax(-1)  # softmax_n <W_q t, W_k p_n> / sqrt(16)
    kept = math.ceil(0.7 * 13)
    assert out.shape == (3, 1 + kept + 1, 32)
    torch.testing.assert_close(out[:, 0], tokens[:, 0])  # [CLS] first, unchanged
    for b in range(3):
        top = rel[b].argsort(descending=True)[:kept]
        torch.testing.assert_close(out[b, 1:1 + kept], tokens[b, 1:][top])  # the most relevant, in order
        dropped = [i for i in range(13) if i not in top.tolist()]
        torch.testing.assert_close(out[b, -1], (tokens[b, 1:][dropped] * rel[b, dropped, None]).sum(0))
    with torch.no_grad():
        other = sel(tokens, 5 * torch.randn(3, 24))
    assert not torch.equal(other, out)  # another text keeps other patches
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        sel(tokens, texts[:2])


def test_itc_image_features_in_training_are_encode_images(tmp_path, synth_train):
    """The image embedding ITC trains on is computed exactly as evaluation computes it (encode_image),
    whatever the captions of the batch."""
    model = _tiny_albef(tmp_path, synth_train)
    _sharpen_selector(model)
    batch = _batch()
    seen = []
    hook = model.vision_proj.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    model(batch)
    other = dict(batch, text_ids=_batch(seed=5)["text_ids"])
    model._micro = 0
    model(other)
    hook.remove()
    assert len(seen) == 2
    model.eval()
    with torch.no_grad():
        expected = model.encode_image(batch["image"])
    for feats in seen:
        torch.testing.assert_close(F.normalize(feats.float(), dim=-1), expected, rtol=1e-5, atol=1e-6)


def test_mlm_image_tokens_see_only_the_masked_caption(tmp_path, synth_train):
    """Changing the words MLM hides changes nothing the MLM (or its momentum teacher) reads from the
    image, while the ITM positive pair, selected under the full caption, does change: the masked words
    cannot be read back through the image tokens."""
    model = _tiny_albef(tmp_path, synth_train, "model.albef.alpha_warmup_steps=0", "model.albef.mlm_prob=0.5")
    _sharpen_selector(model)
    batch = _batch()

    def run(b):
        ids_seen = []
        hook = model.text.model.embeddings.word_embeddings.register_forward_pre_hook(
            lambda m, a: ids_seen.append(a[0].clone()))
        online, teacher = _Calls(model.fusion), _Calls(model.momentum_models["fusion"])
        model._micro = 0  # the same MLM masks and ITM draws
        model(b)
        hook.remove(), online.remove(), teacher.remove()
        itm = next(c for c in online.calls if c[0].shape[0] == 3 * 4)
        mlm = next(c for c in online.calls if c[0].shape[0] == 4)
        assert len(teacher.calls) == 1
        return ids_seen[1], itm, mlm, teacher.calls[0]  # online text encoder: the caption, then the masked one

    masked, itm, mlm, teacher = run(batch)
    hidden = masked != batch["text_ids"]  # [MASK] or a random word: what MLM has to predict from elsewhere
    assert hidden.any()
    ids2 = batch["text_ids"].clone()
    ids2[hidden] = 5 + (ids2[hidden] - 5 + 7) % 35
    masked2, itm2, mlm2, teacher2 = run(dict(batch, text_ids=ids2))
    assert torch.equal(masked2, masked)  # the MLM input is the same masked caption
    torch.testing.assert_close(mlm2[2], mlm[2])  # so are the image tokens MLM reads
    torch.testing.assert_close(teacher2[2], teacher[2])  # and those of the momentum teacher
    assert not torch.allclose(itm2[2][:4], itm[2][:4])  # the positive ITM pairs see the full caption


def test_every_itm_pair_is_selected_under_its_own_caption_as_match_scores_does(tmp_path, synth_train):
    """Each of the 3B ITM pairs of a training step (positive, negative image, negative text) reads the
    image tokens `match_scores` builds at re-ranking for the same (image, text)."""
    model = _tiny_albef(tmp_path, synth_train)
    _sharpen_selector(model)
    batch = _batch()
    calls = _Calls(model.fusion)
    model(batch)
    calls.remove()
    text, _, image = next(c for c in calls.calls if c[0].shape[0] == 3 * 4)
    model.eval()
    with torch.no_grad():
        hidden = model._text(batch["text_ids"], batch["text_mask"])
        rows_t = [int((hidden - t).flatten(1).abs().amax(1).argmin()) for t in text]  # each row's caption
        j, t = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)  # every (image j, text t)
        evals = _Calls(model.fusion)
        model.match_scores(batch["image"][j], batch["text_ids"][t], batch["text_mask"][t])
        evals.remove()
    cand = evals.calls[0][2].reshape(4, 4, *image.shape[1:])  # [image j, text t]
    pairs = []
    for r in range(image.shape[0]):
        hits = [jj for jj in range(4) if torch.allclose(image[r], cand[jj, rows_t[r]], rtol=1e-4, atol=1e-5)]
        assert len(hits) == 1, (r, hits)
        pairs.append((hits[0], rows_t[r]))
    assert sum(i == k for i, k in pairs) == 4 and sum(i != k for i, k in pairs) == 8  # B positives, 2B negatives
    assert pairs[:4] == [(i, i) for i in range(4)]


def test_ptm_loss_is_symmetric_infonce_over_pooled_pairs_and_trains_the_head_only(tmp_path, synth_train):
    from vlp.models.bus import ptm_loss

    model = _tiny_albef(tmp_path, synth_train)
    batch = _batch()
    texts = model._text_feature(model._text(batch["text_ids"], batch["text_mask"]), batch["text_mask"])
    t = F.normalize(model.text_proj(texts), dim=-1)
    tokens = model._image(batch["image"])
    got = ptm_loss(model.selector, model.ptm_proj, tokens, texts, t, torch.tensor([0.07]))
    with torch.no_grad():
        patches = tokens[:, 1:]
        rel = model.selector.relevance(texts, patches, pairs=True)  # (image, text, patch)
        pooled = torch.einsum("ijn,ind->ijd", rel, patches)
        logits = torch.einsum("ije,je->ij", F.normalize(model.ptm_proj(pooled), dim=-1), t) / 0.07
        y = torch.arange(4)
        expected = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
    torch.testing.assert_close(got.detach(), expected)
    got.backward()
    head = {"selector.text_q.weight", "selector.patch_k.weight", "ptm_proj.weight", "ptm_proj.bias"}
    for name, p in model.named_parameters():
        if name in head:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # neither the ViT nor the text tower
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_gradients_reach_the_selector_through_the_fused_token_and_ptm_only(tmp_path, synth_train):
    """Top-k is discrete: the relevance head learns through the fused token's weights and through PTM;
    with neither (fuse off, PTM off) it gets no gradient."""
    def grads(*extra):
        model = _tiny_albef(tmp_path, synth_train, *extra)
        model(_batch())["loss"].backward()
        return model.selector.text_q.weight.grad

    def nonzero(g):
        return g is not None and g.abs().sum() > 0

    assert nonzero(grads("model.bus.ptm_weight=0"))  # via the fused token
    assert nonzero(grads("model.bus.fuse=false"))  # via PTM
    assert not nonzero(grads("model.bus.fuse=false", "model.bus.ptm_weight=0"))


def test_albef_with_pad_feeds_the_fusion_encoder_cls_plus_summaries(tmp_path, synth_train):
    from vlp.models.bus import PatchAbstractionDecoder, TextPatchSelector

    model = _tiny_albef(tmp_path, synth_train)
    assert isinstance(model.pad, PatchAbstractionDecoder) and isinstance(model.selector, TextPatchSelector)
    assert {"pad", "selector"} <= set(model.momentum_models)
    batch = _batch()
    calls = _Calls(model.fusion)
    out = model(batch)
    calls.remove()
    assert [c[2].shape for c in calls.calls] == [(12, 1 + 3, 32), (4, 1 + 3, 32)]  # ITM 3B pairs, MLM B
    assert out["ptm_loss"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.pad.queries.grad.abs().sum() > 0 and model.selector.text_q.weight.grad.abs().sum() > 0
    model.after_step()  # the momentum PAD follows the online one
    torch.testing.assert_close(model.momentum_models["pad"].queries, model.pad.queries)  # no step taken yet

    model.eval()
    with torch.no_grad():
        tokens = model._image(batch["image"])
        assert tokens.shape == (4, 1 + 13, 32)  # 16 patches, one block keeping ceil(0.7 * 16) + 1 fused
        # the PAD keeps the ViT's [CLS] first
        pair = model._pair_tokens(tokens, torch.randn(4, 32))
        torch.testing.assert_close(pair[:, 0], tokens[:, 0])
        # ITM re-ranking selects patches under the candidate text; ITC embeddings use no text and do not
        # depend on the rest of the batch
        _sharpen_selector(model)
        ids2 = batch["text_ids"].clone()
        ids2[:, 1:-1] = ids2[:, 1:-1].roll(1, 0)
        s1 = model.match_scores(batch["image"], batch["text_ids"], batch["text_mask"])
        s2 = model.match_scores(batch["image"], ids2, batch["text_mask"])
        e1, e2 = model.encode_image(batch["image"]), model.encode_image(batch["image"][:2])
    assert s1.shape == s2.shape == (4,) and not torch.allclose(s1, s2)
    torch.testing.assert_close(e1[:2], e2, rtol=1e-5, atol=1e-6)


def test_errors_name_the_key(tmp_path, synth_train):
    from vlp.models import build_model

    clip = ["model.vision.name=vit_tiny_patch16_224",
            "model.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}",
            "model.text.kwargs={context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1, mlp_ratio: 2.0}",
            "model.embed_dim=32", "model.bus.enabled=true"]
    with pytest.raises(ConfigError, match=r"model\.type=clip.*model\.vision\.evit"):
        build_model(load_config(None, clip).model)
    for extra, pattern in ((["model.bus.blocks=[5]"], r"model\.bus\.blocks.*1 blocks"),
                           (["model.bus.keep_rate=0"], r"model\.bus\.keep_rate"),
                           (["model.bus.text_keep_rate=1.5"], r"model\.bus\.text_keep_rate"),
                           (["model.vision.evit.keep_rate=0.7"], r"model\.vision\.evit"),
                           (["model.vision.locked=true"], r"model\.vision\.locked")):
        with pytest.raises(ConfigError, match=pattern):
            build_model(_cfg(tmp_path, synth_train, *extra).model)


def test_albef_flops_count_a_real_training_step_and_leave_the_model_untouched(tmp_path, synth_train):
    """ALBEF's FLOPs per sample come from one counted forward + backward (momentum passes, ITM pairs,
    MLM); counting changes no buffer, gradient, step counter or global RNG draw. At 64 patches BUS's
    selection and PAD make the counted step cheaper than plain ALBEF's at the same towers (at 16 the
    per-pair PAD costs more than it saves)."""
    from vlp.models.flops import _count, flops_per_sample

    size = ["model.vision.kwargs.img_size=64"]
    bus = _tiny_albef(tmp_path, synth_train, "model.bus.pad_queries=2", *size)
    plain = _tiny_albef(tmp_path, synth_train, "model.bus.enabled=false", *size)
    for model in (bus, plain):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        flops = flops_per_sample(model, 64, 16)
        assert torch.equal(torch.get_rng_state(), rng) and model.training and model._micro == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
        with torch.enable_grad():
            towers = _count(model.eval().encode_image, torch.zeros(1, 3, 64, 64)) + \
                _count(model.encode_text, torch.full((1, 16), 5), torch.ones(1, 16, dtype=torch.long))
        model.train()
        assert flops > 3 * towers  # more than forward + backward of the two encoders alone
    assert flops_per_sample(bus, 64, 16) < flops_per_sample(plain, 64, 16)
