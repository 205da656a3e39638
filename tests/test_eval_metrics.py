"""Retrieval and classification metrics on hand-made embeddings with known ranks."""
import numpy as np
import pytest
import torch

from vlp.eval.retrieval import query_ranks, reranked_ranks, retrieval_metrics, retrieval_ranks
from vlp.eval.zeroshot import classification_metrics, true_class_ranks


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_known_ranks_one_caption_per_image():
    img = torch.eye(3)
    txt = _t([[1, 0, 0], [0.8, 0.6, 0], [0.6, 0.7, 0.1]])
    r = retrieval_ranks(img, txt, [0, 1, 2])
    assert r["t2i_ranks"].tolist() == [1, 2, 3]
    assert r["i2t_ranks"].tolist() == [1, 2, 1]
    m = retrieval_metrics(img, txt, [0, 1, 2])
    assert m["t2i_r1"] == pytest.approx(1 / 3) and m["t2i_r5"] == 1.0
    assert m["i2t_r1"] == pytest.approx(2 / 3)
    assert m["i2t_median_rank"] == 1.0 and m["i2t_mean_rank"] == pytest.approx(4 / 3)
    assert m["t2i_median_rank"] == 2.0 and m["t2i_mean_rank"] == 2.0
    recalls = [m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert m["mean_recall"] == pytest.approx(np.mean(recalls))


def test_several_captions_per_image_use_the_best_positive():
    img = torch.eye(2)
    # image 0: a poor caption (t0) and a good one (t1); image 1: a poor one (t2) and a good one (t3)
    txt = _t([[0.2, 0.98], [0.9, 0.1], [0.95, 0.3], [0.0, 1.0]])
    r = retrieval_ranks(img, txt, [0, 0, 1, 1])
    assert r["i2t_ranks"].tolist() == [2, 1]  # image 0: t2 (0.95, negative) beats its best caption t1 (0.9)
    assert r["t2i_ranks"].tolist() == [2, 1, 2, 1]
    m = retrieval_metrics(img, txt, [0, 0, 1, 1])
    assert m["i2t_r1"] == 0.5 and m["t2i_r1"] == 0.5 and m["t2i_median_rank"] == 1.5


def test_ties_rank_pessimistically():
    same = torch.ones(4, 3)  # a collapsed model: every score equal
    r = retrieval_ranks(same, same, [0, 1, 2, 3])
    assert r["i2t_ranks"].tolist() == [4, 4, 4, 4] and r["t2i_ranks"].tolist() == [4, 4, 4, 4]
    assert retrieval_metrics(same, same, [0, 1, 2, 3])["t2i_r1"] == 0.0
    # one negative ties with the positive: rank 2, not 1; a tie between two positives costs nothing
    img = _t([[1, 0], [1, 0], [0, 1]])
    txt = _t([[1, 0], [0.6, 0.8], [0, 1]])
    assert retrieval_ranks(img, txt, [0, 1, 2])["t2i_ranks"].tolist() == [2, 3, 1]
    r = retrieval_ranks(torch.eye(2), _t([[1, 0], [1, 0], [0, 1]]), [0, 0, 1])
    assert r["i2t_ranks"].tolist() == [1, 1]


def test_chunking_and_an_independent_sort_agree():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(100, 8, generator=g), dim=-1)
    txt2img = torch.arange(100) % 40
    full = retrieval_ranks(img, txt, txt2img, topk=5)
    chunked = retrieval_ranks(img, txt, txt2img, topk=5, chunk_size=7)
    for k in ("i2t_ranks", "t2i_ranks", "i2t_topk", "t2i_topk"):
        assert torch.equal(full[k], chunked[k])
    sims = (img @ txt.T).numpy()
    for i in range(40):  # rank of the first positive in the descending order
        order = np.argsort(-sims[i])
        first = next(p for p, t in enumerate(order) if txt2img[t] == i)
        assert full["i2t_ranks"][i] == first + 1
    for t in range(100):
        order = np.argsort(-sims[:, t])
        assert full["t2i_ranks"][t] == list(order).index(int(txt2img[t])) + 1
        assert full["t2i_topk"][t].tolist() == order[:5].tolist()


def test_bad_inputs_raise():
    img, txt = torch.eye(3), torch.eye(3)
    with pytest.raises(ValueError, match="no positive"):
        retrieval_ranks(img, txt[:2], [0, 1])  # image 2 has no caption
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(img, torch.full((3, 3), float("nan")), [0, 1, 2])
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_ranks(img, txt, [0, 1, 3])
    with pytest.raises(ValueError, match="non-empty"):
        query_ranks(torch.empty(0, 3), img, torch.empty(0), torch.arange(3))


def test_reranked_ranks():
    cands = torch.tensor([[2, 0, 1], [1, 2, 3], [0, 1, 3]])
    scores = _t([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [0.7, 0.7, 0.1]])
    itc = torch.tensor([2, 9, 1])
    # query 0: positive 0 gets the top ITM score -> 1; query 1: positive 0 not among candidates -> ITC rank;
    # query 2: positive 1 ties with negative 0 -> pessimistic rank 2
    out = reranked_ranks(cands, scores, torch.tensor([0, 0, 1]), torch.arange(4), itc)
    assert out.tolist() == [1, 9, 2]


def test_classification_ranks_and_metrics():
    logits = _t([[0.9, 0.1, 0.0], [0.2, 0.5, 0.5], [0.3, 0.2, 0.1], [0.0, 0.1, 0.8]])
    labels = torch.tensor([0, 2, 1, 2])
    ranks = true_class_ranks(logits, labels)
    assert ranks.tolist() == [1, 2, 2, 1]  # sample 1 ties with class 1 -> rank 2
    m = classification_metrics(ranks, labels, ["a", "b", "c", "d", "e", "f"])
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": 0.5, "d": None, "e": None, "f": None}
    assert m["mean_per_class_accuracy"] == pytest.approx(0.5)


def test_shipped_templates_are_clips_80_imagenet_prompts():
    import json
    import os

    import clip_benchmark

    from vlp.eval.zeroshot import read_templates

    ours = read_templates()
    path = os.path.join(os.path.dirname(clip_benchmark.__file__), "datasets", "en_zeroshot_classification_templates.json")
    theirs = [t.replace("{c}", "{}") for t in json.load(open(path))["imagenet1k"]]
    assert len(ours) == 80 and ours == theirs
