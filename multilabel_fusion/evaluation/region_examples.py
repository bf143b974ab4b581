"""A figure of where the region-attention head looks: held-out photos with a small-object label, each overlaid with
that class's score at every location of the map, from the fold head that never saw the photo."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import labels as L
from ..data.images import GREY, BadImageError, read_rgb
from .figures import _save

#: The classes the pooled features miss most (issue "find the small things in the background").
SMALL_OBJECTS = ("car", "bench", "truck", "bicycle", "traffic light")


def attention_examples(heads: Sequence[torch.nn.Module], fold_of: np.ndarray, maps: np.ndarray, probs: np.ndarray,
                       targets: np.ndarray, image_paths: Sequence[Path], path: Path, *, n: int = 6,
                       seed: int = 0) -> Path:
    """Up to ``n`` training photos, one per class of :data:`SMALL_OBJECTS` that has any, each with the class's per-location score (the
    last head's, i.e. the maximum-pooled one by default) of the fold head ``heads[fold_of[row]]`` that held it out,
    its out-of-fold probability in the title."""
    import matplotlib.pyplot as plt

    names = L.names()
    columns = [names.index(c) for c in SMALL_OBJECTS]
    rng = np.random.default_rng(seed)
    picks: list[tuple[int, int]] = []
    for col in columns:  # one photo per class
        rows = np.flatnonzero(targets[:, col] > 0)
        if len(rows):
            picks.append((int(rng.choice(rows)), col))
    picks = picks[:n]
    side = int(round(math.sqrt(maps.shape[-1])))
    ncols = 3
    nrows = max(1, math.ceil(len(picks) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 4.4 * nrows), squeeze=False)
    for ax, (row, col) in zip(axes.flat, picks):
        head = heads[int(fold_of[row])]
        inner = getattr(head, "head", head)  # a mirror-averaging wrapper: its head
        with torch.no_grad():
            score = inner.eval().scores(torch.from_numpy(np.asarray(maps[row: row + 1], np.float32)))[-1][0, col]
        try:
            image = read_rgb(image_paths[row])
        except BadImageError:
            image = np.full((side * 32, side * 32, 3), GREY, dtype=np.uint8)
        h, w = image.shape[:2]
        ax.imshow(image)
        ax.imshow(score.view(side, side).numpy(), cmap="inferno", alpha=0.45, extent=(0, w, h, 0),
                  interpolation="bilinear")
        ax.set_title(f"{Path(image_paths[row]).name}: {names[col]}\nout-of-fold probability {probs[row, col]:.2f}",
                     fontsize=8)
        ax.axis("off")
    for ax in axes.flat[len(picks):]:
        ax.axis("off")
    fig.suptitle("Where the region-attention head sees each class (its score per location, held-out photos)")
    return _save(fig, path)
