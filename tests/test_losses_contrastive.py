"""Contrastive (CLIP/ALIGN) and sigmoid (SigLIP) losses against hand computations, one process."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlp.dist import gather_with_grad, rank_and_world
from vlp.losses import clip_loss, siglip_loss


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _ce(logits_row, target, smoothing=0.0):
    """Cross-entropy of one row written out: -sum_k q_k log softmax_k."""
    n = len(logits_row)
    log_z = math.log(sum(math.exp(v) for v in logits_row))
    q = [smoothing / n + (1 - smoothing) * (k == target) for k in range(n)]
    return -sum(qk * (logits_row[k] - log_z) for k, qk in enumerate(q))


def _hand_clip(img, txt, scale, smoothing=0.0):
    n = img.shape[0]
    s = (img @ txt.T).tolist()
    i2t = sum(_ce([scale * s[i][j] for j in range(n)], i, smoothing) for i in range(n)) / n
    t2i = sum(_ce([scale * s[j][i] for j in range(n)], i, smoothing) for i in range(n)) / n
    return i2t, t2i


def test_world_is_one_without_process_group():
    assert rank_and_world() == (0, 1)
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_clip_loss_matches_hand_computation():
    img, txt = _unit(3, 4, seed=1), _unit(3, 4, seed=2)
    scale = 1 / 0.07
    i2t, t2i = _hand_clip(img, txt, scale)
    got = clip_loss(img, txt, torch.tensor([scale], dtype=torch.float64))
    assert got.shape == ()
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-9)


def test_clip_loss_hand_case_two_pairs():
    # orthogonal matched pairs, scale 1: each row's logits are [1, 0] -> loss = log(1 + e^-1)
    img = torch.eye(2, dtype=torch.float64)
    got = clip_loss(img, img.clone(), torch.tensor([1.0], dtype=torch.float64))
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)


def test_align_label_smoothing_and_summed_directions():
    img, txt = _unit(4, 8, seed=3), _unit(4, 8, seed=4)
    i2t, t2i = _hand_clip(img, txt, 1.0, smoothing=0.1)
    scale = torch.tensor([1.0], dtype=torch.float64)
    got = clip_loss(img, txt, scale, label_smoothing=0.1, sum_directions=True)
    assert got.item() == pytest.approx(i2t + t2i, rel=1e-9)
    plain = clip_loss(img, txt, scale, sum_directions=True)
    assert plain.item() != pytest.approx(got.item(), rel=1e-6)  # smoothing changes the value


def test_local_loss_equals_full_on_one_rank():
    img, txt = _unit(5, 6, seed=5), _unit(5, 6, seed=6)
    scale = torch.tensor([20.0], dtype=torch.float64)
    full = clip_loss(img, txt, scale)
    local = clip_loss(img, txt, scale, local_loss=True)
    assert local.item() == pytest.approx(full.item(), rel=1e-12)


def test_siglip_matches_direct_formula():
    img, txt = _unit(4, 5, seed=7), _unit(4, 5, seed=8)
    t, b = 10.0, -10.0
    s = (img @ txt.T).tolist()
    direct = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            direct -= math.log(1.0 / (1.0 + math.exp(-z * (t * s[i][j] + b))))
    direct /= 4
    got = siglip_loss(img, txt, torch.tensor([t], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
    assert got.shape == ()
    assert got.item() == pytest.approx(direct, rel=1e-9)


def test_losses_send_gradient_to_features_scale_and_bias():
    img = _unit(3, 4, seed=9).requires_grad_()
    txt = _unit(3, 4, seed=10).requires_grad_()
    scale = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    (clip_loss(img, txt, scale) + siglip_loss(img, txt, scale, bias)).backward()
    for t in (img, txt, scale, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
