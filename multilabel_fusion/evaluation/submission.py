"""The one submission writer (``ImageID,Labels``) and its validator.

Kaggle scores a row by splitting its Labels on spaces, so ``[1, 3]`` or ``1,3`` silently score 0:
the validator rejects anything but space-separated ascending label ids from the 18 classes,
and every writer validates before the file is renamed into place.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import labels as L
from ..data.reader import DataError, read_records
from ..io.atomic import write_text

HEADER = "ImageID,Labels"
LABELS_FORMAT = re.compile(r"[1-9]\d*( [1-9]\d*)*")  # ids as Kaggle compares them: no sign, no leading zero


class SubmissionError(ValueError):
    """A submission Kaggle would reject or score wrongly; the message names the file and row."""


def format_rows(image_ids: Sequence[str], multi_hot: np.ndarray) -> str:
    rows = [HEADER]
    for image_id, label_list in zip(image_ids, L.decode(multi_hot), strict=True):
        rows.append(f"{image_id},{' '.join(map(str, label_list))}")
    return "\n".join(rows) + "\n"


def validate_text(text: str, expected_ids: Sequence[str], source: str = "submission", *,
                  allow_empty: bool = False) -> None:
    """Raise :class:`SubmissionError` unless ``text`` is a submission Kaggle scores as intended.

    ``allow_empty``: a row without labels is accepted (only when the at-least-one rule was switched off).
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != HEADER:
        got = lines[0] if lines else ""
        raise SubmissionError(f"{source}: line 1: header is {got!r}, expected {HEADER!r}")
    expected = set(expected_ids)
    seen: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if "," not in line:
            raise SubmissionError(f"{source}: line {number}: expected 'ImageID,Labels', got {line!r}")
        image_id, label_text = line.split(",", 1)
        if len(label_text) >= 2 and label_text[0] == label_text[-1] == '"':
            label_text = label_text[1:-1]
        if image_id not in expected:
            raise SubmissionError(f"{source}: line {number}: {image_id!r} is not a test ImageID")
        if image_id in seen:
            raise SubmissionError(f"{source}: line {number}: {image_id} already on line {seen[image_id]}")
        seen[image_id] = number
        if label_text == "" and allow_empty:  # no label predicted (thresholds.at_least_one: false): scores 0
            continue
        if not LABELS_FORMAT.fullmatch(label_text):
            raise SubmissionError(
                f"{source}: line {number} ({image_id}): labels {label_text!r} must be label ids separated by "
                f"single spaces, e.g. '1 3' (Kaggle compares the label text: '[1, 3]', '1,3' or '01' score 0)"
            )
        ids = [int(x) for x in label_text.split()]
        bad = [x for x in ids if not L.is_valid_label(x)]
        if bad:
            raise SubmissionError(f"{source}: line {number} ({image_id}): label {bad[0]} is not one of the 18 classes")
        if ids != sorted(set(ids)):
            raise SubmissionError(f"{source}: line {number} ({image_id}): labels {label_text!r} repeat or are not ascending")
    if len(seen) != len(expected):
        missing = [i for i in expected_ids if i not in seen]
        raise SubmissionError(
            f"{source}: {len(missing)} test ImageIDs missing (first: {', '.join(missing[:5])})"
        )


def write(path: str | Path, image_ids: Sequence[str], multi_hot: np.ndarray, *, allow_empty: bool = False) -> Path:
    """Validate and atomically write a submission for ``image_ids`` (test-file order)."""
    multi_hot = np.asarray(multi_hot)
    if len(multi_hot) != len(image_ids):
        raise SubmissionError(f"{path}: {len(multi_hot)} predictions for {len(image_ids)} test images")
    text = format_rows(image_ids, multi_hot)
    validate_text(text, image_ids, source=str(path), allow_empty=allow_empty)
    return write_text(path, text)


def validate_file(path: str | Path, test_csv: str | Path) -> int:
    """Validate a submission file against the test file's ImageIDs; returns the number of rows."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    ids = [r.image_id for r in read_records(test_csv, with_labels=False)]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SubmissionError(f"{path}: line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    validate_text(text, ids, source=str(path))
    return len(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multilabel_fusion.evaluation.submission",
        description="Check a submission CSV against the competition's test.csv before uploading it to Kaggle.",
    )
    parser.add_argument("submission", help="the CSV to check, e.g. output/predictions.csv")
    parser.add_argument("--test-csv", default="input/test.csv", help="the competition test.csv (default: input/test.csv)")
    args = parser.parse_args(argv)
    try:
        rows = validate_file(args.submission, args.test_csv)
    except (SubmissionError, DataError) as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    print(f"OK: {args.submission} has one valid row for each of the {rows} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
