"""Zero-shot evaluation: image-text retrieval (with optional ITM re-ranking) and classification.

Public API (imported lazily so `vlp --help` stays fast; models load through `vlp.load.load_model`):
- `evaluate_retrieval(...)`, `evaluate_zeroshot(...)`: metrics dicts, identical on every rank
- `run_retrieval_eval(model, cfg, rank, world_size)`: the trainer's periodic eval hook
- `retrieval_metrics(img_emb, txt_emb, txt2img)`: the metric core on embeddings
"""
import importlib

_EXPORTS = {
    "evaluate_retrieval": "vlp.eval.evaluate",
    "run_retrieval_eval": "vlp.eval.evaluate",
    "evaluate_zeroshot": "vlp.eval.zeroshot",
    "retrieval_metrics": "vlp.eval.retrieval",
    "retrieval_ranks": "vlp.eval.retrieval",
    "metrics_from_ranks": "vlp.eval.retrieval",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlp.eval' has no attribute {name!r}")


__all__ = list(_EXPORTS)
