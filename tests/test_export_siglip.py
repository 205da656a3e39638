"""SigLIP -> transformers SiglipModel, offline: a tiny open_clip SigLIP-style model (a timm ViT without class
token and with an attention-pool head behind open_clip's timm adapter + a bidirectional last-token text
transformer) is written with `--format hf`, reloaded with plain transformers, and gives the trained model's
embeddings and logits (learned scale AND bias); towers SiglipModel cannot hold are refused with the reason."""
import json
import os

import pytest
import torch

from vlp.config import from_dict

TIMM_NAME = "vlp_test_siglip_vit"
OC_NAME = "vlp-test-SigLIP-tiny"
OC_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0,
           "no_causal_mask": True, "pool_type": "last", "proj_bias": True}
CLIP_TOK = {"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}
CAPTIONS = ["a photo of a cat.", "it's 3 dogs' toys, 2024!", "hello ! world"]  # "!" is CLIP BPE id 0 = open_clip's pad


@pytest.fixture(scope="module", autouse=True)
def tiny_siglip_configs(tmp_path_factory):
    """A tiny SigLIP-style timm ViT (GELU-tanh, no class token, MAP head) and an open_clip config around it,
    registered the way a user adds their own (timm.register_model, open_clip.add_model_config)."""
    import open_clip
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if TIMM_NAME not in timm.list_models(TIMM_NAME):
        def vlp_test_siglip_vit(pretrained=False, **kwargs):
            for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(k, None)
            args = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                        class_token=False, global_pool="map", act_layer="gelu_tanh", num_classes=0)
            args.update(kwargs)
            return VisionTransformer(**args)

        vlp_test_siglip_vit.__module__ = __name__
        register_model(vlp_test_siglip_vit)
    root = tmp_path_factory.mktemp("oc_cfg")
    cfg = {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
           "vision_cfg": {"image_size": 32, "timm_model_name": TIMM_NAME, "timm_model_pretrained": False,
                          "timm_pool": "map", "timm_proj": "none"},
           "text_cfg": dict(OC_TEXT)}
    (root / f"{OC_NAME}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(root / f"{OC_NAME}.json"))


def _cfg(vision=None, text_kwargs=None, embed_dim=32):
    vision = vision or {"kind": "open_clip", "name": OC_NAME}
    text = {"kind": "open_clip", "kwargs": dict(OC_TEXT, **(text_kwargs or {}))}
    return from_dict({"model": {"type": "siglip", "embed_dim": embed_dim, "vision": vision, "text": text},
                      "data": {"tokenizer": CLIP_TOK}, "train": {"resume": "none"}})


def _model(cfg):
    """The vlp model with every weight perturbed (tests/test_export_mapping.py), and SigLIP's scale and bias
    set away from their initial values."""
    from tests.test_export_mapping import _model as perturbed

    m = perturbed(cfg)
    with torch.no_grad():
        m.logit_scale.fill_(2.1)
        m.logit_bias.fill_(-3.7)
    return m


def test_siglip_exports_to_siglip_model_and_plain_transformers_reproduces_it(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    from vlp.data.tokenizers import build_tokenizer
    from vlp.data.transforms import resolve_image_cfg
    from vlp.export.hf import write_hf
    from vlp.export.verify import verify_export

    cfg = _cfg()
    m = _model(cfg)
    assert type(m.vision).__name__ == "TimmModel" and m.vision.trunk.cls_token is None
    image_cfg = resolve_image_cfg(m.image_cfg, cfg.data)
    out = str(tmp_path / "hf")
    info = write_hf(m, cfg, image_cfg, out, "fp32", "5GB")
    assert info["architecture"] == "SiglipModel" and any("<|pad|>" in note for note in info["notes"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "siglip" and config["architectures"] == ["SiglipModel"]
    assert config["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"

    hf = SiglipModel.from_pretrained(out).eval()  # plain transformers, nothing of vlp
    tok = AutoTokenizer.from_pretrained(out)
    proc = AutoImageProcessor.from_pretrained(out)
    assert proc.crop_size["height"] == image_cfg["size"]
    enc = tok(CAPTIONS, padding="max_length", return_tensors="pt")
    assert set(enc) == {"input_ids"}  # SigLIP is called without an attention mask
    ids, mask = build_tokenizer(cfg.data.tokenizer)(CAPTIONS)
    assert enc["input_ids"].shape == ids.shape
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(**enc, pixel_values=images)
        img, txt = m.encode_image(images), m.encode_text(ids, mask)
        logits = img @ txt.t() * m.logit_scale.exp() + m.logit_bias
    assert float(hf.logit_bias.detach()) == pytest.approx(-3.7) and float(hf.logit_scale.detach()) == pytest.approx(2.1)
    assert (theirs.image_embeds - img).abs().max() < 1e-5
    assert (theirs.text_embeds - txt).abs().max() < 1e-5
    assert (theirs.logits_per_image - logits).abs().max() < 1e-4
    assert img.abs().max() > 0.05 and logits.std() > 0.1  # not a degenerate comparison

    verified = verify_export("hf", out, m, build_tokenizer(cfg.data.tokenizer), image_cfg)
    assert set(verified) == {"image_max_abs_diff", "text_max_abs_diff", "logits_max_abs_diff"}
    assert max(verified.values()) < 1e-4

    # vlp reads its own export back (vlp eval, model.init_from): the tokenizer gives no mask, read as all ones
    from vlp.load import load_model

    loaded = load_model(out)
    ids2, mask2 = loaded.tokenizer(CAPTIONS)
    assert torch.equal(ids2, enc["input_ids"]) and bool(mask2.all())
    with torch.no_grad():
        again = loaded.model.encode_text(ids2, mask2)
    assert (again - theirs.text_embeds).abs().max() < 1e-5


@pytest.mark.parametrize("vision,text_kwargs,embed_dim,match", [
    # a timm tower: vlp puts a linear image head after the pool, SiglipVisionModel has nowhere to hold it
    ({"kind": "timm", "name": "vit_tiny_patch16_224",
      "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2,
                 "class_token": False, "global_pool": "map"}}, None, 32, "linear image head"),
    (None, {"no_causal_mask": False}, 32, "no_causal_mask"),
    (None, {"pool_type": "argmax"}, 32, "pool_type: last"),
    (None, {"use_pad_mask": True}, 32, "use_pad_mask"),
    (None, None, 24, "linear image head"),  # embed_dim != ViT width: vlp adds an image head
])
def test_towers_siglip_model_cannot_hold_are_refused_naming_the_option(vision, text_kwargs, embed_dim, match):
    from vlp.export.hf import hf_model
    from vlp.export.transformer_ir import Unsupported

    cfg = _cfg(vision, text_kwargs, embed_dim)
    with pytest.raises(Unsupported, match=match) as e:
        hf_model(_model(cfg), cfg, eot_id=49407)
    assert "SiglipModel" in str(e.value) and "valid:" in str(e.value)


def test_an_export_with_an_unmappable_tower_is_refused_not_written_as_clip(tmp_path):
    """The CLIPModel fallback would drop the learned logit bias: a SigLIP model is SiglipModel or nothing."""
    from vlp.data.transforms import resolve_image_cfg
    from vlp.export.hf import write_hf
    from vlp.export.transformer_ir import Unsupported

    cfg = _cfg(text_kwargs={"no_causal_mask": False, "pool_type": "argmax"})
    m = _model(cfg)
    with pytest.raises(Unsupported, match="no_causal_mask"):
        write_hf(m, cfg, resolve_image_cfg(m.image_cfg, cfg.data), str(tmp_path / "hf"), "fp32", "5GB")
    assert not os.path.exists(tmp_path / "hf" / "config.json")
