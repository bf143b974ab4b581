"""Probabilities -> labels: one global threshold or per-class thresholds, plus the at-least-one-label rule.

Every stage turns scores into labels through :func:`decide`, and tunes its thresholds on the
validation part with :func:`tune_global` / :func:`tune_per_class`.
"""

from __future__ import annotations

import numpy as np

from .metrics import mean_f1

DEFAULT_GRID = np.round(np.arange(0.02, 0.98, 0.01), 2)


def decide(probs: np.ndarray, thresholds: float | np.ndarray = 0.5, *, at_least_one: bool = True) -> np.ndarray:
    """Multi-hot labels: scores at or above their threshold; with ``at_least_one`` the top label is always on."""
    probs = np.asarray(probs, dtype=np.float64)
    out = probs >= np.asarray(thresholds, dtype=np.float64)
    if at_least_one and len(probs):
        out[np.arange(len(probs)), probs.argmax(1)] = True
    return out.astype(np.uint8)


def tune_global(probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = DEFAULT_GRID, *,
                at_least_one: bool = True) -> tuple[float, float]:
    """The single threshold maximising mean-F1 under the same rule as :func:`decide`; returns (threshold, F1)."""
    scores = [mean_f1(y_true, decide(probs, t, at_least_one=at_least_one)) for t in grid]
    best = int(np.argmax(scores))
    return float(grid[best]), float(scores[best])


def tune_per_class(
    probs: np.ndarray, y_true: np.ndarray, grid: np.ndarray = DEFAULT_GRID, rounds: int = 2, *,
    at_least_one: bool = True,
) -> tuple[np.ndarray, float]:
    """Per-class thresholds by coordinate ascent on mean-F1, starting from the best global threshold.

    Each class's threshold moves only when that strictly improves the validation mean-F1, so the
    result is never worse than the global threshold on the data it was tuned on. ``at_least_one`` is the
    rule the written predictions use, so the tuned F1 is the F1 of exactly those predictions.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true).astype(bool)
    start, best_score = tune_global(probs, y_true, grid, at_least_one=at_least_one)
    thresholds = np.full(probs.shape[1], start)
    top = np.zeros_like(y_true)
    if at_least_one and len(probs):
        top[np.arange(len(probs)), probs.argmax(1)] = True  # the at-least-one rule's forced labels
    for _ in range(rounds):
        changed = False
        for c in range(probs.shape[1]):
            pred = (probs >= thresholds) | top
            tp_rest = (pred & y_true).sum(1) - (pred[:, c] & y_true[:, c])
            size_rest = pred.sum(1) - pred[:, c] + y_true.sum(1)
            # F1 of every sample for every candidate threshold of class c, vectorised over the grid
            col = (probs[:, c : c + 1] >= grid[None, :]) | top[:, c : c + 1]
            tp = tp_rest[:, None] + (col & y_true[:, c : c + 1])
            denom = size_rest[:, None] + col
            f1 = np.divide(2.0 * tp, denom, out=np.zeros(tp.shape), where=denom > 0).mean(0)
            best = int(np.argmax(f1))
            if f1[best] > best_score + 1e-12:
                thresholds[c], best_score, changed = grid[best], float(f1[best]), True
        if not changed:
            break
    return thresholds, best_score
