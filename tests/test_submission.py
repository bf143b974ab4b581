import numpy as np
import pytest

from multilabel_fusion.data import labels as L
from multilabel_fusion.evaluation import submission
from multilabel_fusion.evaluation.submission import SubmissionError

IDS = [f"{i}.jpg" for i in range(30000, 30005)]


def test_round_trip_writes_ascending_space_separated_labels(tmp_path):
    hot = L.encode([[3, 1], [19], [13, 2, 11], [1], [18, 17]])
    out = submission.write(tmp_path / "sub.csv", IDS, hot)
    lines = out.read_text().splitlines()
    assert lines == ["ImageID,Labels", "30000.jpg,1 3", "30001.jpg,19", "30002.jpg,2 11 13",
                     "30003.jpg,1", "30004.jpg,17 18"]
    submission.validate_text(out.read_text(), IDS)


@pytest.mark.parametrize("body, message", [
    ("30000.jpg,[1, 3]", r"line 2 \(30000.jpg\): labels '\[1, 3\]' must be label ids separated by single spaces"),
    ('30000.jpg,"[1, 3]"', r"labels '\[1, 3\]' must be label ids separated by single spaces"),
    ("30000.jpg,1,3", r"labels '1,3' must be"),
    ("30000.jpg", r"line 2: expected 'ImageID,Labels'"),
    ("30000.jpg,12", r"label 12 is not one of the 18 classes"),
    ("30000.jpg,", r"labels '' must be"),
    ("30000.jpg,3 1", r"not ascending"),
    ("39999.jpg,1", r"'39999.jpg' is not a test ImageID"),
])
def test_validator_rejects_what_kaggle_would_score_wrongly(body, message):
    rows = [body] + [f"{i},1" for i in IDS[1:]]
    with pytest.raises(SubmissionError, match=message):
        submission.validate_text("ImageID,Labels\n" + "\n".join(rows) + "\n", IDS)


def test_validator_rejects_missing_duplicate_rows_and_bad_header():
    good = [f"{i},1" for i in IDS]
    with pytest.raises(SubmissionError, match="1 test ImageIDs missing"):
        submission.validate_text("ImageID,Labels\n" + "\n".join(good[:-1]), IDS)
    with pytest.raises(SubmissionError, match="already on line 2"):
        submission.validate_text("ImageID,Labels\n" + "\n".join(good + good[:1]), IDS)
    with pytest.raises(SubmissionError, match="header"):
        submission.validate_text("id,labels\n" + "\n".join(good), IDS)


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "sub.csv"
    submission.write(path, IDS, L.encode([[1]] * 5))
    before = path.read_text()
    empty_row = np.zeros((5, 18), dtype=np.uint8)  # a row with no label would score 0: refused
    with pytest.raises(SubmissionError):
        submission.write(path, IDS, empty_row)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_command_line_validator(demo_data, tmp_path, capsys):
    from multilabel_fusion.data import reader as data

    ids = data.load(demo_data).test["ImageID"].tolist()
    path = submission.write(tmp_path / "sub.csv", ids, L.encode([[1, 3]] * len(ids)))
    assert submission.main([str(path), "--test-csv", str(demo_data / "test.csv")]) == 0
    assert "OK" in capsys.readouterr().out
    path.write_text(path.read_text().replace(",1 3\n", ",[1, 3]\n", 1))
    assert submission.main([str(path), "--test-csv", str(demo_data / "test.csv")]) == 1
    assert "INVALID" in capsys.readouterr().err
