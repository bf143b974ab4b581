"""The ranking losses of stage 05's baselines (the CNN-RNN papers compare their decoders with them): WARP and softmax.

* WARP (Weighted Approximate-Rank Pairwise; Weston et al. 2011, Gong et al. 2013 "Deep Convolutional Ranking for
  Multilabel Image Annotation"): for each positive label p of an image, negatives are drawn in random order until one,
  n, breaks the margin (``m - s_p + s_n > 0``); after N draws the rank of p is estimated as ``floor(negatives / N)``
  and the hinge ``m - s_p + s_n`` is weighted by ``L(rank) = sum_{j=1..rank} 1/j`` (a positive ranked low is pushed
  hard, one near the top gently). A positive no negative violates costs nothing. Vectorised over the batch: every
  (image, positive) pair draws its own random order of the 18 labels at once, and the first violating negative in that
  order is the one the sequential draw would have met, with N its place among the negatives.
* softmax (Gong et al. 2013; the CNN-RNN paper's baseline): cross-entropy of the softmax over the labels against the
  normalised label vector ``y / sum(y)``.

Both score labels for ranking: their outputs are turned into labels by a rule chosen on the fit part
(:func:`multilabel_fusion.evaluation.thresholds.choose_ranking_rule`). ``SCORES`` maps each loss to what makes its
logits comparable scores in [0, 1] (a monotone map per image: the ranking is the logits').
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def harmonic(n: torch.Tensor) -> torch.Tensor:
    """``L(n) = sum_{j=1..n} 1/j`` elementwise (0 for n = 0), for integer counts up to a few hundred."""
    n = n.long()
    table = torch.cat([n.new_zeros(1, dtype=torch.float32),
                       torch.cumsum(1.0 / torch.arange(1, int(n.max().clamp_min(1)) + 1, device=n.device), 0)])
    return table[n]


class WARPLoss(nn.Module):
    """WARP on logits [B, C] against multi-hot targets [B, C]: the sum over an image's positives, averaged over the
    images. The rank weights are constants of the step (no gradient); the hinge carries the gradient: it raises the
    positive's score and lowers the sampled violator's. Draws come from torch's global generator (the trainer seeds
    and restores it, so a resumed run draws the same negatives)."""

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = float(margin)

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        pos = targets > 0.5
        b, c = scores.shape
        # hinge of every (image, positive p, candidate n): [B, C, C]
        hinge = self.margin - scores[:, :, None] + scores[:, None, :]
        candidates = (~pos)[:, None, :].expand(b, c, c)  # n must be a negative
        violates = candidates & (hinge > 0)
        order = torch.rand(b, c, c, device=scores.device)  # each (image, p) pair's random order of the candidates
        first = order.masked_fill(~violates, 2.0).argmin(2)  # the first violator met in that order
        found = violates.any(2) & pos
        met = order.gather(2, first[..., None])  # its place among the negatives: how many draws it took
        draws = ((order <= met) & candidates).sum(2).clamp_min(1)
        negatives = (~pos).sum(1, keepdim=True)  # [B, 1]; draws <= negatives, so the rank estimate is >= 1
        with torch.no_grad():
            weight = harmonic(torch.div(negatives, draws, rounding_mode="floor")) * found
        loss = weight * hinge.gather(2, first[..., None]).squeeze(2)
        return loss.sum(1).mean()


class SoftmaxLoss(nn.Module):
    """Cross-entropy of ``softmax(scores)`` against ``y / sum(y)`` (an image without labels counts nothing)."""

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float()
        total = targets.sum(1, keepdim=True)
        target = torch.where(total > 0, targets / total.clamp_min(1e-12), torch.zeros_like(targets))
        return -(target * F.log_softmax(scores.float(), 1)).sum(1).mean()


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), 1)


#: loss name -> (the loss given its margin, logits -> scores in [0, 1] with the logits' order within an image)
LOSSES = {"warp": lambda margin: WARPLoss(margin), "softmax": lambda margin: SoftmaxLoss()}
SCORES = {"warp": torch.sigmoid, "softmax": _softmax}
