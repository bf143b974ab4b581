"""An MLP on cached feature vectors: the image network's head (stage 01) and the fused network (stage 03).

Standardisation statistics are fitted on the training part only and stored as buffers, so a
checkpoint alone predicts from raw features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine import trainer
from ..engine.precision import training_precision


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


@dataclass
class HeadSettings:
    hidden: int
    dropout: float
    lr: float
    batch_size: int
    epochs: int
    patience: int
    label1_weight: float
    grad_clip: float | None = None
    weight_decay: float = 0.0
    plateau_patience: int = 2
    plateau_factor: float = 0.5


def _loader(x: np.ndarray, y: np.ndarray | None, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    tensors = [torch.as_tensor(x, dtype=torch.float32)]
    if y is not None:
        tensors.append(torch.as_tensor(y, dtype=torch.float32))
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(*tensors)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_on_features(ctx, train_features: np.ndarray, test_features: np.ndarray, hs: HeadSettings, *,
                      fold: int, fit_idx: np.ndarray, held_idx: np.ndarray, run_dir: Path, name: str,
                      settings: dict, resume: bool = False):
    """Fit an :class:`MLPHead` on the fit part of ``train_features`` with the shared trainer.

    Fold ``fold``: trained on the rows ``fit_idx`` less the selection rows (:meth:`StageContext.selection`), which
    early-stop it; scored on ``held_idx``. ``run_dir`` is the caller's checkpoint folder, keyed by the settings that shape the
    weights. Returns ``(model, fit_result, held_probs, test_probs)``; the learning rate follows ReduceLROnPlateau on
    the selection rows' mean-F1 (the published fusion schedule).
    """
    seed = ctx.cfg.trainer.seed
    trainer.seed_everything(seed)
    y = ctx.targets
    fit_idx, select_idx = ctx.selection(fold, fit_idx, held_idx)
    x_fit, x_sel = train_features[fit_idx], train_features[select_idx]
    model = MLPHead(train_features.shape[1], hs.hidden, hs.dropout)
    model.fit_standardisation(x_fit)
    optimizer = torch.optim.Adam(model.parameters(), lr=hs.lr, weight_decay=hs.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=hs.plateau_patience,
                                                           factor=hs.plateau_factor)
    precision = training_precision(ctx.device, ctx.cfg.trainer.mixed_precision)
    result = trainer.fit(
        model,
        _loader(x_fit, y[fit_idx], hs.batch_size, True, seed),
        _loader(x_sel, y[select_idx], 4096, False, seed),
        y[select_idx],
        loss_fn=trainer.weighted_bce(hs.label1_weight),
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_uses_metric=True,
        run_dir=run_dir,
        epochs=hs.epochs,
        patience=hs.patience,
        grad_clip=hs.grad_clip,
        device=ctx.device,
        precision=precision,
        resume=resume,
        settings={**settings, "head": vars(hs)},
        name=name,
    )
    val_probs = trainer.predict(model, _loader(train_features[held_idx], None, 4096, False, seed), ctx.device,
                                precision=precision)
    test_probs = trainer.predict(model, _loader(test_features, None, 4096, False, seed), ctx.device,
                                 precision=precision)
    return model, result, val_probs, test_probs
