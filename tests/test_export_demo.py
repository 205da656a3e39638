"""`vlp export` on a real training run of configs/demo_clip.yaml (2 steps, a checkpoint per step):
all three layouts load back through their own libraries with the trained model's embeddings (1e-5),
the transformers and open_clip ones in a process where vlp cannot be imported."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red cube left of a blue sphere", "two green triangles", "a photo of a yellow circle"]


CONVNEXT = """\
model:
  type: clip
  embed_dim: 16
  vision: {kind: timm, name: convnext_atto}
  text: {kind: open_clip, kwargs: {context_length: 16, vocab_size: 49408, width: 16, heads: 2, layers: 1}}
data:
  image_size: 32
  tokenizer: {kind: open_clip, name: ViT-B-32, context_length: 16}
"""


def _train(config, out, shards, *overrides):
    """`vlp train` in its own process (DeepSpeed keeps process-group state per process); returns the Popen."""
    args = [f"output_dir={out}", f"data.train_shards={shards}", "train.steps=2", "train.micro_batch_size=8",
            "train.warmup_steps=0", "data.workers=0", "data.shuffle_buffer=0", "train.tensorboard=false",
            "train.peak_flops=1e12", "train.resume=none", *overrides]
    return subprocess.Popen([sys.executable, "-m", "vlp.cli", "train", "--config", str(config), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(synth_train, tmp_path_factory):
    """Two runs trained side by side: configs/demo_clip.yaml for 2 steps with both checkpoints kept (weights
    above 10 MB get sharded) plus an eval result in RUN/eval/ as `vlp eval` writes it in the demo; and a
    1-step CLIP with a convolutional timm vision tower."""
    root = tmp_path_factory.mktemp("runs")
    (root / "convnext.yaml").write_text(CONVNEXT)
    out = {"demo": str(root / "demo"), "convnext": str(root / "convnext")}
    procs = [_train(os.path.join(ROOT, "configs", "demo_clip.yaml"), out["demo"], synth_train,
                    "train.save_every=1", "train.keep_last=0", "export.max_shard_size=10MB"),
             _train(root / "convnext.yaml", out["convnext"], synth_train, "train.steps=1")]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
    return out


@pytest.fixture(scope="module")
def demo_run(runs):
    run = runs["demo"]
    os.makedirs(os.path.join(run, "eval"))
    with open(os.path.join(run, "eval", "retrieval.json"), "w") as f:
        json.dump({"metrics": {"i2t_r1": 0.3125, "t2i_r1": 0.28125, "mean_recall": 0.5}, "n_images": 32,
                   "data": "synth test"}, f)
    return run


def _reference(run, step):
    """The trained model rebuilt from the run's config and DeepSpeed's stage-0 module state, read directly."""
    from vlp.config import load_config
    from vlp.data.tokenizers import build_tokenizer
    from vlp.models import build_model

    ckpt = os.path.join(run, "checkpoints", f"step_{step:07d}")
    cfg = load_config(os.path.join(ckpt, "config.yaml"), ["train.resume=none"])
    model = build_model(cfg.model)
    sd = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(sd)
    return model.eval(), build_tokenizer(cfg.data.tokenizer), cfg


@pytest.fixture(scope="module")
def exports(demo_run, tmp_path_factory):
    from vlp.export import export

    root = tmp_path_factory.mktemp("exports")
    return {fmt: export(demo_run, fmt, str(root / fmt), log=lambda m: None) for fmt in ("hf", "open_clip", "vlp")}


# Runs with vlp made unimportable: the standard layouts must not need it.
LOAD_WITHOUT_VLP = r"""
import sys
sys.modules["vlp"] = None
import torch, torch.nn.functional as F, open_clip
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
hf_dir, oc_dir, out, *captions = sys.argv[1:]
images = torch.load(out + ".images.pt")
res = {}
model = AutoModel.from_pretrained(hf_dir).eval()
tok = AutoTokenizer.from_pretrained(hf_dir)
enc = tok(captions, padding=True, return_tensors="pt")
proc = AutoImageProcessor.from_pretrained(hf_dir)
with torch.no_grad():
    res["hf_image"] = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
    res["hf_text"] = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
res["hf_crop"] = torch.tensor([proc.crop_size["height"], proc.crop_size["width"]])
res["hf_mean"], res["hf_std"] = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
oc, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + oc_dir)
oc.eval()
octok = open_clip.get_tokenizer("local-dir:" + oc_dir)
with torch.no_grad():
    res["oc_image"] = oc.encode_image(images, normalize=True)
    res["oc_text"] = oc.encode_text(octok(captions), normalize=True)
res["oc_ids"] = octok(captions)
save_file({k: v.contiguous() for k, v in res.items()}, out)
print(type(model).__name__)
"""


@pytest.fixture(scope="module")
def loaded_without_vlp(exports, tmp_path_factory):
    from safetensors.torch import load_file

    out = str(tmp_path_factory.mktemp("loaded") / "emb.safetensors")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(images, out + ".images.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_VLP, exports["hf"].out, exports["open_clip"].out, out,
                           *CAPTIONS], capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return images, load_file(out), proc.stdout.strip()


def _ours(demo_run, images):
    model, tok, cfg = _reference(demo_run, 2)
    ids, mask = tok(CAPTIONS)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(ids, mask), ids, cfg


def test_hf_export_is_a_transformers_dual_encoder_with_our_embeddings(demo_run, exports, loaded_without_vlp):
    images, res, arch = loaded_without_vlp
    img, txt, _, cfg = _ours(demo_run, images)
    assert arch == "VisionTextDualEncoderModel"  # the demo's plain timm ViT becomes a Dinov2Model tower
    assert (res["hf_image"] - img).abs().max() < 1e-5
    assert (res["hf_text"] - txt).abs().max() < 1e-5
    assert res["hf_crop"].tolist() == [64, 64]
    assert torch.allclose(res["hf_mean"], torch.tensor([0.5, 0.5, 0.5]))
    files = set(os.listdir(exports["hf"].out))
    # 30 MB of fp32 weights with export.max_shard_size=10MB: shards plus the index transformers reads
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) >= 2


def test_open_clip_export_loads_with_open_clip_and_matches(demo_run, exports, loaded_without_vlp):
    images, res, _ = loaded_without_vlp
    img, txt, ids, _ = _ours(demo_run, images)
    assert torch.equal(res["oc_ids"], ids)  # the bundled CLIP BPE at the run's context length (32)
    assert (res["oc_image"] - img).abs().max() < 1e-5
    assert (res["oc_text"] - txt).abs().max() < 1e-5
    with open(os.path.join(exports["open_clip"].out, "open_clip_config.json")) as f:
        cfg = json.load(f)
    assert cfg["preprocess_cfg"]["size"] == 64 and cfg["model_cfg"]["embed_dim"] == 128


def test_vlp_export_round_trips_through_load_pretrained(demo_run, exports):
    import vlp

    model = vlp.load_pretrained(exports["vlp"].out)
    ref, tok, _ = _reference(demo_run, 2)
    assert not model.training
    ours, theirs = ref.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids, mask = model.tokenizer(CAPTIONS)
    assert torch.equal(ids, tok(CAPTIONS)[0])
    assert model.image_cfg["size"] == 64 and model.vlp_config.model.embed_dim == 128
    assert "model.safetensors.index.json" in os.listdir(exports["vlp"].out)


def test_no_pickle_anywhere_and_weights_are_safetensors(exports):
    from safetensors import safe_open

    for res in exports.values():
        names = os.listdir(res.out)
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names
        weights = [n for n in names if n.endswith(".safetensors")]
        assert weights
        for n in names:
            if os.path.isdir(os.path.join(res.out, n)):
                continue
            with open(os.path.join(res.out, n), "rb") as f:
                assert f.read(2) not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), n  # pickle protocols
        for n in weights:
            with safe_open(os.path.join(res.out, n), "pt") as f:
                assert f.metadata().get("format") == "pt"
        assert not [n for n in os.listdir(os.path.dirname(res.out)) if ".tmp." in n]


def test_model_cards_carry_metadata_training_facts_and_eval_results(exports):
    from huggingface_hub import ModelCard

    libraries = {"hf": "transformers", "open_clip": "open_clip", "vlp": "vlp"}
    for fmt, res in exports.items():
        card = ModelCard.load(os.path.join(res.out, "README.md"))
        assert card.data.license == "apache-2.0" and card.data.library_name == libraries[fmt]
        assert card.data.pipeline_tag == "zero-shot-image-classification" and "clip" in card.data.tags
        # Hub metadata: RUN/eval/retrieval.json as model-index; random towers, so no base_model
        got = {(e.task_type, e.dataset_name, e.metric_type): e.metric_value for e in card.data.eval_results}
        ret = ("image-text-retrieval", "synth test")
        assert got == {ret + ("i2t_r1",): 0.3125, ret + ("t2i_r1",): 0.28125, ret + ("mean_recall",): 0.5}, fmt
        assert card.data.base_model is None
        text = card.text
        for fact in ("vit_tiny_patch16_224", "| optimizer steps | 2 of 2 planned |", "| samples seen | 16 |",
                     "| ZeRO stage | 0 |", "i2t_r1 | 0.3125", "radford2021clip", "Intended use"):
            assert fact in text, (fmt, fact)
        # the Hub page shows the training curves and the recall bars: files beside the card, linked relatively
        for link in ("](images/training_curves.png)", "](images/recall_0.png)"):
            assert link in text, (fmt, link)
            png = os.path.join(res.out, link[2:-1])
            with open(png, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def test_step_and_dtype_select_the_checkpoint_and_the_weight_type(demo_run, tmp_path):
    from safetensors import safe_open

    import vlp
    from vlp.export import export

    res = export(demo_run, "vlp", str(tmp_path / "s1"), step=1, dtype="bf16", log=lambda m: None)
    assert res.step == 1
    with open(os.path.join(res.out, "vlp_export.json")) as f:
        assert json.load(f)["step"] == 1
    shard = sorted(n for n in os.listdir(res.out) if n.endswith(".safetensors"))[0]
    with safe_open(os.path.join(res.out, shard), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = vlp.load_pretrained(res.out).state_dict()
    step1, step2 = _reference(demo_run, 1)[0].state_dict(), _reference(demo_run, 2)[0].state_dict()
    key = "vision.blocks.0.attn.qkv.weight"
    assert torch.equal(loaded[key], step1[key].bfloat16().float())
    assert not torch.equal(loaded[key], step2[key].bfloat16().float())


def test_cli_refuses_a_nonempty_out_and_overwrites_only_an_export(demo_run, tmp_path, capsys):
    from vlp.cli import main

    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["export", "--checkpoint", demo_run, "--format", "vlp", "--out", str(out)]
    assert main(args) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    # --overwrite replaces only a previous export, never a directory of something else
    assert main(args + ["--overwrite"]) == 2
    assert "not a previous export" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(args) == 0
    assert main(args + ["--overwrite"]) == 0
    cap = capsys.readouterr()
    assert "5/5" in cap.err and "stage/s" in cap.err  # a progress bar over the export's stages (rate, ETA)
    assert "── vlp export: done" in cap.out and f"out         {out}" in cap.out  # the summary block
    assert "vlp_config.yaml" in os.listdir(out)
    assert os.listdir(tmp_path) == ["exp"]  # no temp or old directories left beside it
    # --out equal to (or containing) the run or checkpoint directory is refused; the run stays whole
    before = sorted(os.listdir(os.path.join(demo_run, "checkpoints")))
    for target in (demo_run, os.path.dirname(demo_run)):
        assert main(["export", "--checkpoint", demo_run, "--format", "vlp", "--out", target, "--overwrite"]) == 2
        assert "would replace the checkpoints" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(demo_run, "checkpoints"))) == before


def test_a_format_the_model_cannot_take_fails_naming_the_formats_that_work(runs, tmp_path):
    from vlp.export import ExportError, export

    with pytest.raises(ExportError) as err:
        export(runs["convnext"], "hf", str(tmp_path / "hf"), log=lambda m: None)
    msg = str(err.value)
    assert "--format hf" in msg and "ConvNeXt" in msg and "Formats that work for it: open_clip, vlp" in msg
    assert not os.path.exists(tmp_path / "hf") and not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_help_names_layouts_hub_options_and_exit_codes(capsys):
    from vlp.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    text = capsys.readouterr().out
    for word in ("--checkpoint", "--step", "--format", "--dtype", "--push-to-hub", "--private", "--revision",
                 "--commit-message", "--dry-run", "--overwrite", "CLIPModel", "local-dir:OUT",
                 "vlp.load_pretrained", "HF_TOKEN", "exit codes"):
        assert word in text, word


def test_published_files_name_no_secret_and_no_local_path(demo_run, tmp_path):
    """A shard URL's userinfo and query (tokens) and the machine's paths stay out of what is published:
    the model card, the exported config and the provenance record."""
    import shutil

    from omegaconf import OmegaConf

    from vlp.export import export

    run = tmp_path / "secret_run"
    shutil.copytree(demo_run, run)
    url = "https://alice:hunter2@data.example.com/shards/{000..009}.tar?X-Amz-Signature=deadbeef"
    for cfg_file in [run / "config.yaml"] + sorted(run.glob("checkpoints/step_*/config.yaml")):
        cfg = OmegaConf.load(cfg_file)
        cfg.data.train_shards = url
        OmegaConf.save(cfg, cfg_file)
    out = tmp_path / "vlp"
    export(str(run), "vlp", str(out), log=lambda m: None)
    published = "".join((out / name).read_text() for name in ("README.md", "vlp_config.yaml", "vlp_export.json"))
    for secret in ("hunter2", "alice", "deadbeef", "X-Amz", str(tmp_path)):
        assert secret not in published, secret
    assert "https://data.example.com/shards/{000..009}.tar" in published
    assert json.loads((out / "vlp_export.json").read_text())["checkpoint"].startswith("secret_run/checkpoints/step_")
