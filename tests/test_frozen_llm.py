"""Frozen LLM block: one decoder layer loaded alone from sharded safetensors (local dir and hub cache),
run without causal mask and without RoPE exactly as written out by hand here, frozen as buffers."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, load_config

TINY_TEXT = "model.text.kwargs={context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1, mlp_ratio: 2.0}"
TINY_VIT = "model.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer LLaMA (hidden 64, 4 heads, 2 KV heads, intermediate 128) saved in 12 safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    return str(out), model


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(1)
    cfg = OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                    word_embed_proj_dim=48, max_position_embeddings=64, do_layer_norm_before=True)
    model = OPTForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_opt")
    model.save_pretrained(out, safe_serialization=True, max_shard_size="30KB")
    return str(out), model


def _weight_map(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _attend(q, k, v, causal=False):
    """(B,H,N,d) each -> (B,N,H*d); plain softmax attention, optionally with a causal mask."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _llama_layer_by_hand(h, sd, cfg, causal=False, rope=False):
    """LLaMA decoder layer written out: RMSNorm, GQA attention (no mask, no RoPE unless asked), SwiGLU MLP."""
    B, N, _ = h.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    a = _rms(h, sd["input_layernorm.weight"], cfg.rms_norm_eps)
    q = (a @ sd["self_attn.q_proj.weight"].T).view(B, N, nh, hd).transpose(1, 2)
    k = (a @ sd["self_attn.k_proj.weight"].T).view(B, N, nkv, hd).transpose(1, 2)
    v = (a @ sd["self_attn.v_proj.weight"].T).view(B, N, nkv, hd).transpose(1, 2)
    if rope:  # standard RoPE at positions 0..N-1, to show the test would notice it
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(N).float(), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        rot = lambda x: torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)  # noqa: E731
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    h = h + _attend(q, k, v, causal) @ sd["self_attn.o_proj.weight"].T
    b = _rms(h, sd["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    mlp = (F.silu(b @ sd["mlp.gate_proj.weight"].T) * (b @ sd["mlp.up_proj.weight"].T)) @ sd["mlp.down_proj.weight"].T
    return h + mlp


def _block_by_hand(block, x, layer_fn):
    """proj_out(rms_norm_without_weight(layer(proj_in(x)))), the reference's arrangement."""
    h = x @ block.proj_in.weight.T
    out = layer_fn(h)
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + block.eps)
    return out @ block.proj_out.weight.T


class _Spy:
    """Records the keys read through safetensors.safe_open (the real reader does the reading)."""

    def __init__(self, real, log):
        self.real, self.log = real, log

    def __call__(self, path, *args, **kwargs):
        spy = self

        class Handle:
            def __enter__(self):
                self.f = spy.real(path, *args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, key):
                spy.log.append((os.path.basename(path), key))
                return self.f.get_tensor(key)

        return Handle()


def test_only_the_chosen_layer_is_read(tiny_llama, tmp_path, monkeypatch):
    import safetensors

    from vlp.models.frozen_llm import load_decoder_layer

    src, full = tiny_llama
    wm = _weight_map(src)
    needed = {f for k, f in wm.items() if k.startswith("model.layers.1.")}
    assert 1 < len(needed) < len(set(wm.values()))  # the layer spans several shards, not all of them
    local = tmp_path / "only_needed"  # the other shards are absent: they must never be opened
    local.mkdir()
    for name in ["config.json", "model.safetensors.index.json", *needed]:
        shutil.copy(os.path.join(src, name), local / name)

    log = []
    monkeypatch.setattr(safetensors, "safe_open", _Spy(safetensors.safe_open, log))
    loaded = load_decoder_layer(str(local), -1)

    assert loaded.index == 1 and loaded.prefix == "model.layers.1."
    expected = {k for k in wm if k.startswith("model.layers.1.")}
    assert {k for _, k in log} == expected and len(log) == len(expected)
    ref = full.model.layers[1].state_dict()
    got = loaded.module.state_dict()  # persistent buffers: what checkpoints and exports hold
    assert list(loaded.module.parameters()) == []
    assert set(got) == set(ref)
    assert sum(t.numel() for t in got.values()) == sum(t.numel() for t in ref.values())
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert not any(b.is_meta for b in loaded.module.buffers())


def test_llama_block_is_bidirectional_without_rope(tiny_llama):
    from vlp.models.frozen_llm import FrozenLLMBlock, load_decoder_layer

    src, full = tiny_llama
    block = FrozenLLMBlock(load_decoder_layer(src, 1), dim=32, source=src)
    sd = {k: v.float() for k, v in full.model.layers[1].state_dict().items()}
    cfg = full.config
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        got = block(x)
        want = _block_by_hand(block, x, lambda h: _llama_layer_by_hand(h, sd, cfg))
        causal = _block_by_hand(block, x, lambda h: _llama_layer_by_hand(h, sd, cfg, causal=True))
        roped = _block_by_hand(block, x, lambda h: _llama_layer_by_hand(h, sd, cfg, rope=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, causal, atol=1e-4) and not torch.allclose(got, roped, atol=1e-4)
    # the first token sees the last one (no causal mask); permuting tokens permutes outputs (no positions)
    y = x.clone()
    y[:, -1] += 1.0
    perm = torch.randperm(7)
    with torch.no_grad():
        assert not torch.allclose(block(y)[:, 0], got[:, 0])
        torch.testing.assert_close(block(x[:, perm]), got[:, perm], rtol=1e-5, atol=1e-5)


def test_opt_block_matches_hand_written_layer(tiny_opt):
    from vlp.models.frozen_llm import FrozenLLMBlock, load_decoder_layer

    src, full = tiny_opt
    loaded = load_decoder_layer(src, 0)
    assert loaded.prefix.endswith("decoder.layers.0.")
    block = FrozenLLMBlock(loaded, dim=32, source=src)
    assert not block.identity_rope  # OPT layers carry no position information
    sd = full.model.decoder.layers[0].state_dict()
    nh, hd = 4, 12

    def layer(h):
        B, N, C = h.shape
        a = F.layer_norm(h, (C,), sd["self_attn_layer_norm.weight"], sd["self_attn_layer_norm.bias"])
        proj = lambda n: (a @ sd[f"self_attn.{n}.weight"].T + sd[f"self_attn.{n}.bias"]).view(B, N, nh, hd).transpose(1, 2)  # noqa: E731,E501
        h = h + _attend(proj("q_proj"), proj("k_proj"), proj("v_proj")) @ sd["self_attn.out_proj.weight"].T \
            + sd["self_attn.out_proj.bias"]
        b = F.layer_norm(h, (C,), sd["final_layer_norm.weight"], sd["final_layer_norm.bias"])
        return h + F.relu(b @ sd["fc1.weight"].T + sd["fc1.bias"]) @ sd["fc2.weight"].T + sd["fc2.bias"]

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    block.train()  # OPT's dropout must stay off: the frozen layer never trains
    with torch.no_grad():
        torch.testing.assert_close(block(x), _block_by_hand(block, x, layer), rtol=1e-5, atol=1e-5)
    assert not block.layer.training


def test_hub_name_downloads_only_what_the_layer_needs(tiny_llama, tmp_path, monkeypatch):
    """A hub repo id resolves through huggingface_hub's cache; offline, only the files present there
    (config, index, the layer's shards) can be fetched, so loading proves nothing else was asked for."""
    from huggingface_hub import constants

    from vlp.models.frozen_llm import load_decoder_layer

    src, full = tiny_llama
    needed = {f for k, f in _weight_map(src).items() if k.startswith("model.layers.0.")}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--vlp-test--tiny-llama"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ["config.json", "model.safetensors.index.json", *needed]:
        shutil.copy(os.path.join(src, name), snap / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    loaded = load_decoder_layer("vlp-test/tiny-llama", 0)
    with pytest.raises(ConfigError, match="no config.json.*HF_HUB_OFFLINE"):
        load_decoder_layer("vlp-test/not-cached", 0)
    assert {os.path.basename(f) for f in loaded.files} == needed
    for k, v in full.model.layers[0].state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v)


def _model_cfg(llm_dir, *extra):
    llm = [f"model.vision.frozen_llm.name={llm_dir}"] if llm_dir else []
    return load_config(None, ["model.vision.name=vit_tiny_patch16_224", TINY_VIT, TINY_TEXT, "model.embed_dim=32",
                              *llm, *extra]).model


def test_tower_trains_around_a_frozen_block(tiny_llama):
    """Placed after the last ViT block; projections and ViT get gradients, the LLM layer gets none and no
    optimizer slot, its weights stay bit-identical, and it is in the state dict (exported with the model)."""
    from vlp.models import build_model, param_groups
    from vlp.models.frozen_llm import FrozenLLMBlock

    src, full = tiny_llama
    torch.manual_seed(0)
    model = build_model(_model_cfg(src))
    blocks = model.vision.blocks
    assert len(blocks) == 3 and isinstance(blocks[-1], FrozenLLMBlock)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".blocks.2.layer." in k}
    assert len(frozen) == len(full.model.layers[1].state_dict())
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}  # every parameter trains; the LLM layer has none
    before = blocks[-1].proj_in.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    torch.manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32), "text_ids": torch.randint(1, 100, (4, 16)),
             "text_mask": torch.ones(4, 16, dtype=torch.long)}
    for _ in range(3):
        opt.zero_grad()
        model(batch)["loss"].backward()
        assert model.vision.patch_embed.proj.weight.grad.abs().sum() > 0  # gradient flows through the block
        opt.step()
    assert not torch.equal(before, blocks[-1].proj_in.weight)
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    assert all(len(opt.state[p]) > 0 for g in opt.param_groups for p in g["params"])
    again = build_model(_model_cfg(src))
    again.load_state_dict(state, strict=True)
    torch.testing.assert_close(again.eval().encode_image(batch["image"]), model.eval().encode_image(batch["image"]))


def test_block_runs_in_the_compute_dtype(tiny_llama):
    """DeepSpeed's bf16 mode casts parameters, not buffers: the layer follows its input's dtype."""
    from vlp.models.frozen_llm import FrozenLLMBlock, load_decoder_layer

    src, _ = tiny_llama
    block = FrozenLLMBlock(load_decoder_layer(src), dim=32, source=src)
    for p in block.parameters():
        p.data = p.data.to(torch.bfloat16)
    out = block(torch.randn(1, 3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert {b.dtype for b in block.layer.buffers()} == {torch.bfloat16}


def test_errors_name_the_key(tiny_llama, tmp_path):
    from vlp.models import build_model

    src, _ = tiny_llama
    with pytest.raises(ConfigError, match=r"model.vision.frozen_llm.layer.*2 layers"):
        build_model(_model_cfg(src, "model.vision.frozen_llm.layer=5"))
    with pytest.raises(ConfigError, match="model.vision.frozen_llm.name.*not a directory"):
        build_model(_model_cfg(str(tmp_path / "missing")))
    (tmp_path / "bin_only").mkdir()
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "bin_only")
    with pytest.raises(ConfigError, match="no safetensors weights"):
        build_model(_model_cfg(str(tmp_path / "bin_only")))
    with pytest.raises(ConfigError, match="model.text.frozen_llm.name.*timm"):
        build_model(_model_cfg("", f"model.text.frozen_llm.name={src}"))


def test_albef_vision_tower_takes_both_extras(tiny_llama, tmp_path):
    """ALBEF builds its ViT through the same tower builder: the fusion encoder reads tokens that passed
    EViT and the frozen block, and `after_step` advances EViT in the online and the momentum ViT."""
    from transformers import BertConfig

    from vlp.models import build_model
    from vlp.models.frozen_llm import FrozenLLMBlock

    src, _ = tiny_llama
    BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32).save_pretrained(tmp_path / "bert")
    cfg = load_config(None, [
        "model.type=albef", "model.embed_dim=16", "model.vision.name=vit_tiny_patch16_224", TINY_VIT,
        "model.text.kind=hf", f"model.text.name={tmp_path / 'bert'}", "model.albef.text_layers=1",
        "model.albef.fusion_layers=1", "model.albef.queue_size=8", "model.albef.cls_token_id=1",
        "model.albef.sep_token_id=2", "model.albef.mask_token_id=3", "model.vision.evit.keep_rate=0.5",
        "model.vision.evit.blocks=[0]", "model.vision.evit.shrink_steps=2", f"model.vision.frozen_llm.name={src}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert isinstance(model.vision.blocks[-1], FrozenLLMBlock)
    assert isinstance(model.momentum_models["vision"].blocks[-1], FrozenLLMBlock)
    ids = torch.randint(4, 120, (4, 10))
    ids[:, 0] = 1
    batch = {"image": torch.randn(4, 3, 32, 32), "text_ids": ids, "text_mask": torch.ones(4, 10, dtype=torch.long),
             "key": list("abcd")}
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.vision.blocks[-1].proj_in.weight.grad.abs().sum() > 0
    model.after_step()
    steps = {k: int(v) for k, v in model.state_dict().items() if k.endswith("evit_step")}
    assert steps == {"vision.blocks.0.evit_step": 1, "momentum_models.vision.blocks.0.evit_step": 1}


def test_exports_as_vlp_only_and_reloads(tiny_llama, tmp_path):
    """The frozen layer's buffers travel in the vlp export; open_clip/transformers layouts have no such
    layer (nor EViT), so only the vlp format is offered."""
    import vlp
    from vlp.data.transforms import resolve_image_cfg
    from vlp.export.exporter import supported_formats
    from vlp.export.vlp_format import write_vlp
    from vlp.models import build_model

    src, full = tiny_llama
    tok = ["data.tokenizer.name=ViT-B-32", "data.tokenizer.context_length=16"]
    cfg = load_config(None, ["model.vision.name=vit_tiny_patch16_224", TINY_VIT, TINY_TEXT, "model.embed_dim=32",
                             f"model.vision.frozen_llm.name={src}", "model.vision.evit.keep_rate=0.5",
                             "model.vision.evit.blocks=[1]", *tok])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    assert supported_formats(model, cfg) == ["vlp"]
    out = tmp_path / "export"
    out.mkdir()
    write_vlp(model, cfg, resolve_image_cfg(model.image_cfg, cfg.data), str(out), "fp32", "5GB", {})
    again = vlp.load_pretrained(str(out))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.encode_image(images), model.encode_image(images))
    layer = again.vision.blocks[-1].layer.state_dict()
    assert all(torch.equal(layer[k], v) for k, v in full.model.layers[1].state_dict().items())
