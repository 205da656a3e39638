"""Reload a freshly written export through its public loader and compare it with the trained model.

The same random images and sample captions go through both: the exported tokenizer must give the
training tokenizer's ids (on real tokens) and the L2-normalised embeddings must agree to `tol`
(fp32 exports: 1e-4; bf16/fp16 exports are compared after upcasting, to 5e-2).

A transformers SigLIP export (`SiglipModel`) is read back with plain transformers (`SiglipModel.from_pretrained`,
`AutoTokenizer`, padding="max_length", no attention mask: how SigLIP is called) and its logits, with the learned
scale and bias, are compared too (tolerance scaled by exp(logit_scale) + 1).
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


def _model_type(path: str) -> str:
    import json
    import os

    cfg = os.path.join(path, "config.json")
    return json.load(open(cfg)).get("model_type", "") if os.path.isfile(cfg) else ""


def verify_siglip(path: str, model: torch.nn.Module, tokenizer: Any, image_cfg: Dict[str, Any],
                  tol: float) -> Dict[str, float]:
    """A SiglipModel export against the trained SigLIP model: ids, embeddings and logits (scale and bias)."""
    from transformers import AutoTokenizer, SiglipModel

    hf = SiglipModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(SAMPLE_CAPTIONS, padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt")
    theirs = enc["input_ids"]
    ids, mask = tokenizer(SAMPLE_CAPTIONS)
    pad = getattr(tokenizer, "pad_id", None)
    mapped = theirs.clone()
    if pad is not None:  # an appended <|pad|> token embeds as training's pad id
        mapped[theirs == tok.pad_token_id] = int(pad)
    if mapped.shape != ids.shape or not torch.equal(mapped, ids):
        raise VerificationError(f"hf export: the exported tokenizer (padding='max_length') does not give the training "
                                f"ids and length SigLIP's last-token pooling needs on {SAMPLE_CAPTIONS!r}:\n ours   "
                                f"{ids[:, :12].tolist()}\n theirs {theirs[:, :12].tolist()}")
    images = _inputs(int(image_cfg["size"]))
    with torch.no_grad():
        out = hf(input_ids=theirs, pixel_values=images)
        img, txt = model.encode_image(images), model.encode_text(ids, mask)
        scale = model.logit_scale.float().exp()
        logits = img @ txt.t() * scale + model.logit_bias.float()
    return {"image_max_abs_diff": _compare("hf image", img, out.image_embeds, tol),
            "text_max_abs_diff": _compare("hf text", txt, out.text_embeds, tol),
            "logits_max_abs_diff": _compare("hf logits", logits, out.logits_per_image, tol * (float(scale) + 1))}


def verify_export(fmt: str, path: str, model: torch.nn.Module, tokenizer: Any, image_cfg: Dict[str, Any],
                  dtype: str = "fp32") -> Dict[str, float]:
    """Max abs differences of image and text embeddings; raises VerificationError beyond tolerance."""
    tol = 1e-4 if dtype == "fp32" else 5e-2
    if fmt == "hf" and _model_type(path) == "siglip":
        return verify_siglip(path, model, tokenizer, image_cfg, tol)
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
        if getattr(model, "video", False) and fmt == "vlp":  # the clip path too: (2, K, 3, H, W)
            k = int(image_cfg.get("frames") or model.image_cfg.get("frames", 2))
            clips = torch.stack([images.roll(i, dims=-1) for i in range(k)], dim=1)
            out["video_max_abs_diff"] = _compare(f"{fmt} video", model.encode_image(clips), enc_image(clips), tol)
        if hasattr(model, "encode_text"):
            ids, mask = tokenizer(SAMPLE_CAPTIONS)
            out["text_max_abs_diff"] = _compare(f"{fmt} text", model.encode_text(ids, mask),
                                                enc_text(SAMPLE_CAPTIONS), tol)
    return out


__all__ = ["verify_export", "verify_siglip", "VerificationError"]
