"""Figures a person wants to look at: training curves, per-class F1 bars, error co-occurrence."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt  # headless machines fall back to Agg; notebooks show figures inline
import numpy as np
import pandas as pd

from ..data import labels as L
from ..io.atomic import atomic_path


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def training_curves(history: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Loss (train and validation) and validation mean-F1 per epoch."""
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(history["epoch"], history["train_loss"], label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="BCE loss", title=f"{title}: loss")
    ax_loss.legend()
    ax_f1.plot(history["epoch"], history["val_mean_f1"], color="tab:green")
    best = history["val_mean_f1"].idxmax()
    ax_f1.scatter([history.loc[best, "epoch"]], [history.loc[best, "val_mean_f1"]], color="tab:red", zorder=3,
                  label=f"best {history.loc[best, 'val_mean_f1']:.4f}")
    ax_f1.set(xlabel="epoch", ylabel="mean F1 (threshold 0.5)", title=f"{title}: validation mean-F1")
    ax_f1.legend()
    return _save(fig, path)


def per_class_f1(results: Mapping[str, list[float]], path: str | Path, title: str = "Per-class F1") -> Path:
    """Grouped bars: one group per class, one bar per stage (``{stage: [18 F1 values]}``)."""
    names = [f"{i} {n}" for i, n in zip(L.LABEL_IDS, L.names())]
    x = np.arange(len(names))
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(12, 4))
    for k, (stage, f1) in enumerate(results.items()):
        ax.bar(x + k * width - 0.4 + width / 2, f1, width, label=stage)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set(ylabel="F1 (tuned thresholds)", ylim=(0, 1), title=title)
    ax.legend(ncol=min(4, len(results)))
    return _save(fig, path)


def error_cooccurrence(y_true: np.ndarray, y_pred: np.ndarray, path: str | Path, title: str) -> Path:
    """Heat map: rows the true label that was missed or present, columns the label wrongly predicted."""
    t, p = y_true.astype(bool), y_pred.astype(bool)
    missed = (t & ~p).astype(int)
    false_pos = (~t & p).astype(int)
    # how often a wrong prediction of column j comes with true label i
    matrix = t.astype(int).T @ false_pos
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [4, 1]})
    im = axes[0].imshow(matrix, cmap="Reds")
    names = [n for n in L.names()]
    axes[0].set_xticks(range(18), names, rotation=70, ha="right", fontsize=8)
    axes[0].set_yticks(range(18), names, fontsize=8)
    axes[0].set(xlabel="wrongly predicted label", ylabel="true label of the image", title=title)
    fig.colorbar(im, ax=axes[0], fraction=0.04)
    axes[1].barh(range(18), missed.sum(0), color="tab:blue")
    axes[1].set_yticks(range(18), names, fontsize=8)
    axes[1].invert_yaxis()
    axes[1].set(title="missed labels", xlabel="count")
    return _save(fig, path)


def throughput(results: Mapping[str, dict], path: str | Path) -> Path:
    """Image-extraction benchmark: full extraction vs bare forward (img/s) per backbone, ratio on top."""
    names = list(results)
    full = [results[n]["full_extraction_images_per_s"] for n in names]
    bare = [results[n]["bare_forward_images_per_s"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(names), 3.8))
    ax.bar(x - 0.2, bare, 0.4, label="bare forward (batch in memory)", color="tab:gray")
    ax.bar(x + 0.2, full, 0.4, label="full extraction (decode, resize, forward)", color="tab:blue")
    for i, n in enumerate(names):
        r = results[n]
        ax.annotate(f"ratio {r['ratio']:.2f}\n{r['images']} img in {r['extraction_seconds']:.0f} s",
                    (x[i] + 0.2, full[i]), ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                    textcoords="offset points")
    labels = [f"{n}\n{results[n].get('precision', '').split(' ')[0]}, batch {results[n].get('batch_size', '?')}"
              for n in names]
    ax.set_xticks(x, labels)
    ax.set(ylabel="images / s", ylim=(0, max(bare + full) * 1.3),
           title=f"Image feature extraction on {results[names[0]].get('device', '?')} "
                 f"({results[names[0]].get('cpu_count', '?')} cores)")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def fold_scores(scores: list[float], cross_fitted: float | None, path: str | Path, title: str) -> Path:
    """Mean-F1 of each fold's held-out records (tuned thresholds), with the out-of-fold figure to quote."""
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(scores), 3.2))
    x = np.arange(1, len(scores) + 1)
    ax.bar(x, scores, color="tab:blue", width=0.6)
    for xi, v in zip(x, scores):
        ax.annotate(f"{v:.4f}", (xi, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    if cross_fitted is not None:
        ax.axhline(cross_fitted, color="tab:red", lw=1.2, label=f"out-of-fold, cross-fitted decision {cross_fitted:.4f}")
        ax.legend(loc="lower right", fontsize=8)
    low = min(scores + ([cross_fitted] if cross_fitted is not None else []))
    ax.set(xticks=x, xlabel="fold", ylabel="mean F1 of its held-out records", ylim=(max(0.0, low - 0.05), 1.0),
           title=title)
    return _save(fig, path)


def estimate_vs_held_out(rows: list[dict], path: str | Path) -> Path:
    """Per stage: its out-of-fold estimate beside its score on held-out records (with the standard error)."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(rows))
    estimates = [np.nan if r["estimate"] is None else r["estimate"] for r in rows]
    ax.bar(x - 0.2, estimates, 0.4, label="out-of-fold estimate (training records)")
    ax.bar(x + 0.2, [r["held_out"] for r in rows], 0.4, yerr=[r["standard_error"] for r in rows], capsize=3,
           label="held-out records (never seen)")
    values = [v for v in estimates + [r["held_out"] for r in rows] if not np.isnan(v)]
    ax.set(xticks=x, xticklabels=[r["stage"] for r in rows], ylabel="mean F1",
           ylim=(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.04)),
           title="Does the estimate hold on records the pipeline never saw?")
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    return _save(fig, path)
