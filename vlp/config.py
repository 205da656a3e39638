"""Typed experiment configuration: one YAML per run, validated before any work starts.

The schema is a tree of dataclasses read through OmegaConf's structured configs. Every field is
typed and defaulted here; YAML files and dotted command-line overrides (`train.lr=3e-4`) are merged
on top; an override with a `!` before its key (`!model.vision.kwargs={depth: 2}`) replaces the whole
node instead (a section: its schema defaults, then the given keys). An unknown key or a value of the
wrong type raises `ConfigError` naming the key and, for unknown keys, the nearest valid one.
"""
from __future__ import annotations

import copy
import difflib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from vlp.families import families


class ConfigError(ValueError):
    """A configuration problem a user can fix: names the key and what would be valid."""


# ----------------------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    """One weighted source for mixing: tar shards, or a Hugging Face `datasets` dataset (kind: hf)."""

    shards: str = ""  # shard spec: brace pattern, list joined by '::', local/http(s)/pipe: URLs
    weight: float = 1.0
    name: str = ""  # label used when reporting the realised mix; defaults to the index
    kind: str = "shards"  # shards | hf (streamed with datasets.load_dataset; vlp.data.hf_source)
    path: str = ""  # kind hf: Hub dataset name or local path, as load_dataset takes it
    config: str = ""  # kind hf: the dataset's config name (load_dataset's `name`)
    split: str = "train"  # kind hf
    revision: str = ""  # kind hf: a Hub revision (branch, tag, commit)
    image_column: str = "image"  # kind hf: the column with the image (datasets Image, bytes or a path)
    caption_column: str = "caption"  # kind hf: the column with the caption
    key_column: str = ""  # kind hf: a column of unique ids used as sample keys (default: position-derived)


@dataclass
class TokenizerConfig:
    kind: str = "open_clip"  # open_clip | hf | sentencepiece
    name: str = ""  # open_clip model name, HF name/dir, or path to a SentencePiece .model
    context_length: int = 77


@dataclass
class RandAugmentConfig:
    """RandAugment as ALBEF pretrains with it (vlp/data/augment.py): `n` ops drawn with replacement from
    Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate, each applied
    with probability 0.5 at magnitude `m`. Training only."""

    n: int = 0  # ops per training image; 0 = off (ALBEF: 2)
    m: int = 7  # magnitude, 0-10 (ALBEF: 7)


@dataclass
class VideoDataConfig:
    """Clips for video models (model.video.enabled; Frozen in Time, Bain et al. 2021, §3.2 and §4)."""

    key: str = "mp4;webm;mkv;mov;avi"  # sample fields holding a video (first present wins); images come from data.image_key
    frames: int = 4  # K frames per clip: training takes a random frame of each of K equal segments, eval the middles
    curriculum: List[List[int]] = field(default_factory=list)  # [[step, frames], ...]: frames from that step on; [] = data.video.frames throughout
    min_seconds: float = 0.0  # training clips shorter than this are skipped (too_short_video)


@dataclass
class DataConfig:
    train_shards: str = ""  # shard spec; alternatively several weighted `sources`
    sources: List[SourceConfig] = field(default_factory=list)
    eval_shards: str = ""
    resampled: bool = False  # False: epoch mode (each shard once per epoch); True: infinite sampling
    shuffle_buffer: int = 1000  # samples; 0 disables sample shuffling
    workers: int = 2  # DataLoader workers per rank
    image_key: str = "jpg;jpeg;png;webp"
    caption_key: str = "txt"
    image_size: int = 0  # 0: take the vision tower's size
    crop_scale: List[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop scale
    interpolation: str = "bilinear"  # nearest | bilinear | bicubic | area
    hflip: bool = False  # training: mirror half the images (ALBEF does); captions are kept, so "left"/"right" in them then lie
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)  # training: ALBEF's RandAugment
    mean: List[float] = field(default_factory=list)  # empty: from the vision tower
    std: List[float] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    samples_per_epoch: int = 0  # resampled mode: how many samples make one "epoch"; 0: unknown
    max_corrupt_fraction: float = 0.1  # fail when more than this fraction of samples is corrupt
    remote_timeout: float = 60.0  # http(s) shards: seconds a read may wait for data before it fails, naming the URL
    video: VideoDataConfig = field(default_factory=VideoDataConfig)  # clips, for model.video.enabled
    decode: str = "loader"  # loader: JPEGs decoded by the DataLoader workers | device: by torchvision.io.decode_jpeg where the model runs (nvJPEG on GPUs), for hosts with few cores per GPU


# ---------------------------------------------------------------------------------------- model
@dataclass
class FrozenLLMConfig:
    """A frozen decoder layer of a transformers causal LM after the last ViT block (vision timm towers only)."""

    name: str = ""  # causal LM: local dir or hub name with safetensors weights; "" = off
    layer: int = -1  # decoder layer index; negative counts from the end (-1: the last, as the paper)


@dataclass
class EViTConfig:
    """EViT token reorganization inside a timm ViT (vision towers only)."""

    keep_rate: float = 1.0  # share of patch tokens kept at each of `blocks`; 1.0 = off (paper: 0.7)
    blocks: List[int] = field(default_factory=lambda: [3, 6, 9])  # 0-based block indices (paper: 3, 6, 9)
    fuse: bool = True  # fuse the dropped tokens into one, weighted by their [CLS] attention
    shrink_start: int = 0  # optimizer steps at keep rate 1.0 before shrinking starts (paper: 10 of 300 epochs)
    shrink_steps: int = 0  # steps of cosine decay from 1.0 to keep_rate (paper: 100 epochs); 0 = at once


@dataclass
class TowerConfig:
    kind: str = "timm"  # vision: timm | hf | open_clip; text: hf | open_clip
    name: str = ""  # model name (timm/open_clip) or HF name / local dir
    pretrained: str = ""  # "" random init; a local dir/file or a hub name for the library's loader
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    locked: bool = False  # freeze the tower (LiT)
    grad_checkpointing: bool = False
    pool: str = ""  # hf towers only: "" (the model's pooled output, else [CLS]) | cls | mean; vision also pooled (README: Vision towers)
    frozen_llm: FrozenLLMConfig = field(default_factory=FrozenLLMConfig)  # vision timm towers only
    evit: EViTConfig = field(default_factory=EViTConfig)  # vision timm towers only


@dataclass
class AlbefConfig:
    """ALBEF options (model.type=albef); defaults are the paper's (configs/Pretrain.yaml of salesforce/ALBEF)."""

    text_layers: int = 6  # first layers of the BERT text tower: the text encoder
    fusion_layers: int = 6  # the next layers, given cross-attention to the image tokens: the fusion encoder
    queue_size: int = 65536  # momentum features kept as extra ITC negatives; a multiple of micro_batch x ranks
    momentum: float = 0.995  # EMA factor of the momentum encoders, applied after each optimizer step
    alpha: float = 0.4  # weight of the momentum-distillation targets (ITC and MLM)
    alpha_warmup_steps: int = 0  # alpha ramps linearly from 0 over these optimizer steps (paper: 1 epoch)
    mlm_prob: float = 0.15  # share of text tokens masked for MLM (80% [MASK], 10% random, 10% kept)
    itc_weight: float = 1.0
    itm_weight: float = 1.0  # > 1 helps ITM off its label-prior plateau from random towers (demo_albef: 4)
    mlm_weight: float = 1.0
    max_temperature: float = 0.5  # the learnable temperature (init model.init_temperature) is clamped in place
    min_temperature: float = 0.001  # to [min_temperature, max_temperature] after every optimizer step
    itm_pool: str = "cls"  # ITM head input: cls (the paper: fusion [CLS]) | mean (masked mean of the fused tokens, for random towers)
    hard_negative_warmup_steps: int = 0  # ITM negatives go from uniform random to hard over these steps (0: hard)
    cross_attention_init_std: float = 0.0  # fusion cross-attention weights ~ N(0, std^2), biases 0; 0: torch's default init
    seed: int = 0  # seeds the ITM-negative and MLM-mask draws; the same stream on every rank
    pad_token_id: int = 0  # special token ids of data.tokenizer (defaults: bert-base-uncased); never masked
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103


@dataclass
class BUSConfig:
    """BUS patch summarization for ALBEF (vlp/models/bus.py; Jiang et al., ICCV 2023). The paper's layers,
    keep ratio and summary length are not published in a source we could read: the defaults are EViT's,
    TRIPS's (same authors, EMNLP 2022) and our own, as marked."""

    enabled: bool = False  # BUS (albef only): patch selection in the ViT and per (image, caption) pair, PAD, PTM
    blocks: List[int] = field(default_factory=lambda: [3, 6, 9])  # 0-based ViT blocks that drop patches by [CLS] attention, text-agnostic (EViT's)
    keep_rate: float = 0.7  # share of patch tokens each of those blocks keeps (EViT, TRIPS: 0.7)
    text_keep_rate: float = 0.7  # share of the ViT's output patches the text-aware selector keeps per (image, caption) pair (ours, TRIPS's rate)
    fuse: bool = True  # fuse the dropped patches into one token weighted by their scores (TRIPS)
    pad_queries: int = 0  # Patch Abstraction Decoder summary tokens for the fusion encoder; 0 = no PAD
    pad_layers: int = 1  # PAD decoder layers (ours); the PAD runs once per (image, caption) pair
    pad_heads: int = 0  # PAD attention heads; 0: ViT width / 64
    ptm_weight: float = 1.0  # weight of the patch-text matching loss; 0 = off
    ptm_temperature: float = 0.0  # PTM logit temperature; 0: the model's contrastive temperature


@dataclass
class VideoModelConfig:
    """A video model: the timm ViT of model.vision reads clips (B, K, 3, H, W) (vlp.models.video)."""

    enabled: bool = False  # batches carry `video`; images become 1-frame clips
    temporal: str = "divided"  # divided: Frozen in Time's space-time attention | mean: per-frame image model, features averaged (baseline)
    max_frames: int = 4  # rows of the temporal embedding (the most frames a clip may have); eval takes this many per clip


@dataclass
class ModelConfig:
    type: str = "clip"  # a family of vlp.models.registry: clip | align | siglip | albef
    embed_dim: int = 512
    vision: TowerConfig = field(default_factory=TowerConfig)
    text: TowerConfig = field(default_factory=lambda: TowerConfig(kind="open_clip"))
    patch_dropout: float = 0.0
    init_temperature: float = 0.07  # CLIP 0.07, ALIGN 1.0; SigLIP uses init_logit_scale/bias
    max_logit_scale: float = 100.0  # clip/align/siglip: log(logit scale) clamped to [0, ln this] after every step; 0 = off
    label_smoothing: float = 0.0  # ALIGN uses 0.1
    local_loss: bool = False  # open_clip's local-loss variant
    siglip_init_logit_scale: float = 10.0
    siglip_init_bias: float = -10.0
    siglip_chunked: bool = False  # siglip: the ring of texts over ranks (one B x B block at a time) instead of gathering all
    extra: Dict[str, Any] = field(default_factory=dict)  # model-family specific options
    init_from: str = ""  # start towers + projections from a vlp run/checkpoint/export or an open_clip/HF export
    albef: AlbefConfig = field(default_factory=AlbefConfig)  # used when type=albef
    bus: BUSConfig = field(default_factory=BUSConfig)  # BUS patch summarization (albef)
    video: VideoModelConfig = field(default_factory=VideoModelConfig)  # clips instead of images (clip/align/siglip)


# ---------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    micro_batch_size: int = 32  # per rank, per micro-step
    grad_accum: int = 1
    grad_cache: bool = False  # contrastive negatives over the whole accumulated batch
    compile: bool = False  # torch.compile the model through DeepSpeed's engine.compile (inductor); see BENCHMARKS
    channels_last: str = "auto"  # auto | true | false: images in channels_last (NHWC) on the device; auto: conv towers
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 0.0  # 0 disables
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    tensorboard: bool = True
    curves: bool = True  # rank 0 draws output_dir/curves.png at checkpoints (at most once a minute) and at the end
    log_keys: bool = False  # each rank appends each step's sample keys to output_dir/keys/rankR.jsonl (an audit)
    wandb: bool = False
    wandb_project: str = "vlp"  # Weights & Biases project (used when train.wandb=true)
    peak_flops: float = 0.0  # FLOP/s per device; 0: GPU data-sheet table, measured matmul peak on CPU
    dist_timeout_s: int = 600
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # advanced DeepSpeed keys, merged last


# ----------------------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    every: int = 0  # run retrieval on data.eval_shards every N steps during training; 0: off
    batch_size: int = 64
    rerank_k: int = 16  # fusion models: ITM re-ranks the top-k ITC candidates
    max_samples: int = 0  # 0: all


# --------------------------------------------------------------------------------------- export
@dataclass
class ExportConfig:
    format: str = "vlp"  # hf | open_clip | vlp
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    max_shard_size: str = "5GB"
    license: str = "apache-2.0"
    image_only: bool = False  # video models to hf/open_clip: export the image (1-frame) path, leaving the trained temporal parts out


@dataclass
class Config:
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


_CHOICES = {
    "data.tokenizer.kind": ("open_clip", "hf", "sentencepiece"),
    "data.interpolation": ("nearest", "bilinear", "bicubic", "area"),
    "model.vision.kind": ("timm", "hf", "open_clip"),
    "model.text.kind": ("hf", "open_clip"),
    "model.vision.pool": ("", "pooled", "cls", "mean"),  # vlp.models.towers.hf.VISION_POOLS
    "model.text.pool": ("", "cls", "mean"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.zero_stage": (0, 1, 2, 3),
    "export.format": ("hf", "open_clip", "vlp"),
    "export.dtype": ("fp32", "bf16", "fp16"),
    "model.video.temporal": ("divided", "mean"),
    "data.decode": ("loader", "device"),
}


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not dict:
                keys.extend(_all_keys(child, full + "."))
    return keys


def _nearest(key: str, schema: DictConfig) -> str:
    valid = _all_keys(schema)
    leaf = key.split(".")[-1]
    hits = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not hits:
        by_leaf = {k.split(".")[-1]: k for k in valid}
        leaf_hits = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        hits = [by_leaf[h] for h in leaf_hits]
    return f"; nearest valid key: '{hits[0]}'" if hits else ""


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"{source}: unknown config key '{key}'{_nearest(key, base)}") from None
    except ValidationError as e:
        raise ConfigError(f"{source}: bad value for '{e.full_key}': {str(e.msg).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


REPLACE = "!"  # `!key=value`: the node at key becomes value (its schema default, then value) instead of a merge


def parse_overrides(overrides: List[str]) -> DictConfig:
    """`a.b=1` strings -> a config tree; values are parsed as YAML scalars/lists/flow mappings."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key.sub=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None


def _reset(cfg: DictConfig, key: str) -> None:
    """Put the node at `key` back to its schema default (a key inside a free-form dict: remove it)."""
    missing = object()
    if OmegaConf.select(cfg, key, default=missing) is missing:
        return  # a new key inside a free-form dict, or an unknown key: the merge says which
    default = OmegaConf.select(OmegaConf.structured(Config), key, default=missing)
    if default is not missing:
        OmegaConf.update(cfg, key, default, merge=False)
        return
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    del node[leaf]


def _replace(cfg: DictConfig, override: str, source: str) -> DictConfig:
    """`!key=value`: reset the node at key, then merge value into it."""
    body = override[len(REPLACE):]
    key = body.split("=", 1)[0]
    if "=" not in body or not key or key.startswith(REPLACE) or "[" in key or "" in key.split("."):
        raise ConfigError(f"override {override!r} is not of the form {REPLACE}key.sub=value: '{REPLACE}' goes "
                          f"before a dotted key, as in '{REPLACE}model.vision.kwargs={{depth: 2}}' (no [index]: "
                          "replace the whole list)")
    patch = parse_overrides([body])
    _reset(cfg, key)
    return _merge(cfg, patch, source)


def apply_overrides(cfg: DictConfig, overrides: List[str], source: str = "command line") -> DictConfig:
    """Apply `key=value` (merge into what is there) and `!key=value` (replace the node), left to right."""
    cfg = copy.deepcopy(cfg)  # replacements reset nodes in place
    run: List[str] = []  # consecutive plain overrides merge as one tree, as before `!` existed
    for override in overrides:
        if not override.startswith(REPLACE):
            run.append(override)
            continue
        if run:
            cfg, run = _merge(cfg, parse_overrides(run), source), []
        cfg = _replace(cfg, override, source)
    return _merge(cfg, parse_overrides(run), source) if run else cfg


def _check_values(cfg: DictConfig) -> None:
    for key, choices in [*_CHOICES.items(), ("model.type", families())]:
        val = OmegaConf.select(cfg, key)
        if val not in choices:
            raise ConfigError(f"bad value for '{key}': {val!r}; valid: {', '.join(map(str, choices))}")
    positive = ["train.steps", "train.micro_batch_size", "train.grad_accum", "data.tokenizer.context_length",
                "data.remote_timeout"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"bad value for '{key}': must be > 0, got {OmegaConf.select(cfg, key)}")
    non_negative = ["train.lr", "train.warmup_steps", "train.log_every", "train.save_every",
                    "train.grad_clip", "data.workers", "data.shuffle_buffer", "data.image_size",
                    "data.samples_per_epoch", "eval.every", "eval.rerank_k", "eval.max_samples"]
    for key in non_negative:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"bad value for '{key}': must be >= 0, got {OmegaConf.select(cfg, key)}")
    if cfg.train.log_every == 0:
        raise ConfigError("bad value for 'train.log_every': must be >= 1")
    if cfg.eval.batch_size <= 0:
        raise ConfigError(f"bad value for 'eval.batch_size': must be > 0, got {cfg.eval.batch_size}")
    if not 0 <= cfg.data.max_corrupt_fraction <= 1:
        raise ConfigError(f"bad value for 'data.max_corrupt_fraction': {cfg.data.max_corrupt_fraction}; want 0..1")
    t = cfg.train
    if cfg.eval.every and not cfg.data.eval_shards:
        raise ConfigError("eval.every > 0 needs data.eval_shards (the held-out shards for retrieval)")
    for key in ("keep_last", "dist_timeout_s", "peak_flops", "min_lr"):
        if t[key] < 0:
            raise ConfigError(f"bad value for 'train.{key}': must be >= 0, got {t[key]}")
    if t.dist_timeout_s == 0:
        raise ConfigError("bad value for 'train.dist_timeout_s': must be > 0 seconds")
    if t.min_lr > t.lr:
        raise ConfigError(f"bad value for 'train.min_lr': {t.min_lr} is above train.lr={t.lr}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"bad value for 'train.betas': {list(t.betas)}; want two values in [0, 1)")
    if t.warmup_steps > t.steps:  # a short smoke run of a real config: warm up over the whole run
        warnings.warn(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}: warming up over all "
                      f"{t.steps} steps instead", stacklevel=2)
        t.warmup_steps = t.steps
    scale = list(cfg.data.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"bad value for 'data.crop_scale': {scale}; want [lo, hi] with 0 < lo <= hi <= 1")
    ra = cfg.data.randaugment
    if ra.n < 0 or not 0 <= ra.m <= 10:
        raise ConfigError(f"bad value for 'data.randaugment': n={ra.n}, m={ra.m}; want n >= 0 (0: off) and 0 <= m <= 10")
    if len(cfg.data.mean) not in (0, 3) or len(cfg.data.std) not in (0, 3):
        raise ConfigError("bad value for 'data.mean'/'data.std': give 3 values each, or leave empty")
    _check_video(cfg)
    if cfg.data.decode == "device" and (cfg.data.randaugment.n or cfg.model.video.enabled):
        raise ConfigError("data.decode=device decodes still JPEGs with crop and flip only: it does not combine with "
                          + ("data.randaugment.n > 0" if cfg.data.randaugment.n else "model.video.enabled")
                          + " (use data.decode=loader)")
    resume = cfg.train.resume
    if resume not in ("auto", "none") and not os.path.exists(resume):
        raise ConfigError(f"bad value for 'train.resume': {resume!r} is neither 'auto', 'none' nor an existing path")
    for i, src in enumerate(cfg.data.sources):
        if src.kind not in ("shards", "hf"):
            raise ConfigError(f"bad value for 'data.sources[{i}].kind': {src.kind!r}; want shards or hf")
        if src.kind == "hf" and not src.path:
            raise ConfigError(f"'data.sources[{i}].path' is empty: kind hf needs a dataset name or local path")
        if src.kind == "hf" and src.shards:
            raise ConfigError(f"'data.sources[{i}]' is kind hf and also has shards: use one source per kind")
        if src.kind == "shards" and not src.shards:
            raise ConfigError(f"'data.sources[{i}].shards' is empty: give a shard spec")
        if src.weight <= 0:
            raise ConfigError(f"bad value for 'data.sources[{i}].weight': must be > 0, got {src.weight}")


def frames_at(curriculum: Any, frames: int, step: int) -> int:
    """Frames per clip at optimizer step `step`: the last curriculum entry whose step is <= `step`, else
    `frames` (data.video.frames)."""
    k = int(frames)
    for at, n in sorted((int(a), int(b)) for a, b in curriculum or []):
        if at <= step:
            k = n
    return k


def _check_video(cfg: DictConfig) -> None:
    v, m = cfg.data.video, cfg.model.video
    if v.frames < 1:
        raise ConfigError(f"bad value for 'data.video.frames': must be >= 1, got {v.frames}")
    for i, entry in enumerate(v.curriculum):
        if len(entry) != 2 or entry[0] < 0 or entry[1] < 1:
            raise ConfigError(f"bad value for 'data.video.curriculum[{i}]': {list(entry)}; want [step >= 0, frames >= 1], "
                              "e.g. [[0, 1], [500, 4]]")
    if v.min_seconds < 0:
        raise ConfigError(f"bad value for 'data.video.min_seconds': must be >= 0, got {v.min_seconds}")
    if not m.enabled:
        return
    if cfg.model.type not in ("clip", "align", "siglip"):
        raise ConfigError(f"model.video.enabled: video towers are built for the dual encoders (clip, align, siglip), "
                          f"not model.type={cfg.model.type!r}")
    if m.max_frames < 1:
        raise ConfigError(f"bad value for 'model.video.max_frames': must be >= 1, got {m.max_frames}")
    most = max([int(v.frames)] + [int(e[1]) for e in v.curriculum])
    if most > m.max_frames:
        raise ConfigError(f"data.video asks for {most} frames per clip but 'model.video.max_frames' is {m.max_frames}: "
                          f"raise model.video.max_frames to at least {most}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema defaults <- YAML file <- dotted overrides, validated; returns a read-only-typed DictConfig."""
    cfg = OmegaConf.structured(Config)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry the line number
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        if not isinstance(data, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train, ...)")
        cfg = _merge(cfg, data, path)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    _check_values(cfg)
    return cfg


def redact_url(url: str) -> str:
    """A URL fit to print or persist: userinfo (`user:token@`) and query string (signed-URL tokens)
    removed; anything that is not a URL with a host comes back unchanged."""
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    if not (u.scheme and u.netloc):
        return url
    host = (u.hostname or "") + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit((u.scheme, host, u.path, "", ""))


def _redact_value(value: Any) -> Any:
    """Config values as persisted: interpolations (`${oc.env:TOKEN}`) stay as written, unresolved; URLs
    (also inside '::'-joined shard specs) lose userinfo and query string."""
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, str) and "${" not in value and "://" in value:
        return "::".join(redact_url(part) for part in value.split("::"))
    return value


def persisted_dict(cfg: DictConfig) -> Dict[str, Any]:
    """The config as vlp writes it anywhere outside the process (run directory, checkpoints, Weights &
    Biases, eval JSON, exports): `${oc.env:...}` interpolations unresolved, so a secret passed through the
    environment never reaches a file, and credentials in URLs removed."""
    return _redact_value(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]


def persisted_yaml(cfg: DictConfig) -> str:
    """`persisted_dict` as YAML (interpolations written as `${...}`)."""
    return OmegaConf.to_yaml(OmegaConf.create(persisted_dict(cfg)))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(d: Dict[str, Any]) -> DictConfig:
    """Rebuild a validated config from a resolved dict (as stored in checkpoints and exports)."""
    cfg = _merge(OmegaConf.structured(Config), d, "stored config")
    _check_values(cfg)
    return cfg


def schema_doc() -> List[tuple]:
    """(key, type, default) for every leaf key: the README's reference table is generated from this."""
    rows = []

    def walk(node: DictConfig, prefix: str) -> None:
        for k in node.keys():
            child = node._get_node(k)
            full = f"{prefix}{k}"
            if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not dict:
                walk(child, full + ".")
            else:
                val = OmegaConf.to_container(child) if isinstance(child, (DictConfig, ListConfig)) else child._value()
                rows.append((full, getattr(child, "_metadata").ref_type, val))

    walk(OmegaConf.structured(Config), "")
    return rows


__all__ = ["Config", "ConfigError", "frames_at", "load_config", "apply_overrides", "from_dict", "to_dict", "to_yaml", "schema_doc", "ListConfig"]
