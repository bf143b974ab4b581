"""Training an :class:`~multilabel_fusion.networks.heads.MLPHead` on cached feature vectors (the image network's head,
the fused network, the label-decoder stage's BCE baselines) with the shared trainer, one fold at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..networks.device import seed_everything
from ..networks.heads import MLPHead
from ..networks.precision import Precision
from . import trainer


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
    pos_weight: str = "off"  # auto: BCE's pos_weight from the rows trained on (trainer.pos_weight)

    def described(self) -> dict:
        """What a run's settings record: every field, but ``pos_weight`` only when on (runs made before it existed
        describe themselves as they did)."""
        return {k: v for k, v in vars(self).items() if not (k == "pos_weight" and v == "off")}


def feature_loader(x: np.ndarray, y: np.ndarray | None, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Batches of feature rows (and their targets), shuffled by a seeded generator of their own."""
    tensors = [torch.as_tensor(x, dtype=torch.float32)]
    if y is not None:
        tensors.append(torch.as_tensor(y, dtype=torch.float32))
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(*tensors)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def predict_heads(heads: list[MLPHead], x: np.ndarray, device: torch.device, precision: Precision) -> np.ndarray:
    """Probabilities of ``x`` averaged over fold heads, batched and summed in fold order as the stages average their
    test rows (float32), so a record's row equals the stage's own."""
    total = 0
    for head in heads:
        total = total + np.asarray(trainer.predict(head, feature_loader(x, None, 4096, False, 0), device,
                                                   precision=precision), dtype=np.float32) / len(heads)
    return total


def train_head(train_features: np.ndarray, test_features: np.ndarray, targets: np.ndarray, hs: HeadSettings, *,
               fit_idx: np.ndarray, select_idx: np.ndarray, held_idx: np.ndarray, run_dir: Path, name: str,
               settings: dict, device: torch.device, precision: Precision, seed: int, resume: bool = False,
               loss_fn: nn.Module | None = None, activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
               score_fn: Callable[[np.ndarray, np.ndarray], float] | None = None):
    """Fit an :class:`MLPHead` on the rows ``fit_idx`` of ``train_features`` with the shared trainer; the rows
    ``select_idx`` (never trained on) choose the epoch and the learning-rate plateaus (ReduceLROnPlateau on their
    mean-F1, the published fusion schedule); the rows ``held_idx`` and the test rows are only predicted
    (``hs.pos_weight: auto`` counts the labels of ``fit_idx`` alone).

    ``run_dir`` is the caller's checkpoint folder, keyed by the settings that shape the weights. The defaults train
    with the weighted BCE and select by mean-F1 at 0.5; a head with another loss (e.g. a ranking loss) gives
    ``loss_fn``, the map of its logits to scores (``activation``) and ``score_fn(select_scores, select_targets)``,
    its selection score. Returns ``(model, fit_result, held_probs, test_probs)`` (``activation`` of the logits).
    """
    seed_everything(seed)
    y = targets
    x_fit, x_sel = train_features[fit_idx], train_features[select_idx]
    model = MLPHead(train_features.shape[1], hs.hidden, hs.dropout)
    model.fit_standardisation(x_fit)
    optimizer = torch.optim.Adam(model.parameters(), lr=hs.lr, weight_decay=hs.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=hs.plateau_patience,
                                                           factor=hs.plateau_factor)
    select_loader = feature_loader(x_sel, y[select_idx], 4096, False, seed)

    def selection_score(m: nn.Module) -> float:
        return score_fn(trainer.predict(m, select_loader, device, precision=precision, activation=activation),
                        y[select_idx])

    result = trainer.fit(
        model,
        feature_loader(x_fit, y[fit_idx], hs.batch_size, True, seed),
        select_loader,
        y[select_idx],
        loss_fn=loss_fn if loss_fn is not None else trainer.bce_for(hs.pos_weight, hs.label1_weight, y[fit_idx]),
        score_fn=None if score_fn is None else selection_score,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_uses_metric=True,
        run_dir=run_dir,
        epochs=hs.epochs,
        patience=hs.patience,
        grad_clip=hs.grad_clip,
        device=device,
        precision=precision,
        resume=resume,
        settings={**settings, "head": hs.described()},
        name=name,
    )
    val_probs = trainer.predict(model, feature_loader(train_features[held_idx], None, 4096, False, seed), device,
                                precision=precision, activation=activation)
    test_probs = trainer.predict(model, feature_loader(test_features, None, 4096, False, seed), device,
                                 precision=precision, activation=activation)
    return model, result, val_probs, test_probs
