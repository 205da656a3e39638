"""Zero-shot classification with prompt ensembles (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", 2021, Sec. 3.1.4).

Each class embedding is the mean of its L2-normalised template embeddings ("a photo of a {}."),
renormalised; an image is assigned the class of highest cosine similarity.

Labels: by default a sample's `cls` field (an integer), else its json `label` or `class` field;
`label_key` names a field of the json metadata instead, dotted for nesting (`objects.0.shape` in the
synthetic set). A label is a class index or a class name from the classnames file. Samples without
a label are skipped and counted (`missing_label`); a label that is neither is an error.
Top-k uses the pessimistic tie rule of `vlp.eval.retrieval`: the true class ranks behind every other
class with an equal score.

Data layouts (`resolve_data`): vlp's shards; CLIP_benchmark's webdataset layout (`DIR/test/0.tar ..`
with `nshards.txt`, `cls` labels, and `classnames.txt` / `zeroshot_classification_templates.txt` in
the shard folder or one level up, used when no class names / templates are given; CLIP_benchmark
writes templates with `{c}`, read here as `{}`); and a folder-per-class image directory (torchvision
ImageFolder: labels are the sorted folder names' positions, the folder names are the class names
unless class names are given, then each folder must name a class or be a class index).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vlp.data.shards import expand_shards
from vlp.eval.data import (FOLDER_IMAGE_EXTENSIONS, EvalDataset, eval_loader, expected_samples,
                           image_folder_classes, record_meta)
from vlp.dist import gather_objects
from vlp.eval.encode import encode_local, encode_texts, gather_encoded, skip_counts
from vlp.eval.evaluate import eval_mode

# Built-in lists, by name: open_clip's own copies (`open_clip.zero_shot_metadata`), not a file of ours.
BUILT_IN = ("imagenet",)
DEFAULT_TEMPLATES = "imagenet"  # CLIP's 80 ImageNet prompts (Radford et al. 2021)
# CLIP_benchmark's metadata files, beside a webdataset set's split folders (`build_wds_dataset`)
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"


def _built_in(name: str, what: str) -> Optional[List[str]]:
    """open_clip's ImageNet class names (1000, in label order) or CLIP's 80 templates as '{}' strings."""
    if name.lower() not in BUILT_IN:
        return None
    from open_clip import zero_shot_metadata as meta

    if what == "classnames":
        return list(meta.IMAGENET_CLASSNAMES)
    return [t("{}") if callable(t) else str(t) for t in meta.OPENAI_IMAGENET_TEMPLATES]


def read_lines(path: str, what: str) -> List[str]:
    """Non-empty stripped lines of a text file (classnames, templates)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    lines = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path!r} is empty")
    return lines


def _read(spec: str, what: str) -> List[str]:
    if os.path.isfile(spec):
        return read_lines(spec, what)
    found = _built_in(spec, what)
    if found is None:
        raise FileNotFoundError(f"{what} file {spec!r} does not exist (built-in lists: {', '.join(BUILT_IN)})")
    return found


def read_classnames(spec: str) -> List[str]:
    """Class names in label order: a file (one per line), else a built-in list (`imagenet`: open_clip's
    1000 ImageNet-1k names). A blank line between names is an error (the labels after it would shift)."""
    if os.path.isfile(spec):
        lines = [line.strip() for line in open(spec, encoding="utf-8").read().splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        blank = next((i for i, line in enumerate(lines) if not line), None)
        if blank is not None and any(lines[blank:]):
            raise ValueError(f"classnames file {spec!r}: line {blank + 1} is empty; class i is line i+1, so a "
                             "blank line would shift every label after it")
    return _read(spec, "classnames")


def _as_template(t: str) -> str:
    """CLIP_benchmark writes its templates with `{c}` for the class name (`template.format(c=name)`)."""
    return t.replace("{c}", "{}")


def read_templates(spec: str = DEFAULT_TEMPLATES) -> List[str]:
    """Prompt templates with one '{}' (or CLIP_benchmark's '{c}') each: a file (one per line), else a
    built-in list (`imagenet`: CLIP's 80 ImageNet prompts from open_clip). Returned with '{}'."""
    templates = [_as_template(t) for t in _read(spec, "templates")]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{spec}: every template needs exactly one '{{}}' (or '{{c}}') for the class name, "
                         f"e.g. 'a photo of a {{}}.'; bad: {bad[0]!r}")
    return templates


def templates_from(spec: str) -> List[str]:
    """`--templates`: a file or built-in list name, or one template given inline ('a photo of a {}.')."""
    if os.path.isfile(spec) or ("{}" not in spec and "{c}" not in spec):
        return read_templates(spec)
    if _as_template(spec).count("{}") != 1:
        raise ValueError(f"template {spec!r} needs exactly one '{{}}' for the class name")
    return [_as_template(spec)]


# ------------------------------------------------------------------------------------ data layouts
SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def folder_labels(root: str, classes: Sequence[str], classnames: Sequence[str], source: str) -> Dict[str, int]:
    """Class folder -> class index: the class whose name the folder spells (case, '_' vs ' ' and repeated
    spaces ignored), else the folder's integer name as an index. A folder that is neither, or two folders
    on one class, is an error naming the folders and the valid names."""
    by_name: Dict[str, int] = {}
    for i, name in enumerate(classnames):
        by_name.setdefault(_norm(name), i)
    labels: Dict[str, int] = {}
    for folder in classes:
        if _norm(folder) in by_name:
            labels[folder] = by_name[_norm(folder)]
        elif folder.isdigit() and int(folder) < len(classnames):
            labels[folder] = int(folder)
        else:
            close = difflib.get_close_matches(folder, list(classnames), n=3)
            shown = ", ".join(repr(c) for c in classnames[:20]) + (f", ... ({len(classnames)} in all)"
                                                                  if len(classnames) > 20 else "")
            raise ValueError(f"{root}: class folder {folder!r} is neither one of the {len(classnames)} class names "
                             f"of {source} nor a class index 0..{len(classnames) - 1}"
                             + (f" (close: {', '.join(map(repr, close))})" if close else "")
                             + f"; valid names: {shown}")
    seen: Dict[int, str] = {}
    for folder, idx in labels.items():
        if idx in seen:
            raise ValueError(f"{root}: class folders {seen[idx]!r} and {folder!r} both name class {idx} "
                             f"({classnames[idx]!r}) of {source}")
        seen[idx] = folder
    return labels


def shard_spec(data: str) -> Tuple[str, List[str]]:
    """(the shard spec to read, the folders where CLIP_benchmark's metadata may lie) for `--data`.
    A local directory without *.tar but with a `test/` folder of shards is a CLIP_benchmark dataset
    root: its test split is read. A shard folder with CLIP_benchmark's `nshards.txt` is read as
    `{0..N-1}.tar`, the shards CLIP_benchmark reads. Metadata folders: the shard folder, then its parent
    (none for remote shards)."""
    if "://" not in data and os.path.isdir(data):
        folder = data
        if not any(n.endswith(".tar") for n in os.listdir(folder)) and os.path.isdir(os.path.join(folder, "test")):
            folder = os.path.join(folder, "test")
        if not any(n.endswith(".tar") for n in os.listdir(folder)):
            raise ValueError(f"--data {data!r}: no *.tar shards in it (nor in a test/ folder), and no class "
                             f"sub-folders holding image files ({', '.join(FOLDER_IMAGE_EXTENSIONS)})")
        spec = folder
        nshards = os.path.join(folder, NSHARDS_FILE)
        if os.path.isfile(nshards):
            text = open(nshards).read().strip()
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"{nshards}: {text!r} is not a shard count (CLIP_benchmark reads 0.tar .. N-1.tar)")
            n = int(text)
            spec = os.path.join(folder, f"{{0..{n - 1}}}.tar") if n > 1 else os.path.join(folder, "0.tar")
        folder = os.path.abspath(folder)
        return spec, [folder, os.path.dirname(folder)]
    first = expand_shards(data, "--data")[0]
    if "://" in first and not first.startswith("file://"):
        return data, []
    folder = os.path.dirname(os.path.abspath(first.removeprefix("file://")))
    return data, [folder, os.path.dirname(folder)]


def _find(folders: Sequence[str], name: str) -> Optional[str]:
    return next((os.path.join(d, name) for d in folders if os.path.isfile(os.path.join(d, name))), None)


@dataclass
class ZeroshotData:
    """What `vlp eval zeroshot --data` resolves to: the set to read and the class names and templates,
    each with where it came from (a file path, a built-in list's name, or 'class folder names')."""
    spec: str
    layout: str  # "shards" or "image_folder"
    classnames: List[str]
    classnames_source: str
    templates: List[str]
    templates_source: str
    folder_labels: Optional[Dict[str, int]] = None
    found: List[str] = field(default_factory=list)  # metadata files found next to the data

    def describe(self) -> Dict[str, Any]:
        return {"read": self.spec, "layout": self.layout, "classnames": self.classnames_source,
                "templates": self.templates_source, "found_next_to_data": self.found}


def resolve_data(data: str, classnames: Optional[str] = None, templates: Optional[str] = None,
                 label_key: Optional[str] = None) -> ZeroshotData:
    """Resolve `--data` / `--classnames` / `--templates` (see the module docstring). Class names or
    templates not given are taken from CLIP_benchmark's files next to the data when present; templates
    then default to `imagenet`; shards without any class names are an error."""
    classes = image_folder_classes(data)
    if classes is not None:
        if label_key:
            raise ValueError(f"--label-key reads shards' json; {data!r} is a folder-per-class image directory, "
                             "labelled by its folder names")
        root = os.path.abspath(data)
        folders = [root, os.path.dirname(root)]
        if classnames:
            names, names_src = read_classnames(classnames), classnames
            labels = folder_labels(data, classes, names, classnames)
        else:
            if set(c.lower() for c in classes) <= SPLIT_NAMES:
                raise ValueError(f"{data!r} holds split folders ({', '.join(classes)}), not class folders: give a "
                                 f"split, e.g. --data {os.path.join(data, classes[-1])}")
            names, names_src = list(classes), "class folder names"
            labels = {c: i for i, c in enumerate(classes)}
        layout, spec = "image_folder", data
    else:
        spec, folders = shard_spec(data)
        layout, labels = "shards", None
        kind_file = _find(folders, DATASET_TYPE_FILE)
        kind = open(kind_file).read().strip().lower() if kind_file else "classification"
        if kind == "retrieval":
            raise ValueError(f"{kind_file} says this is a retrieval set: use `vlp eval retrieval`")
        if kind != "classification":
            raise ValueError(f"{kind_file}: dataset type {kind!r} is not supported by zero-shot classification "
                             "(single-label `cls` only)")
        if classnames:
            names, names_src = read_classnames(classnames), classnames
        else:
            names_src = _find(folders, CLASSNAMES_FILE)
            if names_src is None:
                where = " or ".join(folders) if folders else "(remote shards: not looked for)"
                raise ValueError(f"no --classnames given and no {CLASSNAMES_FILE} next to the shards (looked in "
                                 f"{where}): pass --classnames FILE (one per line, in label order) or imagenet")
            names = read_classnames(names_src)
    found = [f for f in (_find(folders, CLASSNAMES_FILE), _find(folders, TEMPLATES_FILE)) if f]
    if templates:
        temps, temps_src = templates_from(templates), templates
    else:
        temps_src = _find(folders, TEMPLATES_FILE) or DEFAULT_TEMPLATES
        temps = read_templates(temps_src)
    return ZeroshotData(spec, layout, names, names_src, temps, temps_src, labels, found)


class LabelFn:
    """Record -> class index, or a skip reason string (see the module docstring)."""

    def __init__(self, classnames: Sequence[str], label_key: Optional[str] = None):
        self.classnames, self.label_key = list(classnames), label_key
        self.by_name = {c.lower(): i for i, c in enumerate(self.classnames)}

    def _value(self, rec: Dict[str, Any]):
        if self.label_key is None and "cls" in rec:
            raw = rec["cls"]
            return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else raw
        meta = record_meta(rec)
        if meta is None:
            return "bad_json"
        if self.label_key is None:
            return meta.get("label", meta.get("class"))
        value: Any = meta
        for part in self.label_key.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
                value = value[int(part)]
            else:
                return None
        return value

    def __call__(self, rec: Dict[str, Any]):
        value = self._value(rec)
        if value is None:
            return "missing_label"
        if value == "bad_json":
            return value
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if value.lower() not in self.by_name:
                raise ValueError(f"sample {rec.get('__key__')!r}: label {value!r} is not among the "
                                 f"{len(self.classnames)} class names (e.g. {self.classnames[:3]})")
            return self.by_name[value.lower()]
        try:
            idx = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"sample {rec.get('__key__')!r}: label {value!r} is neither a class index nor a name")
        if not 0 <= idx < len(self.classnames):
            raise ValueError(f"sample {rec.get('__key__')!r}: label {idx} out of range for "
                             f"{len(self.classnames)} classes; does the classnames file match the data?")
        return idx


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device: torch.device,
                     batch_size: int = 256, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """(C, D) prompt-ensembled class embeddings; ranks split the classes and gather."""
    mine = list(range(rank, len(classnames), world_size))
    local = {}
    for c in mine:
        emb = encode_texts(model, tokenizer, [t.format(classnames[c]) for t in templates], device, batch_size)
        local[c] = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0)
    merged = {}
    for part in gather_objects(local, world_size):
        merged.update(part)
    return torch.stack([merged[c] for c in range(len(classnames))])


def true_class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of the true class per row."""
    true = logits.gather(1, labels[:, None])
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return 1 + ((logits >= true) & others).sum(1)


def classification_metrics(ranks: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> Dict[str, Any]:
    """top-1/top-5 accuracy, per-class top-1 accuracy (None for classes without samples) and their mean."""
    k5 = min(5, len(classnames))
    per_class, counts = {}, {}
    for c, name in enumerate(classnames):
        sel = labels == c
        counts[name] = int(sel.sum())
        per_class[name] = float((ranks[sel] == 1).double().mean()) if counts[name] else None
    present = [v for v in per_class.values() if v is not None]
    return {"top1": float((ranks == 1).double().mean()), f"top{k5}": float((ranks <= k5).double().mean()),
            "mean_per_class_accuracy": float(sum(present) / len(present)) if present else 0.0,
            "per_class_accuracy": per_class, "per_class_count": counts}


def confusion(pred: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], n_pairs: int = 10) -> Dict[str, Any]:
    """The confusion matrix (`confusion[true][predicted]` counts) and the most confused pairs of classes
    (true -> predicted, by the share of the true class's samples, ties by count)."""
    n = len(classnames)
    mat = torch.zeros(n, n, dtype=torch.long)
    mat.index_put_((labels.long(), pred.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    rows = mat.sum(1).clamp(min=1)
    pairs = [(float(mat[t, p]) / float(rows[t]), int(mat[t, p]), t, p) for t in range(n) for p in range(n)
             if t != p and mat[t, p] > 0]
    pairs.sort(key=lambda x: (-x[0], -x[1], x[2], x[3]))
    return {"confusion": mat.tolist(),
            "most_confused": [{"true": classnames[t], "predicted": classnames[p], "count": c, "share": share}
                              for share, c, t, p in pairs[:n_pairs]]}


def evaluate_zeroshot(model, tokenizer, preprocess, data: str, classnames: Sequence[str], templates: Sequence[str],
                      *, label_key: Optional[str] = None, batch_size: int = 64, workers: int = 0,
                      max_samples: int = 0, image_key: str = "jpg;jpeg;png;webp", rank: int = 0,
                      world_size: int = 1, device: Optional[torch.device] = None,
                      progress: bool = True, frames: int = 0) -> Dict[str, Any]:
    """Zero-shot classification metrics over `data` (shards, a CLIP_benchmark dataset root or split
    folder, or a folder-per-class image directory); every rank returns the same dict."""
    device = device or torch.device("cpu")
    classes = image_folder_classes(data)
    labels = None
    if classes is not None:
        if label_key:
            raise ValueError(f"label_key reads shards' json; {data!r} is a folder-per-class image directory")
        labels = ({c: i for i, c in enumerate(classes)} if list(classnames) == classes
                  else folder_labels(data, classes, classnames, "the class names given"))
    else:
        data = shard_spec(data)[0]
    frames = frames or int(getattr(model, "image_cfg", {}).get("frames", 0))  # video models: clips of video classes
    ds = EvalDataset(data, preprocess, rank, world_size, label_fn=LabelFn(classnames, label_key),
                     image_key=image_key, max_samples=max_samples, folder_labels=labels, frames=frames)
    with eval_mode(model):
        cls_emb = class_embeddings(model, tokenizer, classnames, templates, device, batch_size, rank, world_size)
        local = encode_local(model, tokenizer, eval_loader(ds, batch_size, workers), device, batch_size,
                             progress=progress and rank == 0, desc="zeroshot",
                             total=expected_samples(data, "test", max_samples, rank, world_size))
    enc = gather_encoded(local, world_size)
    if not enc["index"]:
        raise ValueError(f"no evaluable samples in {data!r}: {len(enc['skipped'])} read, all skipped "
                         f"{skip_counts(enc['skipped'])}")
    logits = enc["img"] @ cls_emb.T
    ranks = true_class_ranks(logits, enc["label"])
    return {"metrics": classification_metrics(ranks, enc["label"], classnames),
            **confusion(logits.argmax(1), enc["label"], classnames),
            "n_samples": len(enc["index"]), "n_classes": len(classnames), "n_templates": len(templates),
            "n_samples_read": len(enc["index"]) + len(enc["skipped"]), "n_skipped": len(enc["skipped"]),
            "skipped": skip_counts(enc["skipped"]),
            "label_source": ("class folder names" if classes is not None
                             else label_key or "cls field, else json label/class")}
