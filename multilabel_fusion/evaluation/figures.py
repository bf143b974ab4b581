"""Figures a person wants to look at: training curves, per-class F1 bars, error co-occurrence."""

from __future__ import annotations

import textwrap
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


def _loss_panel(ax, history: pd.DataFrame, title: str, held_out: str = "validation", ylabel: str = "BCE loss") -> None:
    """The training and held-out loss per epoch."""
    ax.plot(history["epoch"], history["train_loss"], label="train")
    ax.plot(history["epoch"], history["val_loss"], label=held_out)
    ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title}: loss")
    ax.legend()


def training_curves(history: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Loss (train and validation) and validation mean-F1 per epoch."""
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    _loss_panel(ax_loss, history, title)
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


# ------------------------------------------------------------------- stage 05 (drawn during its run, read by its page)


#: the colour of a stage-05 table row by its kind (decoders, then the heads by their loss)
KIND_COLORS = {"decoder": "tab:blue", "bce": "tab:gray", "warp": "tab:orange", "softmax": "tab:purple"}


def _row_name(r: dict) -> str:
    return f"{r['model']} ({r['features']})" if r["kind"] != "decoder" or r["features"] != "image" else r["model"]


def decoder_comparison(rows: list[dict], path: str | Path) -> Path:
    """Horizontal bars: mean-F1 of each decoder's decoded sets, of each BCE head at 0.5 and of each ranking head by
    its rule (first fold)."""
    labels = [_row_name(r) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    colors = [KIND_COLORS.get(r["kind"], "tab:green") for r in rows]
    ax.barh(range(len(rows)), [r["f1"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(r["f1"] + 0.002, i, f"{r['f1']:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    low = min(r["f1"] for r in rows)
    ax.set(xlim=(max(0.0, low - 0.05), 1.0), xlabel="mean F1 over samples (decoded sets; BCE heads at 0.5)",
           title="Label decoders vs BCE heads on the same features (first fold)")
    return _save(fig, path)


def decoder_breakdown(rows: list[dict], split: dict, path: str | Path) -> Path:
    """The paper's figures 7 and 8 for the table's rows: held-out mean-F1 by the images' number of true labels (one
    line per row) and per-class F1 (classes by held-out support, most frequent first). The chosen decoder, the best
    decoder and the MLP heads on the image features are drawn bold; the other decoders thin."""
    decoders = [r for r in rows if r["kind"] == "decoder"]
    best = max(decoders, key=lambda r: r["f1"])["model"] if decoders else None
    bold = lambda r: r.get("chosen") or r["model"] == best or (  # noqa: E731
        r["kind"] != "decoder" and r["features"] == "image" and "linear" not in r["model"])
    groups = list(split["images_by_label_count"])
    names, support = split["class_names"], np.asarray(split["class_support"])
    order = np.argsort(-support, kind="stable")
    fig, (ax, ax_class) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1, 2.2]})
    for r in rows:
        style = {"lw": 2.0, "alpha": 1.0, "label": _row_name(r)} if bold(r) else {"lw": 0.8, "alpha": 0.35}
        color = KIND_COLORS.get(r["kind"], "tab:green")
        if r["model"] == best and not r.get("chosen"):  # the best decoder beside the chosen one
            style, color = {**style, "label": f"{_row_name(r)} (best decoder)"}, "tab:cyan"
        f1 = [np.nan if r["f1_by_label_count"][g] is None else r["f1_by_label_count"][g] for g in groups]
        ax.plot(range(len(groups)), f1, "o-", color=color, ms=3, **style)
        ax_class.plot(range(len(order)), np.asarray(r["per_class_f1"])[order], "o-", color=color, ms=3,
                      **{k: v for k, v in style.items() if k != "label"})
    ax.set_xticks(range(len(groups)), [f"{g}\n({split['images_by_label_count'][g]:,})" for g in groups])
    ax.set(xlabel="true labels per image (held-out images)", ylabel="mean F1 over samples", ylim=(0, 1),
           title="F1 by number of labels per image")
    ax.legend(fontsize=7, loc="lower left")
    ax_class.set_xticks(range(len(order)), [f"{names[i]} ({support[i]:,})" for i in order], rotation=60,
                        ha="right", fontsize=7)
    ax_class.set(ylabel="F1 of the class", ylim=(0, 1),
                 title="Per-class F1 (bold: chosen / best decoder, MLP heads; thin: other decoders)")
    return _save(fig, path)


def decoder_curves(history: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Sequence loss (train, held out) and mean-F1 of the decoded sets per epoch."""
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    _loss_panel(ax_loss, history, title, "held out", "cross-entropy per label token")
    for column, label in (("val_mean_f1", "F1"), ("val_precision", "precision"), ("val_recall", "recall")):
        if column in history:
            ax_f1.plot(history["epoch"], history[column], label=label)
    ax_f1.set(xlabel="epoch", ylabel="mean over samples (decoded sets)", title=f"{title}: held out")
    ax_f1.legend()
    return _save(fig, path)


def decoder_data_sizes(sizes: list[dict], path: str | Path) -> Path:
    """Mean-F1 of the learning curve's decoder and of the BCE MLP head against the number of fit records (log
    scale), and their gap."""
    n = [r["n_fit"] for r in sizes]
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax.plot(n, [r["decoder_f1"] for r in sizes], "o-", label=f"decoder {sizes[0]['decoder']} (decoded sets)")
    ax.plot(n, [r["bce_f1"] for r in sizes], "s-", color="tab:gray", label="BCE MLP head (at 0.5)")
    ax.set(xscale="log", xlabel="fit records (first fold, nested subsets)", ylabel="held-out mean F1",
           title="Decoder vs BCE head by training-set size")
    ax.set_xticks(n, [f"{x:,}" for x in n])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax_gap.bar(range(len(n)), [100 * r["gap"] for r in sizes], color=["tab:red" if r["gap"] < 0 else "tab:green"
                                                                      for r in sizes])
    ax_gap.axhline(0, color="black", lw=0.8)
    ax_gap.set_xticks(range(len(n)), [f"{x:,}" for x in n])
    ax_gap.set(xlabel="fit records", ylabel="decoder - BCE (F1 points)", title="The gap")
    return _save(fig, path)


# ------------------------------------------------------------------- stage 06 (drawn during its run, read by its page)


def retrieval_recall(history: pd.DataFrame, compared: Mapping[str, pd.DataFrame], path: str | Path,
                     title: str) -> Path:
    """Selection-pair recall per epoch: the stage's network (first fold), and R@10 of every compared run
    (``compared``: ``"encoder/strategy"`` -> its history)."""
    fig, axes = plt.subplots(1, 3 if compared else 1, figsize=(16 if compared else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for direction, style in (("i2t", "-"), ("t2i", "--")):
        for k, colour in zip((1, 5, 10), ("tab:blue", "tab:orange", "tab:green")):
            ax.plot(history["epoch"], history[f"{direction}_r{k}"], style, color=colour, label=f"{direction} R@{k}")
    ax.set(xlabel="epoch", ylabel="recall (%)", title=f"{title}\n(selection pairs, first fold)", ylim=(0, 100))
    ax.legend(fontsize=7, ncol=2)
    if compared:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        strategies = list(dict.fromkeys(name.split("/")[1] for name in compared))
        for i, direction in enumerate(("i2t", "t2i")):
            ax = axes[0, i + 1]
            for name, h in compared.items():
                encoder, strategy = name.split("/")
                ax.plot(h["epoch"], h[f"{direction}_r10"], "-" if encoder == "gru" else ":",
                        color=colours[strategies.index(strategy) % len(colours)], label=name)
            ax.set(xlabel="epoch", ylabel="R@10 (%)", ylim=(0, 100),
                   title=f"{'image -> caption' if direction == 'i2t' else 'caption -> image'} R@10 per epoch\n"
                         "(encoder/strategy; dotted: mean vectors, solid: GRU)")
            ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def retrieval_comparison(rows: list[dict], path: str | Path) -> Path:
    """1K-protocol R@10 of every compared run (strategy x encoder, first fold) in both directions, with the
    target lines (the paper's best MS-COCO figures)."""
    names = [f"{r['encoder']} / {r['strategy']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.62 * len(rows) + 2), 4))
    for shift, direction, colour, target, what in ((-0.2, "i2t", "tab:blue", 72.5, "image -> caption"),
                                                   (0.2, "t2i", "tab:orange", 69.2, "caption -> image")):
        values = [r["protocol_1k"][f"{direction}_r10"] for r in rows]
        ax.bar(x + shift, values, 0.4, color=colour, label=f"{what} R@10")
        ax.axhline(target, color=colour, ls="--", lw=1, label=f"target {what} ({target})")
        for xi, v in zip(x + shift, values):
            ax.text(xi, v + 0.8, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="R@10 (%), 1K protocol", ylim=(0, 100),
           title="Mining strategies x caption encoders (first fold, held-out 1K sets; one caption per image)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return _save(fig, path)


def photo_grid(cells: list[tuple[np.ndarray, str, bool]], path: str | Path, title: str) -> Path:
    """Photos in rows of five, each with its text above (``(rgb image, text, highlighted)``; a highlighted text is
    green, e.g. a retrieved photo's own caption)."""
    cols = min(len(cells), 5)
    rows = int(np.ceil(len(cells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, text, highlighted) in zip(axes.flat, cells):
        ax.imshow(picture)
        ax.set_title(text, fontsize=7.5, loc="left", color="tab:green" if highlighted else "black")
    fig.suptitle(textwrap.fill(title, 120), fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)
