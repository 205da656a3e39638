"""Command-line overrides: `key=value` merges into the config file, `!key=value` replaces the node."""
import pytest
import torch

from vlp.config import ConfigError, load_config
from vlp.models import build_model

DEMO = "configs/demo_clip.yaml"
VIT_KWARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}


def test_replace_lets_a_shipped_config_take_another_backbone():
    cfg = load_config(DEMO, ["!model.vision.kwargs={}", "model.vision.name=convnext_atto"])
    assert dict(cfg.model.vision.kwargs) == {}
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    assert type(model.vision).__name__ == "ConvNeXt"
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    # a plain override merges: the ViT's kwargs stay and reach the ConvNeXt constructor
    merged = load_config(DEMO, ["model.vision.kwargs={}", "model.vision.name=convnext_atto"])
    assert dict(merged.model.vision.kwargs) == VIT_KWARGS
    with pytest.raises(ConfigError, match="model.vision: cannot build timm tower name='convnext_atto'"):
        build_model(merged.model)


def test_merge_keeps_other_keys_replace_keeps_only_the_given_ones():
    assert dict(load_config(DEMO, ["model.vision.kwargs={depth: 2}"]).model.vision.kwargs) == {**VIT_KWARGS, "depth": 2}
    assert dict(load_config(DEMO, ["!model.vision.kwargs={depth: 2}"]).model.vision.kwargs) == {"depth": 2}
    # left to right: a later merge adds to a replacement; a later replacement drops an earlier merge
    assert dict(load_config(DEMO, ["!model.vision.kwargs={depth: 2}", "model.vision.kwargs.num_heads=2"]
                            ).model.vision.kwargs) == {"depth": 2, "num_heads": 2}
    assert dict(load_config(DEMO, ["model.vision.kwargs.num_heads=2", "!model.vision.kwargs={depth: 2}"]
                            ).model.vision.kwargs) == {"depth": 2}
    # a key inside a free-form dict
    cfg = load_config(DEMO, ["model.vision.kwargs.extra={a: 1, b: 2}", "!model.vision.kwargs.extra={c: 3}"])
    assert dict(cfg.model.vision.kwargs.extra) == {"c": 3} and cfg.model.vision.kwargs.depth == 4


def test_replacing_a_section_starts_from_its_schema_defaults():
    cfg = load_config(DEMO, ["model.vision.locked=true", "!model.vision={kind: hf, name: some/dir}"])
    v = cfg.model.vision
    assert (v.kind, v.name, dict(v.kwargs), v.locked, v.pool, v.evit.keep_rate) == ("hf", "some/dir", {}, False, "", 1.0)
    assert load_config(DEMO, ["!model.text={name: x}"]).model.text.kind == "open_clip"  # the text tower's default
    assert load_config(DEMO).model.vision.kind == "timm" and cfg.train.steps == 600  # nothing else moved


def test_lists_are_replaced_with_or_without_bang(tmp_path):
    yaml = tmp_path / "two_sources.yaml"
    yaml.write_text("data:\n  sources: [{shards: a, weight: 2.0}, {shards: b}]\n  crop_scale: [0.9, 1.0]\n")
    for bang in ("", "!"):
        cfg = load_config(str(yaml), [f"{bang}data.sources=[{{shards: c}}]", f"{bang}data.crop_scale=[0.5, 0.8]",
                                      f"{bang}model.vision.evit.blocks=[1]"])
        assert [(s.shards, s.weight) for s in cfg.data.sources] == [("c", 1.0)]
        assert list(cfg.data.crop_scale) == [0.5, 0.8] and list(cfg.model.vision.evit.blocks) == [1]


@pytest.mark.parametrize("override, message", [
    ("!model.vision.kwarg={}", "unknown config key 'model.vision.kwarg'; nearest valid key: 'model.vision.kwargs'"),
    ("!model.vision.kwargs", "is not of the form !key.sub=value"),
    ("!=1", "is not of the form !key.sub=value"),
    ("!!model.vision.kwargs={}", "'!' goes before a dotted key"),
    ("!data.sources[0]={shards: x}", "no \\[index\\]: replace the whole list"),
    ("!model.vision={kind: mmdet}", "bad value for 'model.vision.kind': 'mmdet'; valid: timm, hf, open_clip"),
])
def test_bad_replacements_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])
