"""Export layouts without checkpoints: each tower combination maps onto transformers' CLIPModel /
VisionTextDualEncoderModel and open_clip's CustomTextCLIP with the same embeddings, or is refused
with the reason; the CLIP BPE becomes an equivalent transformers tokenizer."""
import os

import pytest
import torch
import torch.nn.functional as F

from vlp.config import from_dict

TIMM_VIT = {"kind": "timm", "name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}}
OC_TEXT = {"kind": "open_clip", "kwargs": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                           "layers": 2}}
CLIP_TOK = {"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}
CAPTIONS = ["a photo of a cat", "two red cubes left of a blue sphere", "it's 3 dogs' toys!"]


def _cfg(vision=None, text=None, tokenizer=None, **model):
    return from_dict({"model": {"type": "clip", "embed_dim": 24, "vision": vision or TIMM_VIT, "text": text or OC_TEXT,
                                **model},
                      "data": {"tokenizer": tokenizer or CLIP_TOK}, "train": {"resume": "none"}})


def _model(cfg):
    """The vlp model with every weight perturbed, so no parameter keeps a symmetric init value."""
    from vlp.models import build_model

    torch.manual_seed(0)
    m = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _inputs(m, cfg):
    from vlp.data.tokenizers import build_tokenizer

    s = m.image_cfg["size"]
    images = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    return images, build_tokenizer(cfg.data.tokenizer)(CAPTIONS)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny transformers configs (and a BERT WordPiece tokenizer) saved the way a hub name would be."""
    from transformers import BertConfig, BertTokenizerFast, CLIPTextConfig, CLIPVisionConfig

    root = tmp_path_factory.mktemp("hf")
    dirs = {k: str(root / k) for k in ("clipv", "clipt", "bert")}
    CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                     patch_size=16).save_pretrained(dirs["clipv"])
    CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=16, eos_token_id=49407, bos_token_id=49406,
                   pad_token_id=0).save_pretrained(dirs["clipt"])
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64,
               max_position_embeddings=16).save_pretrained(dirs["bert"])
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "two", "red", "cubes", "left",
             "blue", "sphere", "it", "'", "s", "3", "dogs", "toys", "!"]
    with open(os.path.join(dirs["bert"], "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(dirs["bert"], "vocab.txt")).save_pretrained(dirs["bert"])
    return dirs


def _hf_embeddings(h, images, ids, mask):
    with torch.no_grad():
        return (F.normalize(h.get_image_features(pixel_values=images).pooler_output, dim=-1),
                F.normalize(h.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1))


def _assert_same(m, theirs, images, ids, mask):
    with torch.no_grad():
        ours = (m.encode_image(images), m.encode_text(ids, mask))
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("vision,expected", [
    (TIMM_VIT, "VisionTextDualEncoderModel"),  # plain timm ViT (no pre-norm) -> Dinov2Model tower
    # CLIP-style timm ViT (pre-norm, no patch bias) with LayerScale
    (dict(TIMM_VIT, kwargs=dict(TIMM_VIT["kwargs"], pre_norm=True, init_values=0.1)), "CLIPModel"),
    ({"kind": "open_clip", "kwargs": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 2, "heads": 2}},
     "CLIPModel"),
])
def test_vit_and_open_clip_text_map_onto_transformers(vision, expected):
    from vlp.export.hf import hf_model

    cfg = _cfg(vision=vision)
    m = _model(cfg)
    images, (ids, mask) = _inputs(m, cfg)
    h = hf_model(m, cfg, eot_id=49407)
    assert type(h).__name__ == expected
    _assert_same(m, _hf_embeddings(h, images, ids, mask), images, ids, mask)


def test_transformers_clip_towers_become_clip_model(hf_dirs):
    from vlp.export.hf import hf_model

    cfg = _cfg(vision={"kind": "hf", "name": hf_dirs["clipv"]}, text={"kind": "hf", "name": hf_dirs["clipt"]})
    m = _model(cfg)
    images, (ids, mask) = _inputs(m, cfg)
    h = hf_model(m, cfg, eot_id=49407)
    assert type(h).__name__ == "CLIPModel"
    _assert_same(m, _hf_embeddings(h, images, ids, mask), images, ids, mask)


def test_inexpressible_towers_are_refused_with_the_reason(hf_dirs):
    from vlp.export.hf import hf_model
    from vlp.export.openclip import open_clip_layout
    from vlp.export.transformer_ir import Unsupported

    conv = _cfg(vision={"kind": "timm", "name": "convnext_atto"})
    with pytest.raises(Unsupported, match="ConvNeXt is not a timm VisionTransformer"):
        hf_model(_model(conv), conv, eot_id=49407)
    bert = _cfg(text={"kind": "hf", "name": hf_dirs["bert"], "pool": "cls"},
                tokenizer={"kind": "hf", "name": hf_dirs["bert"], "context_length": 16})
    with pytest.raises(Unsupported, match="pool='cls'"):
        hf_model(_model(bert), bert, eot_id=None)
    hf_vision = _cfg(vision={"kind": "hf", "name": hf_dirs["clipv"]})
    with pytest.raises(Unsupported, match="open_clip has no transformers vision towers"):
        open_clip_layout(_model(hf_vision), hf_vision, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                                        "interpolation": "bicubic"}, "/nonexistent", "/nonexistent")


@pytest.mark.parametrize("case", ["timm_vit_kwargs", "timm_convnext", "open_clip_vit", "hf_bert_text"])
def test_open_clip_layout_reproduces_embeddings(case, hf_dirs, tmp_path):
    """timm ViT reshaped by kwargs -> open_clip's VisionTransformer; a timm CNN -> timm_model_name;
    an open_clip ViT keeps its config; a transformers text tower -> hf_model_name."""
    from vlp.export.openclip import instantiate, open_clip_layout

    kw = {
        "timm_vit_kwargs": {},
        "timm_convnext": {"vision": {"kind": "timm", "name": "convnext_atto"}},
        "open_clip_vit": {"vision": {"kind": "open_clip", "kwargs": {"image_size": 32, "patch_size": 16, "width": 32,
                                                                     "layers": 2, "heads": 2, "ls_init_value": 0.1}}},
        "hf_bert_text": {"text": {"kind": "hf", "name": hf_dirs["bert"], "pool": "mean"},
                         "tokenizer": {"kind": "hf", "name": hf_dirs["bert"], "context_length": 16}},
    }[case]
    cfg = _cfg(**kw)
    m = _model(cfg)
    images, (ids, mask) = _inputs(m, cfg)
    config, weights = open_clip_layout(m, cfg, dict(m.image_cfg), str(tmp_path), str(tmp_path))
    assert weights["logit_scale"].shape == torch.Size([])  # open_clip's scalar, ours is [1]
    if case == "timm_convnext":
        assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "convnext_atto"
    if case == "timm_vit_kwargs":
        assert "timm_model_name" not in config["model_cfg"]["vision_cfg"]
    oc = instantiate(config, weights)
    with torch.no_grad():
        theirs = (oc.encode_image(images, normalize=True), oc.encode_text(ids, normalize=True))
    _assert_same(m, theirs, images, ids, mask)


def test_clip_bpe_becomes_an_equivalent_transformers_tokenizer(tmp_path):
    import open_clip
    from transformers import AutoTokenizer

    from vlp.export.tokenizer_files import clip_bpe_tokenizer

    simple = open_clip.get_tokenizer("ViT-B-32")
    clip_bpe_tokenizer(simple, 77).save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = CAPTIONS + ["Two  RED cubes,   left of a blue sphere!", "word " * 100]
    ours = simple(texts)
    enc = tok(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    assert torch.equal(mask, ours != 0)
    assert torch.equal(enc["input_ids"][mask], ours[mask])
    assert tok.eos_token_id == simple.eot_token_id == 49407


def test_vlp_layout_carries_local_tower_configs_and_tokenizer(hf_dirs, tmp_path):
    """Towers and tokenizer read from local directories still load after those directories are gone."""
    import shutil

    from omegaconf import OmegaConf

    import vlp
    from vlp.data.tokenizers import build_tokenizer
    from vlp.export.vlp_format import write_vlp

    src = tmp_path / "src"
    for k in ("clipv", "bert"):
        shutil.copytree(hf_dirs[k], src / k)
    cfg = _cfg(vision={"kind": "hf", "name": str(src / "clipv")},
               text={"kind": "hf", "name": str(src / "bert"), "pool": "mean", "kwargs": {"num_hidden_layers": 1}},
               tokenizer={"kind": "hf", "name": str(src / "bert"), "context_length": 16})
    m = _model(cfg)
    ids = build_tokenizer(cfg.data.tokenizer)(CAPTIONS)[0]
    out = tmp_path / "export"
    out.mkdir()
    write_vlp(m, cfg, dict(m.image_cfg), str(out), "fp32", "5GB", {"step": 0})
    shutil.rmtree(src)
    stored = OmegaConf.load(out / "vlp_config.yaml")
    assert (stored.model.vision.name, stored.model.text.name, stored.data.tokenizer.name) == (
        "towers/vision", "towers/text", "tokenizer")
    loaded = vlp.load_pretrained(str(out))
    assert len(loaded.text.model.encoder.layer) == 1  # the kwargs-modified config travelled with the export
    ours, theirs = m.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loaded.tokenizer(CAPTIONS)[0], ids)


def test_fusion_models_export_to_the_vlp_layout_only(hf_dirs, tmp_path):
    """ALBEF (configs/demo_albef.yaml with a local BERT config): the vlp layout round-trips it, buffers
    (momentum copies, queues) included; the standard layouts refuse it by name."""
    import vlp
    from vlp.config import load_config
    from vlp.export.hf import hf_model
    from vlp.export.openclip import open_clip_layout
    from vlp.export.transformer_ir import Unsupported
    from vlp.export.vlp_format import write_vlp

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "demo_albef.yaml"),
                      [f"model.text.name={hf_dirs['bert']}", f"data.tokenizer.name={hf_dirs['bert']}",
                       "train.resume=none"])
    m = _model(cfg)
    for mapper in (lambda: hf_model(m, cfg, None),
                   lambda: open_clip_layout(m, cfg, dict(m.image_cfg), str(tmp_path), str(tmp_path))):
        with pytest.raises(Unsupported, match="ALBEF is not a dual encoder"):
            mapper()
    out = tmp_path / "export"
    out.mkdir()
    write_vlp(m, cfg, dict(m.image_cfg), str(out), "fp32", "5GB", {})
    loaded = vlp.load_pretrained(str(out))
    ours, theirs = m.state_dict(), loaded.state_dict()
    assert "image_queue" in theirs and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
