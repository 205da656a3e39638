"""Every shipped config (configs/*.yaml) builds its model and runs a forward pass, offline.

A config whose model section no longer builds (a renamed option, a tower kind or family feature that
broke) fails here. Only what needs the network or a `vlp data bert-vocab` output is replaced, by local
stand-ins of the same kind: hub weights of timm/open_clip towers are dropped (random init of the same
architecture), a BERT named on the hub becomes a saved BERT with its vocabulary and layer count but a
tiny width, the frozen LLM a tiny saved LLaMA, the demos' BERT dir the word-level vocabulary written from
the synthetic shards. Paper-scale ViTs get a narrow width (their depth, heads and image size stay) to
keep this fast on a CPU. Model type, tower kinds and names, and the family options (ALBEF, BUS, frozen
LLM, EViT, SigLIP/ALIGN losses) stay as shipped.
"""
import glob
import os

import pytest
import torch
from omegaconf import OmegaConf

from tests.dist.albef_tiny import write_vocab
from vlp.config import load_config
from vlp.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
NARROW_VIT = 96  # divisible by the head counts of ViT-Ti/S/B/L (3, 6, 12, 16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine torch's default of 2 made these forwards 10-30x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def local(synth_train, tmp_path_factory):
    """Offline stand-ins: `bert` for a BERT hub name, `llama` for a causal LM, `vocab` for `vlp data bert-vocab`."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("configs_build")
    torch.manual_seed(0)
    # bert-base-uncased's vocabulary (ALBEF's default special token ids are its) and 12 layers, width 32
    BertModel(BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64),
              add_pooling_layer=False).save_pretrained(root / "bert")
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
                     ).save_pretrained(root / "llama", safe_serialization=True)
    return {"bert": str(root / "bert"), "llama": str(root / "llama"),
            "vocab": write_vocab(synth_train, str(root / "vocab"))}


def _is_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "runs/"))


def offline_overrides(cfg, local) -> list:
    """Overrides that make `cfg`'s model buildable offline and small; fails naming what has no stand-in yet (add one here)."""
    m, out = cfg.model, []
    if m.init_from:
        pytest.fail(f"no offline stand-in yet: model.init_from={m.init_from!r} needs a trained source model")
    for side in ("vision", "text"):
        t, key = m[side], f"model.{side}"
        if t.kind in ("timm", "open_clip"):
            if str(t.name).startswith("hf-hub:"):
                pytest.fail(f"no offline stand-in yet: {key}.name={t.name!r}: the architecture itself is on the hub")
            if t.pretrained:
                out.append(f"{key}.pretrained=''")  # random init of the same architecture
            if t.kind == "timm" and str(t.name).startswith(("vit_", "deit")) and "embed_dim" not in t.kwargs:
                out.append(f"{key}.kwargs.embed_dim={NARROW_VIT}")
        elif t.kind == "hf":
            source = t.pretrained or t.name
            if side != "text":
                pytest.fail(f"{key}: no offline stand-in for hf vision tower {source!r}")
            stand_in = local["vocab"] if _is_local_path(source) else local["bert"]
            out.append(f"{key}.{'pretrained' if t.pretrained else 'name'}={stand_in}")
        if m[side].frozen_llm.name:
            out.append(f"{key}.frozen_llm.name={local['llama']}")
    return out


def _without_towers(model_cfg) -> dict:
    out = OmegaConf.to_container(model_cfg)
    del out["vision"], out["text"]
    return out


def _batch(cfg, model, b=2):
    """Pixels at the size the data pipeline feeds; BERT-style ids (CLS ... SEP, then padding) for ALBEF."""
    g = torch.Generator().manual_seed(0)
    size = int(cfg.data.image_size or model.image_cfg["size"])
    length = int(cfg.data.tokenizer.context_length)
    vocab = int(model.text_cfg["vocab_size"])
    ids = torch.randint(5, min(vocab, 1000), (b, length), generator=g)
    lengths = torch.tensor([length] + [max(3, length // 2)] * (b - 1))
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    if cfg.model.type == "albef":
        a = cfg.model.albef
        ids[:, 0] = a.cls_token_id
        ids[torch.arange(b), lengths - 1] = a.sep_token_id
        ids[mask == 0] = a.pad_token_id
    if cfg.model.video.enabled:  # clips of the configured frame count
        k = int(cfg.data.video.frames)
        return {"video": torch.randn(b, k, 3, size, size, generator=g), "text_ids": ids, "text_mask": mask}
    return {"image": torch.randn(b, 3, size, size, generator=g), "text_ids": ids, "text_mask": mask}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_builds_and_runs_a_forward_pass(path, local):
    shipped = load_config(path)
    overrides = offline_overrides(shipped, local)
    cfg = load_config(path, overrides)
    # the model as shipped but for the towers' sources and widths: type, family options, tower kinds and names
    assert _without_towers(cfg.model) == _without_towers(shipped.model)
    for side in ("vision", "text"):
        got, want = cfg.model[side], shipped.model[side]
        assert got.kind == want.kind and (got.name == want.name or got.kind == "hf"), side
        assert got.evit == want.evit and bool(got.frozen_llm.name) == bool(want.frozen_llm.name), side
    torch.manual_seed(0)
    model = build_model(cfg.model)
    out = model(_batch(cfg, model))
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad, (overrides, loss)
