"""Models: towers (timm, transformers, open_clip) and objectives, built by `build_model(cfg.model)`."""
from vlp.models.compat import check_tokenizer
from vlp.models.flops import flops_per_sample
from vlp.models.param_groups import param_groups
from vlp.models.registry import build_model, register_model

__all__ = ["build_model", "register_model", "param_groups", "flops_per_sample", "check_tokenizer"]
