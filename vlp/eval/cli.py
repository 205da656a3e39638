"""`vlp eval retrieval|zeroshot`: evaluate a training run, a checkpoint or an export directory.

One process by default; `--nproc N` starts N ranks with the DeepSpeed launcher (`deepspeed --num_gpus N
--module vlp.eval ...`), each encoding its share of the data; rank 0 writes the outputs.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from vlp.config import EvalConfig
from vlp.dist import launcher_command, run_forwarding_signals

_COMMON_HELP = """
MODEL may be a training run directory (its latest complete checkpoint; weights of any ZeRO stage are
consolidated to fp32), one checkpoints/step_XXXXXXX directory, or an export directory: vlp
(vlp_config.yaml), open_clip (open_clip_config.json + open_clip_model.safetensors) or transformers
(config.json of a dual encoder such as CLIPModel).
"""

RETRIEVAL_HELP = """Zero-shot image<->text retrieval: R@1/5/10 both ways, mean recall, median/mean rank.
""" + _COMMON_HELP + """
DATA is a shard spec (a directory of *.tar, a brace pattern like d/test-{000000..000004}.tar, or
several joined by '::') or a Karpathy split JSON (COCO/Flickr30k) with --images-dir. A caption field
may hold several captions, one per line; each is a separate text. Samples whose image cannot be decoded
or that have no caption are skipped and counted in the results. Ties rank pessimistically (the positive
behind every equal-scoring negative). Fusion models (with an ITM head) are also evaluated after
re-ranking each query's top-k candidates by ITM ('reranked' in the results); re-ranking keeps each
rank's preprocessed images in memory (images/ranks x 3 x size x size x 4 bytes).

The results JSON holds metrics (fractions in [0, 1]), n_images, n_texts, skipped counts, the model,
the data, the git commit and the run's config. --nproc N runs N ranks under the DeepSpeed launcher,
each encoding 1/N of the data; the numbers are the same as with one process. Example:

  vlp eval retrieval --checkpoint runs/demo --data runs/demo/data/test --out runs/demo/retrieval.json \\
      --report runs/demo/retrieval.png
"""

ZEROSHOT_HELP = """Zero-shot classification with prompt ensembles: top-1/top-5 and per-class accuracy.
""" + _COMMON_HELP + """
Each class embedding is the mean of its normalised template embeddings, renormalised. The label of a
sample is its `cls` field (an integer), else its json `label` or `class` field; --label-key names
another json field (dotted: objects.0.shape). A label is a class index or a class name from
--classnames (a file, one per line, or `imagenet`: open_clip's 1000 ImageNet-1k names). Samples
without a label are skipped and counted. The default templates (`imagenet`) are CLIP's 80 ImageNet
prompts, from open_clip.

Layouts users' suites write are read as they are:
- CLIP_benchmark's webdataset sets: DATA is the dataset folder (its test/ split is read) or the split
  folder; samples carry `cls`; without --classnames/--templates, classnames.txt and
  zeroshot_classification_templates.txt in the split folder or one level up are used (their `{c}`
  placeholder is read as `{}`); the output names the files used.
- A folder per class (torchvision ImageFolder): DATA/<class>/**/<image>. Labels follow the sorted
  folder names; the folder names are the class names unless --classnames is given, then each folder
  must name one of the classes (case and '_' vs ' ' ignored) or be a class index.

Example on the synthetic set:

  vlp eval zeroshot --checkpoint runs/demo --data runs/demo/data/test --classnames shapes.txt \\
      --label-key objects.0.shape --templates "a photo of a {}." --out zs.json
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="MODEL", help="run, checkpoint or export directory")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="shard spec (or a Karpathy JSON for retrieval, a folder per class for zeroshot)")
    p.add_argument("--out", required=True, metavar="JSON", help="results file (written atomically)")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size,
                   help=f"images per encoder batch (default {EvalConfig.batch_size})")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank for decoding (default 2)")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (default 0: all)")
    p.add_argument("--image-key", default="jpg;jpeg;png;webp", help="image field(s) of a shard sample")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks to start with the DeepSpeed launcher (default 1: this process)")


def _add_commands(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    r = sub.add_parser("retrieval", help="zero-shot image-text retrieval", description=RETRIEVAL_HELP,
                       formatter_class=fmt)
    _common(r)
    r.add_argument("--images-dir", default=None, help="image root for a Karpathy JSON (default: the JSON's folder)")
    r.add_argument("--split", default="test", help="Karpathy split to evaluate (default test)")
    r.add_argument("--caption-key", default="txt", help="caption field of a shard sample (default txt)")
    r.add_argument("--rerank-k", type=int, default=None,
                   help="ITM re-rank the top-K ITC candidates; fusion models only (default: the run's "
                        f"eval.rerank_k, else {EvalConfig.rerank_k}; 0 turns re-ranking off)")
    r.add_argument("--report", default=None, metavar="PNG",
                   help="also write a PNG: recall bars and top-5 images for a few text queries")
    r.set_defaults(func=_guarded(run_retrieval_cli))
    z = sub.add_parser("zeroshot", help="zero-shot classification", description=ZEROSHOT_HELP, formatter_class=fmt)
    _common(z)
    z.add_argument("--classnames", default=None, metavar="FILE",
                   help="class names, one per line, in label order; or imagenet (open_clip's 1000 ImageNet-1k "
                        "names); default: classnames.txt next to the shards (CLIP_benchmark), or the class "
                        "folder names")
    z.add_argument("--templates", default=None, metavar="FILE_OR_TEMPLATE",
                   help="prompt templates file (one per line, '{}' or '{c}' marks the class name), or one "
                        "template; default: zeroshot_classification_templates.txt next to the data "
                        "(CLIP_benchmark), else imagenet (CLIP's 80 ImageNet templates, from open_clip)")
    z.add_argument("--label-key", default=None, help="json metadata field holding the label (dotted for nesting)")
    z.add_argument("--report", default=None, metavar="PNG",
                   help="also draw per-class accuracy and the confusion matrix, most-confused pairs named")
    z.set_defaults(func=_guarded(run_zeroshot_cli))


def register(subparsers) -> None:
    """Add `vlp eval` with its `retrieval` and `zeroshot` subcommands."""
    p = subparsers.add_parser("eval", help="zero-shot retrieval and classification",
                              description="Evaluate a run, checkpoint or export: `vlp eval retrieval --help`, "
                                          "`vlp eval zeroshot --help`.")
    _add_commands(p.add_subparsers(dest="eval_command", metavar="TASK", required=True))


def _relaunch(args, task: str) -> int:
    """Re-run this command on `--nproc` ranks under the DeepSpeed launcher."""
    skip = {"func", "nproc", "command", "eval_command"}
    argv: List[str] = [task]
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return run_forwarding_signals(launcher_command(args.nproc, ["--module", "vlp.eval"] + argv))


def _info(loaded) -> dict:
    from vlp.config import persisted_dict

    info = dict(loaded.info)
    cfg = info.pop("config", None)
    return {"model": {**info, "image_cfg": {k: v for k, v in loaded.image_cfg.items()}},
            "config": persisted_dict(cfg) if cfg is not None else None}  # no credentials in the JSON


def run_retrieval_cli(args) -> int:
    if args.nproc > 1:
        return _relaunch(args, "retrieval")
    from vlp.dist import join_launcher_group
    from vlp.eval.evaluate import evaluate_retrieval
    from vlp.load import load_model
    from vlp.eval.report import git_commit, write_json_atomic, write_report_png

    rank, world, device = join_launcher_group()
    loaded = load_model(args.checkpoint)
    model = loaded.model.to(device)
    rerank_k = args.rerank_k
    if rerank_k is None:
        cfg = loaded.info.get("config")
        rerank_k = (int(cfg.eval.rerank_k) if cfg is not None else EvalConfig.rerank_k) \
            if hasattr(model, "match_scores") else 0
    res = evaluate_retrieval(model, loaded.tokenizer, loaded.preprocess, args.data, images_dir=args.images_dir,
                             split=args.split, batch_size=args.batch_size, workers=args.workers, rerank_k=rerank_k,
                             max_samples=args.max_samples, image_key=args.image_key, caption_key=args.caption_key,
                             rank=rank, world_size=world, device=device)
    if rank == 0:
        out = {"task": "retrieval", **res, **_info(loaded), "git_commit": git_commit(), "world_size": world,
               "data": {"spec": args.data, "images_dir": args.images_dir,
                        "split": args.split if args.data.endswith(".json") else None}}
        write_json_atomic(args.out, out)
        if args.report:
            write_report_png(res, args.report, args.data, args.images_dir, args.split, args.image_key)
        _retrieval_summary(res, args)
    return 0


def _retrieval_summary(res, args) -> None:
    from vlp.console import summary

    def line(m):
        return (f"i2t R@1 {100 * m['i2t_r1']:.1f}  t2i R@1 {100 * m['t2i_r1']:.1f}  "
                f"mean recall {100 * m['mean_recall']:.1f}")

    rows = [("data", f"{res['n_images']} {res.get('unit', 'images')} / {res['n_texts']} texts ({res['n_skipped']} skipped): {args.data}"),
            ("ITC", line(res["metrics"]))]
    if "reranked" in res:
        itm = res["itm"]
        rows += [(f"ITM re-ranked (top {res['rerank_k']})", line(res["reranked"])),
                 ("ITM + ITC (BLIP)", line(res["reranked_itc"])),
                 ("held-out ITM", f"balanced accuracy {100 * itm['balanced_acc']:.1f} (positives "
                                  f"{100 * itm['pos_acc']:.1f}, hardest ITC negatives {100 * itm['neg_acc']:.1f})")]
    rows += [("results", args.out), ("report", args.report)]
    summary("vlp eval retrieval: done", rows)


def run_zeroshot_cli(args) -> int:
    from vlp.eval.zeroshot import evaluate_zeroshot, resolve_data

    zd = resolve_data(args.data, args.classnames, args.templates, args.label_key)  # input errors before loading
    if args.nproc > 1:
        return _relaunch(args, "zeroshot")
    from vlp.dist import join_launcher_group
    from vlp.load import load_model
    from vlp.eval.report import git_commit, write_json_atomic

    rank, world, device = join_launcher_group()
    if rank == 0:
        print(f"vlp eval zeroshot: {len(zd.classnames)} class names from {zd.classnames_source}; "
              f"{len(zd.templates)} templates from {zd.templates_source}", flush=True)
    loaded = load_model(args.checkpoint)
    res = evaluate_zeroshot(loaded.model.to(device), loaded.tokenizer, loaded.preprocess, zd.spec, zd.classnames,
                            zd.templates, label_key=args.label_key, batch_size=args.batch_size, workers=args.workers,
                            max_samples=args.max_samples, image_key=args.image_key, rank=rank, world_size=world,
                            device=device)
    if rank == 0:
        out = {"task": "zeroshot", **res, **_info(loaded), "git_commit": git_commit(), "world_size": world,
               "data": {"spec": args.data, **zd.describe()}}
        write_json_atomic(args.out, out)
        if args.report:
            from vlp.eval.report import write_zeroshot_png
            write_zeroshot_png(out, args.report, zd.spec)
        from vlp.console import summary

        m = res["metrics"]
        top5 = next(k for k in m if k.startswith("top") and k != "top1")
        worst = res["most_confused"][0] if res.get("most_confused") else None
        summary("vlp eval zeroshot: done", [
            ("data", f"{res['n_samples']} images, {res['n_classes']} classes ({res['n_skipped']} skipped): {args.data}"
                     + (" (class folders)" if zd.layout == "image_folder" else "")),
            ("class names", f"{len(zd.classnames)} from {zd.classnames_source}"),
            ("templates", f"{len(zd.templates)} from {zd.templates_source}"),
            ("accuracy", f"top-1 {100 * m['top1']:.1f}  {top5} {100 * m[top5]:.1f}  mean per class "
                         f"{100 * m['mean_per_class_accuracy']:.1f}"),
            ("most confused", f"{worst['true']} → {worst['predicted']} ({100 * worst['share']:.0f}% of "
                              f"{worst['true']})" if worst else None),
            ("results", args.out), ("report", args.report)])
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry for `python -m vlp.eval` (the launcher's per-rank command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for i, a in enumerate(argv) if not a.startswith("--local_rank")
            and not (i > 0 and argv[i - 1] == "--local_rank")]
    parser = argparse.ArgumentParser(prog="python -m vlp.eval", description=__doc__)
    _add_commands(parser.add_subparsers(dest="eval_command", metavar="TASK", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _guarded(func):
    """Input problems a user can fix (missing files, bad data or config) -> one-line message, exit 2."""
    def run(args) -> int:
        try:
            return int(func(args) or 0)
        except (FileNotFoundError, ValueError, NotImplementedError) as e:
            print(f"vlp eval: error: {e}", file=sys.stderr)
            return 2
    return run
