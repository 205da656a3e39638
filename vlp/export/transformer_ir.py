"""Library-neutral weights of a pre-norm ViT / text transformer, to move towers between layouts.

timm's ViT, open_clip's VisionTransformer/TextTransformer, transformers' CLIP towers and DINOv2
are the same computation (pre-norm blocks: LN -> MHA -> residual, LN -> MLP -> residual) with
different parameter names and a few structural options. Readers check every option the target
cannot express and raise `Unsupported` naming it; writers produce (config kwargs, state dict).
Export writes these layouts; `model.init_from` (vlp.train.init_from) reads them back into timm ViTs.
Exact rewrites used: LayerScale gammas are folded into the output projections (gamma*(Wx+b)),
a patch-embedding bias is folded into the patch position embeddings where the target's patch conv
has none, and linear heads after pooling compose into one matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

Tensor = torch.Tensor


class Unsupported(ValueError):
    """The tower uses something the target layout cannot express; the message says what."""


@dataclass
class Block:
    ln1: Tuple[Tensor, Tensor]
    qkv_w: Tensor  # (3D, D): q, k, v stacked
    qkv_b: Tensor  # (3D,)
    out_w: Tensor
    out_b: Tensor
    ln2: Tuple[Tensor, Tensor]
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor


@dataclass
class Encoder:
    width: int
    heads: int
    mlp_dim: int
    eps: float
    act: str  # "gelu" (exact) | "quick_gelu"
    blocks: List[Block] = field(default_factory=list)


@dataclass
class ViT:
    enc: Encoder
    image_size: int
    patch_size: int
    patch_w: Tensor
    patch_b: Optional[Tensor]
    cls: Tensor  # (D,)
    pos: Tensor  # (1 + N, D), class token first
    pre_ln: Optional[Tuple[Tensor, Tensor]]
    post_ln: Tuple[Tensor, Tensor]  # applied to the class token
    proj: Optional[Tensor] = None  # (out, D), no bias: the linear map into the joint space


@dataclass
class TextTransformer:
    enc: Encoder
    context_length: int
    vocab_size: int
    tok_emb: Tensor
    pos: Tensor
    final_ln: Tuple[Tensor, Tensor]
    causal: bool
    pool: str  # argmax | eos | first | last
    eos_id: int
    pad_id: int
    proj: Optional[Tensor] = None  # (out, D)
    proj_b: Optional[Tensor] = None


# ------------------------------------------------------------------------------------------- helpers
def _ln(m: nn.Module, what: str) -> Tuple[Tensor, Tensor, float]:
    if not isinstance(m, nn.LayerNorm) or m.weight is None:
        raise Unsupported(f"{what} is {type(m).__name__}, not an affine LayerNorm")
    bias = m.bias if m.bias is not None else torch.zeros_like(m.weight)
    return m.weight.detach().clone(), bias.detach().clone(), float(m.eps)


def _act(m: nn.Module, what: str, tanh: bool = False) -> str:
    """transformers' `hidden_act` name of an activation module; `tanh`: the target also takes GELU's tanh
    approximation ("gelu_pytorch_tanh": SigLIP; the other layouts here have no such option)."""
    name = type(m).__name__
    approx = getattr(m, "approximate", "none")
    if name == "GELU" and approx == "none":
        return "gelu"
    if name == "QuickGELU":
        return "quick_gelu"
    if tanh and ((name == "GELU" and approx == "tanh") or name == "GELUTanh"):
        return "gelu_pytorch_tanh"
    want = "exact GELU, GELU(tanh) or QuickGELU" if tanh else "exact GELU or QuickGELU"
    raise Unsupported(f"{what} activation {name}{'(' + approx + ')' if name == 'GELU' else ''} (want {want})")


def _gamma(ls: nn.Module, what: str) -> Optional[Tensor]:
    if isinstance(ls, nn.Identity):
        return None
    g = getattr(ls, "gamma", None)
    if g is None:
        raise Unsupported(f"{what} is {type(ls).__name__}, not LayerScale")
    return g.detach().clone()


def _scaled(w: Tensor, b: Optional[Tensor], gamma: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    w = w.detach().clone()
    b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.detach().clone()
    if gamma is not None:
        w, b = w * gamma[:, None], b * gamma
    return w, b


def _bias(lin: nn.Linear) -> Tensor:
    return lin.bias.detach().clone() if lin.bias is not None else torch.zeros(lin.out_features)


def _one_eps(eps: List[float], what: str) -> float:
    if max(eps) - min(eps) > 1e-12:
        raise Unsupported(f"{what} mixes LayerNorm eps values {sorted(set(eps))}")
    return eps[0]


def compose(first: Optional[Tensor], head: Optional[nn.Module], what: str) -> Optional[Tensor]:
    """The (out, in) matrix of `head(first(x))`; either may be absent (None / nn.Identity)."""
    if head is None or isinstance(head, nn.Identity):
        return first
    if not isinstance(head, nn.Linear):
        raise Unsupported(f"{what} head is {type(head).__name__}, not a linear map")
    if head.bias is not None:
        raise Unsupported(f"{what} head has a bias")
    w = head.weight.detach().clone()
    return w if first is None else w @ first


# ------------------------------------------------------------------------------------------- readers
def vit_from_timm(m: nn.Module) -> ViT:
    """timm VisionTransformer with a class token, token pooling and plain pre-norm blocks."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    what = f"timm {type(m).__name__}"
    if not isinstance(m, TimmViT):
        raise Unsupported(f"{what} is not a timm VisionTransformer")
    checks = [
        (m.cls_token is not None, "has no class token"),
        (getattr(m, "num_reg_tokens", 0) == 0, "has register tokens"),
        (not getattr(m, "no_embed_class", False), "keeps no position embedding for the class token"),
        (m.global_pool == "token", f"pools by {m.global_pool!r}, not the class token"),
        (isinstance(m.fc_norm, nn.Identity), "has an fc_norm after pooling"),
        (getattr(m, "attn_pool", None) is None, "pools by attention"),
        (isinstance(getattr(m, "head", nn.Identity()), nn.Identity), "keeps a classifier head"),
        (isinstance(m.patch_embed.norm, nn.Identity), "normalises patch embeddings"),
        (m.pos_embed is not None, "has no learned position embedding"),
        (not isinstance(m.norm, nn.Identity), "has no final norm"),
    ]
    for ok, why in checks:
        if not ok:
            raise Unsupported(f"{what} {why}")
    img, patch = tuple(m.patch_embed.img_size), tuple(m.patch_embed.patch_size)
    if img[0] != img[1] or patch[0] != patch[1]:
        raise Unsupported(f"{what} has non-square images/patches {img}/{patch}")
    blocks, eps, act = timm_blocks(m, what)
    pre = None
    if not isinstance(m.norm_pre, nn.Identity):
        pw, pb, pe = _ln(m.norm_pre, f"{what} norm_pre")
        pre, eps = (pw, pb), eps + [pe]
    nw, nb, ne = _ln(m.norm, f"{what} norm")
    eps.append(ne)
    width = m.embed_dim
    enc = Encoder(width, m.blocks[0].attn.num_heads, blocks[0].fc1_w.shape[0], _one_eps(eps, what), act, blocks)
    conv = m.patch_embed.proj
    return ViT(enc, img[0], patch[0], conv.weight.detach().clone(),
               conv.bias.detach().clone() if conv.bias is not None else None,
               m.cls_token.detach().reshape(-1).clone(), m.pos_embed.detach()[0].clone(), pre, (nw, nb))


def timm_blocks(m: nn.Module, what: str, tanh: bool = False) -> Tuple[List[Block], List[float], str]:
    """The plain pre-norm blocks of a timm VisionTransformer (LayerScale folded in), their LayerNorm eps
    values and their activation (see `_act` for `tanh`)."""
    eps: List[float] = []
    blocks, act = [], None
    for i, b in enumerate(m.blocks):
        w = f"{what} block {i}"
        # a video tower's SpaceTimeBlock is the image Block on the image path (its temporal parts, which
        # vlp.export.sides.check_video_export vetted, are left out)
        if type(b).__name__ not in ("Block", "SpaceTimeBlock"):
            raise Unsupported(f"{w} is {type(b).__name__}, not a plain pre-norm Block")
        a = b.attn
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(a, name, nn.Identity()), nn.Identity):
                raise Unsupported(f"{w} attention has {name}")
        if not hasattr(a, "qkv") or getattr(a, "qkv", None) is None:
            raise Unsupported(f"{w} attention has no fused qkv projection")
        if not isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity) or not hasattr(b.mlp, "fc2"):
            raise Unsupported(f"{w} MLP is {type(b.mlp).__name__} (want a 2-layer MLP without inner norm)")
        a_act = _act(b.mlp.act, w, tanh)
        if act not in (None, a_act):
            raise Unsupported(f"{what} mixes activations")
        act = a_act
        ln1w, ln1b, e1 = _ln(b.norm1, f"{w} norm1")
        ln2w, ln2b, e2 = _ln(b.norm2, f"{w} norm2")
        eps += [e1, e2]
        out_w, out_b = _scaled(a.proj.weight, a.proj.bias, _gamma(b.ls1, f"{w} ls1"))
        fc2_w, fc2_b = _scaled(b.mlp.fc2.weight, b.mlp.fc2.bias, _gamma(b.ls2, f"{w} ls2"))
        blocks.append(Block((ln1w, ln1b), a.qkv.weight.detach().clone(), _bias(a.qkv), out_w, out_b,
                            (ln2w, ln2b), b.mlp.fc1.weight.detach().clone(), _bias(b.mlp.fc1), fc2_w, fc2_b))
    return blocks, eps, act or "gelu"


def _oc_blocks(transformer: nn.Module, what: str, tanh: bool = False) -> Tuple[List[Block], List[float], str]:
    from open_clip.transformer import ResidualAttentionBlock

    blocks, eps, act = [], [], None
    for i, b in enumerate(transformer.resblocks):
        w = f"{what} block {i}"
        if type(b) is not ResidualAttentionBlock or not isinstance(b.attn, nn.MultiheadAttention):
            raise Unsupported(f"{w} is {type(b).__name__} (custom attention features are not mapped)")
        if hasattr(b, "ln_1_kv"):
            raise Unsupported(f"{w} is a cross-attention block")
        a_act = _act(b.mlp.gelu, w, tanh)
        if act not in (None, a_act):
            raise Unsupported(f"{what} mixes activations")
        act = a_act
        ln1w, ln1b, e1 = _ln(b.ln_1, f"{w} ln_1")
        ln2w, ln2b, e2 = _ln(b.ln_2, f"{w} ln_2")
        eps += [e1, e2]
        a = b.attn
        qkv_b = a.in_proj_bias.detach().clone() if a.in_proj_bias is not None else torch.zeros(3 * a.embed_dim)
        out_w, out_b = _scaled(a.out_proj.weight, a.out_proj.bias, _gamma(b.ls_1, f"{w} ls_1"))
        fc2_w, fc2_b = _scaled(b.mlp.c_proj.weight, b.mlp.c_proj.bias, _gamma(b.ls_2, f"{w} ls_2"))
        blocks.append(Block((ln1w, ln1b), a.in_proj_weight.detach().clone(), qkv_b, out_w, out_b, (ln2w, ln2b),
                            b.mlp.c_fc.weight.detach().clone(), _bias(b.mlp.c_fc), fc2_w, fc2_b))
    return blocks, eps, act or "gelu"


def vit_from_open_clip(v: nn.Module) -> ViT:
    """open_clip VisionTransformer with class-token pooling and default blocks."""
    from open_clip.transformer import VisionTransformer as OcViT

    what = "open_clip VisionTransformer"
    if not isinstance(v, OcViT):
        raise Unsupported(f"open_clip vision tower {type(v).__name__} is not a VisionTransformer")
    if v.attn_pool is not None:
        raise Unsupported(f"{what} pools by attention")
    if v.pool_type != "tok":
        raise Unsupported(f"{what} pools by {v.pool_type!r}, not the class token")
    img, patch = tuple(v.image_size), tuple(v.patch_size)
    if img[0] != img[1] or patch[0] != patch[1]:
        raise Unsupported(f"{what} has non-square images/patches {img}/{patch}")
    blocks, eps, act = _oc_blocks(v.transformer, what)
    pre = None
    if not isinstance(v.ln_pre, nn.Identity):
        pw, pb, pe = _ln(v.ln_pre, f"{what} ln_pre")
        pre, eps = (pw, pb), eps + [pe]
    nw, nb, ne = _ln(v.ln_post, f"{what} ln_post")
    eps.append(ne)
    enc = Encoder(v.transformer.width, v.transformer.resblocks[0].attn.num_heads, blocks[0].fc1_w.shape[0],
                  _one_eps(eps, what), act, blocks)
    proj = v.proj.detach().t().clone() if v.proj is not None else None
    return ViT(enc, img[0], patch[0], v.conv1.weight.detach().clone(), None, v.class_embedding.detach().clone(),
               v.positional_embedding.detach().clone(), pre, (nw, nb), proj)


def text_from_open_clip(t: nn.Module, tanh: bool = False) -> TextTransformer:
    """open_clip TextTransformer with default blocks and no appended class token (`tanh`: see `_act`)."""
    from open_clip.transformer import TextTransformer as OcText

    what = "open_clip TextTransformer"
    if not isinstance(t, OcText):
        raise Unsupported(f"open_clip text tower {type(t).__name__} is not a TextTransformer")
    if t.cls_emb is not None:
        raise Unsupported(f"{what} appends a class token (CoCa-style)")
    blocks, eps, act = _oc_blocks(t.transformer, what, tanh)
    fw, fb, fe = _ln(t.ln_final, f"{what} ln_final")
    enc = Encoder(t.width, t.heads, blocks[0].fc1_w.shape[0], _one_eps(eps + [fe], what), act, blocks)
    proj = proj_b = None
    if isinstance(t.text_projection, nn.Linear):
        proj, proj_b = t.text_projection.weight.detach().clone(), _bias(t.text_projection)
    elif t.text_projection is not None:
        proj = t.text_projection.detach().t().clone()
    if getattr(t, "use_pad_mask", False):
        raise Unsupported(f"{what} masks padding in bidirectional mode (use_pad_mask)")
    return TextTransformer(enc, t.context_length, t.vocab_size, t.token_embedding.weight.detach().clone(),
                           t.positional_embedding.detach().clone(), (fw, fb), causal=t.attn_mask is not None,
                           pool=t.pool_type, eos_id=int(t.eos_id), pad_id=int(t.pad_id), proj=proj, proj_b=proj_b)


# ------------------------------------------------------------------------------- per-block key maps
# One table per layout, used by its reader and its writer: part -> key below the block's prefix.
# Split attention: q, k, v, o (".weight"/".bias" appended); fused: qkv_w/qkv_b (whole keys), o.
# ls1/ls2: LayerScale vectors (read: folded into o/fc2; written: ones).
HF_CLIP_KEYS = dict(ln1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                    o="self_attn.out_proj", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")
DINOV2_KEYS = dict(ln1="norm1", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                   o="attention.o_proj", ln2="norm2", fc1="mlp.fc1", fc2="mlp.fc2",
                   ls1="layer_scale1.lambda1", ls2="layer_scale2.lambda1")
HF_VIT_KEYS = dict(DINOV2_KEYS, ln1="layernorm_before", ln2="layernorm_after", ls1="", ls2="")
OPEN_CLIP_KEYS = dict(ln1="ln_1", qkv_w="attn.in_proj_weight", qkv_b="attn.in_proj_bias", o="attn.out_proj",
                      ln2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")
TIMM_KEYS = dict(ln1="norm1", qkv_w="attn.qkv.weight", qkv_b="attn.qkv.bias", o="attn.proj", ln2="norm2",
                 fc1="mlp.fc1", fc2="mlp.fc2")


def block_state(b: Block, p: str, keys: Dict[str, str]) -> Dict[str, Tensor]:
    """The state dict entries of block `b` under prefix `p` in the layout of `keys`."""
    sd = {p + keys["ln1"] + ".weight": b.ln1[0], p + keys["ln1"] + ".bias": b.ln1[1],
          p + keys["o"] + ".weight": b.out_w, p + keys["o"] + ".bias": b.out_b,
          p + keys["ln2"] + ".weight": b.ln2[0], p + keys["ln2"] + ".bias": b.ln2[1],
          p + keys["fc1"] + ".weight": b.fc1_w, p + keys["fc1"] + ".bias": b.fc1_b,
          p + keys["fc2"] + ".weight": b.fc2_w, p + keys["fc2"] + ".bias": b.fc2_b}
    if "qkv_w" in keys:
        sd.update({p + keys["qkv_w"]: b.qkv_w, p + keys["qkv_b"]: b.qkv_b})
    else:
        for part, w, bias in zip("qkv", b.qkv_w.chunk(3, dim=0), b.qkv_b.chunk(3, dim=0)):
            sd.update({p + keys[part] + ".weight": w, p + keys[part] + ".bias": bias})
    for ls in ("ls1", "ls2"):
        if keys.get(ls):
            sd[p + keys[ls]] = torch.ones(b.out_w.shape[0], dtype=b.out_w.dtype)
    return sd


def _hf_block(sd: Dict[str, Tensor], p: str, names: Dict[str, str], gammas=("", "")) -> Block:
    """One pre-norm block of a transformers ViT from its state dict; `names` gives each part's key."""
    g = lambda k: sd[p + names[k]] if names.get(k) else None  # noqa: E731
    w = lambda k: sd[p + names[k] + ".weight"].clone()  # noqa: E731
    b = lambda k: (sd[p + names[k] + ".bias"].clone() if p + names[k] + ".bias" in sd  # noqa: E731
                   else torch.zeros(sd[p + names[k] + ".weight"].shape[0]))
    qkv_w = torch.cat([w("q"), w("k"), w("v")])
    qkv_b = torch.cat([b("q"), b("k"), b("v")])
    out_w, out_b = _scaled(w("o"), b("o"), g("ls1"))
    fc2_w, fc2_b = _scaled(w("fc2"), b("fc2"), g("ls2"))
    return Block((w("ln1"), b("ln1")), qkv_w, qkv_b, out_w, out_b, (w("ln2"), b("ln2")), w("fc1"), b("fc1"),
                 fc2_w, fc2_b)


def vit_from_hf(m: nn.Module) -> ViT:
    """transformers Dinov2Model, ViTModel or CLIP vision model (the towers `--format hf` writes, and the
    usual vision towers of a VisionTextDualEncoderModel). LayerScale is folded into the output maps."""
    from transformers import CLIPVisionConfig, Dinov2Config, ViTConfig

    cfg = m.config
    what = f"transformers {type(m).__name__}"
    sd = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v.detach()
          for k, v in m.state_dict().items()}
    if cfg.hidden_act not in ("gelu", "quick_gelu"):
        raise Unsupported(f"{what} activation {cfg.hidden_act!r} (want exact GELU or QuickGELU)")
    if isinstance(cfg, (Dinov2Config, ViTConfig)):  # the same embeddings and final norm, other block names
        if isinstance(cfg, Dinov2Config) and cfg.use_swiglu_ffn:
            raise Unsupported(f"{what} uses a SwiGLU MLP")
        names, stem = (DINOV2_KEYS, "encoder.layer.") if isinstance(cfg, Dinov2Config) else (HF_VIT_KEYS, "layers.")
        cls, pos = sd["embeddings.cls_token"].reshape(-1), sd["embeddings.position_embeddings"][0]
        patch_w = sd["embeddings.patch_embeddings.projection.weight"]
        patch_b = sd.get("embeddings.patch_embeddings.projection.bias")
        pre, post = None, (sd["layernorm.weight"], sd["layernorm.bias"])
    elif isinstance(cfg, CLIPVisionConfig):
        names, stem = HF_CLIP_KEYS, "encoder.layers."
        cls, pos = sd["embeddings.class_embedding"], sd["embeddings.position_embedding.weight"]
        patch_w, patch_b = sd["embeddings.patch_embedding.weight"], None
        pre = (sd["pre_layrnorm.weight"], sd["pre_layrnorm.bias"])
        post = (sd["post_layernorm.weight"], sd["post_layernorm.bias"])
    else:
        raise Unsupported(f"{what} is not a ViT this reader knows (Dinov2Model, ViTModel, CLIPVisionModel)")
    blocks = [_hf_block(sd, f"{stem}{i}.", names) for i in range(int(cfg.num_hidden_layers))]
    enc = Encoder(int(cfg.hidden_size), int(cfg.num_attention_heads), blocks[0].fc1_w.shape[0],
                  float(cfg.layer_norm_eps), cfg.hidden_act, blocks)
    size, patch = cfg.image_size, cfg.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return ViT(enc, int(size), int(patch), patch_w.clone(), None if patch_b is None else patch_b.clone(),
               cls.clone(), pos.clone(), None if pre is None else (pre[0].clone(), pre[1].clone()),
               (post[0].clone(), post[1].clone()))


# ------------------------------------------------------------------------------------------- writers
def _hf_clip_layers(enc: Encoder, prefix: str) -> Dict[str, Tensor]:
    sd: Dict[str, Tensor] = {}
    for i, b in enumerate(enc.blocks):
        sd.update(block_state(b, f"{prefix}encoder.layers.{i}.", HF_CLIP_KEYS))
    return sd


def _enc_kwargs(enc: Encoder) -> Dict:
    return dict(hidden_size=enc.width, num_hidden_layers=len(enc.blocks), num_attention_heads=enc.heads,
                hidden_act=enc.act, layer_norm_eps=enc.eps)


def _pos_with_patch_bias(v: ViT) -> Tensor:
    pos = v.pos.clone()
    if v.patch_b is not None:
        pos[1:] += v.patch_b
    return pos


def vit_to_hf_clip(v: ViT, prefix: str = "") -> Tuple[Dict, Dict[str, Tensor]]:
    """transformers CLIPVisionTransformer (needs the pre-transformer LayerNorm CLIP always has)."""
    if v.pre_ln is None:
        raise Unsupported("CLIPVisionModel always applies a LayerNorm before the blocks; this ViT has none")
    cfg = dict(_enc_kwargs(v.enc), intermediate_size=v.enc.mlp_dim, image_size=v.image_size,
               patch_size=v.patch_size, num_channels=3)
    sd = {
        prefix + "embeddings.class_embedding": v.cls,
        prefix + "embeddings.patch_embedding.weight": v.patch_w,
        prefix + "embeddings.position_embedding.weight": _pos_with_patch_bias(v),
        prefix + "pre_layrnorm.weight": v.pre_ln[0], prefix + "pre_layrnorm.bias": v.pre_ln[1],
        prefix + "post_layernorm.weight": v.post_ln[0], prefix + "post_layernorm.bias": v.post_ln[1],
    }
    sd.update(_hf_clip_layers(v.enc, prefix))
    return cfg, sd


def vit_to_dinov2(v: ViT, prefix: str = "") -> Tuple[Dict, Dict[str, Tensor]]:
    """transformers Dinov2Model: a plain ViT (no pre-norm) whose pooled output is the normed class token."""
    if v.pre_ln is not None:
        raise Unsupported("Dinov2Model has no LayerNorm before the blocks; this ViT has one")
    if v.enc.mlp_dim % v.enc.width:
        raise Unsupported(f"Dinov2Model's MLP width is an integer multiple of the width; this ViT's is "
                          f"{v.enc.mlp_dim}/{v.enc.width}")
    cfg = dict(_enc_kwargs(v.enc), mlp_ratio=v.enc.mlp_dim // v.enc.width, image_size=v.image_size,
               patch_size=v.patch_size, num_channels=3, qkv_bias=True, layerscale_value=1.0,
               use_swiglu_ffn=False, drop_path_rate=0.0)
    D = v.enc.width
    sd = {
        prefix + "embeddings.cls_token": v.cls.reshape(1, 1, D),
        prefix + "embeddings.mask_token": torch.zeros(1, D),
        prefix + "embeddings.position_embeddings": v.pos.reshape(1, -1, D),
        prefix + "embeddings.patch_embeddings.projection.weight": v.patch_w,
        prefix + "embeddings.patch_embeddings.projection.bias": v.patch_b if v.patch_b is not None else torch.zeros(D),
        prefix + "layernorm.weight": v.post_ln[0], prefix + "layernorm.bias": v.post_ln[1],
    }
    for i, b in enumerate(v.enc.blocks):
        sd.update(block_state(b, f"{prefix}encoder.layer.{i}.", DINOV2_KEYS))
    return cfg, sd


def text_to_hf_clip(t: TextTransformer, eot_id: int, prefix: str = "") -> Tuple[Dict, Dict[str, Tensor]]:
    """transformers CLIPTextTransformer: causal, pooled at the first end-of-text token.

    `eot_id` is the tokenizer's end-of-text id; open_clip's `argmax` pooling picks the same position
    when that id is the largest the tokenizer emits (true of CLIP's BPE)."""
    if not t.causal:
        raise Unsupported("CLIPTextModel is causal; this text transformer is bidirectional (no_causal_mask)")
    if t.pool == "eos":
        eot_id = t.eos_id
    elif t.pool != "argmax":
        raise Unsupported(f"CLIPTextModel pools at the end-of-text token; this text tower pools {t.pool!r}")
    if eot_id == 2:
        raise Unsupported("end-of-text id 2 would switch transformers' CLIP text pooling to its legacy argmax mode")
    if t.proj_b is not None and bool(t.proj_b.abs().max() > 0):
        raise Unsupported("CLIPModel's text projection has no bias; this text tower's has one")
    cfg = dict(_enc_kwargs(t.enc), intermediate_size=t.enc.mlp_dim, vocab_size=t.vocab_size,
               max_position_embeddings=t.context_length, eos_token_id=int(eot_id), pad_token_id=int(t.pad_id),
               bos_token_id=int(eot_id) - 1 if eot_id > 0 else 0)
    sd = {
        prefix + "embeddings.token_embedding.weight": t.tok_emb,
        prefix + "embeddings.position_embedding.weight": t.pos,
        prefix + "final_layer_norm.weight": t.final_ln[0], prefix + "final_layer_norm.bias": t.final_ln[1],
    }
    sd.update(_hf_clip_layers(t.enc, prefix))
    return cfg, sd


def vit_to_open_clip(v: ViT, prefix: str = "visual.") -> Tuple[Dict, Dict[str, Tensor]]:
    """open_clip's own VisionTransformer (`vision_cfg` without timm_model_name)."""
    if v.proj is None:
        raise Unsupported("open_clip's VisionTransformer always ends in a projection; none was given")
    width = v.enc.width
    cfg = dict(image_size=v.image_size, patch_size=v.patch_size, width=width, layers=len(v.enc.blocks),
               head_width=width // v.enc.heads, mlp_ratio=v.enc.mlp_dim / width, no_ln_pre=v.pre_ln is None,
               pool_type="tok", norm_kwargs={"eps": v.enc.eps})
    if width % v.enc.heads:
        raise Unsupported(f"width {width} is not a multiple of {v.enc.heads} heads")
    sd = {
        prefix + "conv1.weight": v.patch_w,
        prefix + "class_embedding": v.cls,
        prefix + "positional_embedding": _pos_with_patch_bias(v),
        prefix + "ln_post.weight": v.post_ln[0], prefix + "ln_post.bias": v.post_ln[1],
        prefix + "proj": v.proj.t().contiguous(),
    }
    if v.pre_ln is not None:
        sd.update({prefix + "ln_pre.weight": v.pre_ln[0], prefix + "ln_pre.bias": v.pre_ln[1]})
    for i, b in enumerate(v.enc.blocks):
        sd.update(block_state(b, f"{prefix}transformer.resblocks.{i}.", OPEN_CLIP_KEYS))
    return cfg, sd


def vit_to_timm(v: ViT) -> Dict[str, Tensor]:
    """The state dict of timm's VisionTransformer (class token, position embedding that covers it,
    fused qkv, `norm_pre` only when the ViT has a pre-norm); a bias-free patch conv gets a zero bias, which
    a timm ViT without one (CLIP-style, `pre_norm=True`) leaves unused."""
    D = v.enc.width
    sd = {
        "cls_token": v.cls.reshape(1, 1, D),
        "pos_embed": v.pos.reshape(1, -1, D),
        "patch_embed.proj.weight": v.patch_w,
        "patch_embed.proj.bias": v.patch_b if v.patch_b is not None else torch.zeros(D, dtype=v.patch_w.dtype),
        "norm.weight": v.post_ln[0], "norm.bias": v.post_ln[1],
    }
    if v.pre_ln is not None:
        sd.update({"norm_pre.weight": v.pre_ln[0], "norm_pre.bias": v.pre_ln[1]})
    for i, b in enumerate(v.enc.blocks):
        sd.update(block_state(b, f"blocks.{i}.", TIMM_KEYS))
    return sd


__all__ = ["Unsupported", "ViT", "TextTransformer", "compose", "vit_from_timm", "vit_from_open_clip",
           "vit_from_hf", "text_from_open_clip", "vit_to_hf_clip", "vit_to_dinov2", "text_to_hf_clip",
           "vit_to_open_clip", "vit_to_timm", "timm_blocks", "block_state", "HF_CLIP_KEYS"]
