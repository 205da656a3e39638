"""The space-time tower (vlp.models.video): image weights load into it, its 1-frame path is the image ViT,
its temporal parts start at zero and get gradients, it sees frame order (the frame-average baseline does
not), wrong configurations are refused, and image layouts take only its image path."""
import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, from_dict
from vlp.models import build_model

VIT = {"kind": "timm", "name": "vit_tiny_patch16_224",
       "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
TEXT = {"kind": "open_clip", "kwargs": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                        "layers": 2}}
TOK = {"kind": "open_clip", "name": "ViT-B-32", "context_length": 16}


def _cfg(video=True, temporal="divided", **model):
    return from_dict({"model": {"type": "clip", "embed_dim": 24, "vision": VIT, "text": TEXT,
                                "video": {"enabled": video, "temporal": temporal, "max_frames": 4}, **model},
                      "data": {"tokenizer": TOK}, "train": {"resume": "none"}})


def _build(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def _perturb_temporal(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "timeattn" in n or "norm3" in n or "temporal_embed" in n:
                p.add_(torch.randn_like(p) * 0.2)


def _clips(b=3, k=4, seed=1):
    return torch.randn(b, k, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_image_weights_load_and_the_one_frame_path_is_the_image_model():
    image, video = _build(_cfg(video=False)), _build(_cfg())
    res = video.load_state_dict(image.state_dict(), strict=False)  # an image checkpoint into the video model
    assert not res.unexpected_keys
    assert res.missing_keys and all(("timeattn" in k or "norm3" in k or k == "vision.temporal_embed")
                                    for k in res.missing_keys)
    _perturb_temporal(video)  # whatever the temporal parts learnt, one frame never uses them
    x = _clips()
    ref = image.encode_image(x[:, 0])
    assert torch.equal(video.encode_video(x[:, :1]), ref)
    assert torch.equal(video.encode_image(x[:, 0]), ref)
    # a batch mixing images (1-frame clips, zero-padded) and 4-frame clips keeps each row's own path
    mixed = x.clone()
    mixed[1, 1:] = 0
    out = video.encode_video(mixed, torch.tensor([4, 1, 4]))
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[[0, 2]], video.encode_video(x[[0, 2]]), rtol=0, atol=1e-6)


def test_temporal_attention_starts_at_zero_and_learns():
    m = _build(_cfg())
    seen = []
    hooks = [b.timeattn.register_forward_hook(lambda mod, i, o: seen.append(o.detach().abs().max()))
             for b in m.vision.blocks]
    m.train()
    ids = torch.ones(3, 16, dtype=torch.long)
    out = m({"video": _clips(), "text_ids": ids, "text_mask": torch.ones_like(ids)})
    out["loss"].backward()
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(float(v) == 0.0 for v in seen)  # t = 0 at step 0: Frozen in Time's init
    grads = {n: p.grad for n, p in m.named_parameters() if "blocks.0.timeattn" in n or n == "vision.temporal_embed"}
    assert grads["vision.blocks.0.timeattn.qkv.weight"].abs().sum() > 0  # proj's ones keep qkv alive
    assert grads["vision.blocks.0.timeattn.proj.bias"].abs().sum() > 0
    assert grads["vision.temporal_embed"].abs().sum() > 0


def test_space_time_sees_frame_order_and_the_frame_average_does_not():
    x = _clips()
    rev = x.flip(1)
    st = _build(_cfg())
    _perturb_temporal(st)
    assert (st.encode_video(x) - st.encode_video(rev)).abs().max() > 1e-3
    avg = _build(_cfg(temporal="mean"))
    torch.testing.assert_close(avg.encode_video(x), avg.encode_video(rev), rtol=0, atol=1e-6)
    per_frame = torch.stack([avg.vision(x[:, i]) for i in range(4)], 1).mean(1)
    torch.testing.assert_close(avg.encode_video(x), F.normalize(avg.image_proj(per_frame), dim=-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, needle", [
    ({"vision": {**VIT, "evit": {"keep_rate": 0.7}}}, "model.vision.evit.keep_rate"),
    ({"patch_dropout": 0.5}, "model.patch_dropout"),
    ({"vision": {"kind": "open_clip", "name": "ViT-B-32"}}, "model.vision.kind"),
])
def test_bad_video_configurations_are_refused_by_name(change, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_model(_cfg(**change).model)


def test_more_frames_than_the_temporal_embedding_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="dual encoders"):
        _cfg(type="albef")
    with pytest.raises(ConfigError, match="model.video.max_frames"):
        from_dict({"model": {"video": {"enabled": True, "max_frames": 2}}, "data": {"video": {"frames": 4}},
                   "train": {"resume": "none"}})
    with pytest.raises(ConfigError, match=r"data\.video\.curriculum\[0\]"):
        from_dict({"data": {"video": {"curriculum": [[0, 0]]}}, "train": {"resume": "none"}})


def test_image_layouts_take_the_image_path_only_when_the_temporal_parts_are_unused_or_asked_for():
    from vlp.data.tokenizers import build_tokenizer
    from vlp.export.hf import hf_model
    from vlp.export.transformer_ir import Unsupported

    cfg = _cfg()
    m = _build(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not ("timeattn" in n or "norm3" in n or "temporal_embed" in n):
                p.add_(torch.randn_like(p) * 0.05)
    tok = build_tokenizer(cfg.data.tokenizer)
    eot = tok.eot_token_id if hasattr(tok, "eot_token_id") else 49407
    x = _clips()[:, 0]
    hf = hf_model(m, cfg, eot)  # temporal parts at their init: the video model is the image model
    got = F.normalize(hf.get_image_features(pixel_values=x).pooler_output, dim=-1)
    torch.testing.assert_close(got, m.encode_image(x), rtol=1e-4, atol=1e-5)
    _perturb_temporal(m)
    with pytest.raises(Unsupported, match="export.image_only=true"):
        hf_model(m, cfg, eot)
    cfg.export.image_only = True
    got = F.normalize(hf_model(m, cfg, eot).get_image_features(pixel_values=x).pooler_output, dim=-1)
    torch.testing.assert_close(got, m.encode_image(x), rtol=1e-4, atol=1e-5)
