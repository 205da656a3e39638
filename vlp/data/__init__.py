"""Online data: shard specs, streaming loaders with exact resume, transforms, tokenizers.

The names below load their module on first use, so a light submodule (`vlp.data.remote`, imported by
the converter's worker processes) does not pull in torch and the loader."""
import importlib

_EXPORTS = {"build_train_loader": "vlp.data.pipeline", "TrainLoader": "vlp.data.pipeline",
            "CorruptDataError": "vlp.data.pipeline", "expand_shards": "vlp.data.shards",
            "resolve_shards": "vlp.data.shards", "build_tokenizer": "vlp.data.tokenizers"}

__all__ = ["build_train_loader", "build_tokenizer", "TrainLoader",
           "CorruptDataError", "expand_shards", "resolve_shards"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlp.data' has no attribute {name!r}")
