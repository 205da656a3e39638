"""The three tokenizer kinds behind build_tokenizer, all offline."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from vlp.config import ConfigError, TokenizerConfig
from vlp.data.tokenizers import build_tokenizer

CAPTIONS = ["a large red circle on the left", "there is a small blue square at the top",
            "a green triangle left of a yellow star", "a purple ring in the center"] * 8


def _cfg(kind, name="", context_length=16):
    return OmegaConf.structured(TokenizerConfig(kind=kind, name=name, context_length=context_length))


def _check_batch(tok, texts, L):
    ids, mask = tok(texts)
    assert ids.shape == mask.shape == (len(texts), L)
    assert ids.dtype == mask.dtype == torch.int64
    assert torch.all((ids == tok.pad_id) | (mask == 1))  # every masked-out position is padding
    assert torch.all(mask[:, 0] == 1)
    assert int(ids.max()) < tok.vocab_size
    lengths = mask.sum(1)
    assert torch.all(mask == (torch.arange(L)[None] < lengths[:, None]).long())  # right padding
    return ids, mask


def test_open_clip_bundled_bpe_offline():
    tok = build_tokenizer(_cfg("open_clip", "", 12))
    assert (tok.name, tok.context_length, tok.vocab_size, tok.pad_id) == ("ViT-B-32", 12, 49408, 0)
    ids, mask = _check_batch(tok, ["a red circle", "word " * 40], 12)
    assert ids[0, 0] == 49406 and ids[0, int(mask[0].sum()) - 1] == 49407  # sot ... eot
    assert mask[1].sum() == 12 and ids[1, -1] == 49407  # truncated, eot kept
    with pytest.raises(ConfigError, match="data.tokenizer.name"):
        build_tokenizer(_cfg("open_clip", "no-such-model"))


def test_hf_tokenizer_from_local_dir(tmp_path):
    from transformers import BertTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    out = tmp_path / "hf_tok"
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(str(out))  # transformers 5: a vocab file path
    tok = build_tokenizer(_cfg("hf", str(out), 10))
    assert tok.vocab_size == 5 + len(words) and tok.pad_id == 0
    ids, mask = _check_batch(tok, ["a red circle", "a large red circle on the left of a green star"], 10)
    assert ids[0, :5].tolist()[0] == 2 and ids[0, 4] == 3  # [CLS] a red circle [SEP]
    assert mask[0].sum() == 5 and mask[1].sum() == 10 and ids[1, -1] == 3  # truncated, [SEP] kept
    with pytest.raises(ConfigError, match="needs data.tokenizer.name"):
        build_tokenizer(_cfg("hf", ""))


def test_sentencepiece_dir_and_model_file(tmp_path):
    import sentencepiece as spm

    out = tmp_path / "spm"
    out.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_prefix=str(out / "spm"),
                                   vocab_size=40, model_type="unigram", pad_id=0, unk_id=1, bos_id=2,
                                   eos_id=3, minloglevel=2)
    (out / "vlp_tokenizer.json").write_text(json.dumps(
        {"kind": "sentencepiece", "model": "spm.model", "vocab_size": 40, "pad_id": 0, "unk_id": 1,
         "bos_id": 2, "eos_id": 3}))
    tok = build_tokenizer(_cfg("sentencepiece", str(out), 12))
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (40, 0, 2, 3)
    ids, mask = _check_batch(tok, ["a red circle", "a large red circle on the left " * 4], 12)
    n = int(mask[0].sum())
    assert ids[0, 0] == 2 and ids[0, n - 1] == 3 and torch.all(ids[0, n:] == 0)
    assert mask[1].sum() == 12 and ids[1, -1] == 3
    same = build_tokenizer(_cfg("sentencepiece", str(out / "spm.model"), 12))
    assert torch.equal(same(["a red circle"])[0], ids[:1])
    with pytest.raises(ConfigError, match="no SentencePiece model"):
        build_tokenizer(_cfg("sentencepiece", str(tmp_path)))
