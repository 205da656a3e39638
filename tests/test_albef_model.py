"""The ALBEF model on one process: losses and gradients, encoders, momentum buffers and their EMA,
the feature queue, the alpha ramp, exact restore from a state dict, and the errors a user can fix."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from albef_tiny import write_tiny_albef, write_vocab  # noqa: E402

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
                 "mlm_head.decoder.weight", "text_proj.weight"):
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


def test_fusion_starts_from_the_later_layers_of_a_pretrained_text_model(yaml_path, tmp_path):
    """bert-base -> layers 0-5 text, 6-11 fusion: the fusion layers keep the pretrained self-attention and
    feed-forward weights; only cross-attention is new."""
    from transformers import BertConfig, BertModel

    cfg = _cfg(yaml_path).model
    bert_cfg = BertConfig.from_pretrained(cfg.text.name)
    bert_cfg.update(dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                         num_hidden_layers=2))
    torch.manual_seed(3)
    BertModel(bert_cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    saved = BertModel.from_pretrained(tmp_path, add_pooling_layer=False)
    model = build_model(_cfg(yaml_path, f"model.text.pretrained={tmp_path}").model)
    assert len(model.text.model.encoder.layer) == 1 and len(model.fusion.layer) == 1
    torch.testing.assert_close(model.text.model.encoder.layer[0].output.dense.weight,
                               saved.encoder.layer[0].output.dense.weight)
    torch.testing.assert_close(model.fusion.layer[0].attention.self.query.weight,
                               saved.encoder.layer[1].attention.self.query.weight)
    torch.testing.assert_close(model.mlm_head.decoder.weight, saved.embeddings.word_embeddings.weight)
