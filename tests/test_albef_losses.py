"""ALBEF's objectives in isolation: hard-negative sampling, MLM masking, momentum distillation, the
alpha ramp and the EMA update."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp.losses.distill import alpha_at, distilled_cross_entropy, itc_distill_loss
from vlp.losses.itm import hard_negatives, hardness_at, itm_labels, itm_loss, negative_weights
from vlp.losses.mlm import IGNORE, mask_tokens, mlm_loss
from vlp.models.momentum import buffer_copy, ema_update


def test_hard_negatives_skip_the_positive_and_follow_the_similarities():
    g = torch.Generator().manual_seed(0)
    n, copies, rounds = 5, 100, 30  # 3,000 draws per row
    sim_i2t = torch.randn(n, n, generator=g) * 2
    sim_t2i = torch.randn(n, n, generator=g) * 2

    def blocks(sim):  # `copies` independent batches in one call: -inf outside each n x n block
        big = torch.full((n * copies, n * copies), -math.inf)
        for c in range(copies):
            big[c * n:(c + 1) * n, c * n:(c + 1) * n] = sim
        return big

    big_i2t, big_t2i = blocks(sim_i2t), blocks(sim_t2i)
    counts_t, counts_i = torch.zeros(n, n), torch.zeros(n, n)
    rows = torch.arange(n * copies)
    draws = copies * rounds
    for _ in range(rounds):
        neg_text, neg_image = hard_negatives(big_i2t, big_t2i, g)
        assert (neg_text // n == rows // n).all() and (neg_image // n == rows // n).all()
        counts_t.index_put_((rows % n, neg_text % n), torch.ones(len(rows)), accumulate=True)
        counts_i.index_put_((rows % n, neg_image % n), torch.ones(len(rows)), accumulate=True)
    for counts, sim in ((counts_t, sim_i2t), (counts_i, sim_t2i)):
        assert counts.diagonal().sum() == 0  # never the positive
        expected = negative_weights(sim) * draws
        off = ~torch.eye(n, dtype=torch.bool)
        for row in range(n):  # Pearson chi-square per row, 4 degrees of freedom
            e, o = expected[row][off[row]], counts[row][off[row]]
            chi2 = float(((o - e) ** 2 / e).sum())
            assert chi2 < 18.47, (row, chi2)  # the 99.9% quantile of chi2(4)
    # the sampling weights are the softmax over the off-diagonal similarities
    w = negative_weights(sim_i2t)
    ref = torch.softmax(sim_i2t.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf), 1)
    torch.testing.assert_close(w, ref)


def test_hard_negative_weights_survive_half_precision_and_tiny_temperatures():
    """The reference's `softmax + 1e-4, zero the diagonal` breaks here ("invalid multinomial distribution")."""
    feats = F.normalize(torch.randn(8, 16), dim=-1)
    sim = (feats @ feats.T / 0.001).to(torch.bfloat16)  # temperature at its lower clamp, bf16 activations
    neg_text, neg_image = hard_negatives(sim, sim.T.contiguous(), torch.Generator().manual_seed(1))
    assert (neg_text != torch.arange(8)).all() and (neg_image != torch.arange(8)).all()
    assert negative_weights(sim).dtype == torch.float32
    with pytest.raises(ValueError, match="at least 2"):
        negative_weights(torch.zeros(1, 1))


def test_negative_curriculum_mixes_uniform_and_hard_weights():
    sim = torch.tensor([[9.0, 5.0, 0.0], [1.0, 9.0, 1.0], [0.0, 8.0, 9.0]])
    uniform = negative_weights(sim, hardness=0.0)
    torch.testing.assert_close(uniform, torch.tensor([[0, .5, .5], [.5, 0, .5], [.5, .5, 0]]))
    half = negative_weights(sim, hardness=0.5)
    torch.testing.assert_close(half, 0.5 * uniform + 0.5 * negative_weights(sim))
    torch.testing.assert_close(half.sum(1), torch.ones(3))
    assert [hardness_at(s, 100) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert hardness_at(0, 0) == 1.0  # no curriculum: hard negatives from the first step (the paper)


def test_itm_labels_and_loss():
    assert itm_labels(2, torch.device("cpu")).tolist() == [1, 1, 0, 0, 0, 0]
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    loss, metrics = itm_loss(logits)
    assert metrics["itm_acc"].item() == pytest.approx(5 / 6)
    p = torch.sigmoid(torch.tensor(5.0)).item()  # P(match) of a confident "match"
    assert metrics["itm_pos_prob"].item() == pytest.approx(p)  # both positives say "match"
    assert metrics["itm_neg_prob"].item() == pytest.approx((p + 3 * (1 - p)) / 4)  # one of 4 negatives does
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0, 0])).item())


def test_mlm_masking_rates_and_never_special_tokens():
    g = torch.Generator().manual_seed(0)
    b, length, vocab = 2000, 32, 1000
    pad, cls, sep, mask_id = 0, 101, 102, 103
    ids = torch.randint(200, vocab, (b, length), generator=g)
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    attention = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = cls
    ids[torch.arange(b), lengths - 1] = sep
    ids[attention == 0] = pad
    ids[:, 1] = mask_id  # a literal [MASK] in the input is special too
    u_select, u_kind = torch.rand(b, length, generator=g), torch.rand(b, length, generator=g)
    random_ids = torch.randint(vocab, (b, length), generator=g)
    out, labels = mask_tokens(ids, attention, u_select, u_kind, random_ids, 0.15, [pad, cls, sep, mask_id], mask_id)

    chosen = labels != IGNORE
    special = torch.isin(ids, torch.tensor([pad, cls, sep, mask_id])) | (attention == 0)
    assert not (chosen & special).any()
    assert (labels[chosen] == ids[chosen]).all()
    assert (out[~chosen] == ids[~chosen]).all()  # nothing else changes
    eligible = ~special
    assert chosen.sum() / eligible.sum() == pytest.approx(0.15, abs=0.006)
    as_mask = (out == mask_id) & chosen
    as_random = chosen & (out == random_ids) & (random_ids != ids)  # a random draw may equal the original
    kept = chosen & (out == ids)
    m = chosen.sum().item()
    assert as_mask.sum().item() / m == pytest.approx(0.8, abs=0.015)
    assert as_random.sum().item() / m == pytest.approx(0.1, abs=0.01)
    assert kept.sum().item() / m == pytest.approx(0.1, abs=0.01)


def test_mlm_loss_is_ce_plus_kl_over_the_global_count():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    targets = torch.randint(11, (6,), generator=g)
    ce = F.cross_entropy(logits, targets)
    assert mlm_loss(logits, targets, None, 0.0, 6).item() == pytest.approx(ce.item(), rel=1e-6)
    kl = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(logits, -1))).sum(-1).mean()
    got = mlm_loss(logits, targets, teacher, 0.4, 6)
    assert got.item() == pytest.approx((0.6 * ce + 0.4 * kl).item(), rel=1e-5)
    # denominators: a rank with 6 of 10 chosen tokens on 2 ranks divides by 10 / 2
    assert mlm_loss(logits, targets, None, 0.0, 5).item() == pytest.approx(ce.item() * 6 / 5, rel=1e-6)
    empty = mlm_loss(torch.zeros(0, 11, requires_grad=True), torch.zeros(0, dtype=torch.long), None, 0.0, 0)
    assert empty.item() == 0.0


def test_alpha_ramps_linearly_then_stays():
    assert [alpha_at(s, 0.4, 10) for s in (0, 5, 10, 1000)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert alpha_at(0, 0.4, 0) == 0.4


def test_itc_distillation_matches_the_reference_gradients():
    """(1-a) CE + a KL has the gradients of ALBEF's soft cross-entropy with mixed targets, and a=0 is
    plain InfoNCE against [momentum batch, queue]."""
    g = torch.Generator().manual_seed(0)
    b, q, d = 4, 8, 16
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    img_m, txt_m = F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)
    iq, tq = F.normalize(torch.randn(q, d, generator=g), dim=-1), F.normalize(torch.randn(q, d, generator=g), dim=-1)
    temp = torch.tensor([0.07])

    def reference(alpha):
        tcols, icols = torch.cat([txt_m, tq]), torch.cat([img_m, iq])
        onehot = torch.zeros(b, b + q)
        onehot[torch.arange(b), torch.arange(b)] = 1
        t_i2t = alpha * F.softmax(img_m @ tcols.T / temp, 1) + (1 - alpha) * onehot
        t_t2i = alpha * F.softmax(txt_m @ icols.T / temp, 1) + (1 - alpha) * onehot
        l1 = -(F.log_softmax(img @ tcols.T / temp, 1) * t_i2t).sum(1).mean()
        l2 = -(F.log_softmax(txt @ icols.T / temp, 1) * t_t2i).sum(1).mean()
        return (l1 + l2) / 2

    plain = itc_distill_loss(img, txt, img_m, txt_m, iq, tq, temp, 0.0)
    assert plain.item() == pytest.approx(reference(0.0).item(), rel=1e-6)
    ours = itc_distill_loss(img, txt, img_m, txt_m, iq, tq, temp, 0.4)
    grads = torch.autograd.grad(ours, [img, txt])
    ref_grads = torch.autograd.grad(reference(0.4), [img, txt])
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    # offset: rows of rank 1 of 2 find their positives at columns B..2B of the gathered momentum batch
    both_m = (torch.cat([torch.randn(b, d, generator=g), img_m]), torch.cat([torch.randn(b, d, generator=g), txt_m]))
    shifted = itc_distill_loss(img, txt, F.normalize(both_m[0], dim=-1), F.normalize(both_m[1], dim=-1), iq, tq,
                               temp, 0.0, offset=b)
    assert torch.isfinite(shifted) and shifted.item() != pytest.approx(plain.item())
    assert distilled_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 3), 1.0).item() == \
        pytest.approx(0.0, abs=1e-7)


def test_ema_update_by_hand_and_tied_weights():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    online[2].weight = nn.Parameter(online[0].weight.detach().T.clone())
    online.tied = nn.Linear(3, 4, bias=False)
    online.tied.weight = online[0].weight  # tied: one parameter in two modules
    online.frozen = nn.Linear(2, 2)
    online.frozen.requires_grad_(False)
    twin, slots = buffer_copy(online)
    assert len(list(twin.parameters())) == 0 and len(slots) == len(list(online.parameters()))
    assert all(b.dtype == torch.float32 for b in twin.buffers())
    assert twin.tied.weight is twin[0].weight  # still tied in the copy
    before = {n: b.clone() for n, b in twin.named_buffers()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    ema_update(online.parameters(), slots, 0.9, max_numel=10)  # several gather runs
    online_now = dict(online.named_parameters(remove_duplicate=False))
    for name, buf in twin.named_buffers():
        if name.startswith("frozen."):  # frozen parameters are not averaged (their copy equals them)
            assert torch.equal(buf, before[name])
            continue
        torch.testing.assert_close(buf, 0.9 * before[name] + 0.1 * online_now[name].detach())
    x = torch.randn(2, 3)
    with torch.no_grad():  # the copy computes like the online module with the momentum weights
        ema_update(online.parameters(), slots, 0.0)
        torch.testing.assert_close(twin[2](twin[1](twin[0](x))), online[2](online[1](online[0](x))))
    with pytest.raises(RuntimeError, match="online parameters"):
        ema_update(list(online.parameters())[:-1], slots, 0.9)
