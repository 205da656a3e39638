"""Token-level pieces for fusion models: image token sequences from the vision towers, a BERT text
encoder run layer by layer, and BERT layers with cross-attention to image tokens.

ALBEF (Li et al. 2021, "Align before Fuse", §3.1) splits one BERT: the first layers encode text alone,
the remaining layers gain cross-attention to the ViT's output tokens and fuse the two modalities.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from vlp.config import ConfigError


def image_tokens(vision: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B, N, D) output tokens of a vision tower ([CLS] first), after the final norm.

    transformers towers (vlp's HFVision): the inner model's `last_hidden_state`; timm ViTs built with
    `global_pool=""` (see `token_tower_kwargs`) return their tokens from `forward` itself. Both go
    through a module call, so ZeRO-3's hooks gather the parameters the model owns directly (cls_token,
    pos_embed), which calling `forward_features` would skip.
    """
    inner = getattr(vision, "model", None)
    if inner is not None and hasattr(inner, "config"):  # vlp.models.towers.hf.HFVision
        return inner(pixel_values=images).last_hidden_state
    tokens = vision(images)
    if tokens.ndim != 3:
        raise RuntimeError(f"{type(vision).__name__} returned shape {tuple(tokens.shape)}, not (B, N, D) tokens: "
                           "build timm towers with global_pool='' for fusion models")
    return tokens


def token_tower_kwargs(kind: str, kwargs: dict) -> dict:
    """Tower kwargs that make a vision tower's forward return its token sequence (timm: no pooling)."""
    if kind != "timm":
        return dict(kwargs)
    if kwargs.get("global_pool", "") != "":
        raise ConfigError(f"model.vision.kwargs.global_pool={kwargs['global_pool']!r}: ALBEF reads the ViT's "
                          "token sequence; leave global_pool unset")
    return dict(kwargs, global_pool="")


def check_token_tower(vision: nn.Module, kind: str) -> None:
    """Fail at build time when the vision tower cannot give a token sequence with a leading [CLS]."""
    inner = getattr(vision, "model", None)
    if kind == "hf" and inner is not None and hasattr(inner, "config"):
        return
    if kind == "timm" and getattr(vision, "cls_token", None) is not None:
        return
    raise ConfigError(f"model.vision: ALBEF needs image tokens with a leading [CLS] token; kind={kind!r} "
                      f"({type(vision).__name__}) gives none. Use a timm ViT with a class token (e.g. "
                      "vit_base_patch16_224) or a transformers ViT (kind=hf)")


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


__all__ = ["image_tokens", "token_tower_kwargs", "check_token_tower", "bert_text", "FusionEncoder", "attention_mask"]
