"""The model families: the one list of `model.type` values, read by config validation and `build_model`.

A built-in family is one line in `BUILT_IN` (its module registers the builder with `@register_model`
when imported, on first use, so `import vlp` stays light); a family from outside vlp registers itself
with `vlp.models.register_model` before the config is loaded. This module imports nothing from vlp, so
`vlp.config` can validate against it without an upward import.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List

BUILT_IN = {
    "clip": "vlp.models.dual_encoder",
    "align": "vlp.models.dual_encoder",
    "siglip": "vlp.models.dual_encoder",
    "albef": "vlp.models.albef",
}
_BUILDERS: Dict[str, Callable[[Any], Any]] = {}


def register_model(name: str) -> Callable:
    """Decorator: `fn(model_cfg) -> nn.Module` builds family `name`."""

    def wrap(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _BUILDERS[name] = fn
        return fn

    return wrap


def families() -> List[str]:
    """Every `model.type` there is."""
    return sorted(set(BUILT_IN) | set(_BUILDERS))


def builder(name: str) -> Callable[[Any], Any]:
    """The registered builder of family `name`, importing its built-in module on first use (KeyError if
    `name` is not a family)."""
    if name not in _BUILDERS and name in BUILT_IN:
        importlib.import_module(BUILT_IN[name])
    return _BUILDERS[name]
