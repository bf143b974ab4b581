"""Stage 05's ranking baselines and breakdowns on tiny constructed cases: the WARP loss (zero past the margin, larger
for a positive ranked lower, gradients the right way), the softmax loss against a hand-computed cross-entropy, the
top-k / threshold rule chosen on other rows, and F1 grouped by the number of true labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from multilabel_fusion.evaluation import metrics as M
from multilabel_fusion.evaluation import thresholds as T
from multilabel_fusion.training.ranking import SCORES, SoftmaxLoss, WARPLoss, harmonic

C = 18


def _one_positive(positive: float, negatives: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: label 0 positive with score ``positive``, labels 1..17 negative with ``negatives``."""
    scores = torch.tensor([[positive, *negatives]], dtype=torch.float32, requires_grad=True)
    y = torch.zeros(1, C)
    y[0, 0] = 1
    return scores, y


def test_harmonic_rank_weights():
    assert harmonic(torch.tensor([0, 1, 2, 3, 17])).tolist() == pytest.approx(
        [0.0, 1.0, 1.5, 11 / 6, sum(1 / j for j in range(1, 18))])


def test_warp_is_zero_when_every_positive_clears_every_negative_by_the_margin():
    torch.manual_seed(0)
    scores = torch.zeros(3, C)
    y = torch.zeros(3, C)
    y[0, [0, 4]], y[1, 7], y[2, [1, 2, 3]] = 1, 1, 1
    scores = torch.where(y > 0, torch.tensor(2.5), torch.tensor(1.0)).requires_grad_()  # gap 1.5 > margin 1
    loss = WARPLoss(1.0)(scores, y)
    loss.backward()
    assert loss.item() == 0.0 and not scores.grad.any()
    assert WARPLoss(2.0)(scores, y).item() > 0  # a wider margin is broken by the same scores


def test_warp_grows_as_the_positive_falls_and_its_gradient_pushes_it_up():
    torch.manual_seed(0)
    # every negative at 0, the positive below them all: the first draw violates, rank 17, hinge 1 + 2 = 3
    low, y = _one_positive(-2.0, np.zeros(17))
    loss_low = WARPLoss(1.0)(low, y)
    assert loss_low.item() == pytest.approx(3 * sum(1 / j for j in range(1, 18)), rel=1e-6)
    loss_low.backward()
    assert low.grad[0, 0] < 0  # descent raises the positive
    assert (low.grad[0, 1:] >= 0).all() and low.grad[0, 1:].sum() == pytest.approx(-float(low.grad[0, 0]))
    # one negative within the margin of a positive ranked first: one violator, rank floor(17 / draws) <= 17
    negatives = np.zeros(17)
    negatives[5] = 1.0
    for seed in range(20):
        torch.manual_seed(seed)
        mid, y = _one_positive(1.5, negatives)
        loss_mid = WARPLoss(1.0)(mid, y)
        draws_possible = {0.5 * sum(1 / j for j in range(1, 17 // n + 1)) for n in range(1, 18)}
        assert 0 < loss_mid.item() < loss_low.item()
        assert min(abs(loss_mid.item() - v) for v in draws_possible) < 1e-5
        loss_mid.backward()
        assert mid.grad[0, 0] < 0 and mid.grad[0, 6] > 0  # the positive up, the violator (label 6) down
        assert (mid.grad[0, [i for i in range(1, C) if i != 6]] == 0).all()  # clear negatives untouched


def test_warp_sums_over_positives_and_averages_over_images():
    torch.manual_seed(0)
    scores = torch.zeros(2, C)
    y = torch.zeros(2, C)
    y[0, [0, 1]] = 1  # both positives below every negative (all at 0): 2 x 3 x L(16)
    scores[0, [0, 1]] = -2.0
    y[1, 2] = 1  # clear of the margin: 0
    scores[1, 2] = 3.0
    expected = 2 * 3 * sum(1 / j for j in range(1, 17)) / 2
    assert float(WARPLoss(1.0)(scores, y)) == pytest.approx(expected, rel=1e-6)


def test_softmax_loss_is_cross_entropy_with_the_normalised_labels():
    scores = torch.zeros(1, C)
    scores[0, 0] = math.log(3.0)  # softmax: label 0 has 3 / 20, every other 1 / 20
    y = torch.zeros(1, C)
    y[0, [0, 1]] = 1  # target 1/2, 1/2
    expected = -(0.5 * math.log(3 / 20) + 0.5 * math.log(1 / 20))
    assert float(SoftmaxLoss()(scores, y)) == pytest.approx(expected, rel=1e-6)
    rng = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, C, generator=rng), (torch.rand(5, C, generator=rng) < 0.2).float()
    t[:, 3] = 1
    assert torch.allclose(SoftmaxLoss()(s, t), F.cross_entropy(s, t / t.sum(1, keepdim=True)))
    assert torch.allclose(SCORES["softmax"](s).sum(1), torch.ones(5))


def test_ranking_rule_is_chosen_on_the_rows_given():
    rng = np.random.default_rng(0)
    y = np.zeros((40, C), dtype=np.uint8)
    for row in y:
        row[rng.choice(C, 2, replace=False)] = 1
    scores = np.where(y > 0, 0.3, 0.1) + rng.uniform(0, 0.05, y.shape)  # the true pair always ranks first
    rule = T.choose_ranking_rule(scores, y, "top_k")
    assert rule == {"rule": "top_k", "k": 2, "f1": 1.0}
    assert T.apply_ranking_rule(scores, rule).sum(1).tolist() == [2] * 40
    assert T.describe_ranking_rule(rule) == "top 2"
    # one to four labels per image, positives clearly above 0.5: one k cannot fit all, a threshold can
    y = np.zeros((40, C), dtype=np.uint8)
    for i, row in enumerate(y):
        row[rng.choice(C, 1 + i % 4, replace=False)] = 1
    scores = np.where(y > 0, 0.8, 0.2) + rng.uniform(-0.05, 0.05, y.shape)
    auto = T.choose_ranking_rule(scores, y, "auto")
    assert auto["rule"] == "threshold" and auto["f1"] == 1.0 and 0.25 <= auto["threshold"] <= 0.75
    assert T.choose_ranking_rule(scores, y, "top_k")["f1"] < 1.0
    assert (T.apply_ranking_rule(scores, auto) == y).all()
    with pytest.raises(ValueError, match="unknown ranking rule"):
        T.choose_ranking_rule(scores, y, "best")


def test_f1_by_number_of_true_labels():
    y = np.zeros((6, C), dtype=np.uint8)
    pred = np.zeros_like(y)
    y[0, 0] = 1; pred[0, 0] = 1  # 1 label, F1 1  # noqa: E702
    y[1, 1] = 1; pred[1, 2] = 1  # 1 label, F1 0  # noqa: E702
    y[2, [0, 1]] = 1; pred[2, 0] = 1  # 2 labels, F1 2/3  # noqa: E702
    y[3, :5] = 1; pred[3, :5] = 1  # 5 labels, F1 1  # noqa: E702
    y[4, :6] = 1; pred[4, :3] = 1  # 6 labels, F1 2*3/9  # noqa: E702
    y[5, :3] = 1; pred[5, 3] = 1  # 3 labels, F1 0  # noqa: E702
    got = M.f1_by_label_count(y, pred)
    assert got == {"1": 0.5, "2": round(2 / 3, 4), "3": 0.0, "4": None, "5+": round((1 + 2 / 3) / 2, 4)}
    assert [(name, int(rows.sum())) for name, rows in M.label_count_groups(y)] == [
        ("1", 2), ("2", 1), ("3", 1), ("4", 0), ("5+", 2)]
