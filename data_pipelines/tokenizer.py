"""`vlp data tokenizer`: train a SentencePiece model on the captions of a set of shards.

Writes `DIR/spm.model` and `DIR/vlp_tokenizer.json` (kind, vocab size, special ids) that
`vlp.data.tokenizers` reads. Special ids are fixed: pad=0, unk=1, bos=2, eos=3, so a padded batch
is zeros whatever the vocabulary.
"""
from __future__ import annotations

import io
import os
from typing import Dict, Iterator

from data_pipelines.shardspec import InputError, expand_shards, iter_samples
from data_pipelines.shards import write_json_atomic

SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
MODEL_TYPES = ("unigram", "bpe")
MODEL_FILE = "spm.model"
META_FILE = "vlp_tokenizer.json"


def iter_captions(paths, caption_key: str = "txt", limit: int = 0) -> Iterator[str]:
    """Every non-empty caption line of the shards (a sample may hold several, one per line)."""
    count = 0
    for s in iter_samples(paths):
        if caption_key not in s:
            continue
        for line in s[caption_key].decode("utf-8", errors="replace").splitlines():
            line = line.strip()
            if line:
                yield line
                count += 1
                if limit and count >= limit:
                    return


def train_tokenizer(spec: str, vocab_size: int, out: str, model_type: str = "unigram",
                    caption_key: str = "txt", max_captions: int = 0, character_coverage: float = 1.0,
                    overwrite: bool = False) -> Dict:
    """Train on the captions of SHARDS; returns the metadata written to DIR/vlp_tokenizer.json."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise InputError(f"--model-type {model_type!r}: valid types are {', '.join(MODEL_TYPES)}")
    if vocab_size <= len(SPECIAL_IDS):
        raise InputError(f"--vocab-size must exceed the {len(SPECIAL_IDS)} special tokens, got {vocab_size}")
    paths = expand_shards(spec)
    model_path, meta_path = os.path.join(out, MODEL_FILE), os.path.join(out, META_FILE)
    if not overwrite and (os.path.exists(model_path) or os.path.exists(meta_path)):
        raise FileExistsError(f"{out!r} already holds a tokenizer ({MODEL_FILE}/{META_FILE}); pass --overwrite")
    os.makedirs(out, exist_ok=True)

    counted = {"captions": 0}

    def captions():
        for c in iter_captions(paths, caption_key, max_captions):
            counted["captions"] += 1
            yield c

    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=captions(), model_writer=proto, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, minloglevel=2,
            num_threads=os.cpu_count() or 1, **SPECIAL_IDS)
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg:
            limit = msg.rsplit("<=", 1)[-1].strip(" .")
            raise InputError(f"--vocab-size {vocab_size} is too large for these captions; "
                             f"use at most {limit} (or train on more text)") from None
        if "smaller than required_chars" in msg:
            need = msg.split("vs", 1)[-1].strip(" .").split(".")[0].strip()
            raise InputError(f"--vocab-size {vocab_size} is too small to hold every character of these captions; "
                             f"use at least {need}, or lower --character-coverage") from None
        raise
    if counted["captions"] == 0:
        raise InputError(f"no captions found under key {caption_key!r} in {len(paths)} shard(s)")
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto.getvalue())
    os.replace(tmp, model_path)
    meta = {"kind": "sentencepiece", "model": MODEL_FILE, "model_type": model_type,
            "vocab_size": sp.get_piece_size(), **SPECIAL_IDS,
            "trained_on": {"shards": len(paths), "captions": counted["captions"], "caption_key": caption_key}}
    write_json_atomic(meta_path, meta)
    return meta
