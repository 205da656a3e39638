"""The clip/align/siglip models: outputs, scalars, parameter groups, locking, checkpointing, FLOPs, configs."""
import math
from types import SimpleNamespace

import pytest
import torch

from vlp.config import ConfigError, load_config
from vlp.models import build_model, check_tokenizer, flops_per_sample, param_groups

# the demo-sized model: timm ViT + open_clip text transformer, as a YAML `model:` section would give it
TINY = dict(
    type="clip", embed_dim=32,
    vision=dict(kind="timm", name="vit_tiny_patch16_224",
                kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    text=dict(kind="open_clip", kwargs=dict(width=32, layers=2, heads=2, context_length=16, vocab_size=49408)))


def tiny(seed=0, **over):
    cfg = {**TINY, **over}
    for side in ("vision", "text"):
        cfg[side] = {**TINY[side], **over.get(side, {})}
    torch.manual_seed(seed)
    return build_model(cfg)


def batch(n=4, size=32, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(image=torch.randn(n, 3, size, size, generator=g),
                text_ids=torch.randint(1, 49408, (n, length), generator=g),
                text_mask=torch.ones(n, length, dtype=torch.long), key=[str(i) for i in range(n)])


def test_builds_from_yaml_and_forward_outputs(tmp_path):
    (tmp_path / "tiny.yaml").write_text("""
model:
  type: clip
  embed_dim: 32
  vision: {kind: timm, name: vit_tiny_patch16_224,
           kwargs: {img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}}
  text: {kind: open_clip, kwargs: {width: 32, layers: 2, heads: 2, context_length: 16, vocab_size: 49408}}
""")
    model = build_model(load_config(str(tmp_path / "tiny.yaml")).model)
    assert model.image_cfg == dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    assert model.text_cfg == dict(vocab_size=49408, context_length=16, kind="open_clip", name="")
    out = model(batch())
    assert set(out) >= {"loss", "contrastive_loss", "logit_scale"}
    assert out["loss"].shape == () and out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert not out["contrastive_loss"].requires_grad
    assert isinstance(out["logit_scale"], float) and out["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    # causal open_clip text towers accept shorter sequences (right-padded; the causal mask hides it)
    short = batch(length=10)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.encode_text(short["text_ids"], short["text_mask"]),
                                   model.encode_text(torch.nn.functional.pad(short["text_ids"], (0, 6)),
                                                     torch.ones(4, 16, dtype=torch.long)))


def test_embeddings_normalised_float32_and_deterministic():
    model, b = tiny().eval(), batch()
    with torch.no_grad():
        img = model.encode_image(b["image"])
        txt = model.encode_text(b["text_ids"], b["text_mask"])
        assert img.shape == txt.shape == (4, 32) and img.dtype == txt.dtype == torch.float32
        torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
        torch.testing.assert_close(model.encode_image(b["image"]), img, rtol=0, atol=0)
        twin = tiny().eval()  # same seed, same weights, same embeddings
        torch.testing.assert_close(twin.encode_text(b["text_ids"], b["text_mask"]), txt, rtol=0, atol=0)
        assert not torch.allclose(tiny(seed=1).eval().encode_image(b["image"]), img)


def test_learnable_scalars_shape_and_init():
    clip = tiny()
    assert clip.logit_scale.shape == (1,) and clip.logit_bias is None
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    align = tiny(type="align", init_temperature=1.0, label_smoothing=0.1)
    assert align.logit_scale.item() == pytest.approx(0.0)
    siglip = tiny(type="siglip")
    assert siglip.logit_scale.shape == siglip.logit_bias.shape == (1,)
    assert siglip.logit_scale.item() == pytest.approx(math.log(10))
    out = siglip(batch())
    assert out["logit_scale"] == pytest.approx(10.0, rel=1e-5) and out["logit_bias"] == pytest.approx(-10.0)
    # the trainer clamps log(scale) to [0, ln max_logit_scale] after each step (vlp.train.engine.clamp_parameters,
    # tests/test_train_clamp.py); the forward reads it as is; max_logit_scale=0 turns the clamp off
    assert clip.parameter_bounds() == [(clip.logit_scale, 0.0, math.log(100.0))]
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    assert clip(batch())["logit_scale"] == pytest.approx(1000.0, rel=1e-5)
    assert tiny(max_logit_scale=0.0).parameter_bounds() == []


def test_align_sums_directions_and_smooths():
    b = batch()
    clip = tiny(init_temperature=1.0)
    align = tiny(type="align", init_temperature=1.0)
    smooth = tiny(type="align", init_temperature=1.0, label_smoothing=0.1)
    with torch.no_grad():
        lc, la, ls = clip(b)["loss"], align(b)["loss"], smooth(b)["loss"]
    torch.testing.assert_close(la, 2 * lc)
    assert not torch.allclose(ls, la)


def test_param_groups():
    model = tiny()
    groups = param_groups(model, weight_decay=0.2)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names.values())
    for name in ("logit_scale", "vision.cls_token", "vision.pos_embed", "vision.norm.weight",
                 "vision.blocks.0.norm1.weight", "vision.blocks.0.attn.qkv.bias", "text.model.token_embedding.weight",
                 "text.model.positional_embedding", "text.model.ln_final.weight"):
        assert name in no_decay, name
    for name in ("vision.blocks.0.attn.qkv.weight", "vision.patch_embed.proj.weight", "image_proj.weight",
                 "text.model.text_projection", "text.model.transformer.resblocks.0.mlp.c_fc.weight"):
        assert name in decay, name
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    siglip = tiny(type="siglip")
    sig_names = {id(p): n for n, p in siglip.named_parameters()}
    assert "logit_bias" in {sig_names[id(p)] for p in param_groups(siglip, 0.1)[1]["params"]}


def test_locked_tower_gets_no_grads_and_stays_in_eval():
    model = tiny(vision=dict(locked=True))
    model.train()
    assert not model.vision.training and model.text.training
    groups = param_groups(model, 0.1)
    assert not any(p is q for g in groups for p in g["params"] for q in model.vision.parameters())
    model(batch())["loss"].backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.image_proj.weight.grad is not None  # the new head on a locked tower trains (LiT)
    assert all(p.grad is not None for p in model.text.parameters())


def test_locked_batchnorm_tower_keeps_running_stats():
    model = tiny(vision=dict(name="test_resnet", kwargs={}, locked=True))
    bn = next(m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()
    model(batch())
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    unlocked = tiny(vision=dict(name="test_resnet", kwargs={}))
    bn2 = next(m for m in unlocked.vision.modules() if isinstance(m, torch.nn.BatchNorm2d))
    unlocked(batch())
    assert not torch.equal(bn2.running_mean, before)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("text_kind", ["open_clip", "hf"])
def test_grad_checkpointing_gives_same_grads(text_kind, bert_dir):
    text = {} if text_kind == "open_clip" else dict(kind="hf", pretrained=bert_dir, kwargs={})
    plain = tiny(text=text)
    ckpt = tiny(vision=dict(grad_checkpointing=True), text=dict(text, grad_checkpointing=True))
    assert ckpt.vision.grad_checkpointing
    if text_kind == "hf":
        inner = ckpt.text.model
        assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing
    else:
        assert ckpt.text.model.transformer.grad_checkpointing
    b = batch()
    for m in (plain, ckpt):
        m(b)["loss"].backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_patch_dropout_only_in_training():
    model = tiny(patch_dropout=0.5)
    x = batch()["image"]
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model.encode_image(x), model.encode_image(x))
        model.eval()
        torch.testing.assert_close(model.encode_image(x), model.encode_image(x))


def test_a_few_steps_lower_the_loss():
    model, b = tiny(), batch(n=8)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    first = None
    for _ in range(8):
        loss = model(b)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(b)["loss"].item() < 0.7 * first


def test_flops_per_sample_restores_the_mode_and_counts_attention_pooling():
    """(The analytic agreement is tests/test_mfu.py's.)"""
    model = tiny()
    fl = flops_per_sample(model)
    assert model.training  # mode restored
    # attention-pooled (SigLIP-style) towers count too, also when the caller is under no_grad
    map_pool = tiny(vision=dict(kwargs={**TINY["vision"]["kwargs"], "global_pool": "map"}))
    with torch.no_grad():
        assert flops_per_sample(map_pool) > fl


def test_check_tokenizer():
    model = tiny()
    check_tokenizer(model, SimpleNamespace(vocab_size=49408, context_length=16, name="open_clip"))
    with pytest.raises(ConfigError, match="data.tokenizer.*50000 tokens.*49408"):
        check_tokenizer(model, SimpleNamespace(vocab_size=50000, context_length=16, name="big"))
    with pytest.raises(ConfigError, match="data.tokenizer.context_length=77 exceeds"):
        check_tokenizer(model, SimpleNamespace(vocab_size=49408, context_length=77, name="open_clip"))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="siglip"):
        tiny(type="siglip", local_loss=True)
    with pytest.raises(ConfigError, match="model.type"):
        build_model({**TINY, "type": "nope"})
    with pytest.raises(ConfigError, match="max_logit_scale"):
        tiny(init_temperature=0.001)
    with pytest.raises(ConfigError, match="below 1"):
        tiny(init_temperature=2.0)  # the clamp's lower bound is scale 1, as open_clip
    tiny(init_temperature=2.0, max_logit_scale=0.0)
    with pytest.raises(ConfigError, match="model.embed_dim"):
        tiny(embed_dim=0)
    with pytest.raises(ConfigError, match="model.vision.name"):
        tiny(vision=dict(name=""))


def test_paper_configs_load():
    clip = load_config("configs/clip_vit_b16.yaml")
    assert (clip.train.lr, clip.train.weight_decay, list(clip.train.betas), clip.train.eps,
            clip.train.warmup_steps) == (5e-4, 0.2, [0.9, 0.98], 1e-6, 2000)
    assert clip.model.init_temperature == 0.07 and clip.model.max_logit_scale == 100
    align = load_config("configs/align_base.yaml")
    assert align.model.type == "align" and align.model.init_temperature == 1.0
    assert align.model.label_smoothing == 0.1 and align.model.vision.name == "efficientnet_b7"
    siglip = load_config("configs/siglip_vit_b16.yaml")
    assert (siglip.model.siglip_init_logit_scale, siglip.model.siglip_init_bias) == (10.0, -10.0)
    assert (siglip.train.lr, siglip.train.weight_decay) == (1e-3, 1e-4)


def test_clip_vit_b16_config_builds_the_paper_model():
    model = build_model(load_config("configs/clip_vit_b16.yaml").model)
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(149.6e6, rel=0.005)  # CLIP ViT-B/16: 149.6M parameters
    assert model.image_cfg["size"] == 224 and model.text_cfg["context_length"] == 77
    assert isinstance(model.image_proj, torch.nn.Identity)  # open_clip towers project to 512 already
