"""URL tables in `vlp data convert`: img2dataset when it is installed, the built-in downloader for small tables.

img2dataset (resizing, retries, opt-out headers, resumable, per-shard stats) is the URL downloader. It cannot
share vlp's environment (img2dataset 1.47 requires webdataset<0.3, vlp webdataset>=1), so vlp runs it as a
separate program, found in this order:
  1. `--img2dataset PATH` (the `img2dataset` executable of another environment)
  2. the environment variable VLP_IMG2DATASET
  3. `img2dataset` on PATH (e.g. `pipx install img2dataset`)
  4. `<this venv>/img2dataset/bin/img2dataset`, where `make img2dataset` installs it
Its output folder is read by `vlp train` as it is: `NNNNN.tar` shards of `KEY.jpg/.txt/.json`, with
`NNNNN_stats.json` (`successes`: the shard's sample count) and `NNNNN.parquet` (every row, failed ones included).
vlp writes no file of its own there: img2dataset's resume takes every `*.json` in the folder for shard stats.

Without img2dataset, tables of at most `BUILTIN_MAX_URLS` URLs are fetched by the built-in downloader
(`vlp.data.remote`: size cap per image, retries with backoff on 429/5xx); larger ones are refused with the
install command.
"""
from __future__ import annotations

import collections
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from data_pipelines import sources
from data_pipelines.shardspec import InputError

DOWNLOADERS = ("auto", "img2dataset", "builtin")
BUILTIN_MAX_URLS = 10_000  # the built-in downloader's cap: a URL table with more rows needs img2dataset
ENV_VAR = "VLP_IMG2DATASET"
INSTALL = "pipx install img2dataset"
INSTALL_HINT = (f"install img2dataset in its own environment: `{INSTALL}` (or `make img2dataset` in a vlp "
                f"checkout), or point {ENV_VAR} / --img2dataset at its `img2dataset` executable; it cannot be "
                "installed next to vlp (it requires webdataset<0.3, vlp webdataset>=1)")
_INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_TAIL_LINES = 30


def is_url(value) -> bool:
    return isinstance(value, str) and value.strip().startswith(("http://", "https://"))


def find_img2dataset(explicit: Optional[str] = None) -> Optional[str]:
    """The `img2dataset` executable to run, or None (see the module docstring for the order). A path given
    explicitly (option or VLP_IMG2DATASET) that is not an executable file raises `InputError`."""
    for given, what in ((explicit, "--img2dataset"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if given:
            path = shutil.which(given) or given
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise InputError(f"{what}={given!r} is not an executable file; {INSTALL_HINT}")
            return os.path.abspath(path)
    found = shutil.which("img2dataset")
    if found:
        return found
    local = os.path.join(sys.prefix, "img2dataset", "bin", "img2dataset")
    if os.path.isfile(local) and os.access(local, os.X_OK):
        return local
    return None


@dataclass
class UrlCensus:
    """What the image column of a table holds: URLs, other (local paths), counted until both are decided."""

    urls: int = 0
    others: int = 0
    complete: bool = True  # False: counting stopped early (more than `limit` URLs and a non-URL seen)


def url_census(src: str, column: str, limit: int = BUILTIN_MAX_URLS) -> UrlCensus:
    """Count the URL and non-URL cells of `column` (empty cells count as neither), stopping once there are
    more than `limit` URLs and at least one local path: nothing more can change the choice of downloader."""
    c = UrlCensus()
    for v in sources.column_values(src, column):
        if v is None or not str(v).strip():
            continue
        if is_url(v):
            c.urls += 1
        else:
            c.others += 1
        if c.urls > limit and c.others:
            c.complete = False
            break
    return c


@dataclass
class Choice:
    """The downloader `vlp data convert` uses for a table: 'img2dataset', 'builtin' or None (no URLs)."""

    kind: Optional[str]
    executable: Optional[str] = None
    note: str = ""  # one line for the user (why the built-in downloader)
    census: UrlCensus = field(default_factory=UrlCensus)


def choose_downloader(src: str, image_column: str, downloader: str = "auto",
                      img2dataset: Optional[str] = None, max_urls: int = BUILTIN_MAX_URLS) -> Choice:
    """Pick the downloader for a table (see the module docstring); a choice that cannot work raises
    `InputError` with what to do instead."""
    if downloader not in DOWNLOADERS:
        raise InputError(f"--downloader {downloader!r}: choose one of {', '.join(DOWNLOADERS)}")
    census = url_census(src, image_column, max_urls)
    if census.urls == 0:
        if downloader == "img2dataset":
            raise InputError(f"{src}: column {image_column!r} holds no http(s) URL; img2dataset downloads URLs only")
        return Choice(None, census=census)
    exe = find_img2dataset(img2dataset) if downloader != "builtin" else None
    mixed = census.others > 0
    if downloader == "img2dataset" or (downloader == "auto" and exe and not mixed):
        if not exe:
            raise InputError(f"--downloader img2dataset: img2dataset not found; {INSTALL_HINT}")
        if mixed:
            raise InputError(f"{src}: column {image_column!r} mixes URLs and local paths; img2dataset downloads "
                             "URLs only: split the table, or use --downloader builtin for a small one")
        return Choice("img2dataset", exe, census=census)
    if census.urls > max_urls:
        why = ("the table mixes URLs and local paths" if mixed and exe else
               "--downloader builtin" if downloader == "builtin" else "img2dataset was not found")
        raise InputError(f"{src}: more than {max_urls:,} URLs and {why}; the built-in downloader is for small "
                         f"tables (at most {max_urls:,} URLs). Use img2dataset: {INSTALL_HINT}")
    note = ""
    if downloader == "auto" and not exe:
        note = (f"vlp data convert: img2dataset not found, so the built-in downloader fetches these "
                f"{census.urls} URLs (small tables only); for resizing, resume and opt-out headers: {INSTALL}")
    return Choice("builtin", note=note, census=census)


def img2dataset_args(src: str, out: str, url_col: str, caption_col: str, columns: Sequence[str] = (), *,
                     samples_per_shard: int = 1000, resize_max: int = 0, min_size: int = 0, workers: int = 1,
                     timeout: float = 10.0, retries: int = 3, extra: Sequence[str] = ()) -> List[str]:
    """img2dataset's arguments for converting table SRC into webdataset shards in OUT with vlp's options.

    - `resize_max` 0 keeps images as they are (re-encoded only when not JPEG); N shrinks the longer side
      to N when larger (img2dataset's keep_ratio_largest, only if bigger), like `--resize-max`.
    - `min_size` skips images whose shorter side is below it, `retries` retries each failed download,
      `timeout` is a whole number of seconds for img2dataset, `workers` its processes.
    - the other `columns` are kept in each sample's JSON (`save_additional_columns`).
    - opt-out headers: img2dataset's default `disallowed_header_directives` (noai, noimageai, noindex,
      noimageindex in X-Robots-Tag) is kept; nothing here turns it off.
    - always `incremental` mode: an interrupted run resumes where it stopped (vlp clears OUT itself
      for --overwrite: img2dataset's own overwrite mode deletes the whole folder).
    - `extra`: more img2dataset arguments, appended last (they win), e.g. ['--thread_count', '16'].
    """
    ext = os.path.splitext(src)[1].lower()
    if ext not in _INPUT_FORMATS:
        raise InputError(f"{src}: img2dataset reads {', '.join(_INPUT_FORMATS)} tables here")
    args = ["--url_list", os.path.abspath(src), "--input_format", _INPUT_FORMATS[ext],
            "--url_col", url_col, "--caption_col", caption_col,
            "--output_format", "webdataset", "--output_folder", os.path.abspath(out),
            "--number_sample_per_shard", str(samples_per_shard), "--processes_count", str(max(1, workers)),
            "--timeout", str(max(1, math.ceil(timeout))), "--retries", str(retries),
            "--min_image_size", str(min_size), "--incremental_mode", "incremental", "--enable_wandb", "False"]
    if resize_max:
        args += ["--resize_mode", "keep_ratio_largest", "--image_size", str(resize_max),
                 "--resize_only_if_bigger", "True"]
    else:
        args += ["--resize_mode", "no", "--skip_reencode", "True"]
    keep = [c for c in columns if c not in (url_col, caption_col)]
    if keep:
        args += ["--save_additional_columns", json.dumps(keep)]
    return args + list(extra)


def run_img2dataset(executable: str, args: Sequence[str], progress: bool = True) -> None:
    """Run img2dataset; its output goes to stderr line by line when `progress`. A non-zero exit raises
    RuntimeError with the command and its last lines."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")  # albumentations would check PyPI at import
    cmd = [executable, *args]
    tail: collections.deque = collections.deque(maxlen=_TAIL_LINES)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, text=True, errors="replace", bufsize=1)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if progress:
                sys.stderr.write(line)
                sys.stderr.flush()
        rc = proc.wait()
    except BaseException:  # Ctrl-C: stop img2dataset too; a rerun with --resume continues
        proc.terminate()
        proc.wait()
        raise
    if rc != 0:
        raise RuntimeError(f"img2dataset exited with status {rc}: {shlex.join(cmd)}\n" + "\n".join(tail))


def summarize(out: str) -> Dict:
    """Counts of an img2dataset webdataset folder from its `NNNNN_stats.json` files: rows, successes,
    failures by img2dataset status, and each shard with its sample count. Raises `InputError` when a shard
    has no stats file (an interrupted run: resume it)."""
    tars = sorted(glob.glob(os.path.join(out, "*.tar")))
    shards, status = [], collections.Counter()
    totals = collections.Counter()
    missing = []
    for tar in tars:
        stem = os.path.basename(tar)[:-4]
        path = os.path.join(out, f"{stem}_stats.json")
        try:
            with open(path) as f:
                st = json.load(f)
        except (OSError, ValueError):
            missing.append(os.path.basename(tar))
            continue
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(st.get(k, 0))
        status.update({str(k): int(v) for k, v in (st.get("status_dict") or {}).items()})
        shards.append({"name": os.path.basename(tar), "samples": int(st.get("successes", 0)),
                       "bytes": os.path.getsize(tar)})
    if missing:
        raise InputError(f"{out}: shard(s) {', '.join(missing[:5])} have no _stats.json: the img2dataset run "
                         "did not finish them; rerun with --resume to complete them")
    return {"count": totals["count"], "successes": totals["successes"],
            "failed_to_download": totals["failed_to_download"], "failed_to_resize": totals["failed_to_resize"],
            "status": dict(status.most_common()), "shards": shards}


def _skips(summary: Dict) -> Dict[str, int]:
    """img2dataset's failures as vlp's skip reasons (download_failed, too_small, unreadable_image)."""
    small = sum(n for s, n in summary["status"].items() if "too small" in s.lower())
    return {"download_failed": summary["failed_to_download"], "too_small": small,
            "unreadable_image": summary["failed_to_resize"] - small}


def _prepare(out: str, overwrite: bool, resume: bool) -> None:
    """OUT for img2dataset: new or empty; a previous run's files with `resume` (kept) or `overwrite`
    (its shards, parquet files and stats removed; other files are left and refused below)."""
    os.makedirs(out, exist_ok=True)
    existing = sorted(os.listdir(out))
    if not existing:
        return
    if resume:
        other = [n for n in existing if n.endswith(".json") and not n.endswith("_stats.json")]
        if other:  # img2dataset reads the shard number from every *.json's name
            raise FileExistsError(f"--resume: {out!r} holds {other[0]!r}, which is not img2dataset output")
        return
    if not overwrite:
        raise FileExistsError(f"output directory {out!r} is not empty ({len(existing)} entries, e.g. "
                              f"{existing[0]!r}); pass --resume to continue an interrupted img2dataset download "
                              "into it, --overwrite to replace it, or choose an empty directory")
    for pattern in ("*.tar", "*.parquet", "*.json", "*.tmp"):
        for path in glob.glob(os.path.join(out, pattern)):
            os.remove(path)
    shutil.rmtree(os.path.join(out, "_tmp"), ignore_errors=True)
    left = sorted(os.listdir(out))
    if left:
        raise FileExistsError(f"output directory {out!r} holds files that are not img2dataset output (e.g. "
                              f"{left[0]!r}); remove them or choose an empty directory")


def convert_with_img2dataset(src: str, out: str, executable: str, image_col: Optional[str] = None,
                             caption_col: Optional[str] = None, *, samples_per_shard: int = 1000,
                             resize_max: int = 0, min_size: int = 0, workers: int = 1, timeout: float = 10.0,
                             retries: int = 3, overwrite: bool = False, resume: bool = False,
                             extra: Sequence[str] = (), progress: bool = True) -> Dict:
    """Download table SRC's URLs into OUT with img2dataset; returns vlp convert's stats (not written to a
    file: OUT's `NNNNN_stats.json` files are the record)."""
    columns, icol, ccol, _ = sources.table_columns(src, image_col, caption_col)
    args = img2dataset_args(src, out, icol, ccol, columns, samples_per_shard=samples_per_shard,
                            resize_max=resize_max, min_size=min_size, workers=workers, timeout=timeout,
                            retries=retries, extra=extra)
    _prepare(out, overwrite, resume)
    start = time.time()
    run_img2dataset(executable, args, progress)
    elapsed = time.time() - start
    summary = summarize(out)
    skipped = _skips(summary)
    return {
        "format": "table", "downloader": "img2dataset", "source": os.path.abspath(src),
        "written": summary["successes"], "rows": summary["count"], "skipped": skipped,
        "skipped_total": sum(skipped.values()), "img2dataset_status": summary["status"],
        "shards": summary["shards"], "total_bytes": sum(s["bytes"] for s in summary["shards"]),
        "elapsed_s": round(elapsed, 3), "command": [executable, *args],
    }
