"""Reload a freshly written export through its public loader and compare it with the trained model.

The same random images and sample captions go through both: the exported tokenizer must give the
training tokenizer's ids (on real tokens) and the L2-normalised embeddings must agree to `tol`
(fp32 exports: 1e-4; bf16/fp16 exports are compared after upcasting, to 5e-2).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from vlp.export.tokenizer_files import SAMPLE_CAPTIONS, check_same_ids


class VerificationError(RuntimeError):
    """The export does not reproduce the trained model."""


def _inputs(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=g)


def _compare(what: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> float:
    diff = float((ours.float() - theirs.float()).abs().max())
    if not diff <= tol:  # also catches NaN
        raise VerificationError(f"{what}: exported embeddings differ from the trained model's by {diff:.3g} "
                                f"(tolerance {tol:g})")
    return diff


def _loader(fmt: str, path: str) -> Tuple[Callable, Callable, Callable]:
    """(encode_image(images), encode_text(texts) -> emb, tokenize(texts) -> (ids, mask)) of the export."""
    if fmt == "vlp":
        from vlp.pretrained import load_pretrained

        m = load_pretrained(path)
        tok = m.tokenizer
        return m.encode_image, (lambda texts: m.encode_text(*tok(texts))), tok
    if fmt == "open_clip":
        import open_clip

        name = "local-dir:" + os.path.abspath(path)
        m, _, _ = open_clip.create_model_and_transforms(name, device="cpu")
        m.eval()
        tok = open_clip.get_tokenizer(name)
        pad = int(getattr(getattr(tok, "tokenizer", None), "pad_token_id", None) or 0)

        def tokenize(texts):
            ids = tok(list(texts))
            return ids, (ids != pad).long()

        return (lambda x: m.encode_image(x, normalize=True),
                lambda texts: m.encode_text(tok(list(texts)), normalize=True), tokenize)
    if fmt == "hf":
        from transformers import AutoModel, AutoTokenizer

        m = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)

        def tokenize(texts):
            enc = tok(list(texts), padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]

        def feats(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        return (lambda x: F.normalize(feats(m.get_image_features(pixel_values=x)), dim=-1),
                lambda texts: F.normalize(feats(m.get_text_features(*tokenize(texts))), dim=-1), tokenize)
    raise ValueError(fmt)


def verify_export(fmt: str, path: str, model: torch.nn.Module, tokenizer: Any, image_cfg: Dict[str, Any],
                  dtype: str = "fp32") -> Dict[str, float]:
    """Max abs differences of image and text embeddings; raises VerificationError beyond tolerance."""
    tol = 1e-4 if dtype == "fp32" else 5e-2
    enc_image, enc_text, tokenize = _loader(fmt, path)
    images = _inputs(int(image_cfg["size"]))
    ours_ids = tokenizer(SAMPLE_CAPTIONS)
    theirs_ids = tokenize(SAMPLE_CAPTIONS)
    if ours_ids[0].shape[1] != theirs_ids[0].shape[1]:  # open_clip pads to the tower's length
        n = min(ours_ids[0].shape[1], theirs_ids[0].shape[1])
        longer = ours_ids if ours_ids[0].shape[1] > n else theirs_ids
        if bool(longer[1][:, n:].any()):
            raise VerificationError(f"{fmt}: tokenizer lengths differ and real tokens would be cut")
        ours_ids, theirs_ids = (ours_ids[0][:, :n], ours_ids[1][:, :n]), (theirs_ids[0][:, :n], theirs_ids[1][:, :n])
    try:
        check_same_ids(ours_ids, theirs_ids, f"{fmt} export")
    except RuntimeError as e:
        raise VerificationError(str(e)) from None
    out = {}
    with torch.no_grad():
        if hasattr(model, "encode_image"):
            out["image_max_abs_diff"] = _compare(f"{fmt} image", model.encode_image(images), enc_image(images), tol)
        if hasattr(model, "encode_text"):
            ids, mask = tokenizer(SAMPLE_CAPTIONS)
            out["text_max_abs_diff"] = _compare(f"{fmt} text", model.encode_text(ids, mask),
                                                enc_text(SAMPLE_CAPTIONS), tol)
    return out


__all__ = ["verify_export", "VerificationError"]
