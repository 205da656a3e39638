"""Reload a freshly written export through its public loader and compare it with the trained model.

The same random images and sample captions go through both: the exported tokenizer must give the
training tokenizer's ids (on real tokens) and the L2-normalised embeddings must agree to `tol`
(fp32 exports: 1e-4; bf16/fp16 exports are compared after upcasting, to 5e-2).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch

from vlp.export.tokenizer_files import SAMPLE_CAPTIONS, check_same_ids
from vlp.load import load_model


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


def _loader(path: str) -> Tuple[Callable, Callable, Callable]:
    """(encode_image(images), encode_text(texts) -> emb, tokenize(texts) -> (ids, mask)) of the export, read
    back by the loader `vlp eval` and `vlp.load_pretrained` use (`vlp.load.load_model`)."""
    loaded = load_model(path)
    m, tok = loaded.model, loaded.tokenizer
    return m.encode_image, (lambda texts: m.encode_text(*tok(texts))), tok


def verify_export(fmt: str, path: str, model: torch.nn.Module, tokenizer: Any, image_cfg: Dict[str, Any],
                  dtype: str = "fp32") -> Dict[str, float]:
    """Max abs differences of image and text embeddings; raises VerificationError beyond tolerance."""
    tol = 1e-4 if dtype == "fp32" else 5e-2
    enc_image, enc_text, tokenize = _loader(path)
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
