"""Config schema: YAML + dotted overrides merge; bad input fails early naming the key."""
import pytest

from vlp.config import ConfigError, from_dict, load_config, schema_doc, to_dict

CONTRACT_KEYS = ["data.train_shards", "data.eval_shards", "train.steps", "train.micro_batch_size",
                 "train.lr", "train.seed", "train.log_every", "train.save_every", "train.resume", "output_dir"]


def test_contract_keys_exist():
    keys = {row[0] for row in schema_doc()}
    for key in CONTRACT_KEYS:
        assert key in keys


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: 7\ndata:\n  crop_scale: [0.5, 1.0]\n")
    cfg = load_config(str(path), ["train.steps=9", "output_dir=/tmp/run", "train.betas=[0.9,0.95]"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.steps == 9
    assert list(cfg.data.crop_scale) == [0.5, 1.0]
    assert list(cfg.train.betas) == [0.9, 0.95]
    assert cfg.output_dir == "/tmp/run"


def test_roundtrip_through_dict():
    cfg = load_config(None, ["train.lr=0.01", "model.vision.kwargs.depth=2"])
    again = from_dict(to_dict(cfg))
    assert again.train.lr == pytest.approx(0.01)
    assert again.model.vision.kwargs["depth"] == 2


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "nearest valid key: 'train.lr'"),
    ("trian.steps=1", "nearest valid key: 'train'"),
    ("train.micro_bach_size=4", "train.micro_batch_size"),
    ("train.steps=abc", "'train.steps'"),
    ("train.steps=0", "'train.steps'"),
    ("model.type=clipp", "valid: albef, align, clip, siglip"),
    ("eval.batch_size=0", "'eval.batch_size'"),  # checked at start, not at the first in-training eval
    ("eval.rerank_k=-1", "'eval.rerank_k'"),
    ("data.max_corrupt_fraction=1.5", "'data.max_corrupt_fraction'"),
    ("data.image_size=-32", "'data.image_size'"),  # the registry (vlp.families) is the list
    ("train.zero_stage=5", "'train.zero_stage'"),
    ("train.resume=/no/such/ckpt", "'train.resume'"),
    ("data.crop_scale=[1.5,0.2]", "'data.crop_scale'"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "train.steps" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.steps"])


def test_a_registered_family_is_a_valid_model_type():
    """Adding a family is one registration: config validation reads the registry."""
    from vlp import families

    with pytest.raises(ConfigError, match="'model.type'"):
        load_config(None, ["model.type=my_family"])
    families.register_model("my_family")(lambda cfg: None)
    try:
        assert load_config(None, ["model.type=my_family"]).model.type == "my_family"
    finally:
        families._BUILDERS.pop("my_family")
