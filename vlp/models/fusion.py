"""Token-level pieces for fusion models: image token sequences from the vision towers, a BERT text
encoder run layer by layer, and BERT layers with cross-attention to image tokens.

ALBEF (Li et al. 2021, "Align before Fuse", §3.1) splits one BERT: the first layers encode text alone,
the remaining layers gain cross-attention to the ViT's output tokens and fuse the two modalities.
Any vision tower whose last stage gives a token sequence or a feature map feeds it here (`as_token_tower`):
a ViT's tokens as they are ([CLS] first); a Swin's, ConvNeXt's, MaxViT's ... map flattened to H*W
tokens behind the tower's own pooled vector, which takes [CLS]'s place (ITC reads it, as it reads a
ViT's [CLS]).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from vlp.config import ConfigError
from vlp.models.towers.hf import HFVision


def image_tokens(vision: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B, N, D) output tokens of a vision tower, [CLS] first (see `as_token_tower`).

    Both kinds go through a module call (timm: the model itself, whose class `as_token_tower` gave a
    token forward; transformers: the inner model), so ZeRO-3's hooks gather the parameters the model
    owns directly (cls_token, pos_embed), which calling `forward_features` from outside would skip.
    """
    tokens = vision.tokens(images) if isinstance(vision, HFVision) else vision(images)
    if tokens.ndim != 3:
        raise RuntimeError(f"{type(vision).__name__} returned shape {tuple(tokens.shape)}, not (B, N, D) tokens: "
                           "build vision towers for fusion models with `as_token_tower`")
    return tokens


def token_tower_kwargs(kind: str, kwargs: dict) -> dict:
    """Tower kwargs for a fusion model: timm's own pooling (its pooled vector becomes [CLS]). `global_pool=''`
    (what fusion ViTs were built with before any tower could feed them) means the same and is dropped."""
    if kind != "timm" or kwargs.get("global_pool") in (None, ""):
        return {k: v for k, v in kwargs.items() if not (kind == "timm" and k == "global_pool")}
    raise ConfigError(f"model.vision.kwargs.global_pool={kwargs['global_pool']!r}: ALBEF reads the tower's "
                      "token sequence, [CLS] first (a ViT's class token, else the tower's default pooled "
                      "vector); leave global_pool unset")


def _join(pooled: torch.Tensor, feats: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, D) pooled vector and a (B, N, D) sequence or (B, D, H, W) / (B, H, W, D) map -> (B, 1 + N, D)."""
    if layout == "cls":
        return feats
    if layout == "NCHW":
        feats = feats.flatten(2).transpose(1, 2)
    elif layout == "NHWC":
        feats = feats.flatten(1, 2)
    return torch.cat([pooled.unsqueeze(1).to(feats.dtype), feats], dim=1)


def _timm_token_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The forward `as_token_tower` gives a timm model: the last stage's tokens, [CLS] first."""
    feats = self.forward_features(x)
    if self.vlp_token_layout == "cls":
        return feats
    return _join(self.forward_head(feats, pre_logits=True), feats, self.vlp_token_layout)


_TOKEN_CLASSES: dict = {}


def _token_class(cls: type) -> type:
    """A subclass of the timm model class `cls` whose forward returns tokens (one per class, importable
    by name here, so deepcopy and pickling keep it); parameter names stay those of `cls`."""
    if cls not in _TOKEN_CLASSES:
        name = f"Tokens{cls.__name__}"
        sub = type(name, (cls,), {"forward": _timm_token_forward, "__module__": __name__, "__qualname__": name})
        _TOKEN_CLASSES[cls] = globals()[name] = sub
    return _TOKEN_CLASSES[cls]


def _refuse(what: str, why: str) -> ConfigError:
    return ConfigError(f"model.vision: ALBEF's fusion encoder reads one token sequence of the vision tower; "
                       f"{what} {why}")


def _timm_layout(model: nn.Module, feats, pooled: torch.Tensor, what: str) -> str:
    """How a timm model's `forward_features` output becomes tokens: 'cls' (a sequence with its class token
    first, which the model pools), 'seq' (a sequence without one), 'NCHW' or 'NHWC' (a feature map)."""
    if not torch.is_tensor(feats):
        shapes = [tuple(f.shape) for f in feats] if isinstance(feats, (list, tuple)) else type(feats).__name__
        raise _refuse(what, f"gives {len(feats) if isinstance(feats, (list, tuple)) else 'no'} feature tensors "
                            f"{shapes} (e.g. CrossViT's two branches of different widths), not one")
    if pooled.dim() != 2:
        raise _refuse(what, f"pools to shape {tuple(pooled.shape)}, not a (B, D) vector")
    dim = pooled.shape[1]
    if feats.dim() == 3 and feats.shape[-1] == dim:
        has_cls = getattr(model, "cls_token", None) is not None or getattr(model, "num_prefix_tokens", 0) > 0
        return "cls" if has_cls and getattr(model, "global_pool", "") == "token" else "seq"
    if feats.dim() == 4:
        fmt = str(getattr(model, "output_fmt", "NCHW") or "NCHW")
        if fmt == "NHWC" and feats.shape[-1] == dim:
            return "NHWC"
        if fmt != "NHWC" and feats.shape[1] == dim:
            return "NCHW"
    raise _refuse(what, f"gives features of shape {tuple(feats.shape)} and a pooled vector of width {dim}: "
                        "neither a token sequence nor a feature map of that width")


def _probe(fn, size: int, like: nn.Module):
    param = next(like.parameters(), None)
    x = torch.zeros(1, 3, size, size, dtype=param.dtype if param is not None else torch.float32)
    was = like.training
    like.eval()
    try:
        with torch.no_grad():
            return fn(x)
    finally:
        like.train(was)


def as_token_tower(vision: nn.Module, kind: str, name: str, size: int, dim: int) -> nn.Module:
    """Make a vision tower give its last stage's tokens, [CLS] first, of width `dim`; refuse, naming the
    tower, when it cannot. A ViT-like timm model (class token, token pooling) gives its tokens as they are;
    any other timm model gives its last stage's map (B, C, H, W) / (B, H, W, C) or tokens flattened to
    (B, H*W, C) behind its pooled vector (`forward_head(pre_logits=True)`: e.g. Swin's and ConvNeXt's
    average pool and norm) as [CLS]. transformers towers do the same from their dry-forward probe
    (`vlp.models.towers.hf.HFVision.tokens`). One dry forward of a zero image at `size` checks it."""
    what = f"{kind} tower {name!r} ({type(vision).__name__})"
    if kind == "timm":
        if not (hasattr(vision, "forward_features") and hasattr(vision, "forward_head")):
            raise _refuse(what, "has no forward_features / forward_head")
        feats, pooled = _probe(lambda x: (lambda f: (f, vision.forward_head(f, pre_logits=True)))(
            vision.forward_features(x)), size, vision)
        vision.vlp_token_layout = _timm_layout(vision, feats, pooled, what)
        vision.__class__ = _token_class(type(vision))
        tokens = _probe(vision, size, vision)
    elif kind == "hf" and isinstance(vision, HFVision):
        tokens = _probe(vision.tokens, size, vision)
    else:
        raise _refuse(what, "gives none; use kind=timm or kind=hf")
    if tokens.dim() != 3 or tokens.shape[-1] != dim:
        raise _refuse(what, f"gives tokens of shape {tuple(tokens.shape)}, not (B, N, {dim})")
    return vision


def attention_mask(config, hidden: torch.Tensor, mask: torch.Tensor):
    """(B, L) 1/0 key mask -> the bidirectional mask `config`'s attention implementation expects
    (transformers builds it: boolean for SDPA, additive for eager, None when nothing is masked)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


def bert_text(bert: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) ids and mask -> (B, L, D) hidden states of a transformers BERT-like model's embeddings and
    encoder layers (its own forward, minus the pooler; it works on momentum copies too)."""
    hidden = bert.embeddings(input_ids=ids)
    ext = attention_mask(bert.config, hidden, mask)
    for layer in bert.encoder.layer:
        hidden = layer(hidden, ext)
    return hidden


class FusionEncoder(nn.Module):
    """BERT layers whose self-attention is followed by cross-attention to image tokens (bidirectional)."""

    def __init__(self, config, layers: int, image_dim: int, init_from: Optional[nn.ModuleList] = None,
                 cross_init_std: float = 0.0):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        cfg = copy.deepcopy(config)
        cfg.is_decoder, cfg.add_cross_attention = True, True  # transformers builds cross-attention only then
        self.layer = nn.ModuleList([BertLayer(cfg, layer_idx=i) for i in range(layers)])
        for layer in self.layer:
            layer.attention.self.is_causal = False  # a fusion layer attends both ways, not like a decoder
            layer.attention.self.is_decoder = False
        if init_from is not None:  # pretrained BERT layers: keep their weights, cross-attention starts fresh
            for mine, theirs in zip(self.layer, init_from):
                missing, unexpected = mine.load_state_dict(theirs.state_dict(), strict=False)
                if unexpected or any(not k.startswith("crossattention.") for k in missing):
                    raise RuntimeError(f"fusion layer init: missing {missing}, unexpected {unexpected}")
        if cross_init_std > 0:  # cross-attention projections ~ N(0, std^2), biases 0 (else torch's default)
            for layer in self.layer:
                for mod in layer.crossattention.modules():
                    if isinstance(mod, nn.Linear):
                        nn.init.normal_(mod.weight, std=cross_init_std)
                        nn.init.zeros_(mod.bias)
        self.config = cfg
        self.image_in = nn.Identity() if image_dim == cfg.hidden_size else nn.Linear(image_dim, cfg.hidden_size)

    def forward(self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text (B, L, D), its mask (B, L), image tokens (B, N, Dv) -> fused (B, L, D)."""
        image = self.image_in(image)
        ext = attention_mask(self.config, text, mask)
        for layer in self.layer:
            text = layer(text, ext, image, None)
        return text


__all__ = ["image_tokens", "token_tower_kwargs", "as_token_tower", "bert_text", "FusionEncoder", "attention_mask"]
