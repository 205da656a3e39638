"""Issue 16, meeting users where their data and tools are: ImageNet class names and CLIP templates from
open_clip itself; the model card's Hub metadata (model-index results, base_model); a downloaded vlp
export read as data (no interpolation resolved, no pretrained weights fetched)."""
import os

import pytest
import torch

from vlp.config import from_dict


# ------------------------------------------------------------------------------ zero-shot lists
def test_imagenet_classnames_and_templates_are_open_clips(tmp_path, monkeypatch):
    from open_clip import zero_shot_metadata as meta

    from vlp.eval.zeroshot import DEFAULT_TEMPLATES, read_classnames, read_templates

    names = read_classnames("imagenet")
    assert len(names) == 1000 and names[0] == "tench" and names == list(meta.IMAGENET_CLASSNAMES)
    templates = read_templates()
    assert DEFAULT_TEMPLATES == "imagenet" and templates == read_templates("imagenet")
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert templates == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    # files still work, and a file wins over the built-in name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").write_text("cat\ndog\n")
    (tmp_path / "t.txt").write_text("a {} here\n\nthe {}.\n")
    assert read_classnames("imagenet") == ["cat", "dog"] and read_templates("t.txt") == ["a {} here", "the {}."]
    with pytest.raises(FileNotFoundError, match="built-in lists: imagenet"):
        read_classnames("imagenet21k")
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_templates("bad.txt")


# ------------------------------------------------------------------------------ model card metadata
def test_model_index_names_task_dataset_and_metrics_without_credentials():
    from vlp.export.model_card import model_index

    results = [
        {"file": "eval/zs.json", "task": "zeroshot", "data": {"spec": "hf://datasets/org/imnet@v1/val/{0..3}.tar"},
         "metrics": {"top1": 0.5, "top5": 0.875, "mean_per_class_accuracy": 0.25, "per_class_accuracy": {"a": 1.0}}},
        {"file": "eval/coco.json", "data": {"spec": "https://user:tok@x.org/c-{0..1}.tar?sig=S", "split": "test"},
         "metrics": {"i2t_r1": 0.3, "t2i_r1": 0.2, "mean_recall": 0.5, "i2t_median_rank": 3.0},
         "reranked": {"i2t_r1": 0.4}, "rerank_k": 16},
        {"file": "eval/other.json", "metrics": {"loss": 1.0}},  # neither task: left out
    ]
    got = {(e.task_type, e.dataset_type, e.dataset_name, e.dataset_split, e.dataset_revision, e.metric_type):
           e.metric_value for e in model_index(results)}
    zs = ("zero-shot-image-classification", "org/imnet", "hf://datasets/org/imnet@v1/val/{0..3}.tar", None, "v1")
    rt = ("image-text-retrieval", "https://x.org/c-{0..1}.tar", "https://x.org/c-{0..1}.tar", "test", None)
    assert got == {zs + ("top1",): 0.5, zs + ("top5",): 0.875, zs + ("mean_per_class_accuracy",): 0.25,
                   rt + ("i2t_r1",): 0.3, rt + ("t2i_r1",): 0.2, rt + ("mean_recall",): 0.5,
                   rt + ("i2t_r1_itm_reranked",): 0.4}


def test_base_model_names_hub_weights_only(tmp_path):
    from vlp.export.model_card import base_models

    def cfg(vision, text, init_from=""):
        return from_dict({"model": {"vision": vision, "text": text, "init_from": init_from}, "train": {"resume": "none"}})

    local = tmp_path / "bert"
    local.mkdir()
    assert base_models(cfg({"kind": "timm", "name": "vit_tiny_patch16_224", "pretrained": "default"},
                           {"kind": "hf", "pretrained": "google-bert/bert-base-uncased"})) == [
        "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "google-bert/bert-base-uncased"]
    tag = {"kind": "open_clip", "name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    snapshot = tmp_path / "hub" / "models--org--run" / "snapshots" / "abc123"
    assert base_models(cfg(tag, tag, str(snapshot))) == ["laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "org/run"]
    # local files and directories, random towers and a local init_from are never published
    assert base_models(cfg({"kind": "timm", "name": "vit_tiny_patch16_224", "pretrained": str(tmp_path / "w.pt")},
                           {"kind": "hf", "pretrained": str(local)}, str(tmp_path / "run"))) == []
    assert base_models(cfg({"kind": "timm", "name": "vit_tiny_patch16_224"}, {"kind": "open_clip"})) == []


# ------------------------------------------------------------------------------ load_pretrained
TINY = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_load_pretrained_reads_a_downloaded_config_as_data(tmp_path, monkeypatch):
    """An export's vlp_config.yaml edited (as a downloaded one may be) to hold `${oc.env:...}`, an open_clip
    pretrained tag, timm's default weights and an init_from: loading resolves nothing and fetches nothing."""
    import open_clip.factory
    import timm.models._builder
    from omegaconf import OmegaConf

    import vlp
    from vlp.export.vlp_format import write_vlp
    from vlp.models import build_model

    cfg = from_dict({"model": {"type": "clip", "embed_dim": 24,
                               "vision": {"kind": "timm", "name": "vit_tiny_patch16_224",
                                          "kwargs": {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2}},
                               "text": {"kind": "open_clip", "name": "ViT-B-32", "kwargs": TINY}},
                     "data": {"tokenizer": {"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}},
                     "train": {"resume": "none"}})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    out = tmp_path / "export"
    out.mkdir()
    write_vlp(model, cfg, dict(model.image_cfg), str(out), "fp32", "5GB", {"step": 0})
    stored = OmegaConf.load(out / "vlp_config.yaml")
    stored.train.wandb_project = "${oc.env:VLP_TEST_SECRET}"
    stored.model.text.pretrained = "openai"
    stored.model.vision.pretrained = "default"
    stored.model.init_from = str(tmp_path / "gone")
    OmegaConf.save(stored, out / "vlp_config.yaml")

    def refuse(*a, **k):
        raise AssertionError(f"a download was attempted: {a} {k}")

    monkeypatch.setenv("VLP_TEST_SECRET", "s3cret")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    loaded = vlp.load_pretrained(str(out))
    assert loaded.vlp_config.train.wandb_project == "${oc.env:VLP_TEST_SECRET}"  # text, never resolved
    assert loaded.vlp_config.model.text.pretrained == "openai"  # kept as stored, only not followed
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_open_clip_hf_hub_tower_exports_its_config_and_loads_without_the_hub(tmp_path, monkeypatch):
    """A tower named `hf-hub:ORG/NAME` (its config in the Hub cache, as training left it): the vlp export
    keeps the config as a local-dir tower, and loading it fetches nothing from the Hub."""
    import json

    import huggingface_hub.constants
    import open_clip.factory

    import vlp
    from vlp.export.vlp_format import write_vlp
    from vlp.models import build_model

    snapshot = tmp_path / "hub" / "models--org--tiny-oc" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    (tmp_path / "hub" / "models--org--tiny-oc" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-oc" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = from_dict({"model": {"type": "clip", "embed_dim": 24,
                               "vision": {"kind": "open_clip", "name": "hf-hub:org/tiny-oc"},
                               "text": {"kind": "open_clip", "name": "hf-hub:org/tiny-oc"}},
                     "data": {"tokenizer": {"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}},
                     "train": {"resume": "none"}})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()  # from the cached config (no weights in the cache: random init)
    out = tmp_path / "export"
    out.mkdir()
    write_vlp(model, cfg, dict(model.image_cfg), str(out), "fp32", "5GB", {"step": 0})
    stored = (out / "vlp_config.yaml").read_text()
    assert "hf-hub:" not in stored and "local-dir:towers/vision" in stored
    assert json.loads((out / "towers" / "text" / "open_clip_config.json").read_text())["model_cfg"] == TINY

    def refuse(*a, **k):
        raise AssertionError(f"the Hub was asked: {a} {k}")

    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", refuse)
    monkeypatch.setattr(open_clip.factory, "_get_hf_config", refuse)
    loaded = vlp.load_pretrained(str(out))
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
