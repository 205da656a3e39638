"""transformers vision towers by what they output: six architectures from tiny configs saved to a
directory and named like a Hub model (model.vision.kind=hf, model.vision.name=DIR), in a CLIP."""
import pytest
import torch

from vlp.config import ConfigError, TowerConfig, load_config
from vlp.models import build_model
from vlp.models.towers import build_vision_tower

EMBED = 8
TEXT = dict(kind="open_clip", kwargs=dict(width=16, layers=1, heads=2, context_length=8, vocab_size=64))


def _config(arch):
    import transformers as T

    if arch == "cvt":  # two stages; depth[i] > i (CvtStage indexes its drop-path list by stage)
        two = dict(patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], embed_dim=[8, 16],
                   num_heads=[1, 2], depth=[1, 2], mlp_ratio=[2.0, 2.0], attention_drop_rate=[0.0, 0.0],
                   drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.0], qkv_bias=[True, True], cls_token=[False, True],
                   qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1],
                   stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1])
        return T.CvtConfig(**two)
    if arch == "swin":
        return T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
    if arch == "convnext":
        return T.ConvNextConfig(image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    if arch == "resnet":
        return T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    if arch == "dinov2":
        return T.Dinov2Config(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=32)
    if arch == "siglip":
        return T.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)
    raise KeyError(arch)


ARCHS = ["cvt", "swin", "convnext", "resnet", "dinov2", "siglip"]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    """A directory per architecture holding only its config.json, as a Hub name resolves to."""
    dirs = {}
    for arch in ARCHS:
        dirs[arch] = tmp_path_factory.mktemp(arch)
        _config(arch).save_pretrained(dirs[arch])
    return dirs


def _batch(n=2, size=32):
    g = torch.Generator().manual_seed(0)
    return dict(image=torch.randn(n, 3, size, size, generator=g), text_ids=torch.randint(1, 64, (n, 8), generator=g),
                text_mask=torch.ones(n, 8, dtype=torch.long), key=[str(i) for i in range(n)])


# the final width every architecture's tower reports, and what `pool: ""` takes from it
EXPECTED = {"cvt": (16, "cls_value"), "swin": (16, "pooled"), "convnext": (16, "pooled"),
            "resnet": (16, "pooled"), "dinov2": (16, "pooled"), "siglip": (16, "pooled")}


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_vision_tower_trains_in_a_clip(arch_dirs, arch):
    torch.manual_seed(0)
    model = build_model(dict(type="clip", embed_dim=EMBED, vision=dict(kind="hf", name=str(arch_dirs[arch])),
                             text=TEXT))
    width, mode = EXPECTED[arch]
    assert model.image_proj.in_features == width and model.vision.mode == mode
    b = _batch()
    out = model(b)
    out["loss"].backward()
    grads = [p.grad for p in model.vision.parameters() if p.grad is not None]  # DINOv2's mask_token: unused
    assert len(grads) > 0.8 * len(list(model.vision.parameters())) and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # the loss reaches the backbone, not only the head
    with torch.no_grad():
        emb = model.eval().encode_image(b["image"])
    assert emb.shape == (2, EMBED)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def _raw(tower, x):
    with torch.no_grad():
        return tower.module.model.eval()(pixel_values=x)


@pytest.mark.parametrize("arch, pool, take", [
    ("cvt", "cls", lambda o: o.cls_token_value[:, 0]),
    ("cvt", "mean", lambda o: o.last_hidden_state.mean(dim=(2, 3))),  # (B, C, H, W) map
    ("resnet", "pooled", lambda o: o.pooler_output.flatten(1)),  # (B, C, 1, 1)
    ("convnext", "mean", lambda o: o.last_hidden_state.mean(dim=(2, 3))),
    ("swin", "mean", lambda o: o.last_hidden_state.mean(dim=1)),  # (B, L, C) tokens
    ("dinov2", "cls", lambda o: o.last_hidden_state[:, 0]),
    ("dinov2", "pooled", lambda o: o.pooler_output),
])
def test_pool_takes_what_it_names(arch_dirs, arch, pool, take):
    tower = build_vision_tower(TowerConfig(kind="hf", name=str(arch_dirs[arch]), pool=pool))
    x = _batch()["image"]
    with torch.no_grad():
        feats = tower.module.eval()(x)
    expected = take(_raw(tower, x))
    assert tower.dim == expected.shape[-1] and feats.shape == (2, tower.dim)
    torch.testing.assert_close(feats, expected)


@pytest.mark.parametrize("arch, pool, valid", [
    ("resnet", "cls", "valid for this tower: '', pooled, mean"),  # a CNN: no class token
    ("swin", "cls", "valid for this tower: '', pooled, mean"),  # tokens, but no class token among them
    ("cvt", "pooled", "valid for this tower: '', cls, mean"),  # CvtModel has no pooler
])
def test_wrong_pool_for_a_tower_names_the_valid_ones(arch_dirs, arch, pool, valid):
    with pytest.raises(ConfigError, match=f"'model.vision.pool': '{pool}'.*{valid}"):
        build_model(dict(type="clip", embed_dim=EMBED, text=TEXT,
                         vision=dict(kind="hf", name=str(arch_dirs[arch]), pool=pool)))


def test_unknown_pool_value_lists_all_choices():
    with pytest.raises(ConfigError, match="model.vision.pool.*valid: , pooled, cls, mean"):
        load_config(None, ["model.vision.pool=max"])
