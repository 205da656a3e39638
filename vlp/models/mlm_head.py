"""BERT's masked-language-model head, its vocabulary projection tied to the text tower's word embeddings.

Devlin et al. 2019, "BERT" (§3.1, and transformers' `BertLMPredictionHead`): a transform (dense,
activation, LayerNorm), then logits = h @ E^T + b, where E is the word-embedding matrix of the text
encoder (BERT ties the two; ALBEF's `BertForMaskedLM` does too). The head owns the transform and the
bias only and reads E from the embedding module it is called with, so the tie is one parameter in one
place: the momentum head reads the momentum text tower's embedding buffer, checkpoints hold E once, and
the EMA updates E once. Under ZeRO-3 the read happens inside this module's forward, where DeepSpeed's
engine discovers E as an external parameter of the head (`register_external_parameter`) and gathers it
for the head's forward and backward.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.config import ConfigError

log = logging.getLogger(__name__)
_PRETRAINED = ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
               "transform.LayerNorm.bias", "bias")  # under BertForMaskedLM's `cls.predictions.`


class MLMHead(nn.Module):
    """BERT's prediction-head transform and output bias; the decoder weight is the word embeddings."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: nn.Embedding) -> torch.Tensor:
        """(N, width) hidden states -> (N, vocab) logits against `word_embeddings.weight`."""
        return F.linear(self.transform(hidden), word_embeddings.weight, self.bias)


def load_pretrained_mlm_head(head: MLMHead, source: str, text_model: nn.Module, key: str = "model.text") -> bool:
    """Copy BERT's pretrained MLM head (`cls.predictions.transform.*` and `cls.predictions.bias` of a
    BertForMaskedLM / BertForPreTraining checkpoint at `source`) into `head`. Returns whether it was there;
    a checkpoint without one (e.g. a bare BertModel) or a text model that is not a BERT leaves the head as
    built and says so in the log."""
    from transformers import BertForMaskedLM, BertModel
    from transformers.utils import logging as hf_logging

    if not isinstance(text_model, BertModel):
        log.warning("%s.pretrained=%r loads a %s, not a BERT: the MLM head's transform and bias start untrained",
                    key, source, type(text_model).__name__)
        return False
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list every encoder layer, left out on purpose
    try:  # embeddings and head only: the layers are the text tower's, loaded already
        lm, info = BertForMaskedLM.from_pretrained(source, num_hidden_layers=0, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [f"cls.predictions.{k}" for k in _PRETRAINED if f"cls.predictions.{k}" in info["missing_keys"]]
    if missing:
        log.warning("%s.pretrained=%r has no pretrained MLM head (missing %s): the MLM head's transform and bias "
                    "start untrained; its decoder is still the word embeddings", key, source, ", ".join(missing))
        return False
    pred = lm.cls.predictions
    if pred.bias.shape != head.bias.shape or pred.transform.dense.weight.shape != head.transform.dense.weight.shape:
        raise ConfigError(f"{key}.pretrained={source!r}: its MLM head (vocabulary {pred.bias.shape[0]}, width "
                          f"{pred.transform.dense.weight.shape[0]}) does not fit the text tower (vocabulary "
                          f"{head.bias.shape[0]}, width {head.transform.dense.weight.shape[0]}): check {key}.kwargs")
    with torch.no_grad():
        head.transform.load_state_dict(pred.transform.state_dict())
        head.bias.copy_(pred.bias)
    log.info("%s.pretrained=%r: MLM head transform and bias loaded", key, source)
    return True


__all__ = ["MLMHead", "load_pretrained_mlm_head"]
