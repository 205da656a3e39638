"""Online data: shard specs, streaming loaders with exact resume, transforms, tokenizers."""
from vlp.data.pipeline import CorruptDataError, TrainLoader, build_train_loader
from vlp.data.shards import expand_shards, resolve_shards
from vlp.data.tokenizers import build_tokenizer

__all__ = ["build_train_loader", "build_tokenizer", "TrainLoader",
           "CorruptDataError", "expand_shards", "resolve_shards"]
