"""Evaluation sets: WebDataset shards, a Karpathy split JSON or a folder-per-class image directory
(torchvision ImageFolder's layout: `DIR/<class>/**/<image>`), read in a fixed order, split by rank.

Every sample gets a global index (its position in the stream); rank r of W takes the indices with
`index % W == r`, DataLoader workers split a rank's share further, and results are put back in index
order after gathering, so any number of ranks and workers gives the same numbers as one process.
Each rank and worker reads the whole record stream but decodes only its share (reading tar bytes is
cheap next to JPEG decoding and encoding). Shards are read by the training reader
(`vlp.data.shards.read_shard`), and bad samples are not dropped silently: each is returned as a skip
with its reason (`vlp.data.samples.SKIP_REASONS`, `LABEL_SKIP_REASONS`) and counted; a tar cut short or
unreadable ends that shard with one skip (`truncated_tar`, `read_error`) and the evaluation goes on.
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.shards import expand_shards, read_shard
from vlp.data.video import VIDEO_EXTS, read_clip_for_eval
from vlp.dist import ignore_stop_signals, kill_workers_at_exit

IMAGE_KEYS = "jpg;jpeg;png;webp"
VIDEO_KEYS = ";".join(VIDEO_EXTS)
CAPTION_KEY = "txt"
# torchvision's `IMG_EXTENSIONS`: the files ImageFolder takes as images (case-insensitive)
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_files(folder: str) -> Iterator[str]:
    """Image files under one class folder in ImageFolder's order: a sorted walk (links followed), each
    folder's files sorted."""
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(names):
            if name.lower().endswith(FOLDER_IMAGE_EXTENSIONS):
                yield os.path.join(root, name)


def image_folder_classes(path: str) -> Optional[List[str]]:
    """The class folder names, sorted (ImageFolder's labels 0..C-1 in this order), when `path` is a local
    folder-per-class image directory: no *.tar in it or in its sub-folders, and an image file under at
    least one sub-folder. Hidden folders (`.name`) are not classes. None for anything else."""
    if "://" in path or not os.path.isdir(path) or glob.glob(os.path.join(glob.escape(path), "*.tar")):
        return None
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes or any(glob.glob(os.path.join(glob.escape(os.path.join(path, c)), "*.tar")) for c in classes):
        return None
    if not any(next(_class_files(os.path.join(path, c)), None) for c in classes):
        return None
    return classes


def _folder_records(root: str, labels: Optional[Dict[str, int]] = None) -> Iterator[Dict[str, Any]]:
    """One record per image of a folder-per-class directory, class by class in sorted order; `cls` is the
    class index: `labels[folder]`, else the folder's position among the sorted class folders."""
    for i, name in enumerate(image_folder_classes(root) or []):
        label = i if labels is None else labels[name]
        for file in _class_files(os.path.join(root, name)):
            yield {"__key__": os.path.splitext(os.path.relpath(file, root))[0], "__path__": file, "cls": label}


def _shard_records(spec: str, what: str) -> Iterator[Dict[str, Any]]:
    """Every sample of every shard, then one `__skip__` record per error that ended a shard early."""
    for url in expand_shards(spec, what):
        errors: List[str] = []
        for _, sample in read_shard(url, lambda reason, _url, _exn: errors.append(reason)):
            yield sample
        for reason in errors:
            yield {"__key__": url, "__skip__": reason}


def _karpathy_records(path: str, images_dir: Optional[str], split: str) -> Iterator[Dict[str, Any]]:
    """Karpathy split JSON (`{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}`):
    one record per image of `split`, all its sentences joined one per line as the caption."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a Karpathy split file (expected a top-level 'images' list)")
    root = images_dir or os.path.dirname(os.path.abspath(path))
    entries = [e for e in data["images"] if e.get("split") == split]
    if not entries:
        splits = sorted({str(e.get("split")) for e in data["images"]})
        raise ValueError(f"{path}: no images with split {split!r}; splits present: {', '.join(splits)}")
    for e in entries:
        name = e.get("filename", "")
        file = os.path.join(root, e.get("filepath", ""), name)
        sentences = [s.get("raw", "") if isinstance(s, dict) else str(s) for s in e.get("sentences", [])]
        yield {"__key__": os.path.splitext(name)[0] or str(e.get("imgid", "")), "__path__": file,
               "txt": "\n".join(sentences), "json": {k: v for k, v in e.items() if k != "sentences"}}


def iter_records(data: str, images_dir: Optional[str] = None, split: str = "test",
                 what: str = "--data", folder_labels: Optional[Dict[str, int]] = None) -> Iterator[Dict[str, Any]]:
    """Raw samples of an eval set in a fixed order: shards (a spec as `vlp.data.shards` reads it:
    directory, brace pattern, '::' list, URL), a Karpathy JSON (`*.json`), or a folder-per-class image
    directory (records with `__path__` and `cls`, see `_folder_records`). `what` names the option in
    errors."""
    if image_folder_classes(data) is not None:
        return _folder_records(data, folder_labels)
    if data.endswith(".json"):
        if not os.path.isfile(data):
            raise FileNotFoundError(f"{what}: Karpathy split file {data!r} does not exist")
        return _karpathy_records(data, images_dir, split)
    expand_shards(data, what)  # fail now, in the caller, on a bad spec
    return _shard_records(data, what)


def expected_samples(data: str, split: str = "test", max_samples: int = 0, rank: int = 0,
                     world_size: int = 1) -> Optional[int]:
    """How many records `iter_records` will yield to this rank (records are dealt round-robin), when that
    is cheap to know (a Karpathy JSON, or local shards with the `stats.json` vlp's converters write);
    None otherwise. For progress bars only."""
    n: Optional[int] = None
    try:
        classes = image_folder_classes(data)
        if classes is not None:
            n = sum(1 for c in classes for _ in _class_files(os.path.join(data, c)))
        elif data.endswith(".json"):
            with open(data) as f:
                n = sum(1 for e in json.load(f).get("images", []) if e.get("split") == split)
        else:
            urls = expand_shards(data)
            if not all(u.startswith("/") or "://" not in u for u in urls):
                return None
            counts: Dict[str, int] = {}
            for d in {os.path.dirname(u) for u in urls}:
                with open(os.path.join(d, "stats.json")) as f:
                    counts.update({os.path.join(d, sh["name"]): int(sh["samples"]) for sh in json.load(f)["shards"]})
            n = sum(counts[u] for u in urls)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    n = min(n, max_samples) if max_samples else n
    return len(range(rank, n, world_size))


def decode_image(rec: Dict[str, Any], image_keys: List[str]):
    """PIL RGB image of a record, or a skip reason."""
    if "__path__" in rec:
        if not os.path.isfile(rec["__path__"]):
            return None, "missing_image"
        with open(rec["__path__"], "rb") as f:
            raw = f.read()
    else:
        raw = next((rec[k] for k in image_keys if k in rec), None)
        if raw is None:
            return None, "missing_image"
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img.convert("RGB"), None
    except Exception:  # PIL raises many types for corrupt data; the sample is counted as skipped
        return None, "unreadable_image"


def split_captions(value: Any) -> Optional[List[str]]:
    """Caption field -> list of captions (one per non-empty line); None when not valid UTF-8."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return [line.strip() for line in str(value).splitlines() if line.strip()]


def record_meta(rec: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The record's json metadata as a dict ({} when absent, None when unparsable)."""
    value = rec.get("json")
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        meta = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


class EvalDataset(IterableDataset):
    """This rank's (and DataLoader worker's) share of an eval set, preprocessed.

    Yields dicts with `index`, `key`, and either `skip` (a reason) or `image` (tensor) plus
    `captions` (retrieval) or `label` (when `label_fn` is given: record -> class index or a skip reason).
    `folder_labels` maps class folder -> class index for a folder-per-class directory (default: the
    folder's sorted position).
    """

    def __init__(self, data: str, preprocess: Callable, rank: int = 0, world_size: int = 1,
                 label_fn: Optional[Callable[[Dict[str, Any]], Any]] = None, images_dir: Optional[str] = None,
                 split: str = "test", image_key: str = IMAGE_KEYS, caption_key: str = CAPTION_KEY,
                 max_samples: int = 0, what: str = "--data", folder_labels: Optional[Dict[str, int]] = None,
                 frames: int = 0, video_key: str = VIDEO_KEYS):
        super().__init__()
        folder = image_folder_classes(data) is not None
        if data.endswith(".json") and not folder and not os.path.isfile(data):
            raise FileNotFoundError(f"{what}: Karpathy split file {data!r} does not exist")
        if not data.endswith(".json") and not folder:
            expand_shards(data, what)  # a bad spec fails here, before any worker starts
        self.folder_labels = folder_labels
        self.what = what
        self.data, self.preprocess, self.rank, self.world_size = data, preprocess, rank, world_size
        self.label_fn, self.images_dir, self.split = label_fn, images_dir, split
        self.image_keys = [k.strip().lower() for k in image_key.split(";") if k.strip()]
        self.caption_key, self.max_samples = caption_key.lower(), max_samples
        # video models: a record with a video field becomes the (K,3,H,W) stack of its K segment middles
        self.frames = int(frames)
        self.video_keys = [k.strip().lower() for k in video_key.split(";") if k.strip()]

    def _prepare(self, index: int, rec: Dict[str, Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {"index": index, "key": rec.get("__key__", str(index))}
        if "__skip__" in rec:  # the shard reader's error (the key is the shard's URL)
            return {**out, "skip": rec["__skip__"]}
        if self.label_fn is not None:
            label = self.label_fn(rec)
            if isinstance(label, str):
                return {**out, "skip": label}
            out["label"] = int(label)
        else:
            if self.caption_key not in rec:
                return {**out, "skip": "missing_caption"}
            captions = split_captions(rec[self.caption_key])
            if captions is None:
                return {**out, "skip": "bad_text"}
            if not captions:
                return {**out, "skip": "missing_caption"}
            out["captions"] = captions
        raw = next((rec[k] for k in self.video_keys if k in rec), None) if self.frames else None
        if raw is not None:
            try:
                clip = read_clip_for_eval(raw, self.frames)
            except Exception:  # any decoder failure: corrupt or unsupported container/codec
                return {**out, "skip": "unreadable_video"}
            out["image"] = torch.stack([self.preprocess(f) for f in clip])
            return out
        img, reason = decode_image(rec, self.image_keys)
        if reason:
            return {**out, "skip": reason}
        out["image"] = self.preprocess(img)
        return out

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for index, rec in enumerate(iter_records(self.data, self.images_dir, self.split, self.what,
                                                 self.folder_labels)):
            if self.max_samples and index >= self.max_samples:
                break
            if index % self.world_size != self.rank or (index // self.world_size) % nw != wid:
                continue
            yield self._prepare(index, rec)


def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch of eval items: valid ones stacked, skips listed as (index, key, reason)."""
    ok = [it for it in items if "skip" not in it]
    if len({it["image"].dim() for it in ok}) > 1:
        raise ValueError("an eval set mixes images and videos in one batch: evaluate image and video shards "
                         "separately (keys " + ", ".join(str(it["key"]) for it in ok[:2]) + ")")
    batch: Dict[str, Any] = {
        "index": [it["index"] for it in ok], "key": [it["key"] for it in ok],
        "image": torch.stack([it["image"] for it in ok]) if ok else None,
        "skipped": [(it["index"], it["key"], it["skip"]) for it in items if "skip" in it],
    }
    if ok and "captions" in ok[0]:
        batch["text"] = [it["captions"] for it in ok]
    if ok and "label" in ok[0]:
        batch["label"] = torch.tensor([it["label"] for it in ok], dtype=torch.long)
    return batch


def eval_loader(dataset: EvalDataset, batch_size: int, workers: int = 0) -> DataLoader:
    """DataLoader over an EvalDataset; with workers, batches arrive in worker order (indices restore it)."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be > 0, got {batch_size}")
    if workers:
        kill_workers_at_exit()
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      persistent_workers=False, worker_init_fn=ignore_stop_signals if workers else None)
