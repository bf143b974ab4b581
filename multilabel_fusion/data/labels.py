"""The 18 competition classes: COCO category ids 1..19 without 12, in a fixed order."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

#: Competition label ids in the fixed column order used by every multi-hot array.
LABEL_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19)

#: COCO names of those ids (for reports, plots and mapping detector classes by name).
LABEL_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
    18: "dog", 19: "horse",
}

NUM_CLASSES = len(LABEL_IDS)
_COLUMN_OF = {label: i for i, label in enumerate(LABEL_IDS)}


def names() -> list[str]:
    """Class names in column order."""
    return [LABEL_NAMES[i] for i in LABEL_IDS]


def is_valid_label(label: int) -> bool:
    return label in _COLUMN_OF


def column_of(label: int) -> int:
    """Column of a label id in the multi-hot array (KeyError for ids outside the 18 classes)."""
    return _COLUMN_OF[label]


def encode(label_lists: Sequence[Iterable[int]]) -> np.ndarray:
    """Label-id lists -> (N, 18) uint8 multi-hot array."""
    out = np.zeros((len(label_lists), NUM_CLASSES), dtype=np.uint8)
    for row, labels in enumerate(label_lists):
        for label in labels:
            out[row, _COLUMN_OF[int(label)]] = 1
    return out


def decode(multi_hot: np.ndarray) -> list[list[int]]:
    """(N, 18) multi-hot array -> ascending label-id lists."""
    ids = np.asarray(LABEL_IDS)
    return [ids[np.flatnonzero(row)].tolist() for row in np.asarray(multi_hot)]
