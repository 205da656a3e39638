"""Checks that a tokenizer fits a model's text tower, before any training step."""
from __future__ import annotations

from typing import Any

from vlp.config import ConfigError


def check_tokenizer(model: Any, tokenizer: Any) -> None:
    """Raise ConfigError when the tokenizer's ids or sequence length exceed the text tower's.

    `model.text_cfg` holds the tower's vocab_size and context_length; `tokenizer` has `.vocab_size`,
    `.context_length` and `.name` (vlp.data.tokenizers).
    """
    tower = model.text_cfg
    name = getattr(tokenizer, "name", "?")
    if tokenizer.vocab_size > tower["vocab_size"]:
        raise ConfigError(
            f"data.tokenizer ({name}) has {tokenizer.vocab_size} tokens but the text tower "
            f"(model.text: {tower['kind']} {tower['name']!r}) embeds only {tower['vocab_size']}: use the tower's "
            f"tokenizer (data.tokenizer.kind={tower['kind']}, name={tower['name']!r}) or raise "
            f"model.text.kwargs.vocab_size")
    if tokenizer.context_length > tower["context_length"]:
        raise ConfigError(
            f"data.tokenizer.context_length={tokenizer.context_length} exceeds the text tower's "
            f"{tower['context_length']} positions: lower data.tokenizer.context_length or raise "
            f"model.text.kwargs.context_length")
    own = getattr(model, "check_tokenizer", None)  # model-specific needs, e.g. ALBEF's [MASK] id
    if callable(own):
        own(tokenizer)
