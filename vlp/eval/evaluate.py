"""Zero-shot image-text retrieval on an eval set, for the CLI and for the trainer's periodic eval.

`evaluate_retrieval` is independent of how the model was loaded: it takes a model-like, a tokenizer
returning (ids, mask) and an image `preprocess`. `run_retrieval_eval` is the in-training hook.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Optional

import numpy as np
import torch

from vlp.config import TokenizerConfig
from vlp.data.tokenizers import build_tokenizer
from vlp.data.transforms import eval_transform, resolve_image_cfg
from vlp.eval.data import CAPTION_KEY, EvalDataset, IMAGE_KEYS, VIDEO_KEYS, eval_loader, expected_samples, iter_records
from vlp.eval.encode import encode_local, gather_encoded, skip_counts
from vlp.eval.rerank import rerank
from vlp.eval.retrieval import DEFAULT_KS, metrics_from_ranks, retrieval_ranks
from vlp.models import build_model

REPORT_TOPK = 5


def _spread(n_total: int, n: int) -> list:
    return sorted(set(np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int).tolist())) if n else []


def _method_ranks(ranks: Dict[str, torch.Tensor], reranked: Optional[Dict[str, torch.Tensor]], side: str,
                  q: int) -> Dict[str, int]:
    """The query's rank of its true match under ITC and, for fusion models, after re-ranking."""
    out = {"ITC": int(ranks[f"{side}_ranks"][q])}
    if reranked is not None:
        out["ITM re-ranked"] = int(reranked[f"{side}_ranks"][q])
        out["ITM + ITC"] = int(reranked[f"{side}_ranks_itc"][q])
    return out


def _t2i_example(enc, ranks, reranked, t: int) -> dict:
    j = int(enc["txt2img"][t])
    cand = ranks["t2i_topk"][t, :REPORT_TOPK].tolist()
    return {"text": enc["texts"][t], "rank": int(ranks["t2i_ranks"][t]), "ranks": _method_ranks(ranks, reranked, "t2i", t),
            "image_key": enc["key"][j], "image_stream_index": enc["index"][j], "top_keys": [enc["key"][c] for c in cand],
            "top_stream_index": [enc["index"][c] for c in cand], "top_correct": [c == j for c in cand]}


def _i2t_example(enc, ranks, reranked, i: int) -> dict:
    cand = ranks["i2t_topk"][i, :REPORT_TOPK].tolist()
    own = (enc["txt2img"] == i).nonzero().flatten().tolist()
    return {"image_key": enc["key"][i], "image_stream_index": enc["index"][i], "rank": int(ranks["i2t_ranks"][i]),
            "ranks": _method_ranks(ranks, reranked, "i2t", i), "true_texts": [enc["texts"][t] for t in own[:3]],
            "top_texts": [enc["texts"][c] for c in cand], "top_correct": [int(enc["txt2img"][c]) == i for c in cand]}


def _examples(enc: Dict[str, Any], ranks: Dict[str, torch.Tensor], n: int,
              reranked: Optional[Dict[str, torch.Tensor]] = None, n_hardest: int = 2) -> Dict[str, list]:
    """What the report shows: a few text->image and image->text queries spread over the set, and the
    hardest failures (the queries whose true match ranked worst under ITC), each with its top-5
    ITC candidates and its rank under every method the model has."""
    t2i_worst = torch.argsort(ranks["t2i_ranks"], descending=True, stable=True)[:n_hardest].tolist() if n else []
    i2t_worst = torch.argsort(ranks["i2t_ranks"], descending=True, stable=True)[:n_hardest].tolist() if n else []
    return {"examples": [_t2i_example(enc, ranks, reranked, t) for t in _spread(len(enc["texts"]), n)],
            "examples_i2t": [_i2t_example(enc, ranks, reranked, i) for i in _spread(len(enc["index"]), n)],
            "hardest_t2i": [_t2i_example(enc, ranks, reranked, t) for t in t2i_worst if ranks["t2i_ranks"][t] > 1],
            "hardest_i2t": [_i2t_example(enc, ranks, reranked, i) for i in i2t_worst if ranks["i2t_ranks"][i] > 1]}


def _partitioned(model) -> list:
    """Parameters DeepSpeed ZeRO-3 has partitioned across ranks (empty locally)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")] if hasattr(model, "parameters") else []


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for the duration, then the previous train/eval mode."""
    if _partitioned(model):
        raise ValueError("the model's weights are partitioned by ZeRO-3; evaluate an unpartitioned copy "
                         "(run_retrieval_eval makes one from cfg.model)")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def unpartitioned_copy(model, model_cfg):
    """A full copy of a ZeRO-3 partitioned model, rebuilt from `model_cfg` (collective: all ranks call).

    Encoding under ZeRO-3's hooks would all-gather weights at every forward, and ranks with different
    numbers of eval batches would then wait on each other forever; a plain copy has no hooks.
    """
    import deepspeed

    params = _partitioned(model)
    copy = build_model(model_cfg, pretrained=False)  # the weights come from the engine, not from the hub
    keys = set(copy.state_dict())  # persistent entries only
    with deepspeed.zero.GatheredParameters(params):
        state = {n: p.detach().clone() for n, p in model.named_parameters() if n in keys}
    state.update({n: b.detach().clone() for n, b in model.named_buffers() if n in keys})
    copy.load_state_dict(state, strict=True)
    return copy.to(params[0].device)


def evaluate_retrieval(model, tokenizer, preprocess, data: str, *, images_dir: Optional[str] = None,
                       split: str = "test", batch_size: int = 64, workers: int = 0, rerank_k: int = 0,
                       max_samples: int = 0, image_key: str = IMAGE_KEYS, caption_key: str = CAPTION_KEY,
                       rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None,
                       progress: bool = True, n_examples: int = 4, ks=DEFAULT_KS,
                       what: str = "--data", frames: int = 0) -> Dict[str, Any]:
    """Image<->text retrieval metrics over `data` (shard spec or Karpathy JSON); every rank returns the
    same dict. `rerank_k > 0` needs `model.match_scores` and adds ITM re-ranked metrics (`reranked`: ITM
    alone; `reranked_itc`: ITM + ITC, see vlp.eval.rerank) and held-out ITM accuracy (`itm`). A video model
    (`image_cfg["frames"]`, or `frames`) reads a video record as its `frames` segment middles: text<->video
    retrieval (MSR-VTT's protocol: R@1/5/10 and median rank, every caption of a clip a query)."""
    if rerank_k and not hasattr(model, "match_scores"):
        raise ValueError(f"rerank_k={rerank_k} needs a fusion model with match_scores; "
                         f"{type(model).__name__} has none (use rerank_k=0)")
    device = device or torch.device("cpu")
    frames = frames or int(getattr(model, "image_cfg", {}).get("frames", 0))  # video models: K middles per clip
    ds = EvalDataset(data, preprocess, rank, world_size, images_dir=images_dir, split=split,
                     image_key=image_key, caption_key=caption_key, max_samples=max_samples, what=what,
                     frames=frames)
    with eval_mode(model):
        local = encode_local(model, tokenizer, eval_loader(ds, batch_size, workers), device, batch_size,
                             keep_pixels=rerank_k > 0, progress=progress and rank == 0, desc="retrieval",
                             total=expected_samples(data, split, max_samples, rank, world_size))
        enc = gather_encoded(local, world_size)
        skipped = skip_counts(enc["skipped"])
        if not enc["index"]:
            raise ValueError(f"no evaluable samples in {data!r}: {len(enc['skipped'])} read, all skipped {skipped}")
        ranks = retrieval_ranks(enc["img"], enc["txt"], enc["txt2img"], topk=max(rerank_k, REPORT_TOPK))
        result: Dict[str, Any] = {"metrics": metrics_from_ranks(ranks["i2t_ranks"], ranks["t2i_ranks"], ks)}
        rr = None
        if rerank_k:
            rr = rerank(model, tokenizer, {**ranks, "i2t_topk": ranks["i2t_topk"][:, :rerank_k],
                                           "t2i_topk": ranks["t2i_topk"][:, :rerank_k]},
                        enc["txt2img"], local["pixels"], enc["index"], enc["texts"], rank, world_size, device,
                        batch_size, enc["img"], enc["txt"])
            result["reranked"] = metrics_from_ranks(rr["i2t_ranks"], rr["t2i_ranks"], ks)
            result["reranked_itc"] = metrics_from_ranks(rr["i2t_ranks_itc"], rr["t2i_ranks_itc"], ks)
            result["rerank_k"] = rerank_k
            result["itm"] = rr["itm"]
    result.update({
        "n_images": len(enc["index"]), "n_texts": len(enc["texts"]), "unit": _unit(data, frames, images_dir, split),
        "n_samples_read": len(enc["index"]) + len(enc["skipped"]), "n_skipped": len(enc["skipped"]),
        "skipped": skipped, "skipped_examples": [{"key": k, "reason": r} for _, k, r in enc["skipped"][:20]],
    })
    result.update(_examples(enc, ranks, n_examples, rr))
    return result


def _unit(data: str, frames: int, images_dir: Optional[str], split: str) -> str:
    """What the set's items are, for reports: "clips" when a video model reads a video set, else "images"."""
    if not frames:
        return "images"
    first = next(iter(iter_records(data, images_dir, split)), {})
    return "clips" if any(k in first for k in VIDEO_KEYS.split(";")) else "images"


@functools.lru_cache(maxsize=4)
def _tokenizer(kind: str, name: str, context_length: int):
    from omegaconf import OmegaConf

    return build_tokenizer(OmegaConf.structured(TokenizerConfig(kind=kind, name=name, context_length=context_length)))


def run_retrieval_eval(model, cfg, rank: int = 0, world_size: int = 1) -> Dict[str, float]:
    """In-training hook: retrieval on `cfg.data.eval_shards` with the live model (`engine.module`).

    Collective: every rank must call it. A ZeRO-3 partitioned model is evaluated through a full copy
    (`unpartitioned_copy`), so ranks never wait on each other inside the encoders. Returns flat metrics (`i2t_r1`, ..., `mean_recall`, ranks,
    `reranked_*` for fusion models, `n_images`, `n_texts`, `n_skipped`), identical on every rank.
    """
    if not cfg.data.eval_shards:
        raise ValueError("eval.every > 0 needs data.eval_shards (a shard spec of the held-out set)")
    tok_cfg = cfg.data.tokenizer
    tokenizer = _tokenizer(tok_cfg.kind, tok_cfg.name, tok_cfg.context_length)
    image_cfg = resolve_image_cfg(model.image_cfg, cfg.data)
    device = next(model.parameters()).device
    if _partitioned(model):
        model = unpartitioned_copy(model, cfg.model)
    rerank_k = cfg.eval.rerank_k if hasattr(model, "match_scores") else 0
    res = evaluate_retrieval(model, tokenizer, eval_transform(image_cfg), cfg.data.eval_shards,
                             batch_size=cfg.eval.batch_size, workers=cfg.data.workers, rerank_k=rerank_k,
                             max_samples=cfg.eval.max_samples, image_key=cfg.data.image_key,
                             caption_key=cfg.data.caption_key, rank=rank, world_size=world_size, device=device,
                             progress=False, n_examples=0, what="data.eval_shards")
    flat = dict(res["metrics"])
    flat.update({f"reranked_{k}": v for k, v in res.get("reranked", {}).items()})
    flat.update({f"reranked_itc_{k}": v for k, v in res.get("reranked_itc", {}).items()})
    if "itm" in res:
        flat["itm_heldout_acc"] = res["itm"]["balanced_acc"]
    flat.update(n_images=res["n_images"], n_texts=res["n_texts"], n_skipped=res["n_skipped"])
    return flat
