"""Issue 16: `vlp eval zeroshot` reads the layouts users' zero-shot suites write: CLIP_benchmark's
webdataset sets (classnames.txt / zeroshot_classification_templates.txt beside the shards, `cls`
labels) and folder-per-class images (torchvision ImageFolder). Tiny random open_clip model, images
generated here, nothing downloaded."""
import io
import json
import os
import random

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from vlp.eval.data import iter_records
from vlp.eval.zeroshot import LabelFn, read_classnames, read_templates, resolve_data

OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# class names in label order (classnames.txt); the folders spell them with '_' and sort differently
CLASSNAMES = ["red apple", "green leaf", "blue sky"]
FOLDERS = {"red apple": "red_apple", "green leaf": "Green_Leaf", "blue sky": "blue_sky"}
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]
PER_CLASS = {"red apple": 5, "green leaf": 3, "blue sky": 4}


def jpeg(seed: int, colour) -> bytes:
    rnd = random.Random(seed)
    img = Image.new("RGB", (40, 40), tuple(rnd.randrange(256) for _ in range(3)))
    x, y = rnd.randrange(20), rnd.randrange(20)
    ImageDraw.Draw(img).ellipse([x, y, x + 18, y + 18], fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    """[(class index, jpeg bytes)] in an interleaved order."""
    colours = {"red apple": (220, 20, 20), "green leaf": (20, 200, 40), "blue sky": (30, 60, 230)}
    out, seed = [], 0
    for c, name in enumerate(CLASSNAMES):
        for _ in range(PER_CLASS[name]):
            out.append((c, jpeg(seed, colours[name])))
            seed += 1
    random.Random(0).shuffle(out)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("oc_export")
    torch.manual_seed(0)
    model = open_clip.CLIP(**OPEN_CLIP_CFG)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {
        "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}))
    save_file(model.state_dict(), str(out / "open_clip_model.safetensors"))
    return str(out)


def write_bench(root, images, n_shards: int = 2, templates=True):
    """CLIP_benchmark's layout as `clip_benchmark_export_wds` writes it: root/{classnames.txt,
    zeroshot_classification_templates.txt ('{c}')}, root/test/{0..n-1}.tar + nshards.txt, keys s%07d,
    an int `cls` per sample."""
    os.makedirs(root / "test")
    per = -(-len(images) // n_shards)
    for s in range(n_shards):
        with wds.TarWriter(str(root / "test" / f"{s}.tar")) as w:
            for i in range(s * per, min((s + 1) * per, len(images))):
                w.write({"__key__": "s%07d" % i, "jpg": images[i][1], "cls": images[i][0]})
    (root / "test" / "nshards.txt").write_text(f"{n_shards}\n")
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text(
            "\n".join(t.replace("{}", "{c}") for t in TEMPLATES) + "\n")
    return root


def write_folders(root, images, names=None):
    """Folder per class; one image of each class one level deeper, plus a file that is not an image."""
    names = names or [FOLDERS[c] for c in CLASSNAMES]
    for i, (c, data) in enumerate(images):
        folder = root / names[c] / ("nested" if i < 3 else "")
        os.makedirs(folder, exist_ok=True)
        (folder / f"img{i:03d}.jpg").write_bytes(data)
    (root / names[0] / "notes.txt").write_text("not an image")
    return root


def run_cli(argv, capsys):
    from vlp.cli import main

    rc = main(["eval", "zeroshot", "--workers", "0", "--batch-size", "8"] + argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_clip_benchmark_layout_files_are_found_and_read_as_clip_benchmark_does(tmp_path, images, export, capsys):
    from clip_benchmark.datasets.builder import build_wds_dataset

    root = write_bench(tmp_path / "cifar_like", images)
    theirs = build_wds_dataset("cifar_like", transform=None, split="test", data_dir=str(root))
    for data in (str(root), str(root / "test")):  # the dataset folder or its split folder
        zd = resolve_data(data)
        assert zd.classnames == theirs.classes == CLASSNAMES
        assert zd.templates == [t.replace("{c}", "{}") for t in theirs.templates] == TEMPLATES
        assert zd.classnames_source == str(root / "classnames.txt")
        assert zd.templates_source == str(root / "zeroshot_classification_templates.txt")
        assert zd.spec == str(root / "test" / "{0..1}.tar")
    # labels per sample, in order: ours (cls field through LabelFn) == CLIP_benchmark's == written
    fn = LabelFn(CLASSNAMES)
    ours = [fn(r) for r in iter_records(zd.spec)]
    assert ours == [int(label) for _, label in theirs] == [c for c, _ in images]

    found = tmp_path / "found.json"
    rc, out, err = run_cli(["--checkpoint", export, "--data", str(root), "--out", str(found)], capsys)
    assert rc == 0, err
    assert str(root / "classnames.txt") in out and str(root / "zeroshot_classification_templates.txt") in out
    z = json.loads(found.read_text())
    assert z["data"]["classnames"] == str(root / "classnames.txt")
    assert z["data"]["templates"] == str(root / "zeroshot_classification_templates.txt")
    assert z["n_samples"] == len(images) and z["n_classes"] == 3 and z["n_templates"] == 2 and z["n_skipped"] == 0
    assert z["metrics"]["per_class_count"] == PER_CLASS

    # the same set with the files given explicitly ('{}' templates): the same numbers
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES))
    given = tmp_path / "given.json"
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(root / "test"), "--out", str(given),
                          "--classnames", str(root / "classnames.txt"), "--templates", str(tmp_path / "t.txt")],
                         capsys)
    assert rc == 0, err
    g = json.loads(given.read_text())
    assert g["data"]["templates"] == str(tmp_path / "t.txt")
    for key in ("metrics", "confusion", "n_samples", "n_classes", "n_templates"):
        assert g[key] == z[key], key

    # without the templates file: CLIP's 80 ImageNet templates, and the output says so
    bare = write_bench(tmp_path / "bare", images, templates=False)
    rc, out, err = run_cli(["--checkpoint", export, "--data", str(bare), "--out", str(tmp_path / "b.json")], capsys)
    assert rc == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["n_templates"] == 80 and b["data"]["templates"] == "imagenet" and "80 templates from imagenet" in out


def test_image_folder_labels_match_torchvision_and_shards(tmp_path, images, export, capsys):
    from torchvision.datasets import ImageFolder

    root = write_folders(tmp_path / "folders", images)
    # labels per file: sorted folder names, ImageFolder's order and indices
    ref = ImageFolder(str(root))
    recs = list(iter_records(str(root)))
    assert [(r["__path__"], r["cls"]) for r in recs] == ref.samples
    assert ref.classes == sorted(FOLDERS.values())

    # folder names as class names
    plain = tmp_path / "plain.json"
    rc, out, err = run_cli(["--checkpoint", export, "--data", str(root), "--out", str(plain),
                            "--templates", "a photo of a {}."], capsys)
    assert rc == 0, err
    p = json.loads(plain.read_text())
    assert p["data"]["classnames"] == "class folder names" and p["data"]["layout"] == "image_folder"
    assert p["metrics"]["per_class_count"] == {FOLDERS[c]: n for c, n in PER_CLASS.items()}
    assert p["n_samples"] == len(images) and p["n_skipped"] == 0 and "class folder names" in out

    # --classnames: folders matched by name ('_' for ' ', any case); the numbers equal those on the same
    # images as CLIP_benchmark shards with explicit class names and templates
    (tmp_path / "names.txt").write_text("\n".join(CLASSNAMES))
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES))
    explicit = ["--classnames", str(tmp_path / "names.txt"), "--templates", str(tmp_path / "t.txt")]
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(root), "--out", str(tmp_path / "f.json")] + explicit,
                         capsys)
    assert rc == 0, err
    shards = write_bench(tmp_path / "bench", images)
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(shards / "test"), "--out", str(tmp_path / "s.json")]
                         + explicit, capsys)
    assert rc == 0, err
    f, s = (json.loads((tmp_path / n).read_text()) for n in ("f.json", "s.json"))
    assert f["metrics"]["per_class_count"] == PER_CLASS
    for key in ("metrics", "confusion", "most_confused", "n_samples", "n_classes", "n_templates"):
        assert f[key] == s[key], key

    # integer folder names are class indices
    digits = write_folders(tmp_path / "digits", images, names=["0", "1", "2"])
    zd = resolve_data(str(digits), str(tmp_path / "names.txt"))
    assert zd.folder_labels == {"0": 0, "1": 1, "2": 2} and zd.classnames == CLASSNAMES
    by_file = {os.path.basename(r["__path__"]): r["cls"] for r in iter_records(zd.spec, folder_labels=zd.folder_labels)}
    assert by_file == {f"img{i:03d}.jpg": c for i, (c, _) in enumerate(images)}


def test_layout_errors_name_the_problem(tmp_path, images, export, capsys):
    # a class folder that names no class: the folder and the valid names
    root = write_folders(tmp_path / "folders", images, names=["red_apple", "green_leaf", "purple_rain"])
    (tmp_path / "names.txt").write_text("\n".join(CLASSNAMES))
    out = tmp_path / "x.json"
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(root), "--out", str(out),
                          "--classnames", str(tmp_path / "names.txt")], capsys)
    assert rc == 2 and "'purple_rain'" in err and "'red apple', 'green leaf', 'blue sky'" in err
    # split folders are not classes
    splits = tmp_path / "splits"
    write_folders(splits / "train", images)
    write_folders(splits / "val", images)
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(splits), "--out", str(out)], capsys)
    assert rc == 2 and "split folders" in err and str(splits / "val") in err
    # shards with no classnames.txt anywhere near and no --classnames
    bench = write_bench(tmp_path / "bench", images)
    os.remove(bench / "classnames.txt")
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(bench), "--out", str(out)], capsys)
    assert rc == 2 and "classnames.txt" in err and "--classnames" in err
    # a CLIP_benchmark retrieval set
    (bench / "dataset_type.txt").write_text("retrieval\n")
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(bench), "--out", str(out),
                          "--classnames", str(tmp_path / "names.txt")], capsys)
    assert rc == 2 and "vlp eval retrieval" in err
    # a folder with neither shards nor images
    os.makedirs(tmp_path / "empty" / "sub")
    rc, _, err = run_cli(["--checkpoint", export, "--data", str(tmp_path / "empty"), "--out", str(out)], capsys)
    assert rc == 2 and "no *.tar shards" in err
    assert not out.exists()


def test_classnames_and_templates_files(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\nitap of a {}.\n")
    assert read_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "itap of a {}."]
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_classnames(str(tmp_path / "c.txt"))
    (tmp_path / "c.txt").write_text("cat\ndog\n\n")
    assert read_classnames(str(tmp_path / "c.txt")) == ["cat", "dog"]
