"""A head that reads a CNN's spatial feature map, not its pooled vector: class-specific residual attention (CSRA,
Zhu & Wu, ICCV 2021). Small objects in the background light up a few locations of the map and are averaged away
by global pooling; CSRA adds to each class's mean score an attention-pooled score of its own, so a class present
at one location still counts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class RegionAttentionHead(nn.Module):
    """Maps ``[B, C, H*W]`` (any float dtype) → 18 logits.

    Channels are standardised with statistics of the training rows (:meth:`fit_standardisation`, buffers: a
    checkpoint alone predicts; batch norm and dropout over the whole map made a step 8x slower on a CPU for no
    measured gain), optionally mixed by a hidden 1x1 layer, then each head scores every location per class with a
    1x1 convolution; a head's logit per class is the mean of its scores
    over the locations plus ``lam`` times their softmax-weighted mean at temperature ``T`` (``T >= 99``: the
    maximum, CSRA's T = infinity). The heads' logits are averaged (CSRA's multi-head form).
    """

    MAX_TEMPERATURE = 99.0

    def __init__(self, channels: int, num_classes: int = 18, *, hidden: int = 0, lam: float = 0.5,
                 temperatures: tuple[float, ...] = (1.0, 99.0)):
        super().__init__()
        self.channels, self.lam, self.temperatures = int(channels), float(lam), tuple(float(t) for t in temperatures)
        self.register_buffer("mean", torch.zeros(1, channels, 1))
        self.register_buffer("std", torch.ones(1, channels, 1))
        width = channels
        self.body = nn.Identity()
        if hidden:
            self.body = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.ReLU())
            width = hidden
        self.heads = nn.ModuleList(nn.Conv1d(width, num_classes, 1) for _ in self.temperatures)

    @torch.no_grad()
    def fit_standardisation(self, maps: torch.Tensor | np.ndarray) -> None:
        """Per-channel mean and standard deviation over the rows and locations of ``maps`` ``[N, C, H*W]``."""
        x = torch.as_tensor(np.asarray(maps)).float()
        self.mean.copy_(x.mean((0, 2)).view(1, -1, 1))
        self.std.copy_(x.std((0, 2)).clamp_min(1e-3).view(1, -1, 1))

    def scores(self, maps: torch.Tensor) -> list[torch.Tensor]:
        """Each head's class scores at every location, ``[B, classes, H*W]`` (the figure of where a class is)."""
        x = self.body((maps.float() - self.mean) / self.std)
        return [head(x) for head in self.heads]

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        total = 0
        for temperature, score in zip(self.temperatures, self.scores(maps)):
            if temperature >= self.MAX_TEMPERATURE:
                attended = score.amax(-1)
            else:
                attended = (torch.softmax(score * temperature, -1) * score).sum(-1)
            total = total + score.mean(-1) + self.lam * attended
        return total / len(self.temperatures)


def mirrored(maps: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, C, side*side]`` maps of the mirrored photos (a map's columns reversed): cached maps augmented, and
    predictions averaged over both, for free."""
    b, c, _ = maps.shape
    return maps.reshape(b, c, side, side).flip(-1).reshape(b, c, side * side)


class MirrorAveraged(nn.Module):
    """A head whose logits, in eval mode, are averaged over the map and its mirror image (how the stage selects
    epochs and predicts); in training mode the head alone (the batches are mirrored at random instead)."""

    def __init__(self, head: RegionAttentionHead, side: int):
        super().__init__()
        self.head, self.side = head, int(side)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.head(maps)
        return (self.head(maps) + self.head(mirrored(maps, self.side))) / 2
