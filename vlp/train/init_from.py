"""`model.init_from`: start a freshly built model from another model's towers and projections.

ALBEF (Li et al. 2021, "Align before Fuse", §3.1 and §4) starts from pretrained encoders: the ViT from
DeiT, the text encoder from the first 6 layers of BERT-base and the fusion encoder from its last 6, whose
cross-attention is new. This does the same from any source `vlp.train.init_sources` reads (a vlp run,
checkpoint or export, an open_clip or a transformers export):
- vision and text towers by name and shape; a transformers or open_clip ViT becomes a timm ViT through
  `vlp.export.transformer_ir` when the tower kinds differ;
- the source BERT's layers beyond this model's text layers initialise the fusion layers (self-attention
  and feed-forward; cross-attention only where the source has it, i.e. an ALBEF);
- the linear projections into the joint space where shapes match (a source without bias: bias 0, so the
  projection computes the source's);
- then ALBEF's momentum copies restart from the loaded weights (its MLM decoder is the word embeddings).
Everything else stays as built. The trainer calls `init_from` on a fresh run and keeps its report as
`model.init_report`; a run that resumes, `vlp eval` and `vlp export` never apply it: their weights come
from the checkpoint.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig

from vlp.config import ConfigError
from vlp.export.transformer_ir import Unsupported, vit_to_timm
from vlp.train.init_sources import SourceWeights, read_source
from vlp.models.momentum import copy_to_momentum

log = logging.getLogger(__name__)
Tensor = torch.Tensor
_LAYER = re.compile(r"^model\.encoder\.layer\.(\d+)\.(.*)$")
_NESTED = re.compile(r"^model\.(vision_model|text_model)\.")  # transformers 4 nests CLIP towers one level deeper


def _canon(key: str) -> str:
    return _NESTED.sub("model.", key)


def _under(tensors: Dict[str, Tensor], prefix: str) -> Dict[str, Tuple[str, Tensor]]:
    """{key below `prefix` (canonical): (source name, tensor)}."""
    return {_canon(k[len(prefix):]): (k, v) for k, v in tensors.items() if k.startswith(prefix)}


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _groups(keys: List[str]) -> List[str]:
    """Short names for a set of tensor keys: the submodule after the last layer index
    (`layer.0.crossattention.self.query.weight` -> crossattention), else the module path."""
    out: List[str] = []
    for k in keys:
        parts = k.split(".")
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        g = parts[idx[-1] + 1] if idx and idx[-1] + 1 < len(parts) - 1 else ".".join(parts[:-1]) or parts[0]
        if g not in out:
            out.append(g)
    return out


# ----------------------------------------------------------------------------------- one part
class _Part:
    """One part of the target (a module) and the source tensors offered for its keys."""

    def __init__(self, name: str, module: Optional[nn.Module]):
        self.name, self.module = name, module
        self.offered: Dict[str, Tuple[str, Tensor]] = {}  # target key -> (source name, tensor)
        self.notes: List[str] = []
        self.loaded: List[str] = []
        self.random: List[str] = []
        self.mismatched: Dict[str, Tuple[str, str]] = {}  # target key -> (source shape, target shape)
        self.used: set = set()  # source names consumed

    @torch.no_grad()
    def load(self) -> None:
        own = self.module.state_dict()
        take = {}
        for k, t in own.items():
            src = self.offered.get(_canon(k))
            if src is None:
                self.random.append(k)
            elif src[1].shape != t.shape:
                self.mismatched[k] = (_shape(src[1]), _shape(t))
                self.random.append(k)
            else:
                take[k] = src[1]
                self.loaded.append(k)
                self.used.add(src[0])
        if take:
            self.module.load_state_dict(take, strict=False)

    def entry(self) -> Dict[str, Any]:
        total = len(self.loaded) + len(self.random)
        return {"loaded": len(self.loaded), "total": total, "random": list(self.random),
                "mismatched": dict(self.mismatched), "notes": list(self.notes)}

    def line(self) -> str:
        if self.module is None:
            return f"{self.name}: " + "; ".join(self.notes)
        total = len(self.loaded) + len(self.random)
        text = f"{self.name} {len(self.loaded)}/{total} tensors"
        if self.loaded and self.random:
            text += f" (random: {', '.join(_groups(self.random))})"
        elif not self.loaded:
            text += " (random)"
        if self.mismatched:
            k, (a, b) = next(iter(self.mismatched.items()))
            more = f" and {len(self.mismatched) - 1} more" if len(self.mismatched) > 1 else ""
            text += f", shape mismatch {k} ({a} vs {b}){more}"
        return text + "".join(f"; {n}" for n in self.notes)

    def random_groups(self) -> List[str]:
        if self.module is None or not self.random:
            return []
        if not self.loaded:
            return [self.name]
        return [f"{self.name}.{g}" for g in _groups(self.random)]


# --------------------------------------------------------------------------------------- vision
def _timm_differences(vit: nn.Module, ir) -> Tuple[bool, List[str]]:
    """Whether a ViT given as transformer_ir.ViT fits a timm ViT beyond tensor shapes (heads), and notes
    on what differs but loads (LayerNorm eps, activation, a pre-norm only one side has)."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not len(blocks):
        return False, [f"{type(vit).__name__} is not a timm ViT with blocks"]
    b = blocks[0]
    heads = getattr(getattr(b, "attn", None), "num_heads", None)
    if heads is not None and heads != ir.enc.heads:
        return False, [f"the source ViT has {ir.enc.heads} attention heads, this one {heads}"]
    notes = []
    eps = getattr(getattr(b, "norm1", None), "eps", None)
    if eps is not None and abs(eps - ir.enc.eps) > 1e-12:
        notes.append(f"LayerNorm eps {ir.enc.eps:g} in the source, {eps:g} here")
    act = type(getattr(getattr(b, "mlp", None), "act", None)).__name__
    if (ir.enc.act == "quick_gelu") != (act == "QuickGELU"):
        notes.append(f"activation {ir.enc.act} in the source, {act} here")
    if (ir.pre_ln is not None) != (not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity)):
        notes.append("only one of the two ViTs has a LayerNorm before the blocks")
    conv = getattr(getattr(vit, "patch_embed", None), "proj", None)
    if ir.patch_b is not None and bool(ir.patch_b.abs().max() > 0) and getattr(conv, "bias", None) is None:
        notes.append("the source's patch-embedding bias has no place in this ViT (dropped)")
    return True, notes


def _offer_vision(part: _Part, src: SourceWeights, kind: str) -> None:
    if src.vision_kind == kind:
        part.offered = _under(src.tensors, "vision.")
        return
    if kind == "timm" and src.vision_ir is not None:
        try:
            ir = src.vision_ir()
        except Unsupported as e:
            part.notes.append(f"the source's {src.vision_kind} vision tower does not convert to timm: {e}")
            return
        ok, notes = _timm_differences(part.module, ir)
        part.notes += notes
        if ok:
            part.offered = {k: (f"vision.{k} (from {src.vision_kind})", v) for k, v in vit_to_timm(ir).items()}
            part.used.update(k for k in src.tensors if k.startswith("vision."))
        return
    part.notes.append(f"the source's vision tower is {src.vision_kind or 'missing'}; model.vision.kind={kind} "
                      "takes timm ViTs from transformers/open_clip exports, else the same kind")


# ---------------------------------------------------------------------------------- projections
def _projection(part: _Part, src: SourceWeights, prefix: str, tower: _Part) -> None:
    head = part.module
    if not isinstance(head, nn.Linear):
        part.module = None
        part.notes.append("none in this model" + (" (the tower projects itself)" if head is not None else ""))
        return
    w, b = src.tensors.get(prefix + "weight"), src.tensors.get(prefix + "bias")
    if w is None:
        part.notes.append("none in the source")
    elif not tower.loaded:
        part.notes.append("its tower was not loaded")
    else:
        part.offered = {"weight": (prefix + "weight", w)}
        if b is not None and head.bias is not None:
            part.offered["bias"] = (prefix + "bias", b)
        elif b is not None:
            part.notes.append("the source's bias is dropped (this projection has none)")
            part.used.add(prefix + "bias")
        elif head.bias is not None and w.shape == head.weight.shape:
            part.offered["bias"] = ("(zeros)", torch.zeros_like(head.bias))
            part.notes.append("bias set to 0 (the source's projection has none)")


# -------------------------------------------------------------------------------------- entry
def _parts(model: nn.Module, cfg: DictConfig, src: SourceWeights) -> List[_Part]:
    vision = _Part("vision", model.vision)
    _offer_vision(vision, src, str(cfg.vision.kind))
    text = _Part("text", model.text)
    same_text = src.text_kind == str(cfg.text.kind)
    if same_text:
        text.offered = _under(src.tensors, "text.")
    else:
        text.notes.append(f"the source's text tower is {src.text_kind or 'missing'}, model.text.kind={cfg.text.kind}")
    parts = [vision, text]
    fusion_module = getattr(model, "fusion", None)
    if fusion_module is not None:  # ALBEF: the source BERT's later layers, then its image input map
        fusion = _Part("fusion", fusion_module)
        n_text = len(model.text.model.encoder.layer)
        if same_text:
            for key, (name, t) in text.offered.items():
                m = _LAYER.match(key)
                if m and int(m.group(1)) >= n_text:
                    fusion.offered[f"layer.{int(m.group(1)) - n_text}.{m.group(2)}"] = (name, t)
            fusion.offered.update(_under(src.tensors, "fusion."))
            if not any(k.startswith("layer.") for k in fusion.offered):
                fusion.notes.append(f"the source's text tower has no layers beyond this model's {n_text} text layers")
        else:
            fusion.notes.append("its layers would come from the source's text tower")
        parts.append(fusion)
    for p in parts:
        p.load()
    heads = (("vision_proj", vision, ("vision_proj", "image_proj")), ("text_proj", text, ("text_proj",)))
    for name, tower, attrs in heads:
        head = next((getattr(model, a) for a in attrs if getattr(model, a, None) is not None), None)
        part = _Part(name, head)
        _projection(part, src, name + ".", tower)
        if part.module is not None:
            part.load()
        parts.append(part)
    return parts


def _resync_momentum(model: nn.Module) -> List[str]:
    """Momentum copies (ALBEF) were made at build time: restart them from the loaded weights."""
    twins = getattr(model, "momentum_models", None)
    if twins is None or not len(twins):
        return []
    for name, twin in twins.items():
        copy_to_momentum(getattr(model, name), twin)
    return [f"momentum copies re-synced to the online weights: {', '.join(twins.keys())}"]


def init_from(model: nn.Module, cfg: DictConfig) -> Dict[str, Any]:
    """Load the towers and projections of `cfg.init_from` into `model`, just built from `cfg` (the model
    config); log one line per part and return the same as a dict: `parts` (loaded/total tensors, what
    stayed random, shape mismatches, notes), `random` (groups left as built), `unused`, `lines`."""
    path = str(cfg.init_from)
    src = read_source(path)
    parts = _parts(model, cfg, src)
    if not any(p.loaded for p in parts):
        why = "; ".join(f"{p.name}: {', '.join(p.notes)}" for p in parts if p.notes) or "no names and shapes match"
        raise ConfigError(f"model.init_from={path!r} ({src.layout}): nothing in it fits this {cfg.type} model ({why})")
    covered = {"momentum_models"} | {a for a in ("vision", "text", "fusion", "vision_proj", "image_proj", "text_proj")
                                     if getattr(model, a, None) is not None}
    others = sorted({n.split(".")[0] for n, _ in model.named_parameters()} - covered)
    lines = [p.line() for p in parts]
    if others:
        lines.append(f"as built (not taken from the source): {', '.join(others)}")
    lines += _resync_momentum(model)
    offered = {k for k in src.tensors if k.startswith(("vision.", "text.", "fusion.", "vision_proj.", "text_proj."))}
    unused = sorted(offered - set().union(*(p.used for p in parts)))
    if unused:
        more = ", ..." if len(unused) > 4 else ""
        lines.append(f"{len(unused)} source tensors unused ({', '.join(unused[:4])}{more})")
    for line in lines:
        log.info("init_from %s: %s", src.path, line)
    random = [g for p in parts for g in p.random_groups()] + others
    return {"path": src.path, "layout": src.layout, "parts": {p.name: p.entry() for p in parts if p.module is not None},
            "random": random, "unused": unused, "lines": lines}


__all__ = ["init_from"]
