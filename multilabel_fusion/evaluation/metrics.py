"""The competition metric (mean F1 over samples) and per-class figures, vectorised over multi-hot arrays."""

from __future__ import annotations

import numpy as np

from ..data import labels as L


def _as_bool(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-d multi-hot array, got shape {a.shape}")
    return a.astype(bool)


def sample_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 of each sample; a sample with no true and no predicted label scores 0 (as scikit-learn)."""
    t, p = _as_bool(y_true), _as_bool(y_pred)
    tp = (t & p).sum(1)
    denom = t.sum(1) + p.sum(1)
    return np.divide(2.0 * tp, denom, out=np.zeros(len(t)), where=denom > 0)


def mean_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Kaggle's "Mean F1-Score": equal to ``sklearn.metrics.f1_score(y_true, y_pred, average='samples')``."""
    return float(sample_f1(y_true, y_pred).mean())


def per_class(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, list[float]]:
    """Per-class F1, precision, recall and support, in the fixed label order (0 where undefined)."""
    t, p = _as_bool(y_true), _as_bool(y_pred)
    tp = (t & p).sum(0).astype(float)
    fp = (~t & p).sum(0).astype(float)
    fn = (t & ~p).sum(0).astype(float)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return {
        "label": list(L.LABEL_IDS),
        "name": L.names(),
        "f1": f1.round(4).tolist(),
        "precision": precision.round(4).tolist(),
        "recall": recall.round(4).tolist(),
        "support": t.sum(0).astype(int).tolist(),
    }


def label_count_groups(y_true: np.ndarray, largest: int = 5) -> list[tuple[str, np.ndarray]]:
    """(name, row mask) of the records grouped by their number of true labels: ``1`` .. ``largest - 1``, then
    ``largest+`` (the paper's figure of F1 by labels per image; few records carry 5 or more here)."""
    counts = _as_bool(y_true).sum(1)
    groups = [(str(n), counts == n) for n in range(1, largest)]
    return groups + [(f"{largest}+", counts >= largest)]


def f1_by_label_count(y_true: np.ndarray, y_pred: np.ndarray, largest: int = 5) -> dict[str, float | None]:
    """Mean F1 of the records of each group of :func:`label_count_groups` (None for an empty group)."""
    f1 = sample_f1(y_true, y_pred)
    return {name: (round(float(f1[rows].mean()), 4) if rows.any() else None)
            for name, rows in label_count_groups(y_true, largest)}
