"""Caption tokenizers behind one interface: `tok(list[str]) -> (ids, mask)`, LongTensors (B, L).

Kinds (`data.tokenizer.kind`): `open_clip` (open_clip's tokenizer for a model name, by default
ViT-B-32's bundled BPE, offline), `hf` (a transformers fast tokenizer from a hub name or local
dir), `sentencepiece` (a model trained by `vlp data tokenizer`: a dir with `spm.model` and
`vlp_tokenizer.json`, or a `.model` file). Every call tokenises a whole batch at once; sequences
are truncated and padded to `context_length`, and `mask` is 1 on real tokens.
"""
from __future__ import annotations

import difflib
import json
import os
from typing import List, Optional, Tuple

import torch

from vlp.config import ConfigError

Encoded = Tuple[torch.Tensor, torch.Tensor]


class OpenClipTokenizer:
    """open_clip's tokenizer; pads with 0 (or the HF pad id for HF-backed open_clip models).
    `context_length` None: the model's own (an open_clip export read back as `local-dir:DIR`)."""

    def __init__(self, name: str, context_length: Optional[int]):
        import open_clip

        self.name = name or "ViT-B-32"
        if ":" not in self.name and self.name not in open_clip.list_models():
            near = difflib.get_close_matches(self.name, open_clip.list_models(), n=1)
            raise ConfigError(f"data.tokenizer.name={self.name!r} is not an open_clip model name"
                              + (f"; nearest: {near[0]!r}" if near else "")
                              + " (or use 'hf-hub:ORG/NAME' / 'local-dir:DIR')")
        try:
            self._tok = open_clip.get_tokenizer(self.name, context_length=context_length)
        except Exception as e:
            raise ConfigError(f"data.tokenizer.name={self.name!r}: open_clip cannot build its tokenizer "
                              f"({e}); use an open_clip model name such as 'ViT-B-32'") from None
        self.context_length = int(context_length or getattr(self._tok, "context_length", 77))
        inner = getattr(self._tok, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
        self.pad_id = int(getattr(inner, "pad_token_id", None) or 0)
        self.vocab_size = int(getattr(self._tok, "vocab_size", 0) or len(inner))

    def __call__(self, texts: List[str]) -> Encoded:
        ids = self._tok(list(texts), context_length=self.context_length).long()
        return ids, (ids != self.pad_id).long()


class HFTokenizer:
    """A transformers fast tokenizer, padded to `context_length` with truncation."""

    def __init__(self, name: str, context_length: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork
        from transformers import AutoTokenizer

        if not name:
            raise ConfigError("data.tokenizer.kind=hf needs data.tokenizer.name: a hub name or a local "
                              "directory saved with save_pretrained")
        try:
            self._tok = AutoTokenizer.from_pretrained(name, use_fast=True)
        except Exception as e:
            raise ConfigError(f"data.tokenizer.name={name!r}: cannot load a transformers tokenizer ({e})") from None
        if self._tok.pad_token_id is None:  # GPT-style vocabularies: pad with EOS, masked out anyway
            if self._tok.eos_token is None:
                raise ConfigError(f"data.tokenizer.name={name!r}: tokenizer has neither a pad nor an eos token")
            self._tok.pad_token = self._tok.eos_token
        self.name, self.context_length = name, context_length
        self.pad_id = int(self._tok.pad_token_id)
        self.vocab_size = len(self._tok)
        self.model_max_length = int(self._tok.model_max_length or 0)

    def __call__(self, texts: List[str]) -> Encoded:
        enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")
        ids = enc["input_ids"].long()
        # SigLIP's tokenizers (Google's and vlp's SiglipModel exports) return no mask: the model reads every
        # position, padding included, so the mask is all ones
        mask = enc["attention_mask"].long() if "attention_mask" in enc else torch.ones_like(ids)
        return ids, mask


class SentencePieceTokenizer:
    """A SentencePiece model: `bos + pieces + eos`, truncated (eos kept) and padded with `pad_id`."""

    def __init__(self, path: str, context_length: int):
        import sentencepiece as spm

        meta = {}
        model = path
        if os.path.isdir(path):
            meta_path = os.path.join(path, "vlp_tokenizer.json")
            if os.path.isfile(meta_path):
                with open(meta_path) as f:
                    meta = json.load(f)
            model = os.path.join(path, meta.get("model", "spm.model"))
        if not os.path.isfile(model):
            raise ConfigError(f"data.tokenizer.name={path!r}: no SentencePiece model there; give a directory "
                              "written by `vlp data tokenizer` (spm.model + vlp_tokenizer.json) or a .model file")
        self._sp = spm.SentencePieceProcessor(model_file=model)
        self.name, self.context_length = path, context_length
        self.vocab_size = int(self._sp.get_piece_size())

        self.bos_id = int(meta.get("bos_id", self._sp.bos_id()))
        self.eos_id = int(meta.get("eos_id", self._sp.eos_id()))
        pad = int(meta.get("pad_id", self._sp.pad_id()))
        self.pad_id = pad if pad >= 0 else 0  # no pad piece: pad with 0, masked out
        if context_length < 1 + (self.bos_id >= 0) + (self.eos_id >= 0):
            raise ConfigError(f"data.tokenizer.context_length={context_length} is too short for bos/eos")

    def __call__(self, texts: List[str]) -> Encoded:
        pieces = self._sp.encode(list(texts), out_type=int)
        L = self.context_length
        head = [self.bos_id] if self.bos_id >= 0 else []
        tail = [self.eos_id] if self.eos_id >= 0 else []
        ids = torch.full((len(pieces), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pieces), L), dtype=torch.long)
        for i, p in enumerate(pieces):
            seq = head + p[:L - len(head) - len(tail)] + tail
            ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, :len(seq)] = 1
        return ids, mask


_KINDS = {"open_clip": OpenClipTokenizer, "hf": HFTokenizer, "sentencepiece": SentencePieceTokenizer}


def build_tokenizer(tok_cfg):
    """Tokenizer for `data.tokenizer` (kind, name, context_length)."""
    kind = tok_cfg.kind
    if kind not in _KINDS:
        raise ConfigError(f"bad value for 'data.tokenizer.kind': {kind!r}; valid: {', '.join(_KINDS)}")
    if tok_cfg.context_length <= 0:
        raise ConfigError(f"bad value for 'data.tokenizer.context_length': must be > 0, got {tok_cfg.context_length}")
    return _KINDS[kind](tok_cfg.name, int(tok_cfg.context_length))
