"""ALBEF: align the unimodal features contrastively, then fuse them with cross-attention.

Li, Selvaraju, Gotmare, Joty, Xiong, Hoi 2021, "Align before Fuse: Vision and Language Representation
Learning with Momentum Distillation" (NeurIPS). Architecture (§3.1): a ViT image encoder (ViT-B/16,
DeiT init, 256 px), the first 6 BERT layers as text encoder, the last 6 with cross-attention to the
image tokens as fusion encoder, linear projections of both [CLS] features to 256-d. Objectives (§3.2):
image-text contrastive (ITC) against a 65,536-long queue of momentum features, image-text matching
(ITM) on contrastive hard negatives, and masked language modelling (MLM) conditioned on the image.
Momentum distillation (§3.3): EMA copies (m = 0.995) of both encoders, the fusion encoder and the
projections/MLM head give soft targets for ITC and MLM with weight alpha (0.4, ramped up over the
first epoch). Where we follow or change the reference code (salesforce/ALBEF `models/model_pretrain.py`),
the choices below say so.

Choices made here, all rank-count invariant (1 rank x 2B gives the losses of 2 ranks x B):
- ITC columns are the momentum features of the *global* batch (gathered) plus the queue; the queue
  takes the gathered momentum features after the loss. `queue_size % global batch == 0` is checked
  at the first forward.
- ITM negatives are drawn from the gathered batch (as BLIP/LAVIS; the reference samples per GPU),
  with -inf on the positive and fp32 weights. ITM negatives and MLM masks come from one generator
  seeded by (model.albef.seed, optimizer step, micro-batch) and drawn for the whole global batch on
  every rank; each rank keeps its rows. Resume is exact because the step is a saved buffer.
- MLM is normalised by the global number of masked tokens.
- Momentum weights are fp32 *buffers* (`vlp.models.momentum`): saved in every checkpoint, never
  partitioned by ZeRO-3 nor cast by bf16 mode. `after_step()` (the trainer calls it after each
  optimizer step) applies the EMA, reading ZeRO-3 partitioned parameters through
  `deepspeed.zero.GatheredParameters` without `modifier_rank` (nothing is written back to them), and
  counts the step that drives alpha's ramp (`steps` buffer).
- The temperature is kept in [min_temperature, max_temperature] as the reference does, in place, but
  after each optimizer step: `parameter_bounds()` names it and the trainer clamps the parameter and
  DeepSpeed's fp32 master copy (`vlp.train.engine.clamp_parameters`); the forward uses it as is, so
  its gradient never vanishes at a bound.
- `model.text.pool=mean` makes the text ITC feature the masked token mean instead of [CLS]: for
  towers trained from scratch, whose [CLS] output is nearly the same for every caption, so that
  contrasting against (gradient-free) momentum features has something to learn from
  (configs/demo_albef.yaml). The paper's pretrained BERT does not need it.
- ITM from random towers (configs/demo_albef.yaml; BENCHMARKS.md "ALBEF: why ITM did not learn"). With
  the paper's settings the ITM head sits at the label prior (loss 0.636, accuracy 0.667 = "never a
  match") for the whole run: the fused representation barely depends on whether image and caption
  agree, and the only way out is a product of small random weights (cross-attention query x key,
  value x output), a saddle that the ITC and MLM gradients on the shared towers keep the model in.
  Four settings, each off by default (the paper's behaviour), get it out; measured one at a time:
  `itm_pool=mean` (the head reads the masked mean of the fused tokens, so every token's cross-attention
  gets a direct gradient, not only [CLS]'s), `cross_attention_init_std` (larger random
  cross-attention weights: the fused tokens depend on the image from step 0; the layers are built
  without BERT's init, at torch's default ~0.05 for width 128), `itm_weight` > 1 (ITM's share of the
  towers' gradient against ITC and MLM) and `hard_negative_warmup_steps` (negatives go from uniform
  random, which differ in several attributes, to the paper's contrastive hard negatives). The
  logged `itm_pos_prob` / `itm_neg_prob` (mean P(match) of positives / negatives) show the escape
  from the plateau, where both equal 1/3.
- The MLM head (`vlp.models.mlm_head`) is BERT's: transform and bias, loaded from the checkpoint's
  `cls.predictions` when `model.text.pretrained` is a BERT with an MLM head, and the decoder tied to the
  text tower's word embeddings (read at each call, so the momentum head reads the momentum text's).
- BUS (`model.bus`, vlp.models.bus): the ViT drops patches text-agnostically ([CLS] attention) and
  runs once per image (and once in the momentum model); its [CLS] gives the ITC feature exactly as
  `encode_image` does. Each (image, caption) pair the fusion encoder reads then gets its own patches,
  kept by the text-aware selector under that pair's caption feature, and the Patch Abstraction
  Decoder's summary of them: the three ITM pairs (positive, negative image, negative text) under their
  own captions, as `match_scores` does at re-ranking; MLM (and its momentum teacher, with the momentum
  selector and PAD) under the *masked* caption, so no masked word reaches the image tokens. The
  patch-text matching loss (`model.bus.ptm_weight`) contrasts the pairs of each rank's own batch (B x B
  relevance maps), so with BUS the PTM term alone depends on the per-rank batch, like open_clip's local
  loss.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from vlp.config import ConfigError
from vlp.losses.distill import alpha_at, itc_distill_loss
from vlp.dist import gather_with_grad, rank_and_world
from vlp.losses.itm import hard_negatives, hardness_at, itm_loss
from vlp.losses.mlm import IGNORE, mask_tokens, mlm_loss
from vlp.models.bus import add_vit_selectors, build_pad, build_selector, check_bus, check_bus_tower, ptm_loss
from vlp.models.fusion import FusionEncoder, as_token_tower, bert_text, image_tokens, token_tower_kwargs
from vlp.models.mlm_head import MLMHead, load_pretrained_mlm_head
from vlp.models.momentum import buffer_copy, ema_update
from vlp.models.registry import register_model
from vlp.models.towers import build_text_tower, build_vision_tower

MOMENTUM_PARTS = ("vision", "vision_proj", "text", "text_proj", "fusion", "mlm_head")
_TOKEN_KEYS = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")


class ALBEF(nn.Module):
    """Image and text encoders, fusion encoder, ITC/ITM/MLM heads, momentum copies and feature queues."""

    def __init__(self, cfg: DictConfig, vision, text):
        super().__init__()
        a = cfg.albef
        self.opts = {k: (float(v) if isinstance(v, float) else v) for k, v in OmegaConf.to_container(a).items()}
        self.embed_dim = int(cfg.embed_dim)
        self.image_cfg: Dict[str, Any] = dict(vision.info)
        self.text_cfg: Dict[str, Any] = dict(text.info)
        self.vision = vision.module
        self.text = text.module  # vlp HFText: `.model` is the transformers model (text layers only)
        self.text_pool = str(cfg.text.pool)
        bert = self.text.model
        layers = bert.encoder.layer
        bert.encoder.layer = nn.ModuleList(list(layers)[:a.text_layers])
        bert.config.num_hidden_layers = int(a.text_layers)
        self.fusion = FusionEncoder(bert.config, int(a.fusion_layers), vision.dim,
                                    init_from=nn.ModuleList(list(layers)[a.text_layers:]),
                                    cross_init_std=float(a.cross_attention_init_std))
        width = int(bert.config.hidden_size)
        self.vision_proj = nn.Linear(vision.dim, self.embed_dim)
        self.text_proj = nn.Linear(width, self.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = MLMHead(bert.config)  # decoder: the word embeddings, passed at each call
        if cfg.text.pretrained:
            load_pretrained_mlm_head(self.mlm_head, str(cfg.text.pretrained), bert)
        self.vocab_size = int(bert.config.vocab_size)
        self.temp = nn.Parameter(torch.full((1,), float(cfg.init_temperature)))  # shape [1]: DeepSpeed
        bus = cfg.bus
        self.bus = bool(bus.enabled)
        self.pad = build_pad(bus, self.vision) if self.bus else None
        self.ptm_weight = float(bus.ptm_weight) if self.bus else 0.0
        self.ptm_temperature = float(bus.ptm_temperature)
        if self.bus:
            add_vit_selectors(self.vision, bus)
            self.selector = build_selector(bus, self.vision, width)
            if self.ptm_weight:
                self.ptm_proj = nn.Linear(vision.dim, self.embed_dim)
        self.momentum_parts = (MOMENTUM_PARTS + (("selector",) if self.bus else ())
                               + (("pad",) if self.pad is not None else ()))

        self.momentum_models = nn.ModuleDict()
        self._slots: Dict[str, List] = {}
        for name in self.momentum_parts:
            twin, slots = buffer_copy(getattr(self, name))
            self.momentum_models[name] = twin
            self._slots[name] = slots
        g = torch.Generator().manual_seed(int(a.seed))  # the same queues on every rank
        q = int(a.queue_size)
        self.register_buffer("image_queue", F.normalize(torch.randn(q, self.embed_dim, generator=g), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(q, self.embed_dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("steps", torch.zeros(1, dtype=torch.long))  # optimizer steps done
        self._micro = 0  # forwards since the last optimizer step (gradient accumulation)
        self._generators: Dict[str, torch.Generator] = {}
        self.train()

    # ------------------------------------------------------------------ encoders (eval and training)
    def _image(self, images: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """The vision tower's output tokens, [CLS] first (a ViT's class token, or the pooled vector of a
        Swin / ConvNeXt / ... before its flattened last-stage map: `vlp.models.fusion.as_token_tower`);
        never text-dependent (with BUS: after its text-agnostic patch selection). One pass per image
        serves ITC and every pair's `_pair_tokens`."""
        return image_tokens(self.momentum_models["vision"] if momentum else self.vision, images)

    def _pair_tokens(self, tokens: torch.Tensor, texts: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """The image tokens the fusion encoder reads for P (image, caption) pairs: `tokens` (P, N, D) from
        `_image`, `texts` (P, text width) each pair's caption feature (`_text_feature`). With BUS: the
        patches the text-aware selector keeps under the pair's caption, then the PAD summary when
        configured; without BUS: `tokens` as they are."""
        if not self.bus:
            return tokens
        mm = self.momentum_models
        tokens = (mm["selector"] if momentum else self.selector)(tokens, texts)
        if self.pad is not None:
            tokens = (mm["pad"] if momentum else self.pad)(tokens)
        return tokens

    def _text(self, ids: torch.Tensor, mask: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        return bert_text((self.momentum_models["text"] if momentum else self.text).model, ids, mask)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised pixels -> (B, embed_dim) unit-norm ITC embeddings (float32)."""
        return F.normalize(self.vision_proj(self._image(images)[:, 0]).float(), dim=-1)

    def _text_feature(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's ITC input: [CLS] (the paper), or the masked token mean with model.text.pool=mean."""
        if self.text_pool != "mean":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,L) ids and mask -> (B, embed_dim) unit-norm ITC embeddings of the text encoder (float32)."""
        return F.normalize(self.text_proj(self._text_feature(self._text(ids, mask), mask)).float(), dim=-1)

    def itm_logits(self, fused: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) fused sequence and its (B, L) mask -> (B, 2) ITM logits (no match, match) from the
        fusion [CLS] (the paper) or, with model.albef.itm_pool=mean, the masked mean of the fused tokens."""
        if self.opts["itm_pool"] == "mean":
            m = mask.unsqueeze(-1).to(fused.dtype)
            return self.itm_head((fused * m).sum(1) / m.sum(1).clamp(min=1.0))
        return self.itm_head(fused[:, 0])

    def match_scores(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITM score of each (image i, text i) pair, shape (B,) float32: the log-odds of "match",
        logit(match) - logit(no match). It orders candidates as the match probability does (ALBEF
        re-ranks by that probability's logit) and is > 0 exactly where the head says "match", so the
        same score gives the held-out ITM accuracy."""
        text = self._text(ids, mask)
        image = self._pair_tokens(self._image(images), self._text_feature(text, mask))
        logits = self.itm_logits(self.fusion(text, mask, image), mask).float()
        return logits[:, 1] - logits[:, 0]

    def example_batch(self, n: int, image_size: int, context_length: int, like: torch.Tensor) -> Dict[str, Any]:
        """A batch of `n` zero images and full-length captions ([CLS], one ordinary token, [SEP]): what
        `flops_per_sample` runs one training step on (MLM finds maskable tokens in it)."""
        special = {int(self.opts[k]) for k in _TOKEN_KEYS}
        word = next(i for i in range(self.vocab_size) if i not in special)
        ids = torch.full((n, context_length), word, dtype=torch.long, device=like.device)
        ids[:, 0], ids[:, -1] = int(self.opts["cls_token_id"]), int(self.opts["sep_token_id"])
        return {"image": torch.zeros(n, 3, image_size, image_size, dtype=like.dtype, device=like.device),
                "text_ids": ids, "text_mask": torch.ones_like(ids)}

    # ------------------------------------------------------------------------------------- training
    def negative_hardness(self) -> float:
        """Share of ITM negatives drawn by contrastive similarity now (model.albef.hard_negative_warmup_steps)."""
        return hardness_at(int(self.steps.item()), int(self.opts["hard_negative_warmup_steps"]))

    def alpha(self) -> float:
        return alpha_at(int(self.steps.item()), self.opts["alpha"], int(self.opts["alpha_warmup_steps"]))

    def temperature(self) -> torch.Tensor:
        """The ITC temperature as is (fp32): the trainer keeps it in range after each step."""
        return self.temp.float()

    def parameter_bounds(self) -> List[Tuple[nn.Parameter, float, float]]:
        """(parameter, low, high) the trainer clamps in place after each optimizer step (ALBEF: temp in
        [0.001, 0.5]); see vlp.train.engine.clamp_parameters."""
        return [(self.temp, float(self.opts["min_temperature"]), float(self.opts["max_temperature"]))]

    def _generator(self, device: torch.device) -> torch.Generator:
        """The sampling stream of this forward, identical on every rank and after a resume."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        seed = np.random.SeedSequence([int(self.opts["seed"]), int(self.steps.item()), self._micro])
        return self._generators[key].manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))

    def _momentum_precision(self, x: torch.Tensor):
        """Momentum buffers are fp32; with half-precision inputs run them under autocast to that dtype."""
        if x.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(x.device.type, dtype=x.dtype)
        return contextlib.nullcontext()

    def _check_queue(self, global_batch: int, batch: int, world: int) -> None:
        q = int(self.opts["queue_size"])
        if q % global_batch:
            raise ConfigError(
                f"model.albef.queue_size={q} is not a multiple of the global batch {global_batch} "
                f"(train.micro_batch_size {batch} x {world} ranks): the queue takes whole batches; "
                f"use e.g. queue_size={max(1, q // global_batch) * global_batch}")

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        rank, world = rank_and_world()
        b = images.shape[0]
        n = b * world
        self._check_queue(n, b, world)
        rows = slice(rank * b, (rank + 1) * b)
        alpha = self.alpha()
        temp = self.temperature()
        gen = self._generator(images.device)
        o = self.opts

        txt_hid = self._text(ids, mask)
        txt_sem = self._text_feature(txt_hid, mask)
        txt_feat = F.normalize(self.text_proj(txt_sem).float(), dim=-1)
        img_tok = self._image(images)  # text-agnostic: ITC's [CLS] is encode_image's
        img_feat = F.normalize(self.vision_proj(img_tok[:, 0]).float(), dim=-1)
        extra: Dict[str, Any] = {}
        if self.ptm_weight:
            ptm = ptm_loss(self.selector, self.ptm_proj, img_tok, txt_sem, txt_feat,
                           temp.new_full((1,), self.ptm_temperature) if self.ptm_temperature else temp)
            extra["ptm_loss"] = ptm.detach()

        mm = self.momentum_models
        with torch.no_grad(), self._momentum_precision(images):
            txt_hid_m = self._text(ids, mask, momentum=True)
            txt_sem_m = self._text_feature(txt_hid_m, mask)
            txt_feat_m = F.normalize(mm["text_proj"](txt_sem_m).float(), dim=-1)
            img_tok_m = self._image(images, momentum=True)
            img_feat_m = F.normalize(mm["vision_proj"](img_tok_m[:, 0]).float(), dim=-1)
            img_feat_m_all = gather_with_grad(img_feat_m)
            txt_feat_m_all = gather_with_grad(txt_feat_m)
        itc = itc_distill_loss(img_feat, txt_feat, img_feat_m_all, txt_feat_m_all, self.image_queue,
                               self.text_queue, temp, alpha, offset=rank * b)

        # ITM: one hard negative per image and per text from the global batch
        with torch.no_grad():
            sim_i2t = gather_with_grad(img_feat.detach()) @ txt_feat_m_all.T / temp
            sim_t2i = gather_with_grad(txt_feat.detach()) @ img_feat_m_all.T / temp
            neg_text, neg_image = hard_negatives(sim_i2t, sim_t2i, gen, self.negative_hardness())
            neg_text, neg_image = neg_text[rows], neg_image[rows]
            mask_all = gather_with_grad(mask)
        img_tok_all, txt_hid_all = gather_with_grad(img_tok), gather_with_grad(txt_hid)
        itm_image = torch.cat([img_tok, img_tok_all[neg_image], img_tok])
        if self.bus:  # every pair's patches selected under that pair's caption, as match_scores does
            sem_all = gather_with_grad(txt_sem.detach())
            itm_image = self._pair_tokens(itm_image, torch.cat([txt_sem, txt_sem, sem_all[neg_text]]))
        fused = self.fusion(torch.cat([txt_hid, txt_hid, txt_hid_all[neg_text]]),
                            torch.cat([mask, mask, mask_all[neg_text]]), itm_image)
        itm, itm_metrics = itm_loss(self.itm_logits(fused, torch.cat([mask, mask, mask_all[neg_text]])))

        # MLM conditioned on the image, distilled from the momentum model
        length = ids.shape[1]
        u_select = torch.rand(n, length, generator=gen, device=ids.device)[rows]
        u_kind = torch.rand(n, length, generator=gen, device=ids.device)[rows]
        random_ids = torch.randint(self.vocab_size, (n, length), generator=gen, device=ids.device)[rows]
        special = [o[k] for k in _TOKEN_KEYS]
        masked, labels = mask_tokens(ids, mask, u_select, u_kind, random_ids, o["mlm_prob"], special,
                                     o["mask_token_id"])
        chosen = labels != IGNORE
        masked_hid = self._text(masked, mask)  # BUS: the masked caption selects MLM's patches, never the caption
        fused_mlm = self.fusion(masked_hid, mask, self._pair_tokens(img_tok, self._text_feature(masked_hid, mask)))
        logits = self.mlm_head(fused_mlm[chosen], self.text.model.embeddings.word_embeddings)
        with torch.no_grad(), self._momentum_precision(images):
            teacher = None
            if alpha:
                masked_hid_m = self._text(masked, mask, momentum=True)
                image_m = self._pair_tokens(img_tok_m, self._text_feature(masked_hid_m, mask), momentum=True)
                fused_m = mm["fusion"](masked_hid_m, mask, image_m)
                teacher = mm["mlm_head"](fused_m[chosen], mm["text"].model.embeddings.word_embeddings)
            count = chosen.sum().to(torch.float64)
            if world > 1:
                dist.all_reduce(count)
        mlm = mlm_loss(logits, labels[chosen], teacher, alpha, float(count) / world)

        self._enqueue(img_feat_m_all, txt_feat_m_all)
        self._micro += 1
        loss = o["itc_weight"] * itc + o["itm_weight"] * itm + o["mlm_weight"] * mlm
        if self.ptm_weight:
            loss = loss + self.ptm_weight * ptm
        return {"loss": loss, "itc_loss": itc.detach(), "itm_loss": itm.detach(), "mlm_loss": mlm.detach(),
                **itm_metrics, "itm_hardness": self.negative_hardness(), "alpha": alpha, "temperature": float(temp.item()), **extra}

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Write the gathered momentum features at the pointer (same on every rank); the pointer wraps."""
        n, q = image_feat.shape[0], self.image_queue.shape[0]
        ptr = int(self.queue_ptr.item())
        if ptr + n > q:  # resumed with another global batch: the oldest entry moves to 0, first out as before
            for queue in (self.image_queue, self.text_queue):
                queue.copy_(torch.roll(queue, -ptr, 0))
            ptr = 0
        self.image_queue[ptr:ptr + n] = image_feat.to(self.image_queue.dtype)
        self.text_queue[ptr:ptr + n] = text_feat.to(self.text_queue.dtype)
        self.queue_ptr[0] = (ptr + n) % q

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimizer step: momentum EMA of every momentum part, then count the step.

        Collective under ZeRO-3 (gathers the online weights): every rank calls it at every step.
        """
        m = float(self.opts["momentum"])
        for name in self.momentum_parts:
            ema_update(getattr(self, name).parameters(), self._slots[name], m)
        self.steps += 1
        for module in self.modules():  # step schedules inside the towers (EViT's keep-rate warm-up)
            if module is not self and callable(getattr(module, "after_step", None)):
                module.after_step()
        self._micro = 0

    def check_tokenizer(self, tokenizer) -> None:
        """The MLM needs the tokenizer's [MASK] and special ids to be the configured ones."""
        tok = getattr(tokenizer, "_tok", None)
        if tok is None or getattr(tok, "mask_token_id", None) is None:
            raise ConfigError(f"ALBEF's masked language modelling needs a transformers tokenizer with a [MASK] "
                              f"token: set data.tokenizer.kind=hf and name to a BERT tokenizer (e.g. "
                              f"bert-base-uncased, or a dir from `vlp data bert-vocab`); got "
                              f"{type(tokenizer).__name__} {getattr(tokenizer, 'name', '')!r}")
        wrong = {k: getattr(tok, k) for k in _TOKEN_KEYS if getattr(tok, k, None) != self.opts[k]}
        if wrong:
            fix = " ".join(f"model.albef.{k}={v}" for k, v in wrong.items())
            raise ConfigError(f"the special token ids of data.tokenizer ({getattr(tokenizer, 'name', '')}) differ "
                              f"from model.albef's: set {fix}")


def _check(cfg: DictConfig) -> None:
    a = cfg.albef
    if cfg.embed_dim <= 0:
        raise ConfigError(f"bad value for 'model.embed_dim': must be > 0, got {cfg.embed_dim}")
    if cfg.text.kind != "hf":
        raise ConfigError(f"model.text.kind={cfg.text.kind!r}: ALBEF splits a transformers BERT-like model into "
                          "text and fusion layers; use model.text.kind=hf (e.g. name=bert-base-uncased)")
    if cfg.vision.kind not in ("timm", "hf"):
        raise ConfigError(f"model.vision.kind={cfg.vision.kind!r}: ALBEF needs the vision tower's token sequence "
                          "or feature map; use kind=timm or hf")
    if cfg.vision.locked or cfg.text.locked:
        raise ConfigError("model.vision.locked / model.text.locked: ALBEF trains both towers; set them false")
    if cfg.patch_dropout:
        raise ConfigError("model.patch_dropout: not supported by ALBEF (the fusion encoder reads all patches); set 0")
    for key in ("text_layers", "fusion_layers", "queue_size"):
        if a[key] < 1:
            raise ConfigError(f"bad value for 'model.albef.{key}': must be >= 1, got {a[key]}")
    checks = [("momentum", 0.0 <= a.momentum < 1.0, "want 0 <= m < 1"),
              ("alpha", 0.0 <= a.alpha <= 1.0, "want 0 <= alpha <= 1"),
              ("alpha_warmup_steps", a.alpha_warmup_steps >= 0, "must be >= 0"),
              ("mlm_prob", 0.0 < a.mlm_prob < 1.0, "want 0 < p < 1"),
              ("min_temperature", 0.0 < a.min_temperature <= a.max_temperature,
               "want 0 < min_temperature <= max_temperature")]
    checks += [(f"{k}_weight", a[f"{k}_weight"] >= 0, "must be >= 0") for k in ("itc", "itm", "mlm")]
    checks += [("itm_pool", a.itm_pool in ("cls", "mean"), "want cls or mean"),
               ("hard_negative_warmup_steps", a.hard_negative_warmup_steps >= 0, "must be >= 0")]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"bad value for 'model.albef.{key}': {want}, got {a[key]}")
    if cfg.bus.enabled:
        check_bus(cfg.bus, "albef", cfg.vision)
    if not a.min_temperature <= cfg.init_temperature <= a.max_temperature:
        raise ConfigError(f"model.init_temperature={cfg.init_temperature} lies outside "
                          f"[model.albef.min_temperature, max_temperature] = [{a.min_temperature}, {a.max_temperature}]")


def _text_tower(cfg: DictConfig):
    """The hf text tower with text_layers + fusion_layers layers (the fusion layers are split off later)."""
    a = cfg.albef
    tcfg = copy.deepcopy(cfg.text)
    layers = int(a.text_layers + a.fusion_layers)
    kw = OmegaConf.to_container(tcfg.kwargs, resolve=True) if isinstance(tcfg.kwargs, DictConfig) else dict(tcfg.kwargs)
    if "num_hidden_layers" in kw and int(kw["num_hidden_layers"]) != layers:
        raise ConfigError(f"model.text.kwargs.num_hidden_layers={kw['num_hidden_layers']} contradicts "
                          f"model.albef.text_layers + fusion_layers = {layers}: leave it unset")
    tcfg.kwargs = dict(kw, num_hidden_layers=layers)
    tower = build_text_tower(tcfg, int(cfg.embed_dim))
    bert = getattr(tower.module, "model", None)
    if bert is None or not hasattr(getattr(bert, "encoder", None), "layer") or not hasattr(bert, "embeddings"):
        raise ConfigError(f"model.text: {type(bert).__name__} is not a BERT-like encoder (embeddings + "
                          "encoder.layer); ALBEF needs one, e.g. bert-base-uncased")
    return tower


@register_model("albef")
def build_albef(cfg: DictConfig) -> ALBEF:
    _check(cfg)
    vcfg = copy.deepcopy(cfg.vision)
    kw = OmegaConf.to_container(vcfg.kwargs, resolve=True) if isinstance(vcfg.kwargs, DictConfig) else dict(vcfg.kwargs)
    vcfg.kwargs = token_tower_kwargs(vcfg.kind, kw)
    vision = build_vision_tower(vcfg, 0.0, int(cfg.embed_dim))
    if cfg.bus.enabled:
        check_bus_tower(vision.module, vcfg.pretrained or vcfg.name)
    as_token_tower(vision.module, vcfg.kind, vcfg.pretrained or vcfg.name, int(vision.info["size"]), vision.dim)
    return ALBEF(cfg, vision, _text_tower(cfg))


__all__ = ["ALBEF", "build_albef", "MOMENTUM_PARTS"]
