"""Exact reader of the competition's ``train.csv`` / ``test.csv`` and the record checks (the split: :mod:`.folds`).

The raw files wrap every caption in quotes but do not double the quotes inside a caption, and some
captions hold raw newlines, so ``pandas.read_csv`` fails or silently drops and corrupts records.
A well-formed CSV (the same data re-saved by pandas, quotes doubled) is read with :mod:`csv`;
anything else is read line by line as the raw format:

* A line starts a record only if it is a *full record start* -- ``<digits>.jpg,<labels>,"`` (train)
  or ``<digits>.jpg,"`` (test) -- **and** the previous record is *closed*: its caption's last
  non-blank line ends with the closing quote (optionally followed by spaces, tabs or ``\r``).
* Every other line continues the open caption: a caption line such as ``123.jpg, reads hello"``
  never becomes a phantom record.
* A line that could be either is refused with a one-line :class:`DataError` naming file, line and
  ImageID: a full record start while the previous caption is still open (a caption holding a line
  that looks exactly like a record, or a record whose closing quote is missing), or a line beginning
  ``<digits>.jpg,`` after a closed record that is not a full record start (a malformed record, or
  caption text that cannot be told apart from one).
* A caption is the text between its opening quote and its closing quote, inner quotes and line breaks
  kept as written; spaces/tabs/``\r`` after the closing quote and blank lines after a closed record
  (between records or at the end of the file) are dropped. A record whose caption never closes is an
  error, never a silent drop.
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

#: A line that begins like a record (what the raw format guarantees for every record).
RECORD_PREFIX = re.compile(r"(\d+\.jpg),")
#: A line that looks like a record start the raw format does not allow (leading spaces, another case or name, e.g.
#: `` 30003.jpg,``, ``5.JPG,``, ``x30003.jpg,``): refused after a closed record, never glued onto its caption.
RECORD_LIKE = re.compile(r"\s*[^\s,\"]+\.(?:jpe?g|png|gif|bmp|webp)\s*,", re.IGNORECASE)
#: Inside a caption, this ends the quoted field and opens another: a record with more fields than the file's.
FIELD_BREAK = '","'
#: Full record starts: the ImageID, (train) a labels field, and the caption's opening quote.
TRAIN_START = re.compile(r'(\d+\.jpg),(\d+(?: \d+)*),"')
TEST_START = re.compile(r'(\d+\.jpg),"')
LABELS_FIELD = re.compile(r"^\d+( \d+)*$")
TRAIN_HEADER = ["ImageID", "Labels", "Caption"]
TEST_HEADER = ["ImageID", "Caption"]
_AFTER_QUOTE = " \t\r"  # allowed after a caption's closing quote, before the line break


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


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


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


class _Open:
    """The record being read: where it starts, its fields and its caption lines so far."""

    __slots__ = ("line", "image_id", "labels_text", "lines", "closed", "last_text")

    def __init__(self, line: int, image_id: str, labels_text: str | None, first: str):
        self.line, self.image_id, self.labels_text = line, image_id, labels_text
        self.lines = [first]  # caption field, opening quote first, one entry per physical line
        end = first.rstrip(_AFTER_QUOTE)
        self.closed = len(end) >= 2 and end.endswith('"')
        self.last_text = 1  # number of lines up to the last non-blank one

    def add(self, text: str) -> None:
        self.lines.append(text)
        end = text.rstrip(_AFTER_QUOTE)
        if end.strip():  # blank lines leave the state as it was
            self.closed = end.endswith('"')
            self.last_text = len(self.lines)

    def finish(self, path: Path) -> Record:
        if not self.closed:
            raise DataError(
                f"{_where(path, self.line, self.image_id)}: caption does not end with its closing quote (its last "
                f"line, before the next record or the end of the file, must end with '\"')"
            )
        field = "\n".join(self.lines[: self.last_text]).rstrip(_AFTER_QUOTE)
        if FIELD_BREAK in field[1:-1]:
            raise DataError(
                f"{_where(path, self.line, self.image_id)}: a field after the caption ('\",\"' ends the quoted caption "
                f"and opens another field; a record has {2 if self.labels_text is None else 3} fields)")
        labels = None if self.labels_text is None else _parse_labels(self.labels_text, path, self.line, self.image_id)
        return Record(self.image_id, field[1:-1], labels, self.line)


def _bad_start(line_text: str, path: Path, n: int, image_id: str, with_labels: bool, after: _Open | None) -> DataError:
    """Why a line that begins ``<digits>.jpg,`` right after a closed record is not a record start."""
    rest = line_text[len(image_id) + 1 :].rstrip("\r")
    if with_labels:
        if "," not in rest:
            what = f"no labels field (expected <digits>.jpg,<labels>,\"caption\", got {_short(line_text)})"
        else:
            labels_text, caption = rest.split(",", 1)
            if not LABELS_FIELD.match(labels_text.strip()):
                what = f"labels field {labels_text.strip()!r} is not space-separated integers"
            elif not caption.startswith('"'):
                what = f"caption field {_short(caption)} does not start with a quote"
            else:
                what = f"labels field {labels_text!r} has stray spaces"
    else:
        what = f"caption field {_short(rest)} does not start with a quote"
    if after is not None:
        what += (f" (nor can this line be part of the caption of {after.image_id} on line {after.line}: "
                 f"that caption already ended with its closing quote)")
    return DataError(f"{_where(path, n, image_id)}: {what}")


def _read_raw(text: str, path: Path, with_labels: bool) -> list[Record]:
    start = TRAIN_START if with_labels else TEST_START
    lines = text.split("\n")
    records: list[Record] = []
    current: _Open | None = None
    for n, line_text in enumerate(lines[1:], start=2):
        prefix = RECORD_PREFIX.match(line_text)
        if prefix is None:
            if current is not None and current.closed and RECORD_LIKE.match(line_text):
                raise DataError(
                    f"{path}: line {n}: {_short(line_text)} looks like a record but is not one (a record starts "
                    f"'<digits>.jpg,' at the beginning of its line), and it cannot be part of the caption of "
                    f"{current.image_id} (line {current.line}), which already ended with its closing quote")
            if current is not None:
                current.add(line_text)
            elif line_text.strip():
                raise DataError(f"{path}: line {n}: text before the first record does not start with '<digits>.jpg,'")
            continue
        full = start.match(line_text)
        if current is not None and not current.closed:
            if full is None:
                current.add(line_text)  # caption text that happens to begin like an ImageID
                continue
            raise DataError(
                f"{_where(path, n, full.group(1))}: ambiguous: this line looks like a record, but the caption of "
                f"{current.image_id} (line {current.line}) does not end with its closing quote before it, so it "
                f"may as well be part of that caption"
            )
        if full is None:
            raise _bad_start(line_text, path, n, prefix.group(1), with_labels, current)
        if current is not None:
            records.append(current.finish(path))
        current = _Open(n, full.group(1), full.group(2) if with_labels else None, line_text[full.end() - 1 :])
    if current is not None:
        records.append(current.finish(path))
    return records


def _read_well_formed(text: str, path: Path, header: list[str]) -> list[Record] | None:
    """Parse as a strict RFC-4180 CSV; None if the file is not one (e.g. the raw competition file)."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error:
        return None
    if not rows or rows[0] != header:
        return None
    records, line = [], 2
    for row in rows[1:]:
        if not row or (len(row) == 1 and not row[0].strip()):  # a blank line
            line += 1 + sum(field.count("\n") for field in row)
            continue
        if len(row) != len(header):
            return None
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
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if "\n" not in text and "\r" in text:  # old Mac line endings (CR only): the same lines
        text = text.replace("\r", "\n")
    header = TRAIN_HEADER if with_labels else TEST_HEADER
    first_line = text.split("\n", 1)[0].rstrip("\r")
    if next(csv.reader([first_line]), []) != header:  # a re-save may quote every field (pandas QUOTE_ALL)
        raise DataError(f"{path}: line 1: header is {_short(first_line, 80)}, expected {','.join(header)!r}")
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
