"""Cross-fitting: one model per fold, each record's row from the model that never saw it, test rows averaged."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

#: ``train_fold(k, fit_idx, held_idx)`` -> (arrays of the held-out rows, arrays of the test rows, info)
FoldTrainer = Callable[[int, np.ndarray, np.ndarray], tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]]


@dataclass
class CrossFit:
    """Out-of-fold arrays (one row per training record, NaN where no fold held it out) and fold-averaged test arrays."""

    held: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    folds: list[dict[str, Any]]


def cross_fit(folds: list[tuple[np.ndarray, np.ndarray]], n_records: int, train_fold: FoldTrainer,
              name: str = "") -> CrossFit:
    """Run ``train_fold`` on each (fit, held-out) pair of ``folds``; the held-out rows are put in place (every
    record's row comes from the one model that did not train on it) and the test arrays averaged over the fold
    models (float32, summed in fold order)."""
    k_total = len(folds)
    held: dict[str, np.ndarray] = {}
    test: dict[str, np.ndarray] = {}
    infos = []
    for k, (fit_idx, held_idx) in enumerate(folds):
        if k_total > 1:
            log.info(f"[{name}] fold {k + 1}/{k_total}: {len(fit_idx)} fit, {len(held_idx)} held out")
        h, t, info = train_fold(k, fit_idx, held_idx)
        for key, rows in h.items():
            held.setdefault(key, np.full((n_records,) + rows.shape[1:], np.nan, dtype=np.float32))[held_idx] = rows
        for key, rows in t.items():
            test[key] = test.get(key, 0) + np.asarray(rows, dtype=np.float32) / k_total
        infos.append({"fold": k, "n_fit": len(fit_idx), "n_held": len(held_idx), **info})
    return CrossFit(held, test, infos)


def fill_in_sample(arrays: dict[str, np.ndarray], in_sample: dict[str, np.ndarray]) -> None:
    """With one split, the rows no fold held out (the fit part) get the one model's in-sample rows."""
    for key, values in in_sample.items():
        missing = np.isnan(arrays[key]).any(1)
        arrays[key][missing] = values[missing]
