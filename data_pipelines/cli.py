"""`vlp data convert|synth|inspect|tokenizer|bert-vocab|bench`: the offline data tools on the command line.

Heavy modules are imported inside each command so `vlp --help` stays fast.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable, Dict

SHARDS_HELP = ("shards: a directory (all *.tar inside, sorted), a brace pattern "
               "('out/shard-{000000..000009}.tar') or paths joined by '::'")


class _OverridesParser(argparse.ArgumentParser):
    """Takes `key=value` overrides after options too: plain argparse (before Python 3.13) accepts a
    trailing `nargs='*'` positional only right after the positionals before it."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if hasattr(ns, "overrides"):
            late = [a for a in extras if "=" in a and not a.startswith("-")]
            ns.overrides = list(ns.overrides or []) + late
            extras = [a for a in extras if not ("=" in a and not a.startswith("-"))]
        return ns, extras


def _user_errors(name: str) -> Callable:
    """Turn input problems a user can fix into a one-line message and exit status 2."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            from data_pipelines.shardspec import InputError

            try:
                return fn(args)
            except (InputError, FileExistsError, FileNotFoundError) as e:
                print(f"vlp data {name}: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


def _emit(result: Dict, as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


@_user_errors("convert")
def _convert(args: argparse.Namespace) -> int:
    import shlex

    from data_pipelines.convert import convert

    stats = convert(args.src, args.out, args.format, image_col=args.image_col, caption_col=args.caption_col,
                    key_col=args.key_col, images_dir=args.images_dir, all_captions=args.all_captions,
                    split=args.split, samples_per_shard=args.samples_per_shard,
                    max_shard_bytes=args.max_shard_bytes, resize_max=args.resize_max, workers=args.workers,
                    prefix=args.prefix, min_size=args.min_size, timeout=args.timeout,
                    overwrite=args.overwrite, progress=not args.json, max_image_bytes=args.max_image_bytes,
                    retries=args.retries, downloader=args.downloader, img2dataset=args.img2dataset,
                    img2dataset_args=shlex.split(args.img2dataset_args or ""), resume=args.resume,
                    video_col=args.video_col, max_side=args.max_side, max_seconds=args.max_seconds,
                    min_seconds=args.min_seconds)
    skipped = ", ".join(f"{k}={v}" for k, v in stats["skipped"].items() if v) or "none"
    if args.json:
        _emit(stats, True, "")
    elif stats.get("downloader") == "img2dataset":
        from vlp.console import summary
        summary("vlp data convert: done (downloaded by img2dataset)", [
            ("source", f"table: {args.src} ({stats['rows']} rows)"),
            ("written", f"{stats['written']} samples in {len(stats['shards'])} shard(s), "
                        f"{stats['total_bytes'] / 1e6:.1f} MB"),
            ("skipped", skipped),
            ("shards", f"{args.out} (train on it as it is: data.train_shards={args.out})"),
            ("details", f"{args.out}/NNNNN_stats.json (status_dict: each failure), NNNNN.parquet (every row)"),
            ("next", f"vlp data inspect {args.out} --out {args.out}/contact.png")])
    else:
        from vlp.console import summary
        summary("vlp data convert: done", [
            ("source", f"{stats['format']}: {args.src}"),
            ("written", f"{stats['written']} samples in {len(stats['shards'])} shard(s), "
                        f"{stats['total_bytes'] / 1e6:.1f} MB"),
            ("skipped", skipped),
            ("shards", args.out),
            ("details", f"{args.out}/stats.json (skipped_examples name each skipped sample)"),
            ("next", f"vlp data inspect {args.out} --out {args.out}/contact.png")])
    if stats["written"] == 0:
        print("vlp data convert: warning: no sample was written; see skipped_examples in stats.json",
              file=sys.stderr)
        return 1
    return 0


_VIDEO_SYNTH = {"train": 1000, "test": 100, "side": 64, "seconds": 2.0, "fps": 8.0}  # --video defaults


def _synth_video(args: argparse.Namespace) -> int:
    """`--video`: the moving-shapes clips (`data_pipelines.synth_video`) in OUT/train and OUT/test."""
    import os

    from data_pipelines.shardspec import InputError
    from data_pipelines.synth_video import write_synth_video

    for opt, val in (("--n", args.n), ("--split", args.split), ("--image-size", args.image_size),
                     ("--prefix", args.prefix)):
        if val is not None:
            raise InputError(f"{opt} is for the image set; with --video use --train N --test N (OUT/train, "
                             "OUT/test), --side, --seconds, --fps")
    opts = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in _VIDEO_SYNTH.items()}
    if opts["train"] < 0 or opts["test"] < 0 or opts["train"] + opts["test"] == 0:
        raise InputError(f"--train and --test must be >= 0 clips, not both 0; got {opts['train']}, {opts['test']}")
    if opts["test"] % 2:
        raise InputError(f"--test {opts['test']}: the test clips come in twin pairs, so N must be even")
    per_shard = 128 if args.samples_per_shard is None else args.samples_per_shard
    result = {}
    for split in ("train", "test"):
        if opts[split]:
            try:
                result[split] = write_synth_video(
                    os.path.join(args.out, split), opts[split], seed=args.seed, split=split,
                    samples_per_shard=per_shard, side=opts["side"],
                    seconds=opts["seconds"], fps=opts["fps"], overwrite=args.overwrite, progress=not args.json,
                    twins=True if split == "test" or args.train_twins else None)
            except ValueError as e:
                if isinstance(e, InputError):
                    raise
                raise InputError(str(e)) from None
    text = "\n".join(f"synth video {k}: wrote {v['written']} clips of {v['frames']} frames ({v['duration']:g} s, "
                     f"{v['side']} px; {v['twin_pairs']} twin pairs) in {len(v['shards'])} shard(s) to "
                     f"{os.path.join(args.out, k)}" for k, v in result.items())
    _emit(result, args.json, text)
    return 0


@_user_errors("synth")
def _synth(args: argparse.Namespace) -> int:
    from data_pipelines.shardspec import InputError
    from data_pipelines.synth import write_synth

    if args.video:
        return _synth_video(args)
    for opt in ("train", "test", "side", "seconds", "fps"):
        if getattr(args, opt) is not None:
            raise InputError(f"--{opt} is for the video set: add --video (the image set takes --n and --split)")
    if args.train_twins:
        raise InputError("--train-twins is for the video set: add --video")
    args.n = 2000 if args.n is None else args.n
    args.split = args.split or "train"
    per_shard = 256 if args.samples_per_shard is None else args.samples_per_shard
    stats = write_synth(args.out, args.n, seed=args.seed, split=args.split, samples_per_shard=per_shard,
                        image_size=64 if args.image_size is None else args.image_size,
                        prefix=args.prefix, overwrite=args.overwrite, progress=not args.json)
    _emit(stats, args.json, f"synth {args.split}: wrote {stats['written']} samples ({stats['one_object']} one-object, "
          f"{stats['two_objects']} two-object) in {len(stats['shards'])} shard(s) to {args.out}")
    return 0


@_user_errors("inspect")
def _inspect(args: argparse.Namespace) -> int:
    from data_pipelines.inspect_shards import format_report, inspect_shards

    report = inspect_shards(args.shards, n=args.n, out_png=args.out, caption_key=args.caption_key,
                            progress=not args.json)
    _emit(report, args.json, format_report(report))
    return 0


@_user_errors("tokenizer")
def _tokenizer(args: argparse.Namespace) -> int:
    from data_pipelines.tokenizer import train_tokenizer

    meta = train_tokenizer(args.shards, args.vocab_size, args.out, model_type=args.model_type,
                           caption_key=args.caption_key, max_captions=args.max_captions,
                           character_coverage=args.character_coverage, overwrite=args.overwrite)
    _emit(meta, args.json, f"trained a {meta['model_type']} SentencePiece model, vocab {meta['vocab_size']}, on "
          f"{meta['trained_on']['captions']} captions -> {args.out}/spm.model\n"
          f"use it with: data.tokenizer.kind=sentencepiece data.tokenizer.name={args.out}/spm.model")
    return 0


@_user_errors("bert-vocab")
def _bert_vocab(args: argparse.Namespace) -> int:
    from data_pipelines.bert_vocab import write_bert_vocab

    meta = write_bert_vocab(args.shards, args.out, min_count=args.min_count, max_size=args.max_size,
                            caption_key=args.caption_key, max_captions=args.max_captions, overwrite=args.overwrite)
    ids = " ".join(f"model.albef.{k}={v}" for k, v in meta.items() if k.endswith("_token_id"))
    _emit(meta, args.json, f"wrote a {meta['vocab_size']}-token word-level BERT tokenizer ({meta['word_coverage']:.1%} "
          f"of caption words covered) to {args.out}\nuse it with: data.tokenizer.kind=hf data.tokenizer.name={args.out} "
          f"model.text.kind=hf model.text.name={args.out} {ids}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from vlp.train.data_bench import run_bench

    return run_bench(args)


def register(subparsers) -> None:
    """Add `vlp data` and its sub-subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    data = subparsers.add_parser(
        "data", help="offline data tools: convert sources to shards, synthetic set, inspect, tokenizer, bench",
        description="Offline data tools. Shards are WebDataset tar files of KEY.jpg/KEY.txt/KEY.json samples.")
    sub = data.add_subparsers(dest="data_command", metavar="TOOL", required=True, parser_class=_OverridesParser)

    p = sub.add_parser("convert", formatter_class=fmt, help="write WebDataset shards from an image folder, "
                       "CSV/TSV/Parquet, COCO or Karpathy JSON, or img2dataset output",
                       description="""\
Convert SRC into WebDataset shards in OUT: KEY.<jpg|png|webp> (image), KEY.txt (caption) and
KEY.json (source path/url, width, height, extra metadata), plus OUT/stats.json with the number
written, skips per reason and the shard list. The format is detected from SRC:
  folder       a directory of images with sidecar captions (NAME.jpg + NAME.txt), recursive
  table        .csv / .tsv / .parquet with an image column (path relative to the table's folder,
               or an http(s) URL) and a caption column. URLs are downloaded by img2dataset when it
               is found (resizing, retries, opt-out headers, resume; its own environment, e.g.
               `pipx install img2dataset`): OUT is then img2dataset's output (NNNNN.tar +
               NNNNN_stats.json + NNNNN.parquet, no stats.json), which `vlp train` reads as it is.
               Without img2dataset the built-in downloader takes tables of at most 10,000 URLs
  coco         COCO captions JSON (top-level "annotations"); images under --images-dir. One sample
               per image: txt = first caption, json "captions" = all; --all-captions: one per caption
  karpathy     Karpathy split JSON (COCO/Flickr30k, "images" with "sentences"), --split chooses.
               val/test images keep ALL captions in txt, one per line (for retrieval evaluation);
               train/restval get the first caption (or one sample per caption, --all-captions)
  img2dataset  a directory of NNNNN.tar (+ .parquet, _stats.json): every sample re-validated and
               re-sharded; failed downloads listed in the parquet are counted as download_failed
Videos (.mp4 .webm .mkv .mov .avi) come from a folder (NAME.mp4 + NAME.txt), a table (--video-col, a
video/videopath/video_path/contentUrl column, or video files in the image column; URLs fetched by the
built-in downloader) or video2dataset output (samples with status != success or no video are skipped):
KEY.mp4 + KEY.txt + KEY.json (duration, fps, width, height, frames + the input columns), bytes as read
unless --max-side / --max-seconds re-encode them (H.264 mp4); skips unreadable_video, too_short_video.
Skip reasons: missing_caption, empty_caption, duplicate_key, missing_image, unreadable_image,
too_small, download_failed, download_too_large. URL downloads are retried on HTTP 429 and 5xx
(--retries, waiting 1, 2, 4 ... s) and stop at --max-image-bytes. Keys are sanitised (letters,
digits, '_' and '-' only: webdataset splits a key at its first dot) and kept unique. Images pass through unchanged unless larger than
--resize-max or not JPEG/PNG/WebP; those are re-encoded once as JPEG quality 95.""")
    p.add_argument("src", metavar="SRC", help="image folder, table file, COCO/Karpathy JSON or img2dataset folder")
    p.add_argument("out", metavar="OUT", help="output directory for the shards and stats.json")
    p.add_argument("--format", default="auto", choices=["auto", "folder", "table", "coco", "karpathy", "img2dataset"],
                   help="source format (default: detect from SRC)")
    p.add_argument("--image-col", help="table column with the image path or URL (default: first of image, "
                   "image_path, filepath, file_name, filename, path, file, url, image_url)")
    p.add_argument("--video-col", help="table column with the video path or URL (default: first of video, "
                   "videopath, video_path, contentUrl; or the image column when it holds video files)")
    p.add_argument("--max-side", type=int, default=0, metavar="N",
                   help="videos: re-encode those whose longer side exceeds N (aspect kept, even sides); 0: keep")
    p.add_argument("--max-seconds", type=float, default=0.0, metavar="S",
                   help="videos: keep the first S seconds of longer ones (re-encoded); 0: keep all")
    p.add_argument("--min-seconds", type=float, default=0.0, metavar="S",
                   help="videos: skip those shorter than S seconds as too_short_video (default: 0, only "
                   "videos without a frame)")
    p.add_argument("--caption-col", help="table column with the caption (default: first of caption, text, txt, "
                   "title, sentence, description)")
    p.add_argument("--key-col", help="table column to use as sample key (default: the 9-digit row number); "
                   "repeated values are skipped as duplicate_key")
    p.add_argument("--images-dir", help="COCO/Karpathy: folder the image file names are relative to "
                   "(default: the JSON's folder)")
    p.add_argument("--all-captions", action="store_true",
                   help="COCO, Karpathy train/restval: one sample per caption instead of one per image")
    p.add_argument("--split", default="train",
                   help="Karpathy: split(s) to write, comma-separated from train, val, test, restval (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard at most (default: 1000)")
    p.add_argument("--max-shard-bytes", default="0",
                   help="shard size limit, e.g. 500MB or 1GiB; 0: no limit (default: 0)")
    p.add_argument("--resize-max", type=int, default=0, metavar="SIDE",
                   help="shrink images whose longer side exceeds SIDE (aspect kept, JPEG q=95); 0: keep size")
    p.add_argument("--min-size", type=int, default=0, metavar="PX",
                   help="skip images whose shorter side is below PX as too_small (default: 0)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that read/fetch/resize images; output order does not depend on it (default: 1)")
    p.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar (default: shard)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds a URL download may wait for data before it fails (default: 10)")
    p.add_argument("--max-image-bytes", default="50MB",
                   help="skip URL images larger than this as download_too_large, e.g. 20MB; 0: no cap (default: 50MB)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries of a URL answered with HTTP 429 or 5xx, 1, 2, 4 ... s apart (default: 3)")
    p.add_argument("--downloader", default="auto", choices=["auto", "img2dataset", "builtin"],
                   help="who downloads a table's URLs: auto (default) = img2dataset when found, else the "
                   "built-in downloader for at most 10,000 URLs")
    p.add_argument("--img2dataset", metavar="PATH", help="the img2dataset executable to run (default: "
                   "$VLP_IMG2DATASET, img2dataset on PATH, or the one `make img2dataset` installs)")
    p.add_argument("--img2dataset-args", metavar="ARGS", help="more img2dataset arguments, one quoted string, "
                   "e.g. '--thread_count 16 --user_agent_token mybot'")
    p.add_argument("--resume", action="store_true",
                   help="img2dataset: continue an interrupted download into OUT (finished shards are kept)")
    p.add_argument("--overwrite", action="store_true", help="replace shards and stats.json in a non-empty OUT")
    p.add_argument("--json", action="store_true", help="print stats as JSON (and no progress bar)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("synth", help="write the synthetic compositional shapes set (demo and tests)",
                       description="Write N synthetic image-caption samples: one or two coloured shapes with "
                       "size and position ('a large red circle on the left', 'a red circle left of a green "
                       "triangle'). Deterministic for (seed, split); the test split never repeats a description. "
                       "--video: moving-shapes clips instead ('a small red circle moves from left to right, a "
                       "large blue square stays still') in OUT/train and OUT/test; the test clips come in "
                       "reversed-direction twin pairs that no single frame or frame average tells apart.")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--n", type=int, default=None, help="number of samples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--split", default=None, help="split name; 'test' makes descriptions unique (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard (default: 256; --video: 128)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: 64)")
    p.add_argument("--video", action="store_true",
                   help="write the moving-shapes video set (KEY.mp4 + KEY.txt + KEY.json) to OUT/train and OUT/test")
    p.add_argument("--train", type=int, default=None, metavar="N",
                   help=f"--video: training clips in OUT/train (default: {_VIDEO_SYNTH['train']})")
    p.add_argument("--test", type=int, default=None, metavar="N",
                   help=f"--video: test clips in OUT/test, in twin pairs (default: {_VIDEO_SYNTH['test']})")
    p.add_argument("--train-twins", action="store_true",
                   help="--video: write the training clips in twin pairs too, a clip then its time-reversal (hard "
                        "negatives for contrastive training: read them with data.shuffle_buffer=0 to keep pairs "
                        "in one batch)")
    p.add_argument("--side", type=int, default=None, help="--video: frame side in px, even (default: 64)")
    p.add_argument("--seconds", type=float, default=None,
                   help="--video: clip length; the frame count is made odd (default: 2)")
    p.add_argument("--fps", type=float, default=None, help="--video: frames per second (default: 8)")
    p.add_argument("--prefix", help="shard file prefix (default: synth-SPLIT)")
    p.add_argument("--overwrite", action="store_true", help="replace shards in a non-empty OUT")
    p.add_argument("--json", action="store_true", help="print stats as JSON")
    p.set_defaults(func=_synth)

    p = sub.add_parser("inspect", help="count samples, caption lengths, and draw a contact sheet",
                       description="Scan SHARDS: samples per shard, file extensions, sample keys, caption length "
                       "in words (min/mean/max), captions per sample, duplicate keys; optionally a PNG contact "
                       "sheet of the first N samples with their captions.")
    p.add_argument("shards", metavar="SHARDS", help=SHARDS_HELP)
    p.add_argument("--out", metavar="PNG", help="write a contact sheet of the first samples to this PNG")
    p.add_argument("--n", type=int, default=16, help="samples on the contact sheet (default: 16)")
    p.add_argument("--caption-key", default="txt", help="caption file extension (default: txt)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer on the captions",
                       description="Train a SentencePiece model on the captions of SHARDS (every line of a "
                       "multi-caption txt counts). Writes DIR/spm.model and DIR/vlp_tokenizer.json with "
                       "pad_id=0, unk_id=1, bos_id=2, eos_id=3; load it with data.tokenizer.kind=sentencepiece "
                       "data.tokenizer.name=DIR/spm.model.")
    p.add_argument("shards", metavar="SHARDS", help=SHARDS_HELP)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including the 4 special tokens")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"], help="(default: unigram)")
    p.add_argument("--max-captions", type=int, default=0, help="train on the first N captions; 0: all")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="share of characters the vocabulary must cover; ~0.9995 for CJK (default: 1.0)")
    p.add_argument("--caption-key", default="txt", help="caption file extension (default: txt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in DIR")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("bert-vocab", help="write a word-level BERT tokenizer (for ALBEF's MLM) from the captions",
                       description="Count the words of the captions of SHARDS (BERT lower-casing and punctuation "
                       "splitting) and save a BERT tokenizer whose vocabulary is [PAD]=0, [UNK]=1, [CLS]=2, "
                       "[SEP]=3, [MASK]=4 and then the words by frequency, plus a base BERT config.json of that "
                       "vocabulary size, to DIR. Offline; meant for small closed vocabularies such as the "
                       "synthetic set (configs/demo_albef.yaml). For open text use a pretrained tokenizer "
                       "(bert-base-uncased).")
    p.add_argument("shards", metavar="SHARDS", help=SHARDS_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--min-count", type=int, default=1, help="leave out words seen fewer times (default: 1)")
    p.add_argument("--max-size", type=int, default=0, help="at most this many tokens, specials included; 0: all")
    p.add_argument("--max-captions", type=int, default=0, help="count the first N captions only; 0: all")
    p.add_argument("--caption-key", default="txt", help="caption file extension (default: txt)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=_bert_vocab)

    p = sub.add_parser("bench", help="measure loader throughput (samples/s) on shards",
                       description="Run the training data loader over SHARDS and report samples/s per stage.")
    p.add_argument("shards", metavar="SHARDS", help=SHARDS_HELP)
    p.add_argument("--workers", type=int, default=None, metavar="W", help="DataLoader workers (default: config)")
    p.add_argument("--config", metavar="CFG", help="experiment YAML whose data section is used")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: train.micro_batch_size)")
    p.add_argument("--samples", type=int, default=None, help="samples to time")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.image_size=128")
    p.set_defaults(func=_bench)
