"""Every tower kind builds from a tiny config, random or through its library's own pretrained loader."""
import json

import open_clip
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from vlp.config import ConfigError, ModelConfig, TowerConfig
from vlp.models.towers import build_text_tower, build_towers, build_vision_tower

TIMM_TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
OPEN_CLIP_TINY = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def _images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ timm
def test_timm_random_and_from_safetensors_file(tmp_path):
    torch.manual_seed(0)
    src = build_vision_tower(TowerConfig(kind="timm", name="vit_tiny_patch16_224", kwargs=TIMM_TINY))
    assert src.dim == 32 and not src.projects
    assert src.info == dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    assert src.module(_images()).shape == (2, 32)
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(src.module.state_dict(), str(path))

    torch.manual_seed(1)
    fresh = build_vision_tower(TowerConfig(kind="timm", name="vit_tiny_patch16_224", kwargs=TIMM_TINY))
    assert not _same_weights(fresh.module, src.module)
    for pretrained in (str(path), str(tmp_path)):  # a file, or a directory holding model.safetensors
        if pretrained == str(tmp_path):
            path.rename(tmp_path / "model.safetensors")
        torch.manual_seed(1)
        loaded = build_vision_tower(TowerConfig(kind="timm", name="vit_tiny_patch16_224", kwargs=TIMM_TINY,
                                                pretrained=pretrained))
        assert _same_weights(loaded.module, src.module)


def test_timm_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.vision.name is empty"):
        build_vision_tower(TowerConfig(kind="timm"))
    with pytest.raises(ConfigError, match="model.vision.*no_such_net"):
        build_vision_tower(TowerConfig(kind="timm", name="no_such_net"))
    with pytest.raises(ConfigError, match="model.vision.pretrained.*not a file"):
        build_vision_tower(TowerConfig(kind="timm", name="vit_tiny_patch16_224", pretrained=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="model.vision: cannot build timm tower.*hf-hub:"):  # offline / no repo
        build_vision_tower(TowerConfig(kind="timm", name="vit_tiny_patch16_224", kwargs=TIMM_TINY,
                                       pretrained="hf-hub:vlp-tests/no-such-repo"))
    with pytest.raises(ConfigError, match="holds none of"):
        build_vision_tower(TowerConfig(kind="timm", name="vit_tiny_patch16_224", pretrained=str(tmp_path)))
    with pytest.raises(ConfigError, match="patch_dropout"):  # a CNN has no patches to drop
        build_vision_tower(TowerConfig(kind="timm", name="test_resnet"), patch_dropout=0.5)


# -------------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = tmp_path_factory.mktemp("hf_vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    ViTModel(cfg).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2],
                      resample=2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("hf_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16)).save_pretrained(out)
    return out


def test_hf_vision_pretrained_dir(hf_vit_dir):
    from transformers import ViTModel

    tower = build_vision_tower(TowerConfig(kind="hf", pretrained=str(hf_vit_dir)))
    saved = ViTModel.from_pretrained(hf_vit_dir, add_pooling_layer=False)
    assert _same_weights(tower.module.model, saved)
    assert tower.module.model.pooler is None  # the untrained tanh pooler is dropped
    assert tower.dim == 32
    assert tower.info == dict(size=32, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2), interpolation="bilinear")
    x = _images()
    with torch.no_grad():
        expected = saved(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(tower.module(x), expected)


def test_hf_vision_random_init_with_overrides(hf_vit_dir):
    one = build_vision_tower(TowerConfig(kind="hf", name=str(hf_vit_dir)))
    tower = build_vision_tower(TowerConfig(kind="hf", name=str(hf_vit_dir), kwargs={"num_hidden_layers": 2}))
    assert tower.module.model.config.num_hidden_layers == 2
    assert _n_params(tower.module) > _n_params(one.module)
    with pytest.raises(ConfigError, match="model.vision.kwargs.no_such_field"):
        build_vision_tower(TowerConfig(kind="hf", name=str(hf_vit_dir), kwargs={"no_such_field": 1}))
    with pytest.raises(ConfigError, match="patch_dropout"):
        build_vision_tower(TowerConfig(kind="hf", name=str(hf_vit_dir)), patch_dropout=0.1)


def test_hf_two_tower_checkpoint_gives_sub_models(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2), projection_dim=8))
    clip.save_pretrained(tmp_path)
    vision = build_vision_tower(TowerConfig(kind="hf", pretrained=str(tmp_path)))
    text = build_text_tower(TowerConfig(kind="hf", pretrained=str(tmp_path)))
    assert type(vision.module.model).__name__ == "CLIPVisionModel"
    assert type(text.module.model).__name__ == "CLIPTextModel"
    assert _same_weights(vision.module.model, clip.vision_model)
    assert _same_weights(text.module.model, clip.text_model)
    assert text.info == dict(vocab_size=64, context_length=8, kind="hf", name=str(tmp_path))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():  # CLIP's own pooled outputs (post-LN [CLS] / EOS token) are the features
        torch.testing.assert_close(vision.module(_images(size=16)), clip.vision_model(_images(size=16)).pooler_output)
        torch.testing.assert_close(text.module(ids, torch.ones_like(ids)), clip.text_model(ids).pooler_output)


def test_hf_text_pretrained_dir_and_pooling(hf_bert_dir):
    from transformers import BertModel

    cls_tower = build_text_tower(TowerConfig(kind="hf", pretrained=str(hf_bert_dir), pool="cls"))
    assert _same_weights(cls_tower.module.model, BertModel.from_pretrained(hf_bert_dir, add_pooling_layer=False))
    assert cls_tower.info == dict(vocab_size=100, context_length=16, kind="hf", name=str(hf_bert_dir))
    mean_tower = build_text_tower(TowerConfig(kind="hf", pretrained=str(hf_bert_dir), pool="mean"))
    mean_tower.module.eval(), cls_tower.module.eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        cls_out, mean_out = cls_tower.module(ids, mask), mean_tower.module(ids, mask)
        assert not torch.allclose(cls_out, mean_out)
        hidden = cls_tower.module.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(cls_out, hidden[:, 0])
        torch.testing.assert_close(mean_out[0], hidden[0, :3].mean(0))
        # padded positions are ignored: changing their ids changes nothing
        other = ids.clone()
        other[0, 3:] = 42
        torch.testing.assert_close(mean_tower.module(other, mask), mean_out)


def test_hf_text_kwargs_and_missing_source(hf_bert_dir):
    one = build_text_tower(TowerConfig(kind="hf", name=str(hf_bert_dir)))
    tower = build_text_tower(TowerConfig(kind="hf", name=str(hf_bert_dir), kwargs={"num_hidden_layers": 3}))
    assert tower.module.model.config.num_hidden_layers == 3
    assert _n_params(tower.module) > _n_params(one.module)
    with pytest.raises(ConfigError, match="model.text: set name"):
        build_text_tower(TowerConfig(kind="hf"))
    with pytest.raises(ConfigError, match="model.text: cannot build hf tower"):
        build_text_tower(TowerConfig(kind="hf", name=str(hf_bert_dir / "missing")))


# ------------------------------------------------------------------------------------ open_clip
@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory):
    """A custom open_clip architecture registered by file, and a weights file for it."""
    out = tmp_path_factory.mktemp("open_clip")
    (out / "vlp-test-tiny.json").write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(str(out / "vlp-test-tiny.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("vlp-test-tiny")
    weights = out / "tiny.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(weights))
    return model, str(weights)


def test_open_clip_named_model_pretrained_file(open_clip_tiny):
    ref, weights = open_clip_tiny
    cfg = OmegaConf.structured(ModelConfig(
        embed_dim=16, vision=TowerConfig(kind="open_clip", name="vlp-test-tiny", pretrained=weights),
        text=TowerConfig(kind="open_clip", name="vlp-test-tiny", pretrained=weights)))
    vision, text = build_towers(cfg)  # one create_model call serves both towers
    assert vision.projects and text.projects and vision.dim == text.dim == 16
    assert _same_weights(vision.module, ref.visual)
    assert vision.info == dict(size=16, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
                               interpolation="bicubic")
    assert text.info == dict(vocab_size=64, context_length=8, kind="open_clip", name="vlp-test-tiny")
    ref.eval(), text.module.eval(), vision.module.eval()
    ids = torch.randint(1, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(text.module(ids, torch.ones_like(ids)), ref.encode_text(ids))
        torch.testing.assert_close(vision.module(_images(size=16)), ref.encode_image(_images(size=16)))
    # the same towers built separately (different kwargs/pretrained take this path) load the same weights
    alone = build_text_tower(TowerConfig(kind="open_clip", name="vlp-test-tiny", pretrained=weights), 16)
    assert _same_weights(alone.module, text.module)


def test_open_clip_towers_from_kwargs():
    text = build_text_tower(TowerConfig(kind="open_clip", kwargs=dict(width=16, layers=1, heads=2, context_length=8,
                                                                      vocab_size=64)), embed_dim=12)
    assert text.dim == 12 and text.info["context_length"] == 8 and text.info["vocab_size"] == 64
    vision = build_vision_tower(TowerConfig(kind="open_clip", kwargs=dict(image_size=16, patch_size=8, width=16,
                                                                          layers=1, heads=2)), 0.0, embed_dim=12)
    assert vision.dim == 12 and vision.info["size"] == 16
    ids = torch.randint(1, 64, (3, 8))
    assert text.module(ids, torch.ones_like(ids)).shape == (3, 12)
    assert vision.module(_images(3, 16)).shape == (3, 12)
    with pytest.raises(ConfigError, match="model.text: cannot build open_clip tower"):
        build_text_tower(TowerConfig(kind="open_clip", kwargs=dict(no_such_arg=1)))
    with pytest.raises(ConfigError, match="model.vision.*no_such_model"):
        build_vision_tower(TowerConfig(kind="open_clip", name="no_such_model"))
