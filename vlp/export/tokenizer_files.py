"""Tokenizer files for each export layout, built from the run's `data.tokenizer` config.

- transformers (`--format hf`): open_clip's CLIP BPE (the vocabulary open_clip bundles) becomes a
  `CLIPTokenizer` (vocab + merges in tokenizer.json); HF tokenizers are saved as they are. Padding uses
  `<|endoftext|>` like OpenAI's CLIP repos (open_clip pads with 0; the mask and the first-EOT pooling
  make both equivalent).
- open_clip (`--format open_clip`): the bundled BPE needs no files; HF-backed tokenizers are saved into
  the export and named by `text_cfg.hf_tokenizer_name` (open_clip then loads them from the directory).
- vlp (`--format vlp`): transformers and SentencePiece tokenizers are copied into `tokenizer/`.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Optional

from vlp.export.transformer_ir import Unsupported

SAMPLE_CAPTIONS = ["a photo of a cat.", "Two red cubes left of a blue sphere", "it's 3 dogs' toys, 2024!"]


def open_clip_inner(tok_cfg: Any):
    """(open_clip tokenizer object, its wrapped transformers tokenizer or None) for an open_clip-kind config."""
    import open_clip

    tok = open_clip.get_tokenizer(tok_cfg.name or "ViT-B-32", context_length=int(tok_cfg.context_length))
    return tok, getattr(tok, "tokenizer", None)


def clip_bpe_tokenizer(simple_tokenizer: Any, context_length: int):
    """transformers `CLIPTokenizer` with exactly the vocabulary and merges of open_clip's SimpleTokenizer."""
    from transformers import CLIPTokenizer

    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): int(v) for k, v in simple_tokenizer.encoder.items()}
    if len(getattr(simple_tokenizer, "all_special_ids", [])) > 2:
        raise Unsupported("open_clip tokenizer has additional special tokens; transformers' CLIPTokenizer has two")
    merges = [m for m, _ in sorted(simple_tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=int(context_length))


def hf_tokenizer(tok_cfg: Any):
    """A transformers tokenizer equivalent to the run's tokenizer, or Unsupported."""
    if tok_cfg.kind == "hf":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_cfg.name)
        if tok.pad_token_id is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token  # as vlp.data.tokenizers does
        tok.model_max_length = int(tok_cfg.context_length)
        return tok
    if tok_cfg.kind == "open_clip":
        outer, inner = open_clip_inner(tok_cfg)
        if inner is not None:
            inner.model_max_length = int(tok_cfg.context_length)
            return inner
        if hasattr(outer, "bpe_ranks"):
            return clip_bpe_tokenizer(outer, int(tok_cfg.context_length))
        raise Unsupported(f"open_clip tokenizer {type(outer).__name__} has no transformers equivalent")
    raise Unsupported(f"data.tokenizer.kind={tok_cfg.kind} (a SentencePiece model with vlp's bos/eos/pad rules) "
                      "has no transformers tokenizer equivalent")


def check_same_ids(ours, theirs, what: str, texts: Optional[List[str]] = None) -> None:
    """Raise when the exported tokenizer gives other ids than training's on the real (masked) positions."""
    texts = texts or SAMPLE_CAPTIONS
    ids_a, mask_a = ours
    ids_b, mask_b = theirs
    if ids_a.shape != ids_b.shape or not bool((mask_a == mask_b).all()) or not bool(
            ((ids_a == ids_b) | (mask_a == 0)).all()):
        raise RuntimeError(f"{what}: the exported tokenizer does not reproduce the training tokenizer's ids on "
                           f"{texts!r}:\n ours   {ids_a[:, :12].tolist()}\n theirs {ids_b[:, :12].tolist()}")


def write_open_clip_tokenizer(tok_cfg: Any, out_dir: str, hub_repo: Optional[str] = None) -> Dict[str, Any]:
    """Files for open_clip's loader; returns the text_cfg entries that select this tokenizer.

    `local-dir:` loads a transformers tokenizer from the directory whatever `hf_tokenizer_name` says;
    `hf-hub:` loads it from `hf_tokenizer_name`, so a pushed export names its own repo there."""
    if tok_cfg.kind == "open_clip":
        outer, inner = open_clip_inner(tok_cfg)
        if inner is None:
            if not hasattr(outer, "bpe_ranks"):
                raise Unsupported(f"open_clip tokenizer {type(outer).__name__} cannot be saved for local-dir loading")
            return {}  # the bundled CLIP BPE: open_clip's default tokenizer
        inner.save_pretrained(out_dir)
        import open_clip

        text_cfg = (open_clip.get_model_config(tok_cfg.name) or {}).get("text_cfg", {})
        entries = {"hf_tokenizer_name": hub_repo or text_cfg.get("hf_tokenizer_name") or tok_cfg.name}
        for key in ("tokenizer_kwargs", "tokenizer_mode"):
            if text_cfg.get(key):
                entries[key] = text_cfg[key]
        return entries
    if tok_cfg.kind == "hf":
        hf_tokenizer(tok_cfg).save_pretrained(out_dir)
        return {"hf_tokenizer_name": hub_repo or tok_cfg.name}
    raise Unsupported("data.tokenizer.kind=sentencepiece: open_clip loads only its BPE or transformers tokenizers")


def copy_for_vlp(tok_cfg: Any, out_dir: str, sub: str = "tokenizer") -> Optional[str]:
    """Copy a local tokenizer into `out_dir/sub`; returns the new `data.tokenizer.name` (relative) or None
    when the name needs no files (an open_clip model name)."""
    dest = os.path.join(out_dir, sub)
    if tok_cfg.kind == "sentencepiece":
        src = tok_cfg.name
        if os.path.isdir(src):
            shutil.copytree(src, dest)
            return sub
        os.makedirs(dest)
        shutil.copy2(src, os.path.join(dest, os.path.basename(src)))
        return f"{sub}/{os.path.basename(src)}"
    if tok_cfg.kind == "hf":
        hf_tokenizer(tok_cfg).save_pretrained(dest)
        return sub
    return None


__all__ = ["hf_tokenizer", "clip_bpe_tokenizer", "check_same_ids", "write_open_clip_tokenizer", "copy_for_vlp",
           "open_clip_inner", "SAMPLE_CAPTIONS"]
