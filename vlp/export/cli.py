"""`vlp export`: a training checkpoint to transformers, open_clip or vlp layout (+ Hugging Face Hub)."""
from __future__ import annotations

import argparse
import sys

EXIT_FAILED, EXIT_USER, EXIT_PUSH = 1, 2, 3

DESCRIPTION = """Export a training checkpoint as safetensors in one of three layouts, with a model card.

The checkpoint's weights are consolidated to one fp32 state dict whatever the ZeRO stage and world
size (DeepSpeed's zero_to_fp32), cast to --dtype, and written into a temporary directory beside --out,
which is reloaded through the layout's own loader and compared with the trained model (embeddings
must agree) before it is renamed into place. No pickle files are written.

formats:
  hf         transformers: CLIPModel when both towers are CLIP-shaped, else VisionTextDualEncoderModel;
             config.json, model.safetensors (sharded above export.max_shard_size), preprocessor_config.json
             (CLIPImageProcessor), tokenizer files. Load: AutoModel.from_pretrained(OUT).
  open_clip  open_clip_config.json + open_clip_model.safetensors (+ tokenizer files for HF tokenizers).
             Load: open_clip.create_model_and_transforms("local-dir:OUT") (or "hf-hub:ORG/NAME").
  vlp        any vlp model: model.safetensors, vlp_config.yaml, vlp_export.json, tokenizer/.
             Load: vlp.load_pretrained(OUT or "ORG/NAME").
A model that a layout cannot express (e.g. a convolutional timm vision tower in transformers' layout)
fails with the reason and the formats that do work for it.

Hub: --push-to-hub ORG/NAME creates the repo if needed and uploads the whole directory in one commit.
The token comes from HF_TOKEN or `hf auth login` (never a flag). If the upload fails the local export
stays complete. --dry-run lists what would be uploaded, with sizes, and uploads nothing.

exit codes: 0 done, 1 failure, 2 user error (bad option, existing --out, unsupported format),
3 the upload failed (the local export is intact).
"""

EPILOG = """examples:
  vlp export --checkpoint runs/demo --format hf --out runs/demo/export/hf
  vlp export --checkpoint runs/demo --step 200 --format open_clip --out exp/oc --dtype bf16 --overwrite
  vlp export --checkpoint runs/demo --format vlp --out exp/vlp --push-to-hub my-org/tiny-clip --private --dry-run
"""


def run(args: argparse.Namespace) -> int:
    from vlp.config import ConfigError
    from vlp.checkpoint import CheckpointNotFound
    from vlp.export.exporter import ExportError, export
    from vlp.export.hub import HubError
    from vlp.export.verify import VerificationError

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars of the verification reload: noise here

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if not args.dry_run else sys.stdout, flush=True)

    try:
        result = export(args.checkpoint, args.format, args.out, step=args.step, dtype=args.dtype,
                        overwrite=args.overwrite, verify=not args.no_verify, push_to_hub=args.push_to_hub,
                        private=args.private, revision=args.revision, commit_message=args.commit_message,
                        dry_run=args.dry_run, log=log, progress=True, image_only=args.image_only)
    except (ExportError, CheckpointNotFound, ConfigError) as e:
        print(f"vlp export: {e}", file=sys.stderr)
        return EXIT_USER
    except HubError as e:
        print(f"vlp export: {e}", file=sys.stderr)
        return EXIT_PUSH
    except VerificationError as e:
        print(f"vlp export: verification failed, nothing written to {args.out}: {e}", file=sys.stderr)
        return EXIT_FAILED
    _summary(result, args)
    return 0


def _summary(result, args) -> None:
    from vlp.console import summary
    from vlp.export.hub import files_to_upload, human_size

    files = files_to_upload(result.out)
    summary("vlp export: done", [
        ("checkpoint", f"step {result.step} of {args.checkpoint}"),
        ("layout", f"{result.format}, {result.dtype} weights"),
        ("verified", f"reloaded and matched the trained model (max abs diff {max(result.verified.values()):.2g})"
         if result.verified else "not verified (--no-verify)"),
        ("files", f"{len(files)} ({human_size(sum(s for _, s in files))}), model card README.md"
                  + (" with its figures in images/" if any(p.startswith("images/") for p, _ in files) else "")),
        ("out", result.out),
        ("Hub", getattr(result, "commit_url", None)),
    ])


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to hf / open_clip / vlp layout (+ Hub)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="training run directory (its checkpoints/latest), its checkpoints/ directory, or one "
                        "checkpoints/step_XXXXXXX directory")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="export checkpoint step_N of the run instead of the latest")
    p.add_argument("--format", choices=("hf", "open_clip", "vlp"), default=None,
                   help="output layout (default: the run's export.format)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="weight dtype (default: the run's export.dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                   help="upload the export to this Hugging Face Hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--revision", default=None, metavar="R", help="Hub branch to commit to (created if missing)")
    p.add_argument("--commit-message", default=None, metavar="M", help="Hub commit message")
    p.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded; "
                                                          "upload nothing")
    p.add_argument("--image-only", action="store_true",
                   help="video models to hf/open_clip: export the image (1-frame) path, leaving the trained "
                        "temporal parts out (export.image_only)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the export and comparing it with the trained model")
    p.set_defaults(func=run)


__all__ = ["register", "run"]
