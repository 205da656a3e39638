"""Two gloo ranks: gather-with-grad losses give the gradients of the loss on the concatenated batch.

Each rank holds half of a global batch. After averaging parameter gradients over ranks (what
DeepSpeed/DDP do), they must equal the single-process gradients on the whole batch; each rank's
input gradients equal world x the single-process ones (every rank's loss reaches them through the
all-gather's reduce-scatter backward). Checked for full and local-loss InfoNCE, for SigLIP (gathered
and chunked over the ring), and through the tiny dual-encoder model.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp.losses import clip_loss, siglip_loss

WORLD, PER_RANK, DIM = 2, 3, 8
VARIANTS = ("full", "local", "siglip", "siglip_ring")


def _data():
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(WORLD * PER_RANK, DIM, generator=g, dtype=torch.float64)
    x_txt = torch.randn(WORLD * PER_RANK, DIM, generator=g, dtype=torch.float64)
    w = torch.randn(DIM, DIM, generator=g, dtype=torch.float64) / DIM ** 0.5
    return x_img, x_txt, w


def _loss_grads(variant, x_img, x_txt, w):
    """Loss and grads w.r.t. inputs and the shared parameters (w, log-scale, bias)."""
    x_img, x_txt = x_img.clone().requires_grad_(), x_txt.clone().requires_grad_()
    w = w.clone().requires_grad_()
    log_scale = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    img, txt = F.normalize(x_img @ w, dim=-1), F.normalize(x_txt @ w.T, dim=-1)
    if variant.startswith("siglip"):  # siglip_ring: the texts travel rank to rank, one block at a time
        loss = siglip_loss(img, txt, log_scale.exp(), bias, chunked=variant == "siglip_ring")
    else:
        loss = clip_loss(img, txt, log_scale.exp(), local_loss=variant == "local")
    loss.backward()
    bias_grad = bias.grad if bias.grad is not None else torch.zeros(1, dtype=torch.float64)
    return dict(loss=loss.detach(), x_img=x_img.grad, x_txt=x_txt.grad, w=w.grad, log_scale=log_scale.grad,
                bias=bias_grad)


def _tiny_model(model_type):
    from vlp.models import build_model

    torch.manual_seed(0)
    return build_model(dict(
        type=model_type, embed_dim=16,
        vision=dict(kind="timm", name="vit_tiny_patch16_224",
                    kwargs=dict(img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2)),
        text=dict(kind="open_clip", kwargs=dict(width=16, layers=1, heads=2, context_length=8, vocab_size=64))))


def _model_batch():
    g = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    return dict(image=torch.randn(n, 3, 16, 16, generator=g), text_ids=torch.randint(0, 64, (n, 8), generator=g),
                text_mask=torch.ones(n, 8, dtype=torch.long))


def _model_grads(model_type, rows):
    model = _tiny_model(model_type)
    batch = {k: v[rows] for k, v in _model_batch().items()}
    out = model(batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x_img, x_txt, w = _data()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        result = {}
        for variant in VARIANTS:
            res = _loss_grads(variant, x_img[rows], x_txt[rows], w)
            for key in ("w", "log_scale", "bias"):  # data-parallel gradient averaging
                dist.all_reduce(res[key])
                res[key] /= WORLD
            result[variant] = res
        for model_type in ("clip", "siglip"):
            loss, grads = _model_grads(model_type, rows)
            for g in grads.values():
                dist.all_reduce(g)
                g /= WORLD
            result[f"model_{model_type}"] = dict(loss=loss, grads=grads)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_gathered_loss_gradients_match_single_process(ranks, variant):
    x_img, x_txt, w = _data()
    ref = _loss_grads(variant, x_img, x_txt, w)
    losses = torch.stack([r[variant]["loss"] for r in ranks])
    if variant == "full":  # every rank computes the global loss
        torch.testing.assert_close(losses, ref["loss"].expand(WORLD), rtol=1e-10, atol=1e-12)
    else:  # each rank scores its own rows; their mean is the global loss
        assert not torch.allclose(losses[0], losses[1])
        torch.testing.assert_close(losses.mean(), ref["loss"], rtol=1e-10, atol=1e-12)
    for key in ("w", "log_scale", "bias"):
        for r in ranks:
            torch.testing.assert_close(r[variant][key], ref[key], rtol=1e-9, atol=1e-12)
    for key in ("x_img", "x_txt"):
        got = torch.cat([r[variant][key] for r in ranks]) / WORLD
        torch.testing.assert_close(got, ref[key], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_model_gradients_match_single_process(ranks, model_type):
    ref_loss, ref_grads = _model_grads(model_type, slice(None))
    losses = torch.stack([r[f"model_{model_type}"]["loss"] for r in ranks])
    expected = losses[0] if model_type == "clip" else losses.mean()
    torch.testing.assert_close(expected, ref_loss, rtol=1e-5, atol=1e-6)
    for r in ranks:
        grads = r[f"model_{model_type}"]["grads"]
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_siglip_ring_equals_the_gathered_siglip_on_every_rank(ranks):
    """Not only the same global sum: each rank's ring loss and gradients are its gathered ones."""
    for r in ranks:
        for key in ("loss", "x_img", "x_txt", "w", "log_scale", "bias"):
            torch.testing.assert_close(r["siglip_ring"][key], r["siglip"][key], rtol=1e-10, atol=1e-12, msg=key)

