"""README.md model card for an export: Hub metadata plus what was trained, on what, and how well.

Everything is read from the run: the resolved config, `vlp_state.json` (step, samples seen, world
size, each rank's data-loader counters), the last record of `metrics.jsonl`, and every results
JSON with `metrics` under `RUN/eval/` (what `vlp eval` writes there).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from vlp.data import hub
from vlp.data.shards import public_spec

LIBRARY = {"hf": "transformers", "open_clip": "open_clip", "vlp": "vlp"}
OBJECTIVES = {
    "clip": ("CLIP", "symmetric InfoNCE contrastive loss over in-batch negatives gathered across ranks, "
                     "learnable temperature (Radford et al. 2021)", "radford2021clip"),
    "align": ("ALIGN", "InfoNCE with both directions summed and label smoothing (Jia et al. 2021)", "jia2021align"),
    "siglip": ("SigLIP", "pairwise sigmoid loss with learnable temperature and bias (Zhai et al. 2023)",
               "zhai2023siglip"),
    "albef": ("ALBEF", "image-text contrastive, matching and masked-language-modelling losses with momentum "
                       "distillation (Li et al. 2021)", "li2021albef"),
}
BIBTEX = {
    "radford2021clip": """@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2021}
}""",
    "jia2021align": """@inproceedings{jia2021align,
  title={Scaling Up Visual and Vision-Language Representation Learning With Noisy Text Supervision},
  author={Jia, Chao and Yang, Yinfei and Xia, Ye and Chen, Yi-Ting and Parekh, Zarana and Pham, Hieu and Le, Quoc V. and Sung, Yunhsuan and Li, Zhen and Duerig, Tom},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2021}
}""",
    "zhai2023siglip": """@inproceedings{zhai2023siglip,
  title={Sigmoid Loss for Language Image Pre-Training},
  author={Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle={IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2023}
}""",
    "li2021albef": """@inproceedings{li2021albef,
  title={Align before Fuse: Vision and Language Representation Learning with Momentum Distillation},
  author={Li, Junnan and Selvaraju, Ramprasaath R. and Gotmare, Akhilesh Deepak and Joty, Shafiq and Xiong, Caiming and Hoi, Steven},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2021}
}""",
    "zhai2022lit": """@inproceedings{zhai2022lit,
  title={LiT: Zero-Shot Transfer with Locked-image text Tuning},
  author={Zhai, Xiaohua and Wang, Xiao and Mustafa, Basil and Steiner, Andreas and Keysers, Daniel and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2022}
}""",
}


def _params(m: Optional[nn.Module]) -> int:
    return sum(p.numel() for p in m.parameters()) if isinstance(m, nn.Module) else 0


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def data_counts(state: Dict[str, Any]) -> Dict[str, int]:
    """Samples drawn per data source, summed over ranks (from the loaders' mix counters)."""
    totals: Dict[str, int] = {}
    for rank_state in state.get("loader") or []:
        if not isinstance(rank_state, dict):
            continue
        names = [s[0] for s in (rank_state.get("layout") or {}).get("sources", [])]
        counts = (rank_state.get("stats") or {}).get("mix_counts") or []
        for i, n in enumerate(counts):
            name = names[i] if i < len(names) and names[i] else f"source {i}"
            totals[name] = totals.get(name, 0) + int(n)
    return totals


def last_metrics(run_dir: Optional[str], step: int) -> Dict[str, Any]:
    """The last metrics.jsonl record at or before the exported step."""
    path = os.path.join(run_dir or "", "metrics.jsonl")
    last: Dict[str, Any] = {}
    if run_dir and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("step", 0) <= step:
                    last = rec
    return last


def eval_results(run_dir: Optional[str]) -> List[Dict[str, Any]]:
    """Every JSON under RUN/eval/ that holds a `metrics` mapping."""
    found = []
    for path in sorted(glob.glob(os.path.join(run_dir or "", "eval", "**", "*.json"), recursive=True)):
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(res, dict) and isinstance(res.get("metrics"), dict):
            found.append({"file": os.path.relpath(path, run_dir), **res})
    return found


# model-index (Hub metadata) for each results JSON: the task by `task`, else by its metrics
_TASKS = {"retrieval": ("image-text-retrieval", "Zero-shot image-text retrieval"),
          "zeroshot": ("zero-shot-image-classification", "Zero-shot image classification")}
_METRICS = {
    "retrieval": {"i2t_r1": "image-to-text R@1", "i2t_r5": "image-to-text R@5", "i2t_r10": "image-to-text R@10",
                  "t2i_r1": "text-to-image R@1", "t2i_r5": "text-to-image R@5", "t2i_r10": "text-to-image R@10",
                  "mean_recall": "mean recall"},
    "zeroshot": {"top1": "top-1 accuracy", "top2": "top-2 accuracy", "top3": "top-3 accuracy",
                 "top4": "top-4 accuracy", "top5": "top-5 accuracy",
                 "mean_per_class_accuracy": "mean per-class accuracy"},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _task(res: Dict[str, Any]) -> Optional[str]:
    task = res.get("task")
    if task in _TASKS:
        return task
    metrics = res.get("metrics") or {}
    return "retrieval" if "i2t_r1" in metrics else "zeroshot" if "top1" in metrics else None


def _dataset(res: Dict[str, Any]) -> Tuple[str, str, Optional[str], Optional[str]]:
    """(dataset id, pretty name, split, revision) of a result's data: an hf://datasets spec gives its repo
    id and revision; anything else its spec made public (`public_spec`), or the result file's name."""
    data = res.get("data", "")
    spec = str((data.get("spec") if isinstance(data, dict) else data) or "")
    split = data.get("split") if isinstance(data, dict) else None
    name = public_spec(spec) if spec else os.path.splitext(os.path.basename(res.get("file", "eval")))[0]
    first = spec.split("::")[0]
    if hub.is_hub(first):
        try:
            ref = hub.parse(first, "eval data")
        except Exception:  # a spec vlp would refuse: keep its public text
            return name, name, split, None
        if ref.repo_type == "dataset":
            return ref.repo_id, name, split, ref.revision
    return name, name, split, None


def model_index(results: List[Dict[str, Any]]) -> List[Any]:
    """`huggingface_hub.EvalResult`s for the Hub's model-index: one per metric of each retrieval or
    zero-shot result (ITM re-ranked recalls as `*_itm_reranked`), values as stored (fractions)."""
    from huggingface_hub import EvalResult

    out = []
    for res in results:
        task = _task(res)
        if task is None:
            continue
        task_type, task_name = _TASKS[task]
        dtype, dname, split, revision = _dataset(res)
        series = [("", "", res.get("metrics") or {})]
        if task == "retrieval" and isinstance(res.get("reranked"), dict):
            series.append(("_itm_reranked", f" (ITM re-ranked, top {res.get('rerank_k', '?')})", res["reranked"]))
        for suffix, note, metrics in series:
            for key, label in _METRICS[task].items():
                value = metrics.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.append(EvalResult(task_type=task_type, task_name=task_name, dataset_type=dtype,
                                          dataset_name=dname, dataset_split=split, dataset_revision=revision,
                                          metric_type=key + suffix, metric_name=label + note,
                                          metric_value=float(value)))
    return out


def _hub_id(value: str) -> Optional[str]:
    """`value` as a Hub repo id (ORG/NAME, or `hf-hub:ORG/NAME`), or None for a local path or anything else."""
    value = str(value or "").strip()
    if value.startswith("hf-hub:"):
        value = value[len("hf-hub:"):]
    value = value.strip("/")
    if not _HUB_ID.match(value) or os.path.exists(value):
        return None
    return value


def _cached_repo(path: str) -> Optional[str]:
    """ORG/NAME of a Hugging Face cache snapshot directory (`.../models--ORG--NAME/snapshots/REV`)."""
    m = re.search(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$", os.path.abspath(path).replace(os.sep, "/"))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def base_models(cfg: Any) -> List[str]:
    """Hub ids of the pretrained weights the towers started from (`model.*.pretrained`: a transformers
    repo, timm's weights for the name, an open_clip tag's Hub repo, `hf-hub:` names) and of
    `model.init_from` when it is a Hub download (a cache snapshot). Local files and directories are
    never named."""
    found: List[str] = []
    for side in ("vision", "text"):
        t = cfg.model[side]
        name, pre = str(t.name or ""), str(t.pretrained or "")
        repo = None
        if t.kind == "hf":
            repo = _hub_id(pre) if pre else None
        elif t.kind == "timm" and pre:
            if pre.lower() in ("default", "true"):
                import timm.models

                pcfg = timm.models.get_pretrained_cfg(name) if name else None
                repo = _hub_id(getattr(pcfg, "hf_hub_id", None) or "")
            elif pre.startswith("hf-hub:"):
                repo = _hub_id(pre)
        elif t.kind == "open_clip":
            if name.startswith("hf-hub:"):
                repo = _hub_id(name)
            elif name and pre and not os.path.exists(pre):
                import open_clip

                repo = _hub_id((open_clip.get_pretrained_cfg(name, pre) or {}).get("hf_hub") or "")
        if repo and repo not in found:
            found.append(repo)
    init = str(cfg.model.init_from or "")
    repo = _cached_repo(init) if init else None
    if repo and repo not in found:
        found.append(repo)
    return found


def _tower_line(t: Any, module: Optional[nn.Module]) -> str:
    kw = ", ".join(f"{k}={v}" for k, v in (dict(t.kwargs) if t.kwargs else {}).items())
    name = t.name or "(built from kwargs)"
    extra = f" ({kw})" if kw else ""
    locked = ", locked (LiT)" if t.locked else ""
    return f"{t.kind} `{name}`{extra}{locked}: {_fmt_count(_params(module))} parameters"


def _usage(fmt: str, repo: str, on_hub: bool, siglip: bool = False) -> str:
    if fmt == "hf":
        # SigLIP reads every position, padding included (as trained): padded to max_length, no attention mask
        text_call = ('tokenizer(["a photo of a cat"], padding="max_length", return_tensors="pt")\n'
                     'text = {"input_ids": text["input_ids"]}') if siglip else \
            'tokenizer(["a photo of a cat"], padding=True, return_tensors="pt")'

        return f"""```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer, AutoImageProcessor

model = AutoModel.from_pretrained("{repo}").eval()
tokenizer = AutoTokenizer.from_pretrained("{repo}")
image_processor = AutoImageProcessor.from_pretrained("{repo}")
text = {text_call}
pixels = image_processor(images=Image.open("cat.jpg"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    image_emb = model.get_image_features(pixel_values=pixels).pooler_output
    text_emb = model.get_text_features(**text).pooler_output
```"""
    if fmt == "open_clip":
        ref = f"hf-hub:{repo}" if on_hub else f"local-dir:{repo}"
        return f"""```python
import open_clip, torch
from PIL import Image

model, _, preprocess = open_clip.create_model_and_transforms("{ref}")
tokenizer = open_clip.get_tokenizer("{ref}")
with torch.no_grad():
    image_emb = model.encode_image(preprocess(Image.open("cat.jpg")).unsqueeze(0), normalize=True)
    text_emb = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)
```"""
    return f"""```python
import vlp

model = vlp.load_pretrained("{repo}")           # eval mode, CPU; .tokenizer, .image_cfg attached
ids, mask = model.tokenizer(["a photo of a cat"])
text_emb = model.encode_text(ids, mask)          # L2-normalised
```"""


def card_figures(ckpt: Any, out_dir: str) -> Dict[str, Any]:
    """Draw the model card's pictures into `out_dir/images/`: the training curves up to the exported step
    (from the run's metrics.jsonl and the checkpoint evals saved in it) and one recall-bars figure per
    retrieval result under RUN/eval/. Returns {"curves": relpath or None, "recall": {result file: relpath}}.
    A run directory without metrics gives no curves; a drawing failure leaves that figure out."""
    from vlp.plots import draw_curves, draw_recall, read_evals, read_metrics

    figures: Dict[str, Any] = {"curves": None, "recall": {}}
    if not ckpt.run_dir:
        return figures
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    try:
        records = [r for r in read_metrics(ckpt.run_dir) if r["step"] <= ckpt.step]
    except FileNotFoundError:
        records = []
    if records:
        evals = [(s, r) for s, r in read_evals(ckpt.run_dir) if s <= ckpt.step]
        draw_curves([(os.path.basename(os.path.normpath(ckpt.run_dir)), records)],
                    os.path.join(out_dir, "images", "training_curves.png"), evals=[evals],
                    title=f"training curves up to the exported step {ckpt.step}")
        figures["curves"] = "images/training_curves.png"
    for i, res in enumerate(r for r in eval_results(ckpt.run_dir) if "i2t_r1" in r["metrics"]):
        name = f"images/recall_{i}.png"
        data = res.get("data", "")
        data = public_spec(data.get("spec", "") if isinstance(data, dict) else data)
        draw_recall(res, os.path.join(out_dir, name), title=f"{res['file']}" + (f" on {data}" if data else ""))
        figures["recall"][res["file"]] = name
    return figures


def model_card(model: nn.Module, cfg: Any, fmt: str, ckpt: Any, image_cfg: Dict[str, Any], info: Dict[str, Any],
               license: str, repo: str, on_hub: bool = False, figures: Optional[Dict[str, Any]] = None) -> str:
    """The README.md text (YAML front matter + markdown); `repo` is the Hub id (`on_hub`) or the directory
    the usage snippet loads from; `figures` (from `card_figures`) are embedded by relative path, so the
    Hub page shows them."""
    from huggingface_hub import ModelCardData

    m, t = cfg.model, cfg.train
    state = ckpt.state
    obj_name, obj_text, obj_key = OBJECTIVES.get(m.type, (m.type, m.type, None))
    cites = [obj_key] if obj_key else []
    if m.vision.locked or m.text.locked:
        cites.append("zhai2022lit")
    dual = hasattr(model, "encode_image") and hasattr(model, "encode_text")
    sources = [s.name for s in cfg.data.sources if s.name] if len(cfg.data.sources) else []
    results = eval_results(ckpt.run_dir)
    index = model_index(results)
    bases = base_models(cfg)
    meta = ModelCardData(
        license=license, library_name=LIBRARY[fmt],
        tags=["vlp", "vision-language", "image-text-retrieval", m.type] + (["clip"] if m.type != "clip" else []),
        pipeline_tag="zero-shot-image-classification" if dual else "feature-extraction",
        datasets=[s for s in sources if "/" in s] or None,
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        model_name=(repo if on_hub else os.path.basename(os.path.normpath(repo))) if index else None,
        eval_results=index or None,
    )
    world = int(state.get("world_size", 1) or 1)
    samples = int(state.get("samples_seen", 0) or 0)
    global_batch = int(t.micro_batch_size) * int(t.grad_accum) * world
    heads = _params(getattr(model, "image_proj", None)) + _params(getattr(model, "text_proj", None))
    lines = [
        f"---\n{meta.to_yaml()}\n---",
        f"# {obj_name} model trained with vlp",
        "",
        f"A {obj_name}-style image-text model ({'dual encoder' if dual else m.type}) trained with "
        f"vlp for {ckpt.step:,} optimizer steps on {samples:,} image-text samples, "
        f"exported in the **{fmt}** layout ({info.get('architecture', '')}).",
        "",
        "## Architecture",
        "",
        f"- Vision tower: {_tower_line(m.vision, getattr(model, 'vision', None))}",
        f"- Text tower: {_tower_line(m.text, getattr(model, 'text', None))}",
        f"- Joint embedding dimension: {m.embed_dim}; projection heads: {_fmt_count(heads)} parameters",
        f"- Total parameters: {_fmt_count(_params(model))}",
        f"- Image preprocessing (eval): resize shorter side to {image_cfg['size']} px ({image_cfg['interpolation']}), "
        f"center crop {image_cfg['size']}, mean {list(image_cfg['mean'])}, std {list(image_cfg['std'])}",
        f"- Tokenizer: {cfg.data.tokenizer.kind} `{cfg.data.tokenizer.name or 'default'}`, "
        f"{cfg.data.tokenizer.context_length} tokens",
        *[f"- {note}" for note in info.get("notes", [])],
        "",
        "## Objective",
        "",
        f"{obj_text}. " + (f"Initial temperature {m.init_temperature}, logit scale clamped at {m.max_logit_scale}."
                           if m.type in ("clip", "align") else
                           f"Initial logit scale {m.siglip_init_logit_scale}, bias {m.siglip_init_bias}."
                           if m.type == "siglip" else ""),
        "",
        "## Training data",
        "",
    ]
    if len(cfg.data.sources):
        for i, s in enumerate(cfg.data.sources):
            lines.append(f"- {s.name or f'source {i}'}: `{public_spec(s.shards)}` (weight {s.weight})")
    elif cfg.data.train_shards:
        lines.append(f"- `{public_spec(cfg.data.train_shards)}`")
    counts = data_counts(state)
    if counts and (len(counts) > 1 or len(cfg.data.sources)):
        lines += ["", "Samples drawn per source: " + ", ".join(f"{k}: {v:,}" for k, v in counts.items())]
    lines += [
        f"- Samples seen: {samples:,} ({'resampled with replacement' if cfg.data.resampled else 'epoch mode'})",
        "",
        "## Training procedure",
        "",
        "| setting | value |",
        "|---|---|",
        f"| optimizer steps | {ckpt.step:,} of {int(t.steps):,} planned |",
        f"| samples seen | {samples:,} |",
        f"| world size (ranks) | {world} |",
        f"| global batch | {global_batch:,} (micro-batch {t.micro_batch_size} x accumulation {t.grad_accum} "
        f"x {world} ranks) |",
        f"| precision | {t.precision}" + (" (bf16 on GPUs that support it, else fp32)" if t.precision == "auto" else "")
        + " |",
        f"| ZeRO stage | {t.zero_stage} |",
        f"| learning rate | {t.lr} (warm-up {t.warmup_steps} steps, cosine to {t.min_lr}) |",
        f"| weight decay | {t.weight_decay}; betas {list(t.betas)} |",
        f"| seed | {t.seed} |",
    ]
    last = last_metrics(ckpt.run_dir, ckpt.step)
    if last:
        keys = [k for k in ("loss", "logit_scale", "logit_bias", "samples_per_s", "mfu") if k in last]
        lines.append(f"| last logged (step {last.get('step')}) | "
                     + ", ".join(f"{k}={last[k]:.4g}" for k in keys) + " |")
    figures = figures or {}
    if figures.get("curves"):
        lines += ["", f"![training curves: losses, learning rate, throughput, held-out retrieval]({figures['curves']})"]
    lines += ["", "## Evaluation", ""]
    if results:
        for res in results:
            metr = {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}
            data = res.get("data", "")
            data = public_spec(data.get("spec", "") if isinstance(data, dict) else data)
            n = res.get("n_images")
            lines.append(f"**{res['file']}**" + (f" on `{data}`" if data else "") + (f" ({n} images)" if n else ""))
            if res["file"] in (figures.get("recall") or {}):
                lines += ["", f"![recall@K, {res['file']}]({figures['recall'][res['file']]})"]
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in metr.items()]
            lines.append("")
    else:
        lines.append("No evaluation results were found in the run directory (`RUN/eval/*.json`).")
        lines.append("")
    lines += [
        "## Usage",
        "",
        _usage(fmt, repo, on_hub, siglip=m.type == "siglip"),
        "",
        "## Intended use and limitations",
        "",
        "Research on image-text representation learning: zero-shot retrieval and classification, and as an "
        "initialisation for fine-tuning. The model reflects its training data: its scope, captions, biases and "
        "any personal information in it. It has not been evaluated for fairness or safety, and should not be used "
        "for decisions about people or for surveillance. Performance outside the training distribution is "
        "unknown" + (" and, at this training budget, low" if samples < 1_000_000 else "") + ".",
        "",
        "## Citation",
        "",
        "```bibtex",
        "\n\n".join(BIBTEX[k] for k in cites),
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["model_card", "card_figures", "eval_results", "model_index", "base_models", "data_counts", "last_metrics"]
