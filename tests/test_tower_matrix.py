"""The seed-tower matrix (issue 21, README "Vision towers"): each timm tower the literature hands users,
at tiny widths, and the transformers towers of tests/test_models_hf_vision.py, in CLIP, SigLIP and ALBEF:
one forward and backward (finite loss, a gradient in the vision tower), then the vlp export layout read
back by `vlp.load_pretrained` gives the same weights and image embeddings. Where a family cannot take a
tower, the build refuses it with a message that names the tower."""
import pytest
import torch

from tests.dist.albef_tiny import write_tiny_albef, write_vocab
from tests.test_models_hf_vision import ARCHS as HF_ARCHS
from tests.test_models_hf_vision import _config as hf_config

# timm name -> (kwargs small enough for a CPU step, image side)
TIMM = {
    "swin_tiny_patch4_window7_224": dict(img_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                         window_size=4),
    "convnext_atto": dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1]),  # no img_size: 224 px, 7 x 7 map
    "maxvit_nano_rw_256": dict(img_size=64, embed_dim=[16, 32], depths=[1, 1], block_type=["M", "M"],
                               stem_width=[8, 16], transformer_dim_head=8, conv_attn_ratio=0.25),
    "crossvit_tiny_240": dict(img_size=48, img_scale=[1.0, 0.6667], patch_size=[12, 16], embed_dim=[16, 32],
                              depth=[[1, 1, 0]], num_heads=[1, 2], mlp_ratio=[2, 2, 1]),
    "tnt_s_patch16_224": dict(img_size=32, patch_size=16, embed_dim=32, inner_dim=8, depth=1, num_heads_outer=2,
                              num_heads_inner=1),
    "volo_d1_224": dict(img_size=32, stem_hidden_dim=8),  # its widths and depths are fixed by the name (27M)
    "vit_small_patch16_224": dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
}
# (family, tower) -> what the refusal says; every other pair trains and round-trips
REFUSED = {("albef", "crossvit_tiny_240"): r"crossvit_tiny_240.*2 feature tensors"}
FAMILIES = ("clip", "siglip", "albef")
OC_TEXT = {"kind": "open_clip", "kwargs": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2,
                                           "layers": 1}}


@pytest.fixture(scope="module")
def albef_yaml(synth_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("tower_matrix")
    return write_tiny_albef(str(root / "tiny.yaml"), write_vocab(synth_train, str(root / "bert")))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    for arch in HF_ARCHS:
        dirs[arch] = str(tmp_path_factory.mktemp(f"hf_{arch}"))
        hf_config(arch).save_pretrained(dirs[arch])
    return dirs


def _cfg(family, vision, albef_yaml):
    from omegaconf import OmegaConf

    from vlp.config import from_dict, load_config

    if family == "albef":
        d = OmegaConf.to_container(load_config(albef_yaml, ["model.albef.queue_size=8"]), resolve=True)
        d["model"]["vision"] = vision
    else:
        d = {"model": {"type": family, "embed_dim": 16, "vision": vision, "text": OC_TEXT},
             "data": {"tokenizer": {"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}}}
    d.setdefault("train", {})["resume"] = "none"
    return from_dict(d)


def _batch(size, n=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (n, 16), generator=g)
    mask = torch.ones(n, 16, dtype=torch.long)
    mask[:, 10:] = 0
    ids[:, 0], ids[:, 9] = 2, 3
    ids[mask == 0] = 0
    return {"image": torch.randn(n, 3, size, size, generator=g), "text_ids": ids, "text_mask": mask,
            "key": [str(i) for i in range(n)]}


def _train_and_round_trip(cfg, tmp_path):
    import vlp
    from vlp.export.vlp_format import write_vlp
    from vlp.models import build_model

    torch.manual_seed(0)
    m = build_model(cfg.model)
    batch = _batch(int(m.image_cfg["size"]))
    out = m(batch)
    assert torch.isfinite(out["loss"]), out
    out["loss"].backward()
    vision = [p.grad for p in m.vision.parameters() if p.grad is not None]
    assert vision and any(bool(g.abs().sum() > 0) for g in vision)  # the loss reaches the vision tower

    write_vlp(m, cfg, dict(m.image_cfg), str(tmp_path), "fp32", "5GB", {})
    loaded = vlp.load_pretrained(str(tmp_path))
    ours, theirs = m.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    m.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(batch["image"]), m.encode_image(batch["image"]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_tower_in_family(family, name, albef_yaml, tmp_path):
    from vlp.config import ConfigError
    from vlp.models import build_model

    cfg = _cfg(family, {"kind": "timm", "name": name, "kwargs": TIMM[name]}, albef_yaml)
    if (family, name) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[family, name]):
            build_model(cfg.model)
        return
    _train_and_round_trip(cfg, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_tower_in_family(family, arch, hf_dirs, albef_yaml, tmp_path):
    _train_and_round_trip(_cfg(family, {"kind": "hf", "name": hf_dirs[arch]}, albef_yaml), tmp_path / "export")


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "convnext_atto"])
def test_albef_reads_a_map_as_pooled_vector_then_positions(name, albef_yaml):
    """A Swin's (B, H, W, C) and a ConvNeXt's (B, C, H, W) last-stage map reach the fusion encoder as
    (B, 1 + H*W, C): the tower's own pooled vector first (what ITC embeds), then the positions in order."""
    from vlp.models import build_model

    torch.manual_seed(0)
    m = build_model(_cfg("albef", {"kind": "timm", "name": name, "kwargs": TIMM[name]}, albef_yaml).model).eval()
    x = _batch(int(m.image_cfg["size"]), n=2)["image"]
    with torch.no_grad():
        tokens = m._image(x)
        feats = m.vision.forward_features(x)
        pooled = m.vision.forward_head(feats, pre_logits=True)
    grid = feats.flatten(1, 2) if name.startswith("swin") else feats.flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 1 + grid.shape[1], m.vision_proj.in_features)
    torch.testing.assert_close(tokens[:, 0], pooled)
    torch.testing.assert_close(tokens[:, 1:], grid)


@pytest.mark.parametrize("key, value, message", [
    ("model.vision.evit.keep_rate", 0.7,
     r"model.vision.evit: .*the tower 'swin_tiny_patch4_window7_224' SwinTransformer"),
    ("model.bus.enabled", True, r"model.bus: .*the vision tower 'swin_tiny_patch4_window7_224' \(SwinTransformer\)"),
])
def test_evit_and_bus_refuse_a_non_vit_tower_by_name(key, value, message, albef_yaml):
    """EViT and BUS rank a ViT's tokens by [CLS] attention inside its blocks: a Swin is refused by name."""
    from omegaconf import OmegaConf

    from vlp.config import ConfigError
    from vlp.models import build_model

    cfg = _cfg("albef", {"kind": "timm", "name": "swin_tiny_patch4_window7_224",
                         "kwargs": TIMM["swin_tiny_patch4_window7_224"]}, albef_yaml)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        build_model(cfg.model)
