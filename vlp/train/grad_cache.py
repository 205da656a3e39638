"""GradCache: the contrastive loss over the whole accumulated batch, at one micro-batch's memory.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(RepL4NLP, §3.2): (1) embed every micro-batch without graph; (2) compute the loss over all cached
embeddings (gathered over ranks by the model's loss) and its gradient w.r.t. each embedding;
(3) re-embed each micro-batch with graph, replaying its RNG state, and backpropagate the cached
embedding gradients; the first micro-batch backpropagates the real loss over the cached embeddings
with its own live, which also yields the gradient of the loss's parameters (logit scale, bias).
The result equals one step on the concatenated batch (mb x accum x world negatives) up to float
summation order.

Under DeepSpeed every pass goes through `engine(batch, loss_fn=...)`, so ZeRO-3 gathers parameters and
the engine's backward bookkeeping runs as usual: the dual encoder's forward encodes, then calls the
loss it is given (capture in (1), surrogate in (3)) in place of its `compute_loss`. Step (2) differentiates w.r.t. the
embeddings only, so no parameter gradient hook (ZeRO's reduction) fires outside the engine.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List

import torch

from vlp.config import ConfigError


def check_model(model: torch.nn.Module) -> None:
    if not (callable(getattr(model, "compute_loss", None))
            and "loss_fn" in inspect.signature(model.forward).parameters):
        raise ConfigError(f"train.grad_cache=true needs a dual-encoder model whose forward ends in "
                          f"compute_loss(image_emb, text_emb) and takes forward(batch, loss_fn) (model.type clip, align or "
                          f"siglip); "
                          f"{type(model).__name__} has none: set train.grad_cache=false")


def _rng_devices(device: torch.device) -> List[torch.device]:
    return [device] if device.type == "cuda" else []


def _get_rng(device: torch.device) -> Any:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _rng_devices(device)]


def _set_rng(state: Any, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(_rng_devices(device), state[1]):
        torch.cuda.set_rng_state(s, d)


def grad_cache_step(engine, chunks: List[Dict[str, Any]], device: torch.device) -> Dict[str, Any]:
    """One optimizer step over `chunks` (= train.grad_accum micro-batches); returns the model's
    loss output on the whole accumulated batch (detached)."""
    import deepspeed

    module = engine.module
    cached: List[Any] = []
    rng: List[Any] = []

    def capture(image_emb, text_emb):
        cached.append((image_emb, text_emb))
        return {"loss": image_emb.new_zeros(())}

    with torch.no_grad():
        for chunk in chunks:
            rng.append(_get_rng(device))
            engine(chunk, loss_fn=capture)
    sizes = [img.shape[0] for img, _ in cached]
    all_img = torch.cat([img for img, _ in cached]).requires_grad_()
    all_txt = torch.cat([txt for _, txt in cached]).requires_grad_()
    own = list(module.parameters(recurse=False))
    with deepspeed.zero.GatheredParameters(own):  # the loss's own parameters in full under ZeRO-3
        out = module.compute_loss(all_img, all_txt)
        g_img, g_txt = torch.autograd.grad(out["loss"], [all_img, all_txt])
    g_img, g_txt = g_img.split(sizes), g_txt.split(sizes)
    real_loss = module.compute_loss

    def surrogate(j):
        def loss_fn(image_emb, text_emb):
            if j > 0:
                return {"loss": (image_emb * g_img[j]).sum() + (text_emb * g_txt[j]).sum()}
            # the real loss with chunk 0 live: the same embedding gradient, plus the gradient of the
            # loss's own parameters (logit scale/bias) inside forward, where ZeRO-3 gathers them. In
            # the first micro-step, because ZeRO-3 overwrites (not adds) a gradient partition there.
            return real_loss(torch.cat([image_emb] + [img for img, _ in cached[1:]]),
                             torch.cat([text_emb] + [txt for _, txt in cached[1:]]))
        return loss_fn

    for j, chunk in enumerate(chunks):
        _set_rng(rng[j], device)
        res = engine(chunk, loss_fn=surrogate(j))
        engine.backward(res["loss"], scale_wrt_gas=False)  # already the whole batch's gradient
        engine.step()
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


__all__ = ["grad_cache_step", "check_model"]
