"""An MLP on cached feature vectors: the image network's head and the fused network.

Standardisation statistics are fitted on the training part only and stored as buffers, so a
checkpoint alone predicts from raw features.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MLPHead(nn.Module):
    """Standardise → Linear(hidden) → ReLU → Dropout → Linear(18); ``hidden=0`` gives a linear head."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, num_classes: int = 18):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))

    def fit_standardisation(self, features: np.ndarray) -> None:
        x = torch.as_tensor(features, dtype=torch.float32)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std)
