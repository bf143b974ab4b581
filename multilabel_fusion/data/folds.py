"""The folds every stage shares, the selection part that chooses epochs, and warnings about thin classes."""

from __future__ import annotations

import numpy as np

from . import labels as L
from .reader import DataError


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded multi-label stratified train/validation split (rare labels land in both parts).

    Every stage calls this with the config's fraction and seed, so all stages share one split.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(targets)), targets))
    return np.sort(train_idx), np.sort(val_idx)


def selection_split(targets: np.ndarray, fit_idx: np.ndarray, fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, selection rows) of a fit part: a seeded multi-label stratified ``fraction`` of ``fit_idx``
    chooses the epoch of a network trained on the rest, so that the held-out part is never used to choose."""
    fit_idx = np.asarray(fit_idx)
    rows, select = split_indices(targets[fit_idx], fraction, seed)
    return fit_idx[rows], fit_idx[select]


#: Training rows (a fold's fit part less its selection rows) a fold needs at the least.
MIN_TRAINING_ROWS = 2


def check_enough(targets: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]] | None, n_folds: int,
                 selection_fraction: float, seed: int, where: str) -> None:
    """Refuse, in one line, data too small for the split: every fold needs held-out rows, selection rows (when
    ``selection_fraction`` > 0) and at least :data:`MIN_TRAINING_ROWS` rows to train on. ``folds``: the folds made
    (None: they could not be made at all)."""
    n = len(targets)
    problem = None
    if folds is None:
        problem = f"{n_folds} folds cannot be made from them"
    else:
        for k, (fit, held) in enumerate(folds):
            train, select = selection(targets, k, fit, held, selection_fraction, seed)
            if len(held) < 1 or len(train) < MIN_TRAINING_ROWS or (selection_fraction > 0 and len(select) < 1):
                problem = (f"fold {k + 1} would hold out {len(held)}, train on {len(train)} and choose its epoch on "
                           f"{len(select)}")
                break
    if problem is None:
        return
    split = f"split.folds={n_folds}" if n_folds > 1 else "one split (split.folds=1)"
    count = f"{n} labelled record{' is' if n == 1 else 's are'}"
    raise DataError(f"{where}: {count} too few for {split} with split.selection_fraction {selection_fraction} "
                    f"({problem}; each fold needs held-out rows, selection rows and at least {MIN_TRAINING_ROWS} rows to "
                    f"train on, so roughly {_records_needed(n_folds, selection_fraction)} records or more); add records "
                    "or lower split.folds")


def _records_needed(n_folds: int, selection_fraction: float) -> int:
    """About how many records a split needs (stratified folds of very few records come out uneven: a guide)."""
    import math

    k = max(n_folds, 2)
    for n in range(k, 10_000):
        fit = n - math.ceil(n / k)
        if fit - (math.ceil(fit * selection_fraction) if selection_fraction > 0 else 0) >= MIN_TRAINING_ROWS + 1:
            return n
    return k


def selection(targets: np.ndarray, k: int, fit_idx: np.ndarray, held_idx: np.ndarray, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to train on, rows that choose the epoch) for fold ``k``: a ``fraction`` of the fit part chooses (seeded
    by ``seed + 1 + k``), so the held-out rows stay unseen by every choice; with 0, the held-out rows choose."""
    if float(fraction) == 0:
        return fit_idx, held_idx
    train, select = selection_split(targets, fit_idx, float(fraction), seed + 1 + k)
    if len(select) == 0 and len(fit_idx) > 1:  # a fit part so small that the stratified draw chose none: one row
        pick = np.random.default_rng(seed + 1 + k).integers(len(fit_idx))
        return np.delete(np.asarray(fit_idx), pick), np.asarray(fit_idx)[[pick]]
    return train, select


def selection_note(fraction: float) -> str:
    """How the epochs were chosen, for the console and the metrics files."""
    if float(fraction) == 0:
        return "epochs chosen on the held-out rows themselves (split.selection_fraction: 0; optimistic)"
    return f"epochs chosen on {float(fraction):.0%} of each fit part, never trained on; held-out rows only scored"


def held_out_rows(folds: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the records with a held-out prediction, sorted; each fold's positions among them): every training record
    with K folds, the validation part with one."""
    eval_idx = np.sort(np.concatenate([held for _, held in folds]))
    position = {int(i): r for r, i in enumerate(eval_idx)}
    return eval_idx, [np.array([position[int(i)] for i in held]) for _, held in folds]


def fold_indices(targets: np.ndarray, folds: int, val_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (fit, held-out) index pairs every stage shares: ``folds`` multi-label-stratified, seeded folds whose
    held-out parts cover every record once; ``folds=1``: one train/validation split of ``val_fraction``."""
    if folds == 1:
        return [split_indices(targets, val_fraction, seed)]
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(fit), np.sort(held)) for fit, held in splitter.split(np.zeros(len(targets)), targets)]


def class_warnings(targets: np.ndarray, val_idx: np.ndarray | None, min_examples: int = 5) -> list[str]:
    """Human-readable warnings about classes the data cannot train or validate well (one string each).

    ``targets`` is the (N, 18) multi-hot array in ``labels.LABEL_IDS`` order; the training part is every
    row not in ``val_idx`` (all rows when ``val_idx`` is None). Warns about classes with fewer than
    ``min_examples`` training examples, classes absent from the validation part ``targets[val_idx]``,
    and training data that holds only one class (or none), where validation F1 is meaningless.
    """
    targets = np.asarray(targets)
    if targets.ndim != 2 or targets.shape[1] != L.NUM_CLASSES:
        raise ValueError(f"targets must be (N, {L.NUM_CLASSES}) multi-hot, got shape {targets.shape}")
    in_val = np.zeros(len(targets), dtype=bool)
    if val_idx is not None:
        in_val[np.asarray(val_idx, dtype=np.int64)] = True
    train_counts = (targets[~in_val] > 0).sum(0)
    val_counts = (targets[in_val] > 0).sum(0)
    n_train, n_val = int((~in_val).sum()), int(in_val.sum())

    def name(col: int) -> str:
        label = L.LABEL_IDS[col]
        return f"label {label} {L.LABEL_NAMES[label]}"

    warnings = []
    present = np.flatnonzero(train_counts)
    if len(present) == 0:
        warnings.append(f"the training data ({n_train} images) holds no labels at all: nothing can be learned "
                        f"and validation F1 is meaningless")
    elif len(present) == 1:
        warnings.append(f"the training data ({n_train} images) holds only one class ({name(present[0])}): "
                        f"every model predicts it, validation F1 is meaningless")
    for col in range(L.NUM_CLASSES):
        count = int(train_counts[col])
        if count < min_examples:
            warnings.append(f"{name(col)}: {'no' if count == 0 else f'only {count}'} training example"
                            f"{'' if count == 1 else 's'} (fewer than {min_examples}): its predictions are unreliable")
    if val_idx is not None:
        for col in np.flatnonzero(val_counts == 0):
            warnings.append(f"{name(col)}: absent from the validation part ({n_val} images): "
                            f"its validation F1 and threshold say nothing")
    return warnings
