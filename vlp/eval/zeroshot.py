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
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from vlp.eval.data import EvalDataset, eval_loader, expected_samples, record_meta
from vlp.dist import gather_objects
from vlp.eval.encode import encode_local, encode_texts, gather_encoded, skip_counts
from vlp.eval.evaluate import eval_mode

# Built-in lists, by name: open_clip's own copies (`open_clip.zero_shot_metadata`), not a file of ours.
BUILT_IN = ("imagenet",)
DEFAULT_TEMPLATES = "imagenet"  # CLIP's 80 ImageNet prompts (Radford et al. 2021)


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
    1000 ImageNet-1k names)."""
    return _read(spec, "classnames")


def read_templates(spec: str = DEFAULT_TEMPLATES) -> List[str]:
    """Prompt templates with one '{}' each: a file (one per line), else a built-in list (`imagenet`:
    CLIP's 80 ImageNet prompts from open_clip)."""
    templates = _read(spec, "templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{spec}: every template needs exactly one '{{}}' for the class name, e.g. "
                         f"'a photo of a {{}}.'; bad: {bad[0]!r}")
    return templates


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
                      progress: bool = True) -> Dict[str, Any]:
    """Zero-shot classification metrics over `data`; every rank returns the same dict."""
    device = device or torch.device("cpu")
    ds = EvalDataset(data, preprocess, rank, world_size, label_fn=LabelFn(classnames, label_key),
                     image_key=image_key, max_samples=max_samples)
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
            "label_source": label_key or "cls field, else json label/class"}
