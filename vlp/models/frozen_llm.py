"""One frozen decoder layer of a pretrained causal LM as an extra visual encoder layer.

Pang et al., ICLR 2024, "Frozen Transformers in Language Models Are Effective Visual Encoder Layers"
(arXiv 2310.12973, §3; reference code ziqipang/LM4VisualEncoding `models/vit_llama.py`, `llama.py`):
after the last ViT block and before the final norm, every token goes through a trainable
`Linear(D -> H, bias=False)`, one frozen LLM layer (LLaMA-7B's last), a normalisation, and a trainable
`Linear(H -> D, bias=False)`. As in the reference, the layer attends without a causal mask and without
rotary position embeddings, and the normalisation is the LM's final RMSNorm *without* its learned
weight (the reference loads only `layers.31.*`, so that norm keeps its ones initialisation).

How the reference's changes are made on transformers' own layer classes:
- causal mask: no mask is passed and every submodule's `is_causal` flag is set to False (transformers'
  SDPA / flash paths otherwise switch causality on by themselves when the mask is None);
- RoPE (LLaMA-family layers, which take `position_embeddings=(cos, sin)`): cos = 1, sin = 0, so
  `q * cos + rotate_half(q) * sin == q` exactly; layers without rotary embeddings (OPT: its learned
  positions live in the model's embedding, not in the layer) need nothing. Layers that compute rotary
  embeddings internally are refused.
- frozen and never in train mode (no dropout), run in the dtype of the incoming activations (the
  weights are cast once, on the first forward in a new dtype).

Memory: only the chosen layer is materialised. The LM skeleton is built on the meta device from its
config (accelerate's `init_empty_weights`), and only that layer's tensors are read from the
safetensors shards (`model.safetensors.index.json` names the files; others are never opened). For a
hub name only config.json, the index and the shards holding the layer are downloaded (a single-file
checkpoint is downloaded whole).

DeepSpeed: the layer's weights are registered as persistent *buffers*, not parameters. ZeRO-3
partitions every parameter of the engine's module, frozen ones included, and would shard, gather
and save the LM layer like trainable weights; buffers are left whole on each rank, get no gradient,
no optimizer state and no weight decay by construction, and are saved with DeepSpeed checkpoints
and exports like any state-dict entry. (`deepspeed.zero.Init` exclusion would only apply to modules
built inside its context, which our builder doesn't use.) The cost: each rank holds the full layer
(LLaMA-7B's last: 202M values).
"""
from __future__ import annotations

import inspect
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.config import ConfigError

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
_ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "partial_rotary_factor")


@dataclass
class LoadedLayer:
    """A decoder layer with its weights as buffers, and where they came from."""

    module: nn.Module
    config: Any  # the LM's (text) config
    index: int  # the layer's index in the LM
    prefix: str  # checkpoint key prefix of the layer, e.g. "model.layers.31."
    files: List[str] = field(default_factory=list)  # safetensors files read


def _fetcher(source: str, key: str) -> Callable[[str], Optional[str]]:
    """filename -> local path (None when the source has no such file): a local dir, else a hub repo."""
    if os.path.isdir(source):
        return lambda name: os.path.join(source, name) if os.path.isfile(os.path.join(source, name)) else None
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConfigError(f"model.{key}.frozen_llm.name: {source!r} is not a directory (nor a hub repo id ORG/NAME)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(name: str) -> Optional[str]:
        try:
            return hf_hub_download(source, name)
        except EntryNotFoundError:  # not in the repo, or (offline) not in the local cache
            return None
        except (OSError, ValueError) as e:  # unknown or gated repo, network
            raise ConfigError(f"model.{key}.frozen_llm.name: cannot fetch {name} of hub repo {source!r}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    return fetch


def _weight_map(fetch: Callable[[str], Optional[str]], source: str, key: str) -> Dict[str, str]:
    """checkpoint key -> safetensors filename."""
    index = fetch(INDEX)
    if index is not None:
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = fetch(SINGLE)
    if single is None:
        raise ConfigError(f"model.{key}.frozen_llm.name: {source!r} has no safetensors weights ({INDEX} or "
                          f"{SINGLE}); re-save the LM with save_pretrained(..., safe_serialization=True)")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: SINGLE for k in f.keys()}


def _decoder_layers(lm: nn.Module, n_layers: int) -> tuple:
    """(qualified name, ModuleList) of the LM's stack of decoder layers."""
    for name, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers:
            return name, mod
    raise ConfigError(f"cannot find the {n_layers} decoder layers of {type(lm).__name__}")


def _key_prefix(layer_name: str, names: List[str], weight_map: Dict[str, str]) -> Optional[str]:
    """The checkpoint prefix of the layer: its module path, or that path less leading components
    (checkpoints saved from the base model lack the `model.` of the causal-LM wrapper)."""
    parts = layer_name.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[i:]) + "."
        if all(prefix + n in weight_map for n in names):
            return prefix
    return None


def _params_to_buffers(module: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Replace every parameter of `module` by a persistent buffer holding tensors[qualified name]."""
    for mod_name, sub in module.named_modules():
        for name in list(sub._parameters):
            if sub._parameters[name] is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, tensors[f"{mod_name}.{name}" if mod_name else name], persistent=True)


def load_decoder_layer(source: str, layer: int = -1, key: str = "vision") -> LoadedLayer:
    """Decoder layer `layer` (negative: from the end) of the causal LM at `source` (local dir or hub
    name), with only that layer's tensors read; its weights become fp32 buffers, all flags non-causal."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if not source:
        raise ConfigError(f"model.{key}.frozen_llm.name is empty: give a causal LM's local dir or hub name")
    fetch = _fetcher(source, key)
    config_file = fetch("config.json")
    if config_file is None:
        raise ConfigError(f"model.{key}.frozen_llm.name: {source!r} has no config.json (a hub repo: or it is not "
                          "in the local cache while HF_HUB_OFFLINE is set)")
    try:
        config = AutoConfig.from_pretrained(os.path.dirname(config_file))
        with init_empty_weights():
            lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.{key}.frozen_llm.name: cannot build a causal LM from {source!r}: {e}") from e
    text_config = config.get_text_config()
    n = int(text_config.num_hidden_layers)
    index = layer + n if layer < 0 else layer
    if not 0 <= index < n:
        raise ConfigError(f"bad value for 'model.{key}.frozen_llm.layer': {layer}; {source!r} has {n} layers "
                          f"(0..{n - 1}, or -1..-{n} from the end)")
    list_name, layers = _decoder_layers(lm, n)
    module = layers[index]
    del lm, layers  # the meta skeleton goes; only `module` stays referenced

    weight_map = _weight_map(fetch, source, key)
    param_names = [name for name, _ in module.named_parameters()]
    buffer_names = [name for name, b in module.named_buffers()]
    prefix = _key_prefix(f"{list_name}.{index}", param_names, weight_map)
    if prefix is None:
        example = next((k for k in weight_map if f".{index}." in k), next(iter(weight_map), ""))
        raise ConfigError(f"model.{key}.frozen_llm.name: the weights of {source!r} don't hold layer {index} under "
                          f"the names {type(module).__name__} expects (e.g. {list_name}.{index}.{param_names[0]}; "
                          f"the checkpoint has e.g. {example!r})")
    wanted = param_names + [b for b in buffer_names if prefix + b in weight_map]
    by_file: Dict[str, List[str]] = defaultdict(list)
    for name in wanted:
        by_file[weight_map[prefix + name]].append(name)
    tensors: Dict[str, torch.Tensor] = {}
    files = []
    for filename, names in sorted(by_file.items()):
        path = fetch(filename)
        if path is None:
            raise ConfigError(f"model.{key}.frozen_llm.name: {source!r} lacks {filename} named by its {INDEX}")
        files.append(path)
        with safe_open(path, framework="pt") as f:
            for name in names:
                t = f.get_tensor(prefix + name)
                tensors[name] = t.float() if t.is_floating_point() else t
    _params_to_buffers(module, tensors)
    with torch.no_grad():  # persistent buffers the checkpoint also holds
        for name in wanted:
            if name in buffer_names:
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner).register_buffer(leaf, tensors[name])
    meta = [name for name, b in module.named_buffers() if b.is_meta]
    if meta:
        raise ConfigError(f"model.{key}.frozen_llm: {type(module).__name__} has tensors the checkpoint lacks: {meta[:4]}")
    for sub in module.modules():
        if hasattr(sub, "is_causal"):
            sub.is_causal = False
    module.eval()
    return LoadedLayer(module, text_config, index, prefix, files)


def _takes_rope(layer: nn.Module, config: Any, source: str, key: str) -> bool:
    """Whether the layer takes `position_embeddings=(cos, sin)`; refuse layers with built-in rotary embeddings."""
    if "position_embeddings" in inspect.signature(layer.forward).parameters:
        return True
    if any(getattr(config, k, None) for k in _ROPE_KEYS):
        raise ConfigError(f"model.{key}.frozen_llm.name: {source!r} ({type(layer).__name__}) applies rotary "
                          "embeddings inside its layers, which cannot be removed as the method requires; "
                          "use a LLaMA-family or OPT model")
    return False


class FrozenLLMBlock(nn.Module):
    """`proj_out(rms_norm(llm_layer(proj_in(x))))` over all tokens; only the two projections train."""

    def __init__(self, loaded: LoadedLayer, dim: int, source: str = "", key: str = "vision"):
        super().__init__()
        cfg = loaded.config
        width = int(cfg.hidden_size)
        self.proj_in = nn.Linear(dim, width, bias=False)
        self.layer = loaded.module
        self.proj_out = nn.Linear(width, dim, bias=False)
        for proj in (self.proj_in, self.proj_out):  # the reference's timm ViT init of all Linear layers
            nn.init.trunc_normal_(proj.weight, std=0.02)
        self.width = width
        self.eps = float(getattr(cfg, "rms_norm_eps", None) or 1e-6)
        self.identity_rope = _takes_rope(self.layer, cfg, source, key)
        self.source, self.index = source, loaded.index

    def train(self, mode: bool = True) -> "FrozenLLMBlock":
        super().train(mode)
        self.layer.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if next(self.layer.buffers()).dtype != h.dtype:
            self.layer.to(h.dtype)  # once per dtype change: the layer runs in the compute dtype
        kwargs = {}
        if self.identity_rope:
            one = torch.ones(1, 1, 1, dtype=h.dtype, device=h.device)
            kwargs["position_embeddings"] = (one, torch.zeros_like(one))
        out = self.layer(h, attention_mask=None, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out = F.rms_norm(out.float(), (self.width,), eps=self.eps).to(h.dtype)
        return self.proj_out(out)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, layer={self.index}, width={self.width}"


def add_frozen_llm(model: nn.Module, fcfg: Any, key: str = "vision") -> nn.Module:
    """Append a `FrozenLLMBlock` after the last block of a timm ViT (before its final norm); returns `model`."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "norm"):
        raise ConfigError(f"model.{key}.frozen_llm: needs a timm VisionTransformer (blocks then norm); "
                          f"{type(model).__name__} is not one")
    loaded = load_decoder_layer(fcfg.name, int(fcfg.layer), key)
    blocks.append(FrozenLLMBlock(loaded, int(model.embed_dim), fcfg.name, key))
    return model


__all__ = ["FrozenLLMBlock", "LoadedLayer", "load_decoder_layer", "add_frozen_llm"]
