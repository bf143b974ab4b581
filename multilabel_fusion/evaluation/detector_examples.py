"""A figure of validation images with the detector's boxes, true and predicted labels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from ..data import labels as L
from ..data.images import GREY, BadImageError, read_rgb
from ..evaluation.thresholds import apply_rule
from .figures import _save


def examples_figure(found: dict[str, Any], thresholds: np.ndarray, path: Path, *, val_idx: np.ndarray,
                    image_paths: Sequence[Path], labels: Sequence[Sequence[int]], image_size: int, at_least_one: bool,
                    n: int = 6, seed: int = 0, rule: str = "per_class") -> Path:
    """A few validation images (rows ``val_idx`` of the training records) with their label boxes (conf >= the
    label's threshold), true and predicted labels (predicted by the stage's decision ``rule``, as its submission)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(val_idx, size=min(n, len(val_idx)), replace=False))
    pred = apply_rule(found["train"][rows], rule, thresholds, at_least_one=at_least_one)
    columns, names = found["class_column"], found["class_names"]
    boxes, box_class = found["train_boxes"], found["train_box_class"]
    paths = image_paths
    ncols = 3
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.4 * nrows), squeeze=False)
    colors = plt.get_cmap("tab20")
    size = int(image_size)
    for ax, row, p in zip(axes.flat, rows, pred):
        image, note = _image(paths[row], size)
        ax.imshow(image)
        mine = boxes[:, 0] == row
        # one object often carries several labels (a cat / dog box): nearly identical boxes share a frame and caption
        groups: list[tuple[np.ndarray, list]] = []
        order = np.argsort(-boxes[mine, 5], kind="stable")
        for (x1, y1, x2, y2, conf), k in zip(boxes[mine][order, 1:].tolist(), box_class[mine][order]):
            col = int(columns[k])
            if col < 0 or conf < thresholds[col]:
                continue
            box = np.array([x1, y1, x2, y2])
            same = next((g for g in groups if _iou(g[0], box) > 0.9), None)
            if same is None:
                groups.append((box, [(conf, col, names[k])]))
            else:
                same[1].append((conf, col, names[k]))
        for (x1, y1, x2, y2), found_here in groups:
            color = colors(found_here[0][1] % 20)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.6, color=color))
            ax.text(x1, y1, " / ".join(f"{name} {conf:.2f}" for conf, _, name in found_here), fontsize=7,
                    color="white", va="bottom", bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
        true_ids = sorted(labels[row])
        pred_ids = L.decode(p[None])[0]
        ok = set(true_ids) == set(pred_ids)
        ax.set_title(f"{Path(paths[row]).name}{note}\ntrue: {_label_text(true_ids)}\n"
                     f"pred: {_label_text(pred_ids)}", fontsize=8, color="darkgreen" if ok else "firebrick")
        ax.axis("off")
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    fig.suptitle("YOLO detector on validation images (boxes at or above the tuned per-label thresholds)")
    return _save(fig, path)


def _image(path: Path, size: int) -> tuple[np.ndarray, str]:
    """The image, or for an unreadable one (``data.bad_images: replace``) the grey stand-in the detector saw:
    size x size, the frame its boxes are in."""
    try:
        return read_rgb(path), ""
    except BadImageError:
        return np.full((size, size, 3), GREY, dtype=np.uint8), " (unreadable: grey stand-in)"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(box_iou(torch.as_tensor(a[None], dtype=torch.float32), torch.as_tensor(b[None], dtype=torch.float32)))


def _label_text(ids: Sequence[int]) -> str:
    return ", ".join(f"{i} {L.LABEL_NAMES[i]}" for i in ids) or "-"
