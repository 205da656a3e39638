"""Eval end to end on tiny real models: open_clip and transformers exports, CLIP_benchmark agreement,
skipped samples, Karpathy JSON, ITM re-ranking, zero-shot labels, the CLI."""
import glob
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import webdataset as wds

from vlp.eval.encode import encode_local, gather_encoded
from vlp.eval.evaluate import evaluate_retrieval
from vlp.load import detect_format, load_model
from vlp.eval.retrieval import metrics_from_ranks, retrieval_metrics, retrieval_ranks

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_open_clip_export(out: str) -> str:
    """A random tiny open_clip CLIP in open_clip's hub layout (open_clip_config.json + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**OPEN_CLIP_CFG)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {
            "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}, f)
    save_file(model.state_dict(), os.path.join(out, "open_clip_model.safetensors"))
    return out


def synth_records(synth_dir) -> list:
    return list(wds.tarfile_samples([{"url": u} for u in sorted(glob.glob(os.path.join(synth_dir, "*.tar")))]))


def second_caption(meta: dict) -> str:
    """Another caption naming every attribute, so no two images share a caption (exact ties between
    a positive and a negative are ranked pessimistically by us and arbitrarily by CLIP_benchmark)."""
    return " and ".join(f"{o['size']} {o['color']} {o['shape']} {o['position']}" for o in meta["objects"])


def write_shards(out: str, samples: list, n_shards: int = 2) -> str:
    """Samples (dicts of field -> bytes/str) into `0.tar .. n-1.tar` plus CLIP_benchmark's nshards.txt."""
    os.makedirs(out, exist_ok=True)
    per = -(-len(samples) // n_shards)
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(out, f"{s}.tar")) as w:
            for sample in samples[s * per:(s + 1) * per]:
                w.write(sample)
    with open(os.path.join(out, "nshards.txt"), "w") as f:
        f.write(str(n_shards))
    return out


@pytest.fixture(scope="module")
def oc_export(tmp_path_factory):
    return save_open_clip_export(str(tmp_path_factory.mktemp("oc_export")))


@pytest.fixture(scope="module")
def oc(oc_export):
    return load_model(oc_export)


@pytest.fixture(scope="module")
def bench_root(synth_test, tmp_path_factory):
    """CLIP_benchmark local layout: ret/ (retrieval, two captions per image) and cls/ (label = first shape),
    both over the same tar shards."""
    root = tmp_path_factory.mktemp("bench")
    samples = []
    for rec in synth_records(synth_test):
        meta = json.loads(rec["json"])
        samples.append({"__key__": rec["__key__"], "jpg": rec["jpg"],
                        "txt": rec["txt"].decode() + "\n" + second_caption(meta),
                        "cls": str(SHAPES.index(meta["objects"][0]["shape"])), "json": rec["json"]})
    write_shards(str(root / "ret" / "test"), samples)
    (root / "ret" / "dataset_type.txt").write_text("retrieval")
    os.makedirs(root / "cls" / "test")
    for name in ("0.tar", "1.tar", "nshards.txt"):
        os.symlink(root / "ret" / "test" / name, root / "cls" / "test" / name)
    (root / "cls" / "classnames.txt").write_text("\n".join(SHAPES))
    templates = ["a photo of a {}.", "a drawing of a {}.", "a {} on a grey background."]
    (root / "cls" / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates))
    (root / "templates.txt").write_text("\n".join(templates))
    return root


CLIP_BENCHMARK = r"""
import json, sys, torch
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from clip_benchmark.models import load_clip

model_dir, root, out = sys.argv[1:4]
model, transform, tokenizer = load_clip("open_clip", "local-dir:" + model_dir, None, None, device="cpu")
model.eval()
res = {}
for name, task in (("ret", "zeroshot_retrieval"), ("cls", "zeroshot_classification")):
    ds = build_dataset("wds/" + name, root=f"{root}/{name}", transform=transform, split="test", task=task)
    dl = torch.utils.data.DataLoader(ds.batched(16), batch_size=None, shuffle=False, num_workers=0)
    if task == "zeroshot_retrieval":
        res[name] = zeroshot_retrieval.evaluate(model, dl, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    else:  # their classifier and logits; their `accuracy` breaks on numpy 2 (float() of a 1-element array),
        # so the scores come from scikit-learn
        from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
        clf = zeroshot_classification.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
        logits, target = zeroshot_classification.run_classification(model, clf, dl, "cpu", amp=False)
        labels = list(range(len(ds.classes)))
        res[name] = {"acc1": top_k_accuracy_score(target, logits, k=1, labels=labels),
                     "acc5": top_k_accuracy_score(target, logits, k=5, labels=labels),
                     "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1))}
json.dump(res, open(out, "w"))
"""


def test_matches_clip_benchmark_and_writes_outputs(oc_export, bench_root, tmp_path):
    """Same open_clip export, same shards: our CLI's numbers equal LAION CLIP_benchmark's (to 0.1 points)."""
    from vlp.cli import main

    theirs_path = tmp_path / "clip_benchmark.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CLIP_BENCHMARK, oc_export, str(bench_root), str(theirs_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, png, zs = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "zs.json"
    assert main(["eval", "retrieval", "--checkpoint", oc_export, "--data", str(bench_root / "ret" / "test"),
                 "--out", str(out), "--report", str(png), "--workers", "1", "--batch-size", "16"]) == 0
    assert main(["eval", "zeroshot", "--checkpoint", oc_export, "--data", str(bench_root / "cls" / "test"),
                 "--classnames", str(bench_root / "cls" / "classnames.txt"),
                 "--templates", str(bench_root / "templates.txt"), "--out", str(zs), "--workers", "0"]) == 0
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    theirs = json.loads(theirs_path.read_text())

    ours = json.loads(out.read_text())
    m = ours["metrics"]
    assert ours["n_images"] == 32 and ours["n_texts"] == 64 and ours["n_skipped"] == 0 and ours["skipped"] == {}
    for k in (1, 5, 10):  # CLIP_benchmark: image_retrieval = text->image, text_retrieval = image->text
        assert m[f"t2i_r{k}"] == pytest.approx(theirs["ret"][f"image_retrieval_recall@{k}"], abs=1e-3)
        assert m[f"i2t_r{k}"] == pytest.approx(theirs["ret"][f"text_retrieval_recall@{k}"], abs=1e-3)
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if "_r" in k and "rank" not in k)
    assert 1 <= m["i2t_median_rank"] <= 63 and 1 <= m["t2i_median_rank"] <= 32
    assert ours["model"]["format"] == "open_clip" and ours["data"]["spec"].endswith("test")
    assert "git_commit" in ours and ours["config"] is None
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))

    z = json.loads(zs.read_text())
    assert z["n_samples"] == 32 and z["n_classes"] == 6 and z["n_templates"] == 3
    assert z["metrics"]["top1"] == pytest.approx(theirs["cls"]["acc1"], abs=1e-3)
    assert z["metrics"]["top5"] == pytest.approx(theirs["cls"]["acc5"], abs=1e-3)
    assert z["metrics"]["mean_per_class_accuracy"] == pytest.approx(theirs["cls"]["mean_per_class_recall"], abs=1e-3)
    assert sum(z["metrics"]["per_class_count"].values()) == 32


def _clean_and_dirty(synth_test, root):
    recs = synth_records(synth_test)[:8]
    clean = [{"__key__": r["__key__"], "jpg": r["jpg"], "txt": r["txt"]} for r in recs]
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": "a red circle"},
        {"__key__": "nocaption", "jpg": recs[0]["jpg"]},
        {"__key__": "emptycaption", "jpg": recs[1]["jpg"], "txt": " \n \n"},
        {"__key__": "latin1", "jpg": recs[2]["jpg"], "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "noimage", "txt": "a blue square"},
    ]
    dirty = clean[:3] + bad[:2] + clean[3:6] + bad[2:] + clean[6:]
    return write_shards(str(root / "clean"), clean), write_shards(str(root / "dirty"), dirty, 3), recs


def test_bad_samples_are_counted_not_in_the_denominator(oc, synth_test, tmp_path):
    clean, dirty, _ = _clean_and_dirty(synth_test, tmp_path)
    kw = dict(batch_size=4, progress=False)
    ref = evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, clean, **kw)
    res = evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, dirty, workers=2, **kw)
    assert res["n_images"] == 8 and res["n_texts"] == 8 and res["n_samples_read"] == 13
    assert res["skipped"] == {"bad_text": 1, "unreadable_image": 1, "missing_caption": 2, "missing_image": 1}
    assert {s["key"] for s in res["skipped_examples"]} == {"corrupt", "nocaption", "emptycaption", "latin1", "noimage"}
    assert res["metrics"] == ref["metrics"]
    # a shard cut mid-member: the samples before the cut count, the cut is one skip, evaluation goes on
    cut = write_shards(str(tmp_path / "cut"), [{"__key__": r["__key__"], "jpg": r["jpg"], "txt": r["txt"]}
                                               for r in synth_records(synth_test)[:8]])
    tar = os.path.join(cut, "1.tar")
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2)
    part = evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, cut, **kw)
    # (the member cut in half leaves its sample without a caption or image: skipped as such)
    assert part["skipped"].pop("truncated_tar") == 1 and set(part["skipped"]) <= {"missing_caption", "missing_image"}
    assert 4 <= part["n_images"] < 8
    assert any(e["key"].endswith("1.tar") and e["reason"] == "truncated_tar" for e in part["skipped_examples"])
    allbad = write_shards(str(tmp_path / "allbad"), [{"__key__": "x", "txt": "a caption"}], 1)
    with pytest.raises(ValueError, match="no evaluable samples"):
        evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, allbad, **kw)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, str(tmp_path / "missing-{0..1}.tar"), **kw)


def test_karpathy_json_matches_shards(oc, synth_test, tmp_path):
    clean, _, recs = _clean_and_dirty(synth_test, tmp_path)
    images = []
    for i, r in enumerate(recs):
        (tmp_path / "imgs" / "val2014").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / "val2014" / f"{r['__key__']}.jpg").write_bytes(r["jpg"])
        images.append({"filepath": "val2014", "filename": f"{r['__key__']}.jpg", "split": "test", "imgid": i,
                       "sentences": [{"raw": r["txt"].decode()}]})
    images.insert(3, {"filepath": "val2014", "filename": "gone.jpg", "split": "test", "sentences": [{"raw": "x"}]})
    images.append({"filepath": "train2014", "filename": "t.jpg", "split": "train", "sentences": [{"raw": "y"}]})
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    kw = dict(batch_size=3, progress=False)
    ref = evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, clean, **kw)
    res = evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, str(karpathy), images_dir=str(tmp_path / "imgs"), **kw)
    assert res["metrics"] == ref["metrics"] and res["n_images"] == 8 and res["skipped"] == {"missing_image": 1}
    with pytest.raises(ValueError, match="splits present: test, train"):
        evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, str(karpathy), split="val", **kw)


class ReversingFusion(torch.nn.Module):
    """Our model interface plus an ITM head that scores pairs by negative cosine similarity, so
    re-ranking reverses each query's top-k: a positive at ITC rank r <= k moves to k + 1 - r."""

    def __init__(self, dual):
        super().__init__()
        self.dual = dual

    def encode_image(self, images):
        return self.dual.encode_image(images)

    def encode_text(self, ids, mask):
        return self.dual.encode_text(ids, mask)

    def match_scores(self, images, ids, mask):
        return -(self.encode_image(images) * self.encode_text(ids, mask)).sum(-1)

    def temperature(self):
        """ITC logit = 2 cos, so ITM + ITC (-cos + 2 cos) keeps the ITC order."""
        return torch.tensor([0.5])


def expected_reversed(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return torch.where(ranks <= k, k + 1 - ranks, ranks)


def test_itm_rerank_reorders_top_k(oc, synth_test):
    from vlp.eval.data import EvalDataset, eval_loader

    model, k = ReversingFusion(oc.model), 4
    enc = gather_encoded(encode_local(model, oc.tokenizer, eval_loader(
        EvalDataset(str(synth_test), oc.preprocess), 8), torch.device("cpu"), 8, progress=False), 1)
    ranks = retrieval_ranks(enc["img"], enc["txt"], enc["txt2img"])
    res = evaluate_retrieval(model, oc.tokenizer, oc.preprocess, str(synth_test), batch_size=8, rerank_k=k,
                             progress=False)
    assert res["metrics"] == metrics_from_ranks(ranks["i2t_ranks"], ranks["t2i_ranks"])
    want = metrics_from_ranks(expected_reversed(ranks["i2t_ranks"], k), expected_reversed(ranks["t2i_ranks"], k))
    assert res["reranked"] == pytest.approx(want) and res["rerank_k"] == k
    assert res["reranked"] != res["metrics"]
    assert res["reranked_itc"] == pytest.approx(res["metrics"])  # -cos + cos / 0.5: the ITC order again
    # held-out ITM accuracy: every text with its image, and both ways with the best-scoring wrong item
    sim = enc["img"] @ enc["txt"].T
    txt2img = torch.as_tensor(enc["txt2img"])
    wrong = txt2img[None, :] != torch.arange(len(enc["img"]))[:, None]
    pos = -sim[txt2img, torch.arange(len(txt2img))]
    hard_t = sim.masked_fill(~wrong, float("-inf")).max(1).values  # each image's hardest wrong text
    hard_i = sim.masked_fill(~wrong, float("-inf")).max(0).values  # each text's hardest wrong image
    neg = -torch.cat([hard_t, hard_i])
    itm = res["itm"]
    assert itm["n_pos"] == len(txt2img) and itm["n_neg"] == len(enc["img"]) + len(txt2img)
    assert itm["pos_acc"] == pytest.approx(float((pos > 0).double().mean()))
    assert itm["neg_acc"] == pytest.approx(float((neg <= 0).double().mean()))
    assert itm["balanced_acc"] == pytest.approx((itm["pos_acc"] + itm["neg_acc"]) / 2)
    with pytest.raises(ValueError, match="match_scores"):
        evaluate_retrieval(oc.model, oc.tokenizer, oc.preprocess, str(synth_test), rerank_k=4, progress=False)


def save_hf_clip(out: str) -> str:
    """A random tiny transformers CLIPModel with a CLIPTokenizer built from open_clip's bundled BPE."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    bpe = SimpleTokenizer()
    tok = CLIPTokenizer(vocab=dict(bpe.encoder), merges=sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_transformers_export_matches_direct_use(synth_test, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    path = save_hf_clip(str(tmp_path / "hf"))
    assert detect_format(path) == "hf"
    loaded = load_model(path)
    assert loaded.image_cfg["size"] == 32 and loaded.image_cfg["interpolation"] == "bicubic"
    res = evaluate_retrieval(loaded.model, loaded.tokenizer, loaded.preprocess, str(synth_test), batch_size=16,
                             progress=False)
    # the same numbers straight from transformers, without any of our data or model code
    model, proc = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    recs = synth_records(synth_test)
    with torch.no_grad():
        inputs = proc(text=[r["txt"].decode() for r in recs], images=[Image.open(io.BytesIO(r["jpg"])) for r in recs],
                      return_tensors="pt", padding=True)
        out = model(**inputs)
    img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    assert res["metrics"] == pytest.approx(retrieval_metrics(img, txt, list(range(len(recs)))))


def test_zeroshot_label_key_and_errors(oc, synth_test, tmp_path):
    from collections import Counter

    from vlp.eval.zeroshot import evaluate_zeroshot

    kw = dict(batch_size=16, progress=False)
    res = evaluate_zeroshot(oc.model, oc.tokenizer, oc.preprocess, str(synth_test), SHAPES, ["a {}."],
                            label_key="objects.0.shape", **kw)
    truth = Counter(json.loads(r["json"])["objects"][0]["shape"] for r in synth_records(synth_test))
    assert res["metrics"]["per_class_count"] == {s: truth.get(s, 0) for s in SHAPES}
    assert res["n_samples"] == 32 and res["n_skipped"] == 0
    res = evaluate_zeroshot(oc.model, oc.tokenizer, oc.preprocess, str(synth_test), SHAPES, ["a {}."],
                            label_key="objects.1.shape", **kw)  # one-object scenes have no second object
    assert res["skipped"] == {"missing_label": 32 - res["n_samples"]} and 0 < res["n_samples"] < 32
    with pytest.raises(ValueError, match="not among the 2 class names"):
        evaluate_zeroshot(oc.model, oc.tokenizer, oc.preprocess, str(synth_test), ["circle", "square"], ["a {}."],
                          label_key="objects.0.shape", **kw)
    with pytest.raises(ValueError, match="no evaluable samples"):  # synth has no cls/label field
        evaluate_zeroshot(oc.model, oc.tokenizer, oc.preprocess, str(synth_test), SHAPES, ["a {}."], **kw)


def test_cli_help_and_user_errors(oc_export, synth_test, tmp_path, capsys):
    from vlp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "retrieval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--rerank-k" in text and "Karpathy" in text and "pessimistic" in text
    out = str(tmp_path / "r.json")
    assert main(["eval", "retrieval", "--checkpoint", str(tmp_path), "--data", str(synth_test), "--out", out]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--checkpoint", oc_export, "--data", str(tmp_path / "nope"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--checkpoint", oc_export, "--data", str(synth_test), "--out", out,
                 "--classnames", str(tmp_path / "none.txt")]) == 2
    assert "classnames file" in capsys.readouterr().err
    assert not os.path.exists(out)
