"""`model.init_from`: an ALBEF starts from a trained CLIP with the same towers (timm ViT + BERT), read from
each layout (run dir, checkpoint dir, vlp export, open_clip export, transformers dual encoder): the towers
compute what the source's do, the BERT's later layer seeds the fusion layer (cross-attention stays random),
the momentum copies equal the loaded weights, and the report says so. A run trained with init_from resumes,
evaluates and exports after the source is gone."""
import logging
import shutil

import pytest
import torch

from tests.dist.albef_tiny import write_tiny_albef, write_vocab

from vlp.config import ConfigError, load_config  # noqa: E402
from vlp.models import build_model  # noqa: E402
from vlp.train.init_from import init_from  # noqa: E402

# the source: a CLIP with ALBEF's towers, its BERT as deep as ALBEF's text + fusion layers (1 + 1)
CLIP = ["model.type=clip", "model.text.kwargs.num_hidden_layers=2"]


def _initialised(model_cfg):
    """The model as `vlp train` starts it on a fresh run: built, then `model.init_from` applied."""
    model = build_model(model_cfg)
    return model.eval(), init_from(model, model_cfg)


@pytest.fixture(scope="module", autouse=True)
def _own_process_group(own_process_group):
    """train() runs in this process: see conftest.own_process_group."""


@pytest.fixture(scope="module")
def yaml_path(synth_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    return write_tiny_albef(str(root / "tiny.yaml"), write_vocab(synth_train, str(root / "bert")))


def _cfg(yaml_path, *overrides):
    return load_config(yaml_path, ["train.resume=none", *overrides])


@pytest.fixture(scope="module")
def sources(yaml_path, synth_train, tmp_path_factory):
    """A 1-step CLIP run, its vlp and open_clip exports (`vlp export`), a transformers
    VisionTextDualEncoderModel of the same weights, and the trained CLIP itself."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    from vlp.export import export
    from vlp.checkpoint import checkpoint_config, find_checkpoint
    from vlp.load import load_trained_model
    from vlp.export.hf import vision_part
    from vlp.train import train

    root = tmp_path_factory.mktemp("sources")
    cfg = _cfg(yaml_path, *CLIP, f"output_dir={root}/run", f"data.train_shards={synth_train}", "train.steps=1")
    step = train(cfg).checkpoint
    ckpt = find_checkpoint(str(root / "run"))
    clip = load_trained_model(ckpt, checkpoint_config(ckpt))
    out = {"run": str(root / "run"), "step": step}
    for fmt in ("vlp", "open_clip"):
        out[fmt] = export(out["run"], fmt, str(root / fmt), verify=False, log=lambda m: None).out
    # transformers cannot hold vlp's pooler-less BERT tower in `vlp export --format hf`: write it here,
    # the ViT as the exporter maps it (Dinov2Model) and the BERT as a BertModel (with an untrained pooler)
    v = vision_part(clip, cfg.model.vision)
    bert = clip.text.model
    hf = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(
        v.config, bert.config, projection_dim=int(cfg.model.embed_dim)))
    sd = {**{f"vision_model.{k}": t for k, t in v.sd.items()},
          **{f"text_model.{k}": t for k, t in bert.state_dict().items()},
          "visual_projection.weight": v.proj, "text_projection.weight": clip.text_proj.weight.detach(),
          "logit_scale": clip.logit_scale.detach().reshape(())}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("text_model.pooler.") for k in missing), (missing, unexpected)
    hf.save_pretrained(str(root / "hf"))
    out["hf"] = str(root / "hf")
    return out, clip.eval()


LAYOUTS = {"run": "vlp-checkpoint", "step": "vlp-checkpoint", "vlp": "vlp-export", "open_clip": "open_clip",
           "hf": "hf"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_albef_starts_from_a_clip_in_any_layout(layout, sources, yaml_path, caplog):
    paths, clip = sources
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="vlp.train.init_from"):
        albef, report = _initialised(_cfg(yaml_path, f"model.init_from={paths[layout]}").model)
    assert report["layout"] == LAYOUTS[layout]
    parts = report["parts"]
    for name in ("vision", "text", "vision_proj", "text_proj"):
        assert parts[name]["loaded"] == parts[name]["total"] > 0, (name, parts[name])
    fusion = parts["fusion"]
    assert 0 < fusion["loaded"] < fusion["total"]
    assert fusion["random"] and all(".crossattention." in k for k in fusion["random"])
    assert {"fusion.crossattention", "itm_head", "mlm_head", "temp"} <= set(report["random"])
    assert "vision_proj" not in report["random"] and "text" not in report["random"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("vision 18/18 tensors" in m for m in logged), logged
    assert any("fusion" in m and "random: crossattention" in m for m in logged), logged
    assert report["lines"] == [m.split(": ", 1)[1] for m in logged]

    # the vision tower computes the source's tokens (the open_clip layout folds the patch bias into the
    # position embedding, so compare functions); the transformers layout keeps the pooler it was given
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(albef.vision.forward_features(images), clip.vision.forward_features(images),
                                   atol=1e-5, rtol=1e-5)
    if layout in ("run", "step", "vlp"):
        for k, t in albef.vision.state_dict().items():
            assert torch.equal(t, clip.vision.state_dict()[k]), k
        assert report["unused"] == []
    if layout == "hf":
        assert report["unused"] and all(".pooler." in k for k in report["unused"])

    src_text = clip.text.model.state_dict()
    for k, t in albef.text.model.state_dict().items():  # embeddings + text layer 0
        torch.testing.assert_close(t, src_text[k], atol=0, rtol=0, msg=k)
    fused = albef.fusion.layer[0].state_dict()
    for k, t in clip.text.model.encoder.layer[1].state_dict().items():  # BERT layer 1 -> fusion layer 0
        torch.testing.assert_close(fused[k], t, atol=0, rtol=0, msg=k)
    torch.testing.assert_close(albef.vision_proj.weight, clip.image_proj.weight)
    assert torch.equal(albef.vision_proj.bias, torch.zeros_like(albef.vision_proj.bias))
    torch.testing.assert_close(albef.text_proj.weight, clip.text_proj.weight)
    for name, twin in albef.momentum_models.items():
        for k, p in getattr(albef, name).named_parameters():
            assert torch.equal(twin.get_buffer(k), p), (name, k)


def test_a_clip_restarts_from_its_own_export_exactly(sources, yaml_path):
    paths, clip = sources
    model, report = _initialised(_cfg(yaml_path, *CLIP, f"model.init_from={paths['vlp']}").model)
    assert report["random"] == ["logit_scale"]
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 40, (2, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), clip.encode_image(images))
        assert torch.equal(model.encode_text(ids, mask), clip.encode_text(ids, mask))


def test_bad_paths_name_the_key_and_the_layouts(yaml_path, tmp_path):
    for path, why in ((tmp_path / "missing", "is not a directory"), (tmp_path, "holds none of these layouts")):
        with pytest.raises(ConfigError) as err:
            _initialised(_cfg(yaml_path, f"model.init_from={path}").model)
        msg = str(err.value)
        assert "'model.init_from'" in msg and why in msg, msg
        for layout in ("vlp_state.json", "vlp_config.yaml", "open_clip_config.json", "VisionTextDualEncoderModel"):
            assert layout in msg, msg
    from vlp.train.loop import check_before_work

    with pytest.raises(ConfigError, match="'model.init_from'.*is not a directory"):  # before any process starts
        check_before_work(_cfg(yaml_path, f"model.init_from={tmp_path / 'missing'}", f"output_dir={tmp_path}"))


def test_a_run_started_with_init_from_resumes_evaluates_and_exports_without_the_source(
        sources, yaml_path, synth_train, tmp_path, capsys):
    from vlp import load_pretrained
    from vlp.load import load_model
    from vlp.export import export
    from vlp.train import train

    paths, _ = sources
    source = str(tmp_path / "source")
    shutil.copytree(paths["vlp"], source)
    overrides = [f"model.init_from={source}", f"output_dir={tmp_path}/albef", f"data.train_shards={synth_train}",
                 "model.albef.queue_size=8", "train.micro_batch_size=8", "train.resume=auto"]
    assert train(_cfg(yaml_path, *overrides, "train.steps=1")).step == 1
    assert "vlp train: init_from " + source + ": fusion 16/" in capsys.readouterr().err
    shutil.rmtree(source)
    result = train(_cfg(yaml_path, *overrides, "train.steps=2"))  # resumes: init_from is not read again
    assert result.step == 2 and "init_from" not in capsys.readouterr().err
    loaded = load_model(str(tmp_path / "albef"))
    assert loaded.info["step"] == 2 and loaded.info["config"].model.init_from == source
    out = export(str(tmp_path / "albef"), "vlp", str(tmp_path / "export"), verify=False, log=lambda m: None).out
    model = load_pretrained(out)
    assert model.vlp_config.model.init_from == ""
    sd = loaded.model.state_dict()
    for k, t in model.state_dict().items():
        assert torch.equal(t, sd[k]), k


@pytest.mark.parametrize("family", ["dinov2", "vit", "clip"])
def test_transformers_vits_read_into_timm_vits_compute_the_same(family):
    """The ViT readers behind the transformers layout: same [CLS] output from the timm ViT they fill."""
    import timm
    from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, ViTConfig,
                              ViTModel)

    from vlp.export.transformer_ir import vit_from_hf, vit_to_timm

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
              hidden_act="gelu", layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = {"dinov2": lambda: Dinov2Model(Dinov2Config(**kw, mlp_ratio=2, layerscale_value=0.5)),
          "vit": lambda: ViTModel(ViTConfig(**kw, intermediate_size=64), add_pooling_layer=False),
          "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**kw, intermediate_size=64))}[family]().eval()
    with torch.no_grad():
        for p in hf.parameters():  # no weight keeps its symmetric init (LayerNorms at 1/0, LayerScale)
            p.add_(torch.randn_like(p) * 0.05)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2, mlp_ratio=2.0, pre_norm=family == "clip").eval()
    sd = vit_to_timm(vit_from_hf(hf))
    if family == "clip":  # CLIP's patch conv has no bias, nor has timm's pre-norm (CLIP-style) ViT
        assert not sd.pop("patch_embed.proj.bias").any()
    vit.load_state_dict(sd, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=images)
        cls = out.pooler_output if family == "clip" else out.last_hidden_state[:, 0]
        torch.testing.assert_close(vit.forward_features(images)[:, 0], cls, atol=1e-5, rtol=1e-4)
