"""`vlp data bert-vocab`: a word-level BERT tokenizer for the captions of a set of shards, offline.

Models with a masked-language-modelling objective (ALBEF) need a BERT-style tokenizer with [CLS],
[SEP], [PAD] and [MASK]. For small closed vocabularies (the synthetic set, a domain corpus) a
whole-word vocabulary from the captions is enough and needs no download: every word seen (BERT's
lower-casing and punctuation splitting) becomes one token. The directory also holds a base BERT
`config.json` whose vocab_size matches, so `model.text.name` can point at it (sizes come from
`model.text.kwargs`). Special ids are fixed: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
"""
from __future__ import annotations

import collections
import os
import shutil
from typing import Dict

from data_pipelines.shardspec import InputError, expand_shards
from data_pipelines.tokenizer import iter_captions

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKEN_IDS = {"pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4}


def write_bert_vocab(spec: str, out: str, min_count: int = 1, max_size: int = 0, caption_key: str = "txt",
                     max_captions: int = 0, overwrite: bool = False) -> Dict:
    """Count the caption words of SHARDS and save a BertTokenizer + base BertConfig to OUT (each file
    written beside it, then renamed into place; with `overwrite`, only the files this writes are
    replaced, anything else in OUT stays).

    Words seen fewer than `min_count` times are left out ([UNK]); `max_size` > 0 keeps the most frequent
    words so that the vocabulary, specials included, has at most that many entries.
    """
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertConfig, BertTokenizer

    if min_count < 1:
        raise InputError(f"--min-count must be >= 1, got {min_count}")
    if max_size and max_size <= len(SPECIALS):
        raise InputError(f"--max-size must exceed the {len(SPECIALS)} special tokens, got {max_size}")
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out!r} is not empty; pass --overwrite to replace it")
    paths = expand_shards(spec)
    norm, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: collections.Counter = collections.Counter()
    captions = 0
    for caption in iter_captions(paths, caption_key, max_captions):
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(caption)))
        captions += 1
    if not captions:
        raise InputError(f"no captions found under key {caption_key!r} in {len(paths)} shard(s)")
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                   key=lambda w: (-counts[w], w))
    if max_size:
        words = words[:max_size - len(SPECIALS)]
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + words)}
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(tmp)
    BertConfig(vocab_size=len(vocab), pad_token_id=TOKEN_IDS["pad_token_id"]).save_pretrained(tmp)
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
    covered = sum(counts[w] for w in words)
    return {"vocab_size": len(vocab), **TOKEN_IDS, "captions": captions, "distinct_words": len(counts),
            "word_coverage": covered / max(1, sum(counts.values())), "out": out}


__all__ = ["write_bert_vocab", "SPECIALS", "TOKEN_IDS"]
