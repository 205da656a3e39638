"""A tiny ALBEF for tests: 32 px, one ViT block, a 1 + 1 layer BERT of width 32, no dropout, and a
word-level tokenizer written from the synthetic captions (offline)."""
from __future__ import annotations

import os

TINY_ALBEF_YAML = """\
model:
  type: albef
  embed_dim: 16
  vision:
    kind: timm
    name: vit_tiny_patch16_224
    kwargs: {{img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2.0}}
  text:
    kind: hf
    name: {vocab}
    kwargs: {{hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 16,
              hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}
  albef:
    text_layers: 1
    fusion_layers: 1
    queue_size: 32
    alpha_warmup_steps: 2
    pad_token_id: 0
    cls_token_id: 2
    sep_token_id: 3
    mask_token_id: 4
    mlm_prob: 0.3
data:
  workers: 0
  shuffle_buffer: 64
  image_size: 32
  tokenizer: {{kind: hf, name: {vocab}, context_length: 16}}
train:
  steps: 4
  micro_batch_size: 8
  lr: 1.0e-3
  min_lr: 1.0e-3
  warmup_steps: 0
  weight_decay: 0.02
  log_every: 1
  tensorboard: false
  curves: false                # drawn and checked in tests/test_curves.py
"""


def write_vocab(shards: str, out: str) -> str:
    """The word-level BERT tokenizer (+ base config) of the shards' captions, once per directory."""
    from data_pipelines.bert_vocab import write_bert_vocab

    if not os.path.isfile(os.path.join(out, "config.json")):
        write_bert_vocab(str(shards), out, overwrite=True)
    return out


def write_tiny_albef(path: str, vocab: str) -> str:
    with open(path, "w") as f:
        f.write(TINY_ALBEF_YAML.format(vocab=vocab))
    return path
