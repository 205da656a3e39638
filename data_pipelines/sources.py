"""Readers for the source formats `vlp data convert` understands, and format auto-detection.

Each reader checks what it can up front (columns, image folder) and raises `InputError` naming the
option to fix, then returns a lazy iterator of `Record`s in a deterministic order. Captions that
are absent come through as `None` so the converter can count them.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
from collections import defaultdict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from data_pipelines.images import Record
from data_pipelines.shardspec import InputError, iter_samples
from vlp.data.video import VIDEO_EXTS as _VIDEO_KEYS

FORMATS = ("folder", "table", "coco", "karpathy", "img2dataset")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTS = tuple("." + e for e in _VIDEO_KEYS)
TABLE_EXTS = (".csv", ".tsv", ".parquet")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "path", "file", "url", "image_url")
VIDEO_COLUMNS = ("video", "videopath", "video_path", "contenturl")  # lower case, as matched
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "sentence", "description")
_CHUNK = 10_000


def detect_format(src: str) -> str:
    """Guess SRC's format: folder of images or videos, table, COCO or Karpathy JSON, img2dataset output."""
    if os.path.isdir(src):
        if glob.glob(os.path.join(src, "*.tar")):
            return "img2dataset"
        for _, _, files in os.walk(src):
            if any(f.lower().endswith(IMAGE_EXTS + VIDEO_EXTS) for f in files):
                return "folder"
        raise InputError(f"cannot tell the format of directory {src!r}: it holds neither *.tar shards "
                         f"nor image files ({', '.join(IMAGE_EXTS)}) nor videos ({', '.join(VIDEO_EXTS)}); "
                         "pass --format")
    if not os.path.exists(src):
        raise InputError(f"source not found: {src!r}")
    lower = src.lower()
    if lower.endswith(TABLE_EXTS):
        return "table"
    if lower.endswith(".json"):
        data = _load_json(src)
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        images = data.get("images") if isinstance(data, dict) else None
        if images and isinstance(images, list) and isinstance(images[0], dict) and "sentences" in images[0]:
            return "karpathy"
        raise InputError(f"{src}: JSON is neither COCO captions (top-level 'annotations') nor a Karpathy "
                         "split file ('images' entries with 'sentences'); pass --format")
    raise InputError(f"cannot tell the format of {src!r} from its name: expected a directory, "
                     f"{', '.join(TABLE_EXTS)} or .json; pass --format ({', '.join(FORMATS)})")


_json_cache: Dict[str, object] = {}


def _load_json(path: str):
    if path not in _json_cache:  # detection and reading both need it; the files can be large
        _json_cache.clear()
        try:
            with open(path, encoding="utf-8") as f:
                _json_cache[path] = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON: {e}") from None
    return _json_cache[path]


# ------------------------------------------------------------------------------------ folder
def read_folder(src: str, exts: Sequence[str] = IMAGE_EXTS) -> Iterator[Record]:
    """Images (or the files ending in `exts`: videos) under SRC, recursive and sorted, with sidecar
    captions `NAME.txt` next to `NAME.jpg`."""
    if not os.path.isdir(src):
        raise InputError(f"--format folder needs a directory, got {src!r}")

    def gen():
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in exts:
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(os.path.join(root, stem), src).replace(os.sep, "/")
                txt = os.path.join(root, stem + ".txt")
                caption = None
                if os.path.isfile(txt):
                    with open(txt, encoding="utf-8", errors="replace") as f:
                        caption = f.read()
                yield Record(key=rel, caption=caption, path=path, source=path)

    return gen()


# ------------------------------------------------------------------------------------- table
def _pick_column(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], option: str,
                 src: str) -> str:
    if wanted:
        if wanted not in columns:
            raise InputError(f"{src}: no column {wanted!r} for {option}; columns: {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise InputError(f"{src}: cannot find the {option[2:].replace('-col', '')} column among "
                     f"{', '.join(columns)}; pass {option}")


def _table_rows(src: str) -> Iterable[List[Dict]]:
    if src.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(src).iter_batches(batch_size=_CHUNK):
            yield batch.to_pylist()
    else:
        with _csv_reader(src) as rows:
            header = next(rows, [])
            chunk: List[Dict] = []
            for row in rows:
                if not row:  # a blank line (pandas skipped them too)
                    continue
                chunk.append(dict(zip(header, row + [""] * (len(header) - len(row)))))
                if len(chunk) == _CHUNK:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk


@contextlib.contextmanager
def _csv_reader(src: str):
    """Rows of a CSV/TSV as lists of text cells (an empty cell is an empty string): the stdlib's reader,
    which is what pandas' `read_csv(dtype=str, na_filter=False)` gave, without the dependency."""
    sep = "\t" if src.lower().endswith(".tsv") else ","
    with open(src, newline="", encoding="utf-8") as f:
        yield csv.reader(f, delimiter=sep)


def _table_columns(src: str) -> List[str]:
    if src.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(src).schema_arrow.names)
    with _csv_reader(src) as rows:
        return list(next(rows, []))


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def table_columns(src: str, image_col: Optional[str] = None, caption_col: Optional[str] = None,
                  key_col: Optional[str] = None, media_candidates: Sequence[str] = IMAGE_COLUMNS,
                  media_option: str = "--image-col", caption_candidates: Sequence[str] = CAPTION_COLUMNS):
    """(all columns, image column, caption column, key column or None) of a table; errors name the option.
    Videos: `media_candidates`/`media_option`/`caption_candidates` of `data_pipelines.video_convert`."""
    if not os.path.isfile(src):
        raise InputError(f"table not found: {src!r}")
    columns = _table_columns(src)
    icol = _pick_column(columns, image_col, media_candidates, media_option, src)
    ccol = _pick_column(columns, caption_col, caption_candidates, "--caption-col", src)
    kcol = _pick_column(columns, key_col, (), "--key-col", src) if key_col else None
    return columns, icol, ccol, kcol


def column_values(src: str, column: str) -> Iterator[object]:
    """One column of a table, row by row, read in chunks (only that column where the format allows)."""
    if src.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(src).iter_batches(batch_size=_CHUNK, columns=[column]):
            yield from batch.column(0).to_pylist()
    else:
        with _csv_reader(src) as rows:
            header = next(rows, [])
            i = header.index(column)
            for row in rows:
                if row:
                    yield row[i] if i < len(row) else ""


def read_table(src: str, image_col: Optional[str] = None, caption_col: Optional[str] = None,
               key_col: Optional[str] = None, **candidates) -> Iterator[Record]:
    """CSV/TSV/Parquet rows: image path (relative to the table's folder) or http(s) URL + caption.

    Keys are the row index (9 digits, as img2dataset does) unless `key_col` names a column.
    Other scalar columns are copied into the sample's JSON. `candidates`: `table_columns`' column choices.
    """
    _, icol, ccol, kcol = table_columns(src, image_col, caption_col, key_col, **candidates)
    base = os.path.dirname(os.path.abspath(src))

    def gen():
        row = 0
        for rows in _table_rows(src):
            for r in rows:
                loc = r.get(icol)
                loc = "" if loc is None else str(loc).strip()
                cap = r.get(ccol)
                meta = {k: v for k, v in r.items() if k not in (icol, ccol) and _jsonable(v)}
                key = str(r[kcol]) if kcol else f"{row:09d}"
                if loc.startswith(("http://", "https://")):
                    rec = Record(key=key, caption=cap, url=loc, source=loc, meta=meta)
                else:
                    path = loc if not loc or os.path.isabs(loc) else os.path.join(base, loc)
                    rec = Record(key=key, caption=cap, path=path, source=path, meta=meta)
                rec.meta["row"] = row
                row += 1
                yield rec

    return gen()


# -------------------------------------------------------------------------------------- COCO
def _check_images_dir(paths: List[str], images_dir: str, src: str) -> None:
    """Fail early when none of the first images exists: almost surely a wrong --images-dir."""
    probe = paths[:20]
    if probe and not any(os.path.isfile(p) for p in probe):
        raise InputError(f"{src}: none of the first {len(probe)} images exist under {images_dir!r} "
                         f"(e.g. {probe[0]!r}); pass --images-dir pointing at the image folder")


def read_coco(src: str, images_dir: Optional[str] = None, all_captions: bool = False) -> Iterator[Record]:
    """COCO captions JSON. One sample per image: `txt` = its first caption, JSON `captions` = all.

    With `all_captions`, one sample per caption instead (key `STEM_ANNID`), for training on every
    caption. Images resolve against `images_dir` (default: the JSON's folder).
    """
    data = _load_json(src)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise InputError(f"{src}: COCO captions JSON needs top-level 'images' and 'annotations'")
    images_dir = images_dir or os.path.dirname(os.path.abspath(src))
    caps = defaultdict(list)
    for ann in data["annotations"]:
        caps[ann["image_id"]].append((ann.get("id"), ann.get("caption")))
    images = data["images"]
    _check_images_dir([os.path.join(images_dir, im["file_name"]) for im in images], images_dir, src)

    def gen():
        for im in images:
            path = os.path.join(images_dir, im["file_name"])
            stem = os.path.splitext(im["file_name"])[0]
            anns = caps.get(im["id"], [])
            if not anns:
                yield Record(key=stem, caption=None, path=path, source=path, meta={"image_id": im["id"]})
            elif all_captions:
                for ann_id, cap in anns:
                    yield Record(key=f"{stem}_{ann_id}", caption=cap, path=path, source=path,
                                 meta={"image_id": im["id"], "annotation_id": ann_id})
            else:
                texts = [c for _, c in anns if c is not None]
                yield Record(key=stem, caption=texts[0] if texts else None, path=path, source=path,
                             meta={"image_id": im["id"], "captions": [t.strip() for t in texts]})

    return gen()


# ---------------------------------------------------------------------------------- Karpathy
def read_karpathy(src: str, splits: str = "train", images_dir: Optional[str] = None,
                  all_captions: bool = False) -> Iterator[Record]:
    """Karpathy split JSON (COCO / Flickr30k): images of the chosen split(s), comma-separated.

    `val`/`test` images keep all their captions, newline-joined in `txt` (one caption per line,
    as retrieval evaluation expects); `train`/`restval` images get their first caption in `txt`
    and all in JSON `captions`, or one sample per caption with `all_captions`.
    """
    wanted = [s.strip() for s in splits.split(",") if s.strip()]
    bad = [s for s in wanted if s not in KARPATHY_SPLITS]
    if bad or not wanted:
        raise InputError(f"--split {splits!r}: valid splits are {', '.join(KARPATHY_SPLITS)} (comma-separated)")
    data = _load_json(src)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{src}: Karpathy split JSON needs a top-level 'images' list")
    images_dir = images_dir or os.path.dirname(os.path.abspath(src))
    images = [im for im in data["images"] if im.get("split") in wanted]

    def path_of(im):
        return os.path.join(images_dir, im.get("filepath", ""), im["filename"])

    _check_images_dir([path_of(im) for im in images], images_dir, src)

    def gen():
        for im in images:
            path = path_of(im)
            stem = os.path.splitext(im["filename"])[0]
            texts = [(s.get("raw") or " ".join(s.get("tokens", []))).strip() for s in im.get("sentences", [])]
            texts = [t for t in texts if t]
            meta = {k: im[k] for k in ("imgid", "cocoid", "split") if k in im}
            if not texts:
                yield Record(key=stem, caption=None, path=path, source=path, meta=meta)
            elif im["split"] in ("val", "test"):
                yield Record(key=stem, caption="\n".join(texts), path=path, source=path,
                             meta={**meta, "captions": texts})
            elif all_captions:
                for j, t in enumerate(texts):
                    yield Record(key=f"{stem}_{j}", caption=t, path=path, source=path, meta=meta)
            else:
                yield Record(key=stem, caption=texts[0], path=path, source=path, meta={**meta, "captions": texts})

    return gen()


# ------------------------------------------------------------------------------- img2dataset
def read_downloader_output(src: str, exts: Sequence[str], what: str) -> Iterator[Record]:
    """img2dataset / video2dataset output (`NNNNN.tar` + `.parquet` + `_stats.json`): each sample's first
    member with one of `exts` (re-validated by the converter); a sample whose json says status != success
    (video2dataset writes its failed downloads) comes without data, so it counts as a failed download."""
    tars = sorted(glob.glob(os.path.join(src, "*.tar")))
    if not tars:
        raise InputError(f"{what} needs a directory with *.tar shards, got {src!r}")

    def gen():
        for s in iter_samples(tars):
            ext = next((e for e in exts if e in s), None)
            meta = {}
            if "json" in s:
                try:
                    meta = json.loads(s["json"])
                except ValueError:
                    meta = {}
            meta = meta if isinstance(meta, dict) else {}
            cap = s["txt"].decode("utf-8", errors="replace") if "txt" in s else None
            source = f"{os.path.basename(s['__url__'])}/{s['__key__']}"
            ok = meta.get("status", "success") == "success"
            yield Record(key=s["__key__"], caption=cap, data=s[ext] if (ext and ok) else b"", source=source,
                         meta=meta)

    return gen()


def read_img2dataset(src: str) -> Iterator[Record]:
    """img2dataset output: each sample re-validated."""
    return read_downloader_output(src, ("jpg", "jpeg", "png", "webp"), "--format img2dataset")


def img2dataset_failures(src: str) -> int:
    """Rows whose download failed: img2dataset lists them only in its parquet files."""
    import pyarrow.parquet as pq

    failed = 0
    for path in sorted(glob.glob(os.path.join(src, "*.parquet"))):
        table = pq.read_table(path)
        if "status" in table.column_names:
            failed += sum(1 for v in table.column("status").to_pylist() if v != "success")
    return failed
