"""One export: checkpoint -> consolidated fp32 weights -> a layout in a temp dir beside --out ->
verified by reloading -> renamed into place -> (optionally) pushed to the Hub."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from vlp.checkpoint import CHECKPOINTS, checkpoint_config, find_checkpoint
from vlp.config import ConfigError
from vlp.data.tokenizers import build_tokenizer
from vlp.data.transforms import resolve_image_cfg
from vlp.export.hf import hf_model, write_hf
from vlp.export.hub import describe, files_to_upload, human_size, preflight, push
from vlp.export.model_card import card_figures, model_card
from vlp.export.openclip import open_clip_layout, write_open_clip
from vlp.export.tokenizer_files import hf_tokenizer
from vlp.export.transformer_ir import Unsupported
from vlp.export.verify import verify_export
from vlp.export.vlp_format import write_vlp
from vlp.load import detect_format, load_trained_model

FORMATS = ("hf", "open_clip", "vlp")


class ExportError(RuntimeError):
    """A problem the user can fix (existing output, unsupported format for this model)."""


@dataclass
class ExportResult:
    out: str
    format: str
    step: int
    files: List[str] = field(default_factory=list)
    verified: Dict[str, float] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)
    commit_url: Optional[str] = None
    dtype: str = ""


def _check_out(out: str, overwrite: bool) -> None:
    """--out must be a new or empty directory, or (with --overwrite) a previous export: --overwrite
    replaces what an export wrote, never a directory of anything else."""
    if os.path.isfile(out):
        raise ExportError(f"--out {out} is a file; give a directory")
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    try:  # the layouts vlp.load reads, with our model card beside them
        layout = detect_format(out)
    except FileNotFoundError:
        layout = None
    if layout not in ("vlp-export", "open_clip", "hf") or not os.path.isfile(os.path.join(out, "README.md")):
        raise ExportError(f"--out {out} is not a previous export (a model card README.md beside a vlp, open_clip "
                          "or transformers layout): --overwrite replaces only an export's directory; give a new --out")


def _check_not_the_run(out: str, ckpt) -> None:
    for what, path in (("the run directory", ckpt.run_dir), ("the checkpoint", ckpt.path)):
        if path and (out == os.path.abspath(path) or os.path.abspath(path).startswith(out + os.sep)):
            raise ExportError(f"--out {out} is or contains {what} {path}: exporting there would replace the "
                              "checkpoints; give a directory of its own (e.g. RUN/export/FORMAT)")


def _write_format(fmt: str, model, cfg, image_cfg, tmp: str, out: str, dtype: str, provenance,
                  hub_repo: Optional[str]) -> Dict[str, Any]:
    max_shard = cfg.export.max_shard_size
    if fmt == "hf":
        return write_hf(model, cfg, image_cfg, tmp, dtype, max_shard)
    if fmt == "open_clip":
        return write_open_clip(model, cfg, image_cfg, tmp, out, dtype, hub_repo)

    return write_vlp(model, cfg, image_cfg, tmp, dtype, max_shard, provenance)


def supported_formats(model, cfg) -> List[str]:
    """The formats this model can be exported to (each layout tried in memory or a scratch directory)."""
    ok = []
    quiet = logging.getLogger("vlp.export.openclip")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the trial layouts' warnings are not about this export
    try:
        try:
            tok = hf_tokenizer(cfg.data.tokenizer)
            hf_model(model, cfg, tok.eos_token_id if cfg.data.tokenizer.kind == "open_clip" else None)
            ok.append("hf")
        except (Unsupported, RuntimeError, ValueError):
            pass
        with tempfile.TemporaryDirectory() as tmp:
            try:
                open_clip_layout(model, cfg, resolve_image_cfg(model.image_cfg, cfg.data), tmp, tmp)
                ok.append("open_clip")
            except (Unsupported, RuntimeError, ValueError):
                pass
    finally:
        quiet.setLevel(level)
    return ok + ["vlp"]


def _retarget_paths(tmp: str, out: str) -> None:
    """Configs that name files of the export by absolute path (open_clip's hf_model_name) move with it."""
    path = os.path.join(tmp, "open_clip_config.json")
    if os.path.isfile(path):
        text = open(path).read()
        if tmp in text:
            with open(path, "w") as f:
                f.write(text.replace(json.dumps(tmp)[1:-1], json.dumps(out)[1:-1]))


def _check_publishable(out: str) -> None:
    """Refuse to push an export whose files name a path of this machine (e.g. an open_clip config's
    `hf_model_name` pointing at a local transformers directory): on the Hub it would load nothing."""
    for d, _, files in os.walk(out):
        for name in files:
            if name.endswith((".json", ".yaml", ".yml", ".md", ".txt")):
                path = os.path.join(d, name)
                if out in open(path, encoding="utf-8", errors="replace").read():
                    raise ExportError(f"{os.path.relpath(path, out)} names the local path {out}: the export "
                                      "cannot load from the Hub; export a model whose towers come from the Hub "
                                      "or files inside the export, or publish without --push-to-hub")


def _usual_permissions(root: str) -> None:
    """mkdtemp and the safetensors writer create owner-only files; give them the umask's modes."""
    mask = os.umask(0)
    os.umask(mask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~mask)


def _move_into_place(tmp: str, out: str) -> None:
    old = None
    if os.path.isdir(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(checkpoint: str, fmt: Optional[str], out: str, *, step: Optional[int] = None, dtype: Optional[str] = None,
           overwrite: bool = False, verify: bool = True, push_to_hub: Optional[str] = None, private: bool = False,
           revision: Optional[str] = None, commit_message: Optional[str] = None, dry_run: bool = False,
           endpoint: Optional[str] = None, log: Callable[[str], None] = print,
           progress: bool = False, image_only: bool = False) -> ExportResult:
    """Export the checkpoint of `checkpoint` (run dir, checkpoints/ dir or step dir) to `out`. `progress`:
    a bar over the stages (weights, layout, model card, verification, move) with rate and ETA on stderr."""
    out = os.path.abspath(out)
    ckpt = find_checkpoint(checkpoint, step)
    _check_not_the_run(out, ckpt)
    _check_out(out, overwrite)
    if push_to_hub and not dry_run:
        preflight(push_to_hub)
    cfg = checkpoint_config(ckpt)
    if image_only:  # a video model's image path into hf / open_clip (vlp.export.sides.check_video_export)
        cfg.export.image_only = True
    fmt = fmt or cfg.export.format
    dtype = dtype or cfg.export.dtype
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}; valid: {', '.join(FORMATS)}")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--dtype {dtype!r}; valid: fp32, bf16, fp16")
    log(f"vlp export: {ckpt.path} (step {ckpt.step}, ZeRO stage {cfg.train.zero_stage}, "
        f"{ckpt.state.get('world_size', '?')} ranks) -> {fmt} ({dtype}) at {out}")
    from tqdm import tqdm

    bar = tqdm(total=5, unit="stage", desc="export: fp32 weights", disable=not progress, file=sys.stderr)

    def stage(name: str) -> None:
        bar.update(1)
        bar.set_description(f"export: {name}")

    model = load_trained_model(ckpt, cfg)
    stage(f"write {fmt}")
    image_cfg = resolve_image_cfg(model.image_cfg, cfg.data)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp.", dir=parent)
    # never an absolute local path in a published file: the run's name and the checkpoint below it
    where = os.path.join(os.path.basename(ckpt.run_dir), CHECKPOINTS) if ckpt.run_dir else ""
    provenance = {"checkpoint": os.path.join(where, os.path.basename(ckpt.path)), "step": ckpt.step,
                  "samples_seen": ckpt.state.get("samples_seen")}
    try:
        try:
            info = _write_format(fmt, model, cfg, image_cfg, tmp, out, dtype, provenance, push_to_hub)
        except Unsupported as e:
            ok = [f for f in supported_formats(model, cfg) if f != fmt]
            raise ExportError(f"cannot export this {cfg.model.type} model to --format {fmt}: {e}. "
                              f"Formats that work for it: {', '.join(ok)}") from None
        stage("model card")
        figures = card_figures(ckpt, tmp)  # images/ beside the card, referenced from it
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(model, cfg, fmt, ckpt, image_cfg, info, cfg.export.license,
                               push_to_hub or f"./{os.path.basename(out)}",  # no local path in the card
                               on_hub=bool(push_to_hub), figures=figures))
        stage("verify")
        verified = verify_export(fmt, tmp, model, tokenizer, image_cfg, dtype) if verify else {}
        stage("move into place")
        _retarget_paths(tmp, out)
        _usual_permissions(tmp)
        _move_into_place(tmp, out)
        bar.update(1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()

    files = [p for p, _ in files_to_upload(out)]
    result = ExportResult(out, fmt, ckpt.step, files, verified, info, dtype=dtype)
    total = sum(s for _, s in files_to_upload(out))
    log(f"vlp export: wrote {len(files)} files ({human_size(total)}) to {out}"
        + (f"; reloaded and matched the trained model (max abs diff {max(verified.values()):.2g})" if verified else ""))
    if push_to_hub:
        _check_publishable(out)
        if dry_run:
            log(describe(out, push_to_hub, revision, private))
        else:
            result.commit_url = push(out, push_to_hub, private=private, revision=revision,
                                     commit_message=commit_message, endpoint=endpoint)
            log(f"vlp export: pushed to {push_to_hub}: {result.commit_url}")
    elif dry_run:
        log(describe(out, None, revision, private))
    return result


__all__ = ["export", "ExportError", "ExportResult", "FORMATS", "supported_formats"]
