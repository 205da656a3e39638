"""`--format hf` for SigLIP (`model.type: siglip`): transformers' `SiglipModel`, logit scale AND bias kept.

What maps exactly (anything else is refused with `Unsupported`, naming the option and what would be valid):

- vision: a timm VisionTransformer built the SigLIP way -- no class token (`class_token=False`), no register
  tokens, no LayerNorm before the blocks, plain pre-norm blocks, the final norm, then timm's attention-pool
  head (`global_pool='map'`: one latent query, q + kv projections, out projection, LayerNorm + MLP with the
  blocks' width and activation) -- reached through open_clip's timm adapter with no projection after it
  (`model.vision.kind: open_clip` with an open_clip SigLIP config: `timm_pool: map`, `timm_proj: none`, and
  `model.embed_dim` equal to the ViT width, so vlp adds no image head). SiglipVisionModel's pooled output is
  its attention-pool head with nothing after it, so a linear map after the pool (vlp's image head for a
  `model.vision.kind: timm` / `hf` tower, open_clip's `timm_proj: linear`) cannot be expressed: the head's
  LayerNorm sees the un-projected vector. The pool's q/kv projections become the head's
  `nn.MultiheadAttention` in-projection, the latent its `probe`.
- text: an open_clip TextTransformer that is bidirectional (`no_causal_mask: true`), pools the last position
  (`pool_type: last`), attends to padding (`use_pad_mask: false`) and has no class token -- open_clip's SigLIP
  text tower. Its projection (with or without bias), followed by vlp's linear text head if any, becomes
  SiglipTextModel's `head` (bias composed through the head).
- activations: exact GELU, GELU's tanh approximation (`gelu_pytorch_tanh`, timm's SigLIP ViTs) or QuickGELU,
  one per tower; one LayerNorm eps per tower.

Padding: SigLIP pools the last position, so the padding token's embedding is part of the computation. The
exported tokenizer pads to the training context length with a token embedded like training's padding: the
training pad id when the transformers tokenizer treats it as a special token, else (open_clip's CLIP BPE pads
with id 0, the regular token "!") a new `<|pad|>` token appended to the vocabulary whose embedding row is a
copy of the pad id's row. The tokenizer returns `input_ids` only (`model_input_names`), like transformers'
own SigLIP tokenizers: SiglipModel must be called WITHOUT an attention mask, padding="max_length".

ALIGN (`model.type: align`) -> transformers `AlignModel` is NOT mapped; ALIGN models export as CLIPModel /
VisionTextDualEncoderModel where their towers allow, else `--format open_clip`/`vlp`. What would map and what not:
- text: yes. AlignTextModel is a BERT whose [CLS] hidden state goes through `text_projection` (linear, with
  bias); vlp's `kind: hf` BERT tower with `pool: cls` (tanh pooler removed) + its linear text head is the same.
- logits: yes. AlignModel divides by `temperature`; temperature = exp(-logit_scale) is exact.
- image: no, for three reasons, each alone enough. (1) AlignModel uses the vision tower's pooled output as the
  image embedding with no projection, while vlp always adds a linear image head after a timm/hf tower; it cannot
  be folded into the last block's 1x1 `project_conv` because that block adds a residual. (2) timm's EfficientNets
  (`efficientnet_b7`, configs/align_base.yaml) end in `conv_head` + BatchNorm + SiLU (2560 channels for B7)
  before pooling; AlignVisionModel pools the last block's output with no head convolution, so there is no layer
  for it. (3) timm's `efficientnet_*` pad convolutions symmetrically (PyTorch style, BatchNorm eps 1e-5), while
  AlignVisionModel pads TF-"same" style (stem ZeroPad2d(0,1,0,1), per-block `correct_pad`, eps 1e-3), which
  only timm's `tf_efficientnet_*` variants reproduce. A `kind: hf` AlignVisionModel tower avoids (2)-(3) but
  not (1).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from vlp.export.sides import check_dual_encoder, open_clip_text_module
from vlp.export.tokenizer_files import hf_tokenizer
from vlp.export.transformer_ir import (HF_CLIP_KEYS, Unsupported, _act, _bias, _ln, _one_eps, block_state,
                                       text_from_open_clip, timm_blocks)
from vlp.export.weights import DTYPES

Tensor = torch.Tensor

VALID_VISION = ("model.vision.kind=open_clip with an open_clip SigLIP-style config (timm_model_name a timm ViT "
                "with class_token=False and global_pool='map', e.g. vit_base_patch16_siglip_224; timm_pool: map; "
                "timm_proj: none) and model.embed_dim equal to the ViT width")
VALID_TEXT = ("model.text.kind=open_clip, a TextTransformer with no_causal_mask: true, pool_type: last, "
              "use_pad_mask: false (open_clip's SigLIP text tower)")
PAD_TOKEN = "<|pad|>"


# --------------------------------------------------------------------------------------------- vision
def _map_vit(m: nn.Module, what: str) -> Tuple[Dict, Dict[str, Tensor]]:
    """(SiglipVisionConfig kwargs, state dict below `vision_model.`) of a timm ViT with a MAP head."""
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(m, TimmViT):
        raise Unsupported(f"{what} is {type(m).__name__}, not a timm VisionTransformer; valid: {VALID_VISION}")
    pool = getattr(m, "attn_pool", None)
    checks = [
        (m.cls_token is None, "has a class token (SiglipVisionModel has none: build the ViT with class_token=False)"),
        (getattr(m, "num_reg_tokens", 0) == 0, "has register tokens"),
        (m.global_pool == "map" and isinstance(pool, AttentionPoolLatent),
         f"pools by {m.global_pool!r}, not an attention-pool head (global_pool='map')"),
        (isinstance(m.fc_norm, nn.Identity), "has an fc_norm after pooling"),
        (isinstance(getattr(m, "head", nn.Identity()), nn.Identity), "keeps a classifier head"),
        (isinstance(m.patch_embed.norm, nn.Identity), "normalises patch embeddings"),
        (isinstance(m.patch_embed.proj, nn.Conv2d), "has a non-convolutional patch embedding"),
        (m.pos_embed is not None, "has no learned position embedding"),
        (isinstance(m.norm_pre, nn.Identity), "has a LayerNorm before the blocks (SiglipVisionModel has none)"),
        (not isinstance(m.norm, nn.Identity), "has no final norm"),
    ]
    for ok, why in checks:
        if not ok:
            raise Unsupported(f"{what} {why}; valid: {VALID_VISION}")
    img, patch = tuple(m.patch_embed.img_size), tuple(m.patch_embed.patch_size)
    if img[0] != img[1] or patch[0] != patch[1]:
        raise Unsupported(f"{what} has non-square images/patches {img}/{patch}")
    blocks, eps, act = timm_blocks(m, what, tanh=True)
    D, heads, mlp = m.embed_dim, m.blocks[0].attn.num_heads, blocks[0].fc1_w.shape[0]
    if any(b.fc1_w.shape[0] != mlp for b in blocks) or any(b.attn.num_heads != heads for b in m.blocks):
        raise Unsupported(f"{what} varies its MLP width or head count across blocks")
    p = f"{what} attention-pool head"
    pchecks = [
        (pool.pos_embed is None, "adds its own position embedding"),
        (pool.latent_len == 1 and pool.latent.shape[-1] == D, "has several latent queries or another latent width"),
        (isinstance(pool.q, nn.Linear), "has no query projection (q_proj=False)"),
        (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity), "normalises q/k"),
        (pool.mlp is not None and isinstance(pool.proj, nn.Linear), "has no output projection / MLP"),
        (pool.num_heads == heads, f"has {pool.num_heads} heads, the blocks {heads}"),
        (pool.pool == "token", f"pools its latents by {pool.pool!r}"),
        (pool.mlp is not None and isinstance(getattr(pool.mlp, "norm", nn.Identity()), nn.Identity)
         and hasattr(pool.mlp, "fc2"), "MLP is not a plain 2-layer MLP"),
    ]
    for ok, why in pchecks:
        if not ok:
            raise Unsupported(f"{p} {why}; SiglipMultiheadAttentionPoolingHead is one query, plain multi-head "
                              "attention, LayerNorm and an MLP like the blocks'")
    if pool.mlp.fc1.out_features != mlp:
        raise Unsupported(f"{p} MLP width {pool.mlp.fc1.out_features} differs from the blocks' {mlp}")
    if _act(pool.mlp.act, p, tanh=True) != act:
        raise Unsupported(f"{p} activation differs from the blocks'")
    nw, nb, ne = _ln(m.norm, f"{what} norm")
    hw, hb, he = _ln(pool.norm, f"{p} norm")
    eps = _one_eps(eps + [ne, he], what)
    grid = img[0] // patch[0]
    pos = m.pos_embed.detach()[0].clone()
    if pos.shape[0] != grid * grid:
        raise Unsupported(f"{what} has {pos.shape[0]} position embeddings for a {grid}x{grid} grid")
    conv = m.patch_embed.proj
    sd = {
        "embeddings.patch_embedding.weight": conv.weight.detach().clone(),
        "embeddings.patch_embedding.bias": _bias(conv) if conv.bias is not None else torch.zeros(D),
        "embeddings.position_embedding.weight": pos,
        "post_layernorm.weight": nw, "post_layernorm.bias": nb,
        "head.probe": pool.latent.detach().reshape(1, 1, D).clone(),
        "head.attention.in_proj_weight": torch.cat([pool.q.weight.detach(), pool.kv.weight.detach()]).clone(),
        "head.attention.in_proj_bias": torch.cat([_bias(pool.q), _bias(pool.kv)]),
        "head.attention.out_proj.weight": pool.proj.weight.detach().clone(),
        "head.attention.out_proj.bias": _bias(pool.proj),
        "head.layernorm.weight": hw, "head.layernorm.bias": hb,
        "head.mlp.fc1.weight": pool.mlp.fc1.weight.detach().clone(), "head.mlp.fc1.bias": _bias(pool.mlp.fc1),
        "head.mlp.fc2.weight": pool.mlp.fc2.weight.detach().clone(), "head.mlp.fc2.bias": _bias(pool.mlp.fc2),
    }
    for i, b in enumerate(blocks):
        sd.update(block_state(b, f"encoder.layers.{i}.", HF_CLIP_KEYS))
    cfg = dict(hidden_size=D, intermediate_size=mlp, num_hidden_layers=len(blocks), num_attention_heads=heads,
               num_channels=int(conv.in_channels), image_size=img[0], patch_size=patch[0], hidden_act=act,
               layer_norm_eps=eps, vision_use_head=True)
    return cfg, sd


def siglip_vision(model: nn.Module, vcfg: Any) -> Tuple[Dict, Dict[str, Tensor]]:
    v = model.vision
    if not isinstance(model.image_proj, nn.Identity):
        raise Unsupported(f"vlp adds a linear image head after this model.vision.kind={vcfg.kind} tower, and "
                          "SiglipVisionModel has no layer after its attention-pool head (the head's LayerNorm would "
                          f"see the projected vector); valid: {VALID_VISION}")
    if vcfg.kind == "open_clip" and type(v).__name__ == "TimmModel":
        extra = [n for n, mod in v.head.named_children() if not isinstance(mod, (nn.Dropout, nn.Identity))]
        if extra:
            raise Unsupported(f"open_clip's timm adapter has a head {extra} after the timm ViT (timm_proj / "
                              f"timm_pool other than map+none); valid: {VALID_VISION}")
        return _map_vit(v.trunk, f"open_clip timm adapter's {type(v.trunk).__name__}")
    raise Unsupported(f"model.vision ({vcfg.kind} {type(v).__name__}) is not a timm ViT with an attention-pool head "
                      f"behind open_clip's timm adapter; valid: {VALID_VISION}")


# ----------------------------------------------------------------------------------------------- text
def siglip_text(model: nn.Module, tcfg: Any) -> Tuple[Dict, Dict[str, Tensor]]:
    """(SiglipTextConfig kwargs, state dict below `text_model.`); pad/bos/eos ids and vocabulary are set by
    `siglip_model` from the exported tokenizer."""
    inner = open_clip_text_module(model) if tcfg.kind == "open_clip" else None
    if inner is None:
        raise Unsupported(f"model.text.kind={tcfg.kind} is not an open_clip TextTransformer; valid: {VALID_TEXT}")
    what = "open_clip TextTransformer"
    if getattr(inner, "cls_emb", None) is not None:
        raise Unsupported(f"{what} appends a class token (CoCa-style); valid: {VALID_TEXT}")
    if getattr(inner, "attn_mask", None) is not None:
        raise Unsupported(f"{what} is causal, SiglipTextModel bidirectional: set model.text.kwargs.no_causal_mask="
                          f"true when training; valid: {VALID_TEXT}")
    if inner.pool_type != "last":
        raise Unsupported(f"{what} pools {inner.pool_type!r}; SiglipTextModel pools the last position (pool_type: "
                          f"last); valid: {VALID_TEXT}")
    if getattr(inner, "use_pad_mask", False):
        raise Unsupported(f"{what} masks its pad id (use_pad_mask: true), SiglipTextModel attends to every position "
                          f"(it is called without an attention mask); valid: {VALID_TEXT}")
    ir = text_from_open_clip(inner, tanh=True)
    D = ir.enc.width
    w = ir.proj if ir.proj is not None else torch.eye(D)
    b = ir.proj_b if ir.proj_b is not None else torch.zeros(w.shape[0])
    head = model.text_proj
    if isinstance(head, nn.Linear):
        hb = head.bias.detach() if head.bias is not None else torch.zeros(head.out_features)
        w, b = head.weight.detach() @ w, head.weight.detach() @ b + hb
    elif not isinstance(head, nn.Identity):
        raise Unsupported(f"text head is {type(head).__name__}, not a linear map")
    sd = {
        "embeddings.token_embedding.weight": ir.tok_emb,
        "embeddings.position_embedding.weight": ir.pos,
        "final_layer_norm.weight": ir.final_ln[0], "final_layer_norm.bias": ir.final_ln[1],
        "head.weight": w.clone(), "head.bias": b.clone(),
    }
    for i, blk in enumerate(ir.enc.blocks):
        sd.update(block_state(blk, f"encoder.layers.{i}.", HF_CLIP_KEYS))
    cfg = dict(hidden_size=D, intermediate_size=ir.enc.mlp_dim, num_hidden_layers=len(ir.enc.blocks),
               num_attention_heads=ir.enc.heads, hidden_act=ir.enc.act, layer_norm_eps=ir.enc.eps,
               vocab_size=ir.vocab_size, max_position_embeddings=ir.context_length, projection_size=int(w.shape[0]))
    return cfg, sd


# ------------------------------------------------------------------------------------------ tokenizer
def siglip_tokenizer(tok_cfg: Any, pad_id: int):
    """The transformers tokenizer of the run, padding with a token embedded as training's pad id `pad_id`;
    returns (tokenizer, pad row to append or None): see the module docstring."""
    tok = hf_tokenizer(tok_cfg)
    extra = None
    if tok.pad_token_id != pad_id:
        special = {int(i) for i in tok.all_special_ids}
        if pad_id in special:
            tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        else:  # a regular token: padding with it would also turn its occurrences in text into padding
            if PAD_TOKEN in tok.get_vocab():
                raise Unsupported(f"the tokenizer already has a {PAD_TOKEN} token; cannot add a pad token")
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
            extra = pad_id
    tok.padding_side = "right"
    tok.model_input_names = ["input_ids"]
    tok.init_kwargs["model_input_names"] = ["input_ids"]
    return tok, extra


def _training_pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return int(pad) if pad is not None else 0


# ------------------------------------------------------------------------------------------------ model
def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def siglip_model(model: nn.Module, cfg: Any, tok: Any, extra_pad: Optional[int] = None) -> nn.Module:
    """transformers SiglipModel (fp32, eval) with `model`'s weights; `tok` the exported tokenizer."""
    from transformers import SiglipConfig, SiglipModel

    check_dual_encoder(model)
    if getattr(model, "logit_bias", None) is None:
        raise Unsupported("SiglipModel is for SigLIP models (model.type: siglip, with a logit bias)")
    reasons = []
    try:
        vcfg, vsd = siglip_vision(model, cfg.model.vision)
    except Unsupported as e:
        reasons.append(f"vision tower: {e}")
    try:
        tcfg, tsd = siglip_text(model, cfg.model.text)
    except Unsupported as e:
        reasons.append(f"text tower: {e}")
    if reasons:
        raise Unsupported("SiglipModel: " + "; ".join(reasons))
    if tcfg["projection_size"] != vcfg["hidden_size"]:
        raise Unsupported(f"text embeddings have {tcfg['projection_size']} dims, image embeddings "
                          f"{vcfg['hidden_size']}")
    emb = tsd["embeddings.token_embedding.weight"]
    if extra_pad is not None:  # the appended <|pad|> row embeds like training's pad id
        emb = torch.cat([emb, emb[extra_pad:extra_pad + 1]])
    if len(tok) > emb.shape[0]:
        raise Unsupported(f"the tokenizer has {len(tok)} tokens, the text tower's vocabulary {emb.shape[0]}")
    tsd["embeddings.token_embedding.weight"] = emb
    ctx = int(cfg.data.tokenizer.context_length)
    if ctx > tcfg["max_position_embeddings"]:
        raise Unsupported(f"data.tokenizer.context_length {ctx} exceeds the text tower's "
                          f"{tcfg['max_position_embeddings']}")
    ids = {k: getattr(tok, f"{k}_token_id", None) for k in ("pad", "bos", "eos")}
    tcfg.update(vocab_size=int(emb.shape[0]), **{f"{k}_token_id": v for k, v in ids.items() if v is not None})
    with _no_init():
        out = SiglipModel(SiglipConfig(text_config=tcfg, vision_config=vcfg))
    sd = {**{"vision_model." + k: x for k, x in vsd.items()}, **{"text_model." + k: x for k, x in tsd.items()}}
    sd["logit_scale"] = model.logit_scale.detach().reshape(1).clone()
    sd["logit_bias"] = model.logit_bias.detach().reshape(1).clone()
    own = out.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        raise RuntimeError(f"internal mapping error to SiglipModel: missing {missing[:6]}, unexpected "
                           f"{unexpected[:6]}, shapes {shapes[:6]}")
    out.load_state_dict(sd, strict=False)  # position_ids buffers are not persistent
    return out.eval()


def hf_siglip(model: nn.Module, cfg: Any, tokenizer: Any = None) -> Tuple[nn.Module, Any]:
    """(SiglipModel, its tokenizer) for a SigLIP model; `tokenizer` the training tokenizer (for its pad id)."""
    if tokenizer is None:
        from vlp.data.tokenizers import build_tokenizer

        tokenizer = build_tokenizer(cfg.data.tokenizer)
    tok, extra = siglip_tokenizer(cfg.data.tokenizer, _training_pad_id(tokenizer))
    tok.model_max_length = int(cfg.data.tokenizer.context_length)
    return siglip_model(model, cfg, tok, extra), tok


def write_siglip(model: nn.Module, cfg: Any, image_cfg: Dict[str, Any], out_dir: str, dtype: str,
                 max_shard_size: str) -> Dict[str, Any]:
    """config.json + model.safetensors + CLIPImageProcessor (the run's resize/crop/normalisation) + tokenizer."""
    from vlp.data.tokenizers import build_tokenizer
    from vlp.export.hf import image_processor

    training_tok = build_tokenizer(cfg.data.tokenizer)
    out, tok = hf_siglip(model, cfg, training_tok)
    if dtype != "fp32":
        out = out.to(DTYPES[dtype])
    out.save_pretrained(out_dir, max_shard_size=max_shard_size)
    image_processor(image_cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tcfg = json.load(f)
    tcfg["model_input_names"] = ["input_ids"]  # SigLIP is called without an attention mask
    with open(path, "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
    notes = ["transformers `SiglipModel` (SiglipVisionModel with its attention-pool head + SiglipTextModel pooled "
             "at the last position) holding the trained weights, logit scale and logit bias (the same computation).",
             f"Tokenize with `padding=\"max_length\"` (length {int(cfg.data.tokenizer.context_length)}) and call the "
             "model without an attention mask, like transformers' SigLIP checkpoints: the tokenizer returns "
             "`input_ids` only."]
    if tok.pad_token == PAD_TOKEN:
        notes.append(f"`{PAD_TOKEN}` (id {tok.pad_token_id}) was appended to the vocabulary as the padding token; "
                     f"its embedding is training's pad id {_training_pad_id(training_tok)}'s.")
    return {"architecture": "SiglipModel", "model_type": "siglip", "notes": notes}


__all__ = ["hf_siglip", "siglip_model", "siglip_vision", "siglip_text", "siglip_tokenizer", "write_siglip",
           "VALID_VISION", "VALID_TEXT"]
