"""The ALBEF model on one process: losses and gradients, encoders, momentum buffers and their EMA,
the feature queue, the alpha ramp, exact restore from a state dict, and the errors a user can fix."""

import pytest
import torch
import torch.nn.functional as F

from tests.dist.albef_tiny import write_tiny_albef, write_vocab

from vlp.config import ConfigError, load_config  # noqa: E402
from vlp.models import build_model  # noqa: E402

B = 4


@pytest.fixture(scope="module")
def yaml_path(synth_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("albef")
    vocab = write_vocab(synth_train, str(root / "bert"))
    return write_tiny_albef(str(root / "tiny.yaml"), vocab)


def _cfg(yaml_path, *overrides):
    return load_config(yaml_path, ["model.albef.queue_size=12", *overrides])


def _model(yaml_path, *overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(_cfg(yaml_path, *overrides).model)


def _batch(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (b, 16), generator=g)
    mask = torch.ones(b, 16, dtype=torch.long)
    mask[:, 10:] = 0
    ids[:, 0], ids[:, 9] = 2, 3
    ids[mask == 0] = 0
    return {"image": torch.randn(b, 3, 32, 32, generator=g), "text_ids": ids, "text_mask": mask,
            "key": [str(i) for i in range(b)]}


def _step(model, opt, batch):
    out = model(batch)
    out["loss"].backward()
    opt.step()
    opt.zero_grad()
    model.after_step()
    return out


def test_forward_gives_each_loss_and_every_parameter_a_gradient(yaml_path):
    model = _model(yaml_path)
    out = model(_batch())
    for key in ("loss", "itc_loss", "itm_loss", "mlm_loss", "itm_acc"):
        assert torch.isfinite(torch.as_tensor(out[key])), key
    total = out["itc_loss"] + out["itm_loss"] + out["mlm_loss"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert out["alpha"] == 0.0 and out["temperature"] == pytest.approx(0.07)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # DeepSpeed's ZeRO stages want no unused parameters
    assert model.temp.shape == (1,)


def test_encoders_and_match_scores(yaml_path):
    model = _model(yaml_path).eval()
    b = _batch()
    with torch.no_grad():
        img = model.encode_image(b["image"])
        txt = model.encode_text(b["text_ids"], b["text_mask"])
        scores = model.match_scores(b["image"], b["text_ids"], b["text_mask"])
    assert img.shape == txt.shape == (B, 16) and img.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(B))
    assert scores.shape == (B,) and torch.isfinite(scores).all()
    assert model.image_cfg["size"] == 32 and model.text_cfg["vocab_size"] >= 40
    mean_pool = _model(yaml_path, "model.text.pool=mean").eval()  # same weights (same seed), token mean
    with torch.no_grad():
        hidden = mean_pool._text(b["text_ids"], b["text_mask"])
        m = b["text_mask"].unsqueeze(-1).float()
        expected = F.normalize(mean_pool.text_proj((hidden * m).sum(1) / m.sum(1)), dim=-1)
        torch.testing.assert_close(mean_pool.encode_text(b["text_ids"], b["text_mask"]), expected)
        assert not torch.allclose(expected, txt)


def test_momentum_weights_are_fp32_buffers_updated_by_ema_after_each_step(yaml_path):
    model = _model(yaml_path)
    param_ids = {id(p) for p in model.parameters()}
    momentum = dict(model.momentum_models.named_buffers())
    online = dict(model.named_parameters())
    averaged = [n for n in momentum if n in online]  # (the towers' own buffers, e.g. position ids, are copied)
    assert len(averaged) == sum(1 for n in online if n.split(".")[0] in ("vision", "vision_proj", "text",
                                                                        "text_proj", "fusion", "mlm_head"))
    assert all(id(momentum[n]) not in param_ids and momentum[n].dtype == torch.float32 for n in averaged)
    assert all(f"momentum_models.{n}" in model.state_dict() for n in averaged)
    # at build time each momentum copy equals its online part
    for name in ("vision.cls_token", "text.model.embeddings.word_embeddings.weight", "fusion.layer.0.crossattention.self.key.weight",
                 "mlm_head.transform.dense.weight", "mlm_head.bias", "text_proj.weight"):
        torch.testing.assert_close(momentum[name], online[name].detach())
    assert "itm_head.weight" in online and "itm_head.weight" not in momentum  # as in the paper
    before = {n: b.clone() for n, b in momentum.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt, _batch())
    moved = 0
    for name, buf in model.momentum_models.named_buffers():
        if name not in online:
            continue
        expected = 0.995 * before[name] + 0.005 * online[name].detach()
        torch.testing.assert_close(buf, expected, rtol=0, atol=1e-7)
        moved += int(not torch.equal(buf, before[name]))
    assert moved > len(online) // 2
    assert int(model.steps) == 1


def test_queue_takes_the_momentum_features_and_wraps(yaml_path):
    model = _model(yaml_path)  # queue of 12 = 3 batches of 4
    initial = model.image_queue.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(12))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pointers = []
    for i in range(4):
        batch = _batch(seed=i)
        with torch.no_grad():
            mm = model.momentum_models
            tokens = mm["vision"](batch["image"])
            feat = F.normalize(mm["vision_proj"](tokens[:, 0]), dim=-1)
            hidden = model._text(batch["text_ids"], batch["text_mask"], momentum=True)
            tfeat = F.normalize(mm["text_proj"](hidden[:, 0]), dim=-1)
        ptr = int(model.queue_ptr)
        _step(model, opt, batch)
        pointers.append(int(model.queue_ptr))
        torch.testing.assert_close(model.image_queue[ptr:ptr + B], feat)
        torch.testing.assert_close(model.text_queue[ptr:ptr + B], tfeat)
        if i == 0:  # the rest of the queue is untouched
            torch.testing.assert_close(model.image_queue[B:], initial[B:])
    assert pointers == [4, 8, 0, 4]


def test_a_pointer_left_by_another_global_batch_keeps_the_queue_first_in_first_out(yaml_path):
    """Resumed with another global batch (4 rows after batches that left the pointer at 10 of 12), the next
    4 rows replace the 4 oldest (10, 11, 0, 1), not a slice running past the end."""
    model = _model(yaml_path)
    before = model.image_queue.clone()
    model.queue_ptr[0] = 10
    new = F.normalize(torch.randn(4, before.shape[1]), dim=1)
    model._enqueue(new, new)
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.image_queue[:4], new)
    torch.testing.assert_close(model.image_queue[4:], before[2:10])  # the rest, oldest first


def test_queue_size_must_be_a_multiple_of_the_global_batch(yaml_path):
    model = _model(yaml_path, "model.albef.queue_size=10")
    with pytest.raises(ConfigError, match=r"model.albef.queue_size=10 is not a multiple of the global batch 4"):
        model(_batch())


def test_queues_are_the_same_whatever_the_torch_seed(yaml_path):
    a, b = _model(yaml_path, seed=0), _model(yaml_path, seed=1)
    assert torch.equal(a.image_queue, b.image_queue) and torch.equal(a.text_queue, b.text_queue)
    assert not torch.equal(a.vision_proj.weight, b.vision_proj.weight)
    c = _model(yaml_path, "model.albef.seed=5")
    assert not torch.equal(a.image_queue, c.image_queue)


def test_state_dict_restores_queues_momentum_and_the_sampling_stream(yaml_path):
    """A model rebuilt from a state dict continues exactly: same losses, same ITM/MLM draws, same alpha."""
    model = _model(yaml_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(2):
        _step(model, opt, _batch(seed=i))
    assert model.alpha() == pytest.approx(0.4)  # warm-up of 2 steps done
    fresh = _model(yaml_path, seed=7)
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.steps) == 2 and int(fresh.queue_ptr) == 8
    batch = _batch(seed=9)
    out_a, out_b = model(batch), fresh(batch)
    for key in ("loss", "itc_loss", "itm_loss", "mlm_loss"):
        assert out_a[key].item() == out_b[key].item(), key
    # and the draws depend on the step: another step gives other negatives and masks
    model.after_step()
    assert model(batch)["mlm_loss"].item() != out_a["mlm_loss"].item()


def test_alpha_ramp_follows_optimizer_steps(yaml_path):
    model = _model(yaml_path, "model.albef.alpha_warmup_steps=4")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    alphas = [_step(model, opt, _batch())["alpha"] for _ in range(5)]
    assert alphas == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_half_precision_parameters_keep_fp32_momentum(yaml_path):
    """As under DeepSpeed bf16 (parameters cast, buffers kept): the momentum forward runs under autocast."""
    model = _model(yaml_path)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    batch = _batch()
    batch["image"] = batch["image"].to(torch.bfloat16)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    before = model.momentum_models["vision_proj"].weight.clone()
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    model.after_step()
    buf = model.momentum_models["vision_proj"].weight
    assert buf.dtype == torch.float32 and model.image_queue.dtype == torch.float32
    torch.testing.assert_close(buf, 0.995 * before + 0.005 * model.vision_proj.weight.float())


def test_tokenizer_and_config_errors_name_the_keys(yaml_path, synth_train):
    from omegaconf import OmegaConf

    from vlp.data.tokenizers import build_tokenizer
    from vlp.models import check_tokenizer

    cfg = _cfg(yaml_path)
    model = build_model(cfg.model)
    check_tokenizer(model, build_tokenizer(cfg.data.tokenizer))  # the matching word-level tokenizer
    wrong = build_model(_cfg(yaml_path, "model.albef.mask_token_id=103", "model.albef.cls_token_id=101").model)
    with pytest.raises(ConfigError, match="set model.albef.cls_token_id=2 model.albef.mask_token_id=4"):
        check_tokenizer(wrong, build_tokenizer(cfg.data.tokenizer))
    clip_tok = build_tokenizer(OmegaConf.create({"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}))
    with pytest.raises(ConfigError, match=r"\[MASK\]"):
        model.check_tokenizer(clip_tok)
    bad = {"model.text.kind=open_clip": "model.text.kind='open_clip'",
           "model.text.kwargs.num_hidden_layers=5": "num_hidden_layers=5 contradicts",
           "model.albef.momentum=1.0": "model.albef.momentum",
           "model.init_temperature=0.9": "model.init_temperature=0.9 lies outside",
           "model.vision.kwargs.global_pool=avg": "global_pool",
           "model.patch_dropout=0.5": "model.patch_dropout"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            build_model(_cfg(yaml_path, override).model)


def _tiny_bert_config(yaml_path):
    from transformers import BertConfig

    bert_cfg = BertConfig.from_pretrained(_cfg(yaml_path).model.text.name)
    bert_cfg.update(dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                         num_hidden_layers=2))
    return bert_cfg


def test_fusion_starts_from_the_later_layers_of_a_pretrained_text_model(yaml_path, tmp_path, caplog):
    """bert-base -> layers 0-5 text, 6-11 fusion: the fusion layers keep the pretrained self-attention and
    feed-forward weights; only cross-attention is new. A bare BertModel has no MLM head to load: the log
    says so, and the MLM decoder is still the word embeddings."""
    from transformers import BertModel

    torch.manual_seed(3)
    BertModel(_tiny_bert_config(yaml_path), add_pooling_layer=False).save_pretrained(tmp_path)
    saved = BertModel.from_pretrained(tmp_path, add_pooling_layer=False)
    model = build_model(_cfg(yaml_path, f"model.text.pretrained={tmp_path}").model)
    assert len(model.text.model.encoder.layer) == 1 and len(model.fusion.layer) == 1
    torch.testing.assert_close(model.text.model.encoder.layer[0].output.dense.weight,
                               saved.encoder.layer[0].output.dense.weight)
    torch.testing.assert_close(model.fusion.layer[0].attention.self.query.weight,
                               saved.encoder.layer[1].attention.self.query.weight)
    assert "has no pretrained MLM head" in caplog.text and "cls.predictions.transform.dense.weight" in caplog.text
    torch.testing.assert_close(model.text.model.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)
    assert torch.equal(model.mlm_head.bias, torch.zeros_like(model.mlm_head.bias))


def test_mlm_head_is_berts_pretrained_head_tied_to_the_word_embeddings(yaml_path, tmp_path):
    """model.text.pretrained = a BertForMaskedLM: the MLM head's transform and bias are the checkpoint's
    `cls.predictions`, and its decoder is the text tower's word-embedding parameter itself, so MLM logits are
    BERT's own; the momentum head decodes with the momentum text tower's embeddings."""
    from transformers import BertForMaskedLM

    torch.manual_seed(3)
    bert = BertForMaskedLM(_tiny_bert_config(yaml_path)).eval()
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()  # the default is zeros, which would not show the copy
        bert.cls.predictions.transform.LayerNorm.weight.uniform_(0.5, 1.5)
    bert.save_pretrained(tmp_path)
    model = build_model(_cfg(yaml_path, f"model.text.pretrained={tmp_path}").model)
    head, pred = model.mlm_head, bert.cls.predictions
    for name, value in pred.transform.state_dict().items():
        torch.testing.assert_close(head.transform.state_dict()[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(head.bias, pred.bias, rtol=0, atol=0)
    # tied: no decoder of its own anywhere (online, momentum, state dict); logits are BERT's
    assert sorted(n for n, _ in head.named_parameters()) == ["bias", "transform.LayerNorm.bias",
                                                            "transform.LayerNorm.weight", "transform.dense.bias",
                                                            "transform.dense.weight"]
    assert not [k for k in model.state_dict() if "mlm_head.decoder" in k]
    words = model.text.model.embeddings.word_embeddings
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, words), bert.cls(hidden))
    # the MLM loss trains the word embeddings through the decoder, and the tie holds after a step
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    only_mlm = _model(yaml_path, f"model.text.pretrained={tmp_path}", "model.albef.itc_weight=0",
                      "model.albef.itm_weight=0")
    out = only_mlm(_batch())
    out["loss"].backward()
    grad_rows = only_mlm.text.model.embeddings.word_embeddings.weight.grad.abs().sum(1)
    unused = sorted(set(range(grad_rows.numel())) - set(_batch()["text_ids"].flatten().tolist()))
    assert grad_rows[unused].gt(0).all()  # rows of words absent from the batch: reached only by the decoder
    _step(model, opt, _batch())
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, words), F.linear(head.transform(hidden), words.weight, head.bias))
        mm = model.momentum_models
        m_words = mm["text"].model.embeddings.word_embeddings
        assert isinstance(m_words.weight, torch.Tensor) and not isinstance(m_words.weight, torch.nn.Parameter)
        torch.testing.assert_close(mm["mlm_head"](hidden, m_words),
                                   F.linear(mm["mlm_head"].transform(hidden), m_words.weight, mm["mlm_head"].bias))


def test_temperature_is_read_as_is_and_bounded_by_the_trainer(yaml_path):
    from vlp.train.engine import clamp_parameters

    model = _model(yaml_path, "model.albef.min_temperature=0.05", "model.albef.max_temperature=0.1")
    assert model.parameter_bounds() == [(model.temp, 0.05, 0.1)]
    with torch.no_grad():
        model.temp.fill_(0.2)
    assert model(_batch())["temperature"] == pytest.approx(0.2)  # no clamp in the forward: it keeps a gradient
    clamp_parameters(model)
    assert model.temp.item() == pytest.approx(0.1)


def test_itm_settings_for_random_towers(yaml_path):
    """itm_pool=mean reads the masked mean of the fused tokens; cross_attention_init_std re-draws only the
    cross-attention; the curriculum's hardness is logged; match_scores is the head's log-odds."""
    base = _model(yaml_path)
    model = _model(yaml_path, "model.albef.itm_pool=mean", "model.albef.cross_attention_init_std=0.15",
                   "model.albef.hard_negative_warmup_steps=4")
    for mine, theirs in zip(model.fusion.layer, base.fusion.layer):
        for name, p in mine.named_parameters():
            q = dict(theirs.named_parameters())[name]
            if name.startswith("crossattention.") and "LayerNorm" not in name:
                if name.endswith("weight"):
                    assert abs(float(p.detach().std()) - 0.15) < 0.02, name
                else:
                    assert not p.any(), name
            else:
                assert torch.equal(p, q), name  # same seed: everything else as built by default
    batch = _batch()
    out = model(batch)
    assert 0 <= out["itm_pos_prob"] <= 1 and 0 <= out["itm_neg_prob"] <= 1
    assert out["itm_hardness"] == 0.0  # uniform random negatives at step 0 of 4
    model.after_step()
    model.after_step()
    assert model.negative_hardness() == 0.5
    model.eval()
    with torch.no_grad():
        text = model._text(batch["text_ids"], batch["text_mask"])
        fused = model.fusion(text, batch["text_mask"], model._pair_tokens(
            model._image(batch["image"]), model._text_feature(text, batch["text_mask"])))
        m = batch["text_mask"].unsqueeze(-1).float()
        logits = model.itm_head((fused * m).sum(1) / m.sum(1))
        scores = model.match_scores(batch["image"], batch["text_ids"], batch["text_mask"])
    torch.testing.assert_close(scores, logits[:, 1] - logits[:, 0])
    for bad, key in (("model.albef.itm_pool=max", "itm_pool"), ("model.albef.hard_negative_warmup_steps=-1",
                                                               "hard_negative_warmup_steps")):
        with pytest.raises(ConfigError, match=key):
            _model(yaml_path, bad)
