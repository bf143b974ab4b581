"""Exact reader of the competition's ``train.csv`` / ``test.csv``, record checks and the shared split.

The raw files wrap every caption in quotes but do not double the quotes inside a caption,
and some captions hold raw newlines, so ``pandas.read_csv`` fails or silently drops and
corrupts records. Every record starts on a line beginning ``<digits>.jpg,``; the reader
splits on those line starts and takes the caption as everything after the last fixed field.
A well-formed CSV (the same data re-saved by pandas, quotes doubled) is read too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import labels as L

RECORD_START = re.compile(r"^(\d+\.jpg),", re.MULTILINE)
LABELS_FIELD = re.compile(r"^\d+( \d+)*$")
TRAIN_HEADER = ["ImageID", "Labels", "Caption"]
TEST_HEADER = ["ImageID", "Caption"]


class DataError(ValueError):
    """Bad competition input; the message names the file and the record."""


@dataclass(frozen=True)
class Record:
    image_id: str
    caption: str
    labels: tuple[int, ...] | None  # None for test records
    line: int  # 1-based line of the file where the record starts


def _where(path: Path, line: int, image_id: str | None = None) -> str:
    return f"{path}: line {line}" + (f" ({image_id})" if image_id else "")


def _parse_labels(text: str, path: Path, line: int, image_id: str) -> tuple[int, ...]:
    text = text.strip()
    if not LABELS_FIELD.match(text):
        raise DataError(f"{_where(path, line, image_id)}: labels field {text!r} is not space-separated integers")
    found = tuple(int(t) for t in text.split())
    bad = [x for x in found if not L.is_valid_label(x)]
    if bad:
        raise DataError(
            f"{_where(path, line, image_id)}: label {bad[0]} is not one of the 18 classes {list(L.LABEL_IDS)}"
        )
    if len(set(found)) != len(found):
        raise DataError(f"{_where(path, line, image_id)}: label repeated in {text!r}")
    return found


def _strip_caption_quotes(field: str) -> str:
    """Remove the one pair of quotes that wraps a raw caption (inner quotes stay as written)."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1]
    return field


def _read_raw(text: str, path: Path, with_labels: bool) -> list[Record]:
    starts = list(RECORD_START.finditer(text))
    header_end = starts[0].start() if starts else len(text)
    leftover = text[text.find("\n") + 1 : header_end] if "\n" in text[:header_end] else ""
    if leftover.strip():
        raise DataError(f"{path}: line 2: text before the first record does not start with '<digits>.jpg,'")
    records = []
    line = text.count("\n", 0, header_end) + 1
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        chunk = text[match.start() : end]
        body = chunk[:-1] if chunk.endswith("\n") else chunk  # the record's own line break
        if body.endswith("\r"):
            body = body[:-1]
        image_id = match.group(1)
        rest = body[match.end() - match.start() :]
        if with_labels:
            if "," not in rest:
                raise DataError(f"{_where(path, line, image_id)}: expected ImageID,Labels,Caption")
            labels_text, caption_field = rest.split(",", 1)
            labels = _parse_labels(labels_text, path, line, image_id)
        else:
            caption_field, labels = rest, None
        records.append(Record(image_id, _strip_caption_quotes(caption_field), labels, line))
        line += chunk.count("\n")
    return records


def _read_well_formed(text: str, path: Path, header: list[str]) -> list[Record] | None:
    """Parse as a strict RFC-4180 CSV; None if the file is not one (e.g. the raw competition file)."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error:
        return None
    if not rows or rows[0] != header or any(len(r) != len(header) for r in rows[1:]):
        return None
    records, line = [], 2
    for row in rows[1:]:
        image_id = row[0]
        if not re.fullmatch(r"\d+\.jpg", image_id):
            return None
        labels = _parse_labels(row[1], path, line, image_id) if len(header) == 3 else None
        records.append(Record(image_id, row[-1], labels, line))
        line += 1 + sum(field.count("\n") for field in row)
    return records


def read_records(path: str | Path, *, with_labels: bool) -> list[Record]:
    """Read every record of a competition CSV exactly, raw or well-formed; never drops one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_bytes().decode("utf-8-sig")
    header = TRAIN_HEADER if with_labels else TEST_HEADER
    first_line = text.split("\n", 1)[0].rstrip("\r")
    if first_line.split(",") != header:
        raise DataError(f"{path}: line 1: header is {first_line!r}, expected {','.join(header)!r}")
    records = _read_well_formed(text, path, header)
    if records is None:
        records = _read_raw(text, path, with_labels)
    _check_records(records, path)
    return records


def _check_records(records: list[Record], path: Path) -> None:
    if not records:
        raise DataError(f"{path}: no records")
    seen: dict[str, int] = {}
    for rec in records:
        if rec.image_id in seen:
            raise DataError(
                f"{_where(path, rec.line, rec.image_id)}: ImageID repeats the record on line {seen[rec.image_id]}"
            )
        seen[rec.image_id] = rec.line
        if not rec.caption.strip():
            raise DataError(f"{_where(path, rec.line, rec.image_id)}: empty caption")
        if rec.labels is not None and not rec.labels:
            raise DataError(f"{_where(path, rec.line, rec.image_id)}: no labels")


def records_frame(records: list[Record]) -> pd.DataFrame:
    """Records as a DataFrame: ImageID, Caption and, for train, Labels (tuple of ids)."""
    frame = pd.DataFrame(
        {"ImageID": [r.image_id for r in records], "Caption": [r.caption for r in records]}
    )
    if records and records[0].labels is not None:
        frame["Labels"] = [r.labels for r in records]
    frame["line"] = [r.line for r in records]
    return frame


@dataclass
class CompetitionData:
    """The labelled train records, the test records and the folder of images."""

    root: Path
    train: pd.DataFrame
    test: pd.DataFrame

    @property
    def image_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_targets(self) -> np.ndarray:
        return L.encode(self.train["Labels"].tolist())

    def image_paths(self, part: str) -> list[Path]:
        frame = self.train if part == "train" else self.test
        return [self.image_dir / image_id for image_id in frame["ImageID"]]

    def fingerprint(self) -> str:
        """Content hash of the two CSV files: caches built from other data are never reused."""
        digest = hashlib.sha256()
        for name in ("train.csv", "test.csv"):
            digest.update((self.root / name).read_bytes())
        digest.update(str(len(self.train) + len(self.test)).encode())
        return digest.hexdigest()[:16]


MISSING_DATA_HELP = (
    "Get the competition data from Kaggle (COMP5329 multi-label classification: train.csv, test.csv and the\n"
    "data/ folder of images), e.g. `kaggle competitions download -c <competition>` and unzip it, so that\n"
    "{root}/train.csv, {root}/test.csv and {root}/data/*.jpg exist; or point the pipeline elsewhere with\n"
    "--data PATH (for example --data ../shared/comp5329), or run on the generated demo data with --demo."
)


def load(root: str | Path, *, check_images: bool = True) -> CompetitionData:
    """Read and check a competition folder (``train.csv``, ``test.csv``, ``data/``)."""
    root = Path(root)
    if not (root / "train.csv").is_file() or not (root / "test.csv").is_file():
        raise DataError(f"{root}: no competition data here (train.csv and test.csv).\n" + MISSING_DATA_HELP.format(root=root))
    train = records_frame(read_records(root / "train.csv", with_labels=True))
    test = records_frame(read_records(root / "test.csv", with_labels=False))
    overlap = set(train["ImageID"]) & set(test["ImageID"])
    if overlap:
        image_id = sorted(overlap)[0]
        line = int(test.loc[test["ImageID"] == image_id, "line"].iloc[0])
        raise DataError(f"{root / 'test.csv'}: line {line} ({image_id}): ImageID also in train.csv")
    data = CompetitionData(root, train, test)
    if check_images:
        check_images_present(data)
    return data


def check_images_present(data: CompetitionData) -> None:
    if not data.image_dir.is_dir():
        raise DataError(f"{data.image_dir}: image folder not found.\n" + MISSING_DATA_HELP.format(root=data.root))
    on_disk = {p.name for p in data.image_dir.iterdir()}
    for name, frame in (("train.csv", data.train), ("test.csv", data.test)):
        missing = frame.loc[~frame["ImageID"].isin(on_disk)]
        if len(missing):
            first = missing.iloc[0]
            raise DataError(
                f"{data.root / name}: line {first['line']} ({first['ImageID']}): image missing from "
                f"{data.image_dir} ({len(missing)} of {len(frame)} missing, first: "
                f"{', '.join(missing['ImageID'].head(5))})"
            )


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded multi-label stratified train/validation split (rare labels land in both parts).

    Every stage calls this with the config's fraction and seed, so all stages share one split.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(targets)), targets))
    return np.sort(train_idx), np.sort(val_idx)
