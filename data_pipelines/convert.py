"""`vlp data convert`: any supported source -> validated WebDataset shards + stats.json.

Every sample becomes `KEY.<img ext>` (image), `KEY.txt` (caption) and `KEY.json` (source, size,
extra metadata); videos `KEY.mp4` (or .webm ...) the same way (`data_pipelines.video_convert`). Samples that cannot be used are skipped and counted per reason, never silently.
Images are read, checked and resized in a process pool; results keep the source order, so the
same input and options always give the same shards.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

from data_pipelines import download, sources, video_convert
from data_pipelines.images import MAX_IMAGE_BYTES, Loaded, Record, load_image
from data_pipelines.shardspec import InputError
from data_pipelines.shards import ShardWriter, prepare_out_dir, write_json_atomic

REASONS = ("missing_caption", "empty_caption", "duplicate_key", "missing_image", "unreadable_image",
           "too_small", "download_failed", "download_too_large") + video_convert.VIDEO_REASONS
MAX_KEY_LEN = 80
_EXAMPLES_PER_REASON = 5


def parse_bytes(text) -> int:
    """'500MB' / '2GiB' / '1000000' -> bytes (K/M/G are powers of 1000, Ki/Mi/Gi of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise InputError(f"cannot read size {text!r}: use bytes or a suffix, e.g. 500MB, 1GiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** "_KMGT".index(unit or "_"))


def sanitize_key(raw: str, used: set) -> str:
    """A key webdataset keeps whole (no dots or slashes), short enough for tar, unique in `used`."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", raw).strip("_") or "sample"
    if len(key) > MAX_KEY_LEN:
        key = f"{key[:MAX_KEY_LEN - 9]}_{zlib.crc32(raw.encode()):08x}"
    if key in used:  # two distinct raw keys that sanitise alike: disambiguate by the raw key's hash
        key = f"{key}_{zlib.crc32(raw.encode()):08x}"
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def ordered_map(fn: Callable, items: Iterable, workers: int, window: int = 0) -> Iterator[Tuple]:
    """Yield (item, fn(item)) in input order; with workers > 1 in a process pool, bounded in flight."""
    if workers <= 1:
        for it in items:
            yield it, fn(it)
        return
    window = window or workers * 16
    pending: deque = deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for it in items:
            pending.append((it, pool.submit(fn, it)))
            if len(pending) >= window:
                it0, fut = pending.popleft()
                yield it0, fut.result()
        while pending:
            it0, fut = pending.popleft()
            yield it0, fut.result()


def read_source(src: str, fmt: str = "auto", image_col: Optional[str] = None,
                caption_col: Optional[str] = None, key_col: Optional[str] = None,
                images_dir: Optional[str] = None, all_captions: bool = False,
                split: str = "train") -> Tuple[str, Iterator[Record]]:
    """(format, records) for SRC; format 'auto' detects it. Input errors raise before any output."""
    if fmt == "auto":
        fmt = sources.detect_format(src)
    if fmt == "folder":
        return fmt, sources.read_folder(src)
    if fmt == "table":
        return fmt, sources.read_table(src, image_col, caption_col, key_col)
    if fmt == "coco":
        return fmt, sources.read_coco(src, images_dir, all_captions)
    if fmt == "karpathy":
        return fmt, sources.read_karpathy(src, split, images_dir, all_captions)
    if fmt == "img2dataset":
        return fmt, sources.read_img2dataset(src)
    raise InputError(f"--format {fmt!r}: valid formats are auto, {', '.join(sources.FORMATS)}")


def _sample_json(key: str, rec: Record, img: Loaded) -> bytes:
    meta = dict(rec.meta)
    meta.update(key=key, source=rec.source, width=img.width, height=img.height)
    if rec.url:
        meta["url"] = rec.url
    if img.resized:
        meta.update(original_width=img.original_width, original_height=img.original_height)
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()


def convert(src: str, out: str, fmt: str = "auto", *, image_col: Optional[str] = None,
            caption_col: Optional[str] = None, key_col: Optional[str] = None,
            images_dir: Optional[str] = None, all_captions: bool = False, split: str = "train",
            samples_per_shard: int = 1000, max_shard_bytes=0, resize_max: int = 0, workers: int = 1,
            prefix: str = "shard", min_size: int = 0, timeout: float = 10.0, overwrite: bool = False,
            progress: bool = True, max_image_bytes=MAX_IMAGE_BYTES, retries: int = 3,
            retry_backoff: float = 1.0, downloader: str = "builtin", img2dataset: Optional[str] = None,
            img2dataset_args: Iterable[str] = (), resume: bool = False, video_col: Optional[str] = None,
            max_side: int = 0, max_seconds: float = 0.0, min_seconds: float = 0.0) -> Dict:
    """Convert SRC into shards in OUT; returns the stats also written to OUT/stats.json.

    A table of URLs is downloaded by `downloader` (`data_pipelines.download`): 'img2dataset' runs img2dataset
    (executable `img2dataset` or found as described there; `img2dataset_args` appended to its arguments,
    `resume` continues an interrupted download in OUT) and writes its own shards and stats, no stats.json;
    'builtin' fetches at most `download.BUILTIN_MAX_URLS` URLs here, each at most `max_image_bytes`, retried
    `retries` times on HTTP 429/5xx, `retry_backoff` x 1, 2, 4 ... s apart; 'auto' (the command line's
    default) takes img2dataset when found, else 'builtin' for a small table.

    Videos (a folder of them, a table whose `video_col` or video-named column holds video paths/URLs,
    video2dataset output) pass through unless longer than `max_seconds` or larger than `max_side`
    (re-encoded); under `min_seconds` (or without a frame) they are skipped as too_short_video."""
    max_shard_bytes = parse_bytes(max_shard_bytes)
    max_image_bytes = parse_bytes(max_image_bytes)
    for name, val in (("--resize-max", resize_max), ("--min-size", min_size), ("--retries", retries),
                      ("--max-image-bytes", max_image_bytes), ("retry_backoff", retry_backoff)):
        if val < 0:
            raise InputError(f"{name} must be >= 0, got {val}")
    if timeout <= 0:
        raise InputError(f"--timeout must be > 0 seconds, got {timeout}")
    if samples_per_shard <= 0:
        raise InputError(f"--samples-per-shard must be > 0, got {samples_per_shard}")
    if fmt == "auto":
        fmt = sources.detect_format(src)
    video = video_convert.detect_media(src, fmt, image_col, video_col) == "video"
    video_convert.check_options("video" if video else "image", resize_max=resize_max, min_size=min_size,
                                max_side=max_side, max_seconds=max_seconds, min_seconds=min_seconds,
                                downloader=downloader)
    choice = download.Choice(None)
    if fmt == "table" and video:
        _, icol, _, _ = video_convert.video_table_columns(src, video_col or image_col, caption_col, key_col)
        choice = download.choose_downloader(src, icol, "builtin", img2dataset)
    elif fmt == "table":
        _, icol, _, _ = sources.table_columns(src, image_col, caption_col, key_col)
        choice = download.choose_downloader(src, icol, downloader, img2dataset)
    elif downloader == "img2dataset":
        raise InputError(f"--downloader img2dataset: {src!r} is not a table of URLs (.csv, .tsv, .parquet)")
    if choice.kind == "img2dataset":
        for name, val in (("--key-col", key_col), ("--max-shard-bytes", max_shard_bytes)):
            if val:  # img2dataset keys samples by shard and row number and cuts shards by count only
                raise InputError(f"{name} is not available when img2dataset downloads the table "
                                 "(use --downloader builtin for a small table)")
        return download.convert_with_img2dataset(
            src, out, choice.executable, image_col, caption_col, samples_per_shard=samples_per_shard,
            resize_max=resize_max, min_size=min_size, workers=workers, timeout=timeout, retries=retries,
            overwrite=overwrite, resume=resume, extra=list(img2dataset_args), progress=progress)
    if resume:
        raise InputError("--resume continues an img2dataset download; this conversion does not use img2dataset")
    if choice.note:
        print(choice.note, file=sys.stderr)
    if video:
        fmt, records = video_convert.read_video_source(src, fmt, video_col or image_col, caption_col, key_col)
    else:
        fmt, records = read_source(src, fmt, image_col, caption_col, key_col, images_dir, all_captions, split)
    prepare_out_dir(out, overwrite)

    skipped = {r: 0 for r in REASONS}
    examples: Dict[str, list] = {}

    def skip(reason: str, rec: Record, detail: str = "") -> None:
        skipped[reason] += 1
        ex = examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES_PER_REASON:
            ex.append({"key": rec.key, "source": rec.source, **({"detail": detail} if detail else {})})

    seen_raw: set = set()

    def usable(recs: Iterable[Record]) -> Iterator[Record]:
        """Checks that need no image: caption present and non-empty, key new, image location."""
        for rec in recs:
            if rec.caption is None:
                skip("missing_caption", rec)
                continue
            rec.caption = str(rec.caption).strip()
            if not rec.caption:
                skip("empty_caption", rec)
                continue
            if rec.key in seen_raw:
                skip("duplicate_key", rec)
                continue
            seen_raw.add(rec.key)
            if not (rec.data or rec.path or rec.url):
                if video:
                    skip(video_convert.missing_reason(rec), rec, "no video for this sample")
                else:
                    skip("missing_image", rec, "the source names no image for this sample")
                continue
            yield rec

    if fmt == "img2dataset":
        skipped["download_failed"] += sources.img2dataset_failures(src)

    if video:
        load = functools.partial(video_convert.load_video, max_side=max_side, max_seconds=max_seconds,
                                 min_seconds=min_seconds, timeout=timeout, max_bytes=max_image_bytes,
                                 retries=retries, backoff=retry_backoff)
    else:
        load = functools.partial(load_image, resize_max=resize_max, min_size=min_size, timeout=timeout,
                                 max_bytes=max_image_bytes, retries=retries, backoff=retry_backoff)
    sample_json = video_convert.sample_json if video else _sample_json
    used_keys: set = set()
    written = resized = 0
    start = time.time()
    bar = _progress(progress, _count_hint(src, fmt, video) if progress else None)
    with ShardWriter(out, prefix, samples_per_shard, max_shard_bytes) as writer:
        for rec, img in ordered_map(load, usable(records), workers):
            if not img.ok:
                skip(img.reason, rec, img.detail)
            else:
                key = sanitize_key(rec.key, used_keys)
                writer.write(key, {img.ext: img.data, "txt": rec.caption.encode("utf-8"),
                                   "json": sample_json(key, rec, img)})
                written += 1
                resized += img.resized
            if bar is not None:
                bar.update(1)
                bar.set_postfix(written=written, skipped=sum(skipped.values()), refresh=False)
        shards = writer.close()
    if bar is not None:
        bar.total = bar.n  # the hint counts rows/files; samples skipped before loading never reach the bar
        bar.refresh()
        bar.close()
    elapsed = time.time() - start
    stats = {
        "format": fmt, "source": os.path.abspath(src), "written": written, "skipped": skipped,
        "skipped_total": sum(skipped.values()), "skipped_examples": examples, "resized": resized,
        "shards": shards, "total_bytes": sum(s["bytes"] for s in shards),
        "elapsed_s": round(elapsed, 3), "samples_per_s": round(written / elapsed, 1) if elapsed > 0 else None,
        "options": {"prefix": prefix, "samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                    "resize_max": resize_max, "min_size": min_size, "all_captions": all_captions,
                    "split": split if fmt == "karpathy" else None, "workers": workers,
                    "max_image_bytes": max_image_bytes, "retries": retries, "timeout": timeout,
                    "downloader": choice.kind,
                    **({"media": "video", "max_side": max_side, "max_seconds": max_seconds,
                        "min_seconds": min_seconds} if video else {})},
    }
    write_json_atomic(os.path.join(out, "stats.json"), stats)
    return stats


def _count_hint(src: str, fmt: str, video: bool = False) -> Optional[int]:
    """How many records a source holds, when that is cheap to know: a Parquet file's metadata, a CSV/TSV's
    line count, a folder's image files. For the progress bar's ETA only (None: no total)."""
    try:
        if fmt == "table" and src.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(src).metadata.num_rows)
        if fmt == "table":
            with open(src, "rb") as f:
                return max(0, sum(1 for _ in f) - 1)
        if fmt == "folder":
            exts = sources.VIDEO_EXTS if video else sources.IMAGE_EXTS
            return sum(1 for _, _, files in os.walk(src) for n in files if n.lower().endswith(exts))
    except (OSError, ValueError, ImportError):
        return None
    return None


def _progress(enabled: bool, total: Optional[int] = None):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc="convert", unit="sample", total=total or None, file=sys.stderr, dynamic_ncols=True)
