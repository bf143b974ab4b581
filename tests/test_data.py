import shutil

import numpy as np
import pandas as pd
import pytest

from multilabel_fusion import data, labels as L
from multilabel_fusion.data import DataError

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
    tr, va = data.split_indices(targets, 0.2, seed=7)
    tr2, va2 = data.split_indices(targets, 0.2, seed=7)
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
