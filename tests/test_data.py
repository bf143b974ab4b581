import re
import shutil

import numpy as np
import pandas as pd
import pytest

from multilabel_fusion.data import folds
from multilabel_fusion.data import labels as L
from multilabel_fusion.data import reader as data
from multilabel_fusion.data.reader import DataError

TRICKY_TRAIN = {
    "1014.jpg": ((18,), "Atop an oriental rug rests a dog and two low-lying tables and a taller one\n"
                        "full of very tidily arranged piles of jeans and tops."),
    "2259.jpg": ((1, 3), "Men loading up a van with bags and suitcases.\n."),
    "6751.jpg": ((4,), "Red motor \nscooter parked on the sand with a sunset in background."),
    "9084.jpg": ((3, 1, 11), 'A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground '
                             "and a street stretching into the background."),
    "9508.jpg": ((1,), 'A cow in street with writing that reads "oh no, not beef on the menu again!"'),
    "1338.jpg": ((1,), 'A man surfing with titling that reads "spray."'),
}


def test_reads_every_shared_record_exactly(shared_data):
    d = data.load(shared_data)
    assert len(d.train) == 10_000 and len(d.test) == 10_000
    assert d.train["ImageID"].tolist() == [f"{i}.jpg" for i in range(10_000)]
    assert d.test["ImageID"].tolist() == [f"{i}.jpg" for i in range(30_000, 40_000)]
    by_id = d.train.set_index("ImageID")
    for image_id, (labels, caption) in TRICKY_TRAIN.items():
        assert by_id.loc[image_id, "Labels"] == labels
        assert by_id.loc[image_id, "Caption"] == caption
    assert d.test.set_index("ImageID").loc["36889.jpg", "Caption"] == (
        'Stop sign with added "war" annotation, at an intersection.'
    )
    assert by_id.loc["0.jpg", "Caption"] == "Woman in swim suit holding parasol on sunny day."
    # no caption keeps the wrapping quotes, every label is one of the 18
    assert not d.train["Caption"].str.startswith('"').any()
    assert d.train_targets.sum(1).min() >= 1 and d.train_targets.sum(1).max() <= 7


def test_plain_pandas_fails_where_the_reader_succeeds(shared_data):
    with pytest.raises(pd.errors.ParserError):
        pd.read_csv(shared_data / "test.csv")


def test_accepts_a_resaved_well_formed_csv(shared_data, tmp_path):
    raw = data.read_records(shared_data / "train.csv", with_labels=True)[:3000]
    frame = pd.DataFrame({"ImageID": [r.image_id for r in raw],
                          "Labels": [" ".join(map(str, r.labels)) for r in raw],
                          "Caption": [r.caption for r in raw]})
    frame.to_csv(tmp_path / "train.csv", index=False)  # pandas doubles the inner quotes
    again = data.read_records(tmp_path / "train.csv", with_labels=True)
    assert [(r.image_id, r.labels, r.caption) for r in again] == [(r.image_id, r.labels, r.caption) for r in raw]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("bad_label", ["12", "20", "0"])
def test_label_outside_the_18_classes_names_the_row(tmp_path, bad_label):
    f = _write(tmp_path / "train.csv", f'ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,3 {bad_label},"b"\n')
    with pytest.raises(DataError, match=rf"train.csv: line 3 \(1.jpg\): label {bad_label} is not one of the 18"):
        data.read_records(f, with_labels=True)


@pytest.mark.parametrize("text, message", [
    ('ImageID,Labels,Caption\n0.jpg,1,"a"\n0.jpg,2,"b"\n', r"line 3 \(0.jpg\): ImageID repeats the record on line 2"),
    ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,2,""\n', r"line 3 \(1.jpg\): empty caption"),
    ('ImageID,Labels,Caption\n0.jpg,1;2,"a"\n', r"line 2 \(0.jpg\): labels field '1;2'"),
    ('ImageID,Caption,Labels\n0.jpg,"a",1\n', r"line 1: header"),
])
def test_bad_records_are_errors_not_drops(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        data.read_records(_write(tmp_path / "train.csv", text), with_labels=True)


def test_missing_images_are_named(demo_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_data, copy)
    (copy / "data" / "5.jpg").unlink()
    with pytest.raises(DataError, match=r"train.csv: line \d+ \(5.jpg\): image missing"):
        data.load(copy)


def test_missing_data_folder_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match="Kaggle"):
        data.load(tmp_path / "nowhere")


def test_split_is_seeded_stratified_and_disjoint(shared_data):
    targets = data.load(shared_data, check_images=False).train_targets
    tr, va = folds.split_indices(targets, 0.2, seed=7)
    tr2, va2 = folds.split_indices(targets, 0.2, seed=7)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(targets)
    share = targets[va].sum(0) / targets.sum(0)
    assert share.min() > 0.15 and share.max() < 0.25  # every label, the rarest included, ~20 % in validation


def test_labels_round_trip():
    lists = [[1], [19, 3], list(L.LABEL_IDS)]
    hot = L.encode(lists)
    assert hot.shape == (3, 18)
    assert L.decode(hot) == [[1], [3, 19], list(L.LABEL_IDS)]
    assert L.names()[0] == "person" and L.names()[-1] == "horse" and L.LABEL_NAMES[13] == "stop sign"


# --- the raw format, case by case: read exactly or refuse with file, line and ImageID -----------------

TRAIN_HEAD = "ImageID,Labels,Caption\n"
INNER_QUOTES = '0.jpg,1,"A sign that reads "stop, now" here"\n'  # unescaped quotes: not a well-formed CSV


def _captions(path, with_labels=True):
    return [(r.image_id, r.caption) for r in data.read_records(path, with_labels=with_labels)]


@pytest.mark.parametrize("after", [" ", "\t", "  \t ", " \r"])
def test_space_after_the_closing_quote_is_not_part_of_the_caption(tmp_path, after):
    f = _write(tmp_path / "train.csv",
               f'{TRAIN_HEAD}{INNER_QUOTES}5.jpg,1,"A dog."{after}\n6.jpg,2 3,"A cat."{after}\n')
    assert _captions(f) == [("0.jpg", 'A sign that reads "stop, now" here'), ("5.jpg", "A dog."), ("6.jpg", "A cat.")]
    # also when the rest of the file is a well-formed CSV (the space makes the csv module refuse it)
    g = _write(tmp_path / "test.csv", f'ImageID,Caption\n30000.jpg,"A dog."{after}\n30001.jpg,"A cat."\n')
    assert _captions(g, with_labels=False) == [("30000.jpg", "A dog."), ("30001.jpg", "A cat.")]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("blank_lines", [0, 1, 3])
def test_blank_lines_at_the_end_and_crlf_are_read_exactly(tmp_path, newline, blank_lines):
    body = TRAIN_HEAD + INNER_QUOTES + '1.jpg,3,"Two\nlines."\n' + '2.jpg,1 2,"A bike."\n'
    text = body.replace("\n", newline) + newline * blank_lines
    (tmp_path / "train.csv").write_bytes(text.encode())
    records = data.read_records(tmp_path / "train.csv", with_labels=True)
    assert [(r.image_id, r.labels, r.caption, r.line) for r in records] == [
        ("0.jpg", (1,), 'A sign that reads "stop, now" here', 2),
        ("1.jpg", (3,), f"Two{newline}lines.", 3),  # a line break inside a caption is kept as written
        ("2.jpg", (1, 2), "A bike.", 5),
    ]


def test_blank_lines_after_a_well_formed_csv_keep_it_well_formed(tmp_path):
    f = _write(tmp_path / "train.csv", TRAIN_HEAD + '0.jpg,1,"He said ""hi, you"""\n1.jpg,2,A bike.\n\n\n')
    assert _captions(f) == [("0.jpg", 'He said "hi, you"'), ("1.jpg", "A bike.")]


def test_blank_lines_between_records_and_inside_captions(tmp_path):
    # 24624.jpg of the full train file holds 14 line breaks in a row inside its caption
    caption_24624 = "A couple of men standing around an exercise w" + "\n" * 14 + "A couple of men standing."
    f = _write(tmp_path / "train.csv", TRAIN_HEAD + INNER_QUOTES + "\n\n" + f'24624.jpg,1 2,"{caption_24624}"\n'
               + '24625.jpg,1,"A person."\n')
    assert _captions(f) == [("0.jpg", 'A sign that reads "stop, now" here'), ("24624.jpg", caption_24624),
                            ("24625.jpg", "A person.")]
    assert [r.line for r in data.read_records(f, with_labels=True)] == [2, 5, 20]


@pytest.mark.parametrize("inner", [
    "123.jpg, reads hello",  # begins like a record, but no labels field
    '123.jpg,1 A "sign"',  # labels-like text, but no opening quote after it
    "123.jpg,",
    '45.jpg,"quoted" words',  # a test-file record start inside a train caption
])
def test_caption_line_that_begins_like_a_record_is_no_phantom_record(tmp_path, inner):
    caption = f"A sign\n{inner} on the wall"
    f = _write(tmp_path / "train.csv", f'{TRAIN_HEAD}{INNER_QUOTES}7.jpg,1,"{caption}"\n8.jpg,2,"A bike."\n')
    assert _captions(f) == [("0.jpg", 'A sign that reads "stop, now" here'), ("7.jpg", caption), ("8.jpg", "A bike.")]


def test_test_file_caption_line_that_begins_like_a_record(tmp_path):
    caption = 'A sign\n123.jpg, reads "hello, you"'
    f = _write(tmp_path / "test.csv", f'ImageID,Caption\n30000.jpg,"{caption}"\n30001.jpg,"A bike."\n')
    assert _captions(f, with_labels=False) == [("30000.jpg", caption), ("30001.jpg", "A bike.")]


@pytest.mark.parametrize("text, message", [
    # a caption line that is exactly a record start while the caption is still open: ambiguous
    (TRAIN_HEAD + '7.jpg,1,"A sign\n123.jpg,1,"reads hello"\n8.jpg,2,"x"\n',
     r"train.csv: line 3 \(123.jpg\): ambiguous: .*caption of 7.jpg \(line 2\)"),
    # a missing closing quote (the next record would silently become part of the caption)
    (TRAIN_HEAD + INNER_QUOTES + '5.jpg,1,"A dog.\n6.jpg,1,"A cat."\n',
     r"train.csv: line 4 \(6.jpg\): ambiguous: .*caption of 5.jpg \(line 3\)"),
    (TRAIN_HEAD + INNER_QUOTES + '5.jpg,1,"A dog.\n', r"train.csv: line 3 \(5.jpg\): caption does not end with its closing"),
    (TRAIN_HEAD + INNER_QUOTES + '5.jpg,1,"A dog.\n\n\n', r"train.csv: line 3 \(5.jpg\): caption does not end with its"),
    # a caption field that does not start with a quote
    (TRAIN_HEAD + INNER_QUOTES + "1.jpg,2,A dog.\n", r"train.csv: line 3 \(1.jpg\): caption field 'A dog.' does not"),
    (TRAIN_HEAD + INNER_QUOTES + '1.jpg,2, "A dog."\n', r"line 3 \(1.jpg\): caption field ' \"A dog.\"' does not start"),
    (TRAIN_HEAD + INNER_QUOTES + '1.jpg,2;3,"A dog."\n', r"line 3 \(1.jpg\): labels field '2;3'"),
    (TRAIN_HEAD + INNER_QUOTES + '1.jpg,"A dog."\n', r"line 3 \(1.jpg\): no labels field"),
    (TRAIN_HEAD + INNER_QUOTES + "1.jpg\n", r"line 2 \(0.jpg\): caption does not end with its closing quote|line 3"),
    # text between records: it leaves the previous caption without its closing quote
    (TRAIN_HEAD + INNER_QUOTES + 'stray text\n1.jpg,2,"A dog."\n', r"line 4 \(1.jpg\): ambiguous: .*0.jpg \(line 2\)"),
    (TRAIN_HEAD + INNER_QUOTES + 'stray text\n', r"line 2 \(0.jpg\): caption does not end with its closing quote"),
    (TRAIN_HEAD + "stray text\n" + INNER_QUOTES, r"train.csv: line 2: text before the first record"),
    ('ImageID,Caption\n30000.jpg,"a "b" c"\n30001.jpg,A dog.\n', r"test.csv: line 3 \(30001.jpg\): caption field"),
    ('ImageID,Caption\n30000.jpg,"a "b" c\n30001.jpg,"A dog."\n', r"test.csv: line 3 \(30001.jpg\): ambiguous"),
])
def test_records_that_cannot_be_read_exactly_are_one_line_errors(tmp_path, text, message):
    name = "train.csv" if text.startswith(TRAIN_HEAD) else "test.csv"
    with pytest.raises(DataError, match=message) as err:
        data.read_records(_write(tmp_path / name, text), with_labels=name == "train.csv")
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / name))


def _raw_file(records, with_labels=True) -> str:
    head = TRAIN_HEAD if with_labels else "ImageID,Caption\n"
    return head + "".join(
        f'{image_id},{" ".join(map(str, labels)) + "," if with_labels else ""}"{caption}"\n'
        for image_id, labels, caption in records
    )


def test_random_raw_files_read_back_exactly(tmp_path):
    """Captions built from the format's traps read back exactly; a caption line that is a record start is refused."""
    rng = np.random.default_rng(0)
    pieces = ['a dog', ' ', ', ', '"', '"quoted, text"', "\n", "\n\n", "\n123.jpg, reads", "\n9.jpg,", "\n45.jpg,1 A",
              "\n77.jpg,\"x", " \t", "2.jpg,1,", "..", "\r"]
    ambiguous = 0
    for trial in range(40):
        records = []
        for i in range(30):
            parts = [str(rng.choice(pieces)) for _ in range(int(rng.integers(1, 8)))]
            caption = "x" + "".join(parts) + "y"
            # a line ending with a quote right before a line beginning '<digits>.jpg,' would close the record there
            # (a line ending with a quote before any other text is fine, and stays in the mix)
            caption = re.sub(r'"([ \t\r]*\n(?:[ \t\r]*\n)*)(?=\d+\.jpg,)', r'"z\1', caption)
            labels = tuple(int(x) for x in rng.choice(L.LABEL_IDS, size=int(rng.integers(1, 4)), replace=False))
            records.append((f"{i}.jpg", labels, caption))
        for with_labels in (True, False):
            f = _write(tmp_path / f"{trial}_{with_labels}.csv", _raw_file(records, with_labels))
            start = r'\d+\.jpg,\d+( \d+)*,"' if with_labels else r'\d+\.jpg,"'
            if any(re.match(start, line) for _, _, c in records for line in c.split("\n")[1:]):
                with pytest.raises(DataError, match="ambiguous"):  # a caption line that is a full record start
                    data.read_records(f, with_labels=with_labels)
                ambiguous += 1
                continue
            got = data.read_records(f, with_labels=with_labels)
            assert [(r.image_id, r.caption) for r in got] == [(i, c) for i, _, c in records]
            if with_labels:
                assert [r.labels for r in got] == [lab for _, lab, _ in records]
    assert 10 < ambiguous < 70  # of the 80 files, both kinds were tried
    # a caption holding a line that is exactly a train record start cannot be told apart from one: refused
    records[5] = ("5.jpg", (1,), 'A sign\n123.jpg,1 2,"reads')
    with pytest.raises(DataError, match=r"line \d+ \(123.jpg\): ambiguous"):
        data.read_records(_write(tmp_path / "amb.csv", _raw_file(records)), with_labels=True)


def test_raw_parse_of_30000_records_is_fast(tmp_path):
    import time

    records = [(f"{i}.jpg", (1, 3), 'A sign that reads "stop, now"\nnear 12.jpg, a car' if i % 50 == 0 else "A car.")
               for i in range(30_000)]
    f = _write(tmp_path / "train.csv", _raw_file(records))
    start = time.perf_counter()
    got = data.read_records(f, with_labels=True)
    seconds = time.perf_counter() - start
    assert len(got) == 30_000 and got[50].caption == records[50][2]
    assert seconds < 2.0, f"parsing 30,000 records took {seconds:.2f} s"


# --- class warnings ------------------------------------------------------------------------------------

def _targets(counts: dict[int, int], n: int = 100) -> np.ndarray:
    """n rows, all person (label 1); label id -> number of rows (from the top) that also hold it."""
    t = np.zeros((n, 18), dtype=np.uint8)
    t[:, L.column_of(1)] = 1
    for label, k in counts.items():
        t[:k, L.column_of(label)] = 1
    return t


def test_class_warnings_name_rare_classes_and_classes_missing_from_validation():
    counts = {label: 30 for label in L.LABEL_IDS if label != 1}
    counts[14] = 6  # rows 0..5: rows 0 and 1 go to validation -> 4 training examples
    counts[19] = 60
    t = _targets(counts)
    t[:, L.column_of(19)] = 0
    t[10:70, L.column_of(19)] = 1  # horse only in rows 10..69, none of them in validation
    val_idx = np.array([0, 1, 80, 81, 82])
    warnings = folds.class_warnings(t, val_idx, min_examples=5)
    rare = [w for w in warnings if "training example" in w]
    absent = [w for w in warnings if "validation" in w]
    assert len(rare) == 1 and rare[0].startswith("label 14 parking meter") and "only 4 training examples" in rare[0]
    # every class but person, bicycle..horse rows 0..29 -> rows 0, 1 in validation; horse (10..69) and none else absent
    assert len(absent) == 1 and absent[0].startswith("label 19 horse") and "5 images" in absent[0]
    assert len(warnings) == 2
    assert folds.class_warnings(t, val_idx, min_examples=4) == absent  # 4 examples are enough for min 4


def test_class_warnings_without_validation_and_for_a_single_class():
    counts = {label: 10 for label in L.LABEL_IDS if label != 1}
    assert folds.class_warnings(_targets(counts), None) == []
    counts[2] = 0
    assert folds.class_warnings(_targets(counts), None) == [
        "label 2 bicycle: no training examples (fewer than 5): its predictions are unreliable"]
    only_person = folds.class_warnings(_targets({}), None, min_examples=1)
    assert only_person[0].startswith("the training data (100 images) holds only one class (label 1 person)")
    assert "meaningless" in only_person[0]
    assert len(only_person) == 1 + 17 and all("no training examples" in w for w in only_person[1:])
    none = folds.class_warnings(np.zeros((3, 18), np.uint8), None, min_examples=0)
    assert len(none) == 1 and "no labels" in none[0]
    with pytest.raises(ValueError, match="18"):
        folds.class_warnings(np.zeros((3, 17), np.uint8), None)
