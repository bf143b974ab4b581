"""The held-out check: records set aside with hidden labels, the main job on the rest, its submissions scored."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from multilabel_fusion.data import demo
from multilabel_fusion.data import labels as L
from multilabel_fusion.data import reader as D
from multilabel_fusion.reports import holdout_check as H

SMALL = ["image.offline_fallback=efficientnet_lite0", "caption.epochs=2", "fusion.epochs=3", "fusion.hidden=32",
         "trainer.num_workers=0", "pipeline.stages=[caption, text, fusion]", "fusion.blocks=[caption_probs, text]",
         "split.folds=3"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("holdout") / "data", n_train=150, n_test=10, seed=3,
                         image_size=(48, 36))


def test_held_out_records_keep_their_captions_and_lose_their_labels(labelled, tmp_path):
    info = H.make_holdout(labelled, tmp_path / "data", 0.2, seed=4)
    original = D.load(labelled)
    derived = D.load(tmp_path / "data")  # the derived folder is a competition folder (images found via the link)
    assert abs(info["held_out"] - 30) <= 2 and info["kept"] + info["held_out"] == 150  # stratified: about 20 %
    assert (len(derived.train), len(derived.test)) == (info["kept"], info["held_out"])
    train_ids, test_ids = set(derived.train["ImageID"]), set(derived.test["ImageID"])
    assert not train_ids & test_ids and train_ids | test_ids == set(original.train["ImageID"])
    assert "Labels" not in derived.test.columns
    by_id = original.train.set_index("ImageID")
    for part in (derived.train, derived.test):  # captions with inner quotes, commas and newlines survive exactly
        assert (part["Caption"].to_numpy() == by_id.loc[part["ImageID"], "Caption"].to_numpy()).all()
    assert any('"' in c or "\n" in c for c in original.train["Caption"])
    ids, truth = H.read_answers(tmp_path / "data" / "answers.csv")
    assert ids == derived.test["ImageID"].tolist()
    assert (truth == L.encode(by_id.loc[ids, "Labels"].tolist())).all()
    again = H.make_holdout(labelled, tmp_path / "again", 0.2, seed=4)
    assert again == {**info} and (tmp_path / "again" / "test.csv").read_text() == (tmp_path / "data" / "test.csv").read_text()
    with pytest.raises(ValueError, match="--share 1.5"):
        H.make_holdout(labelled, tmp_path / "bad", 1.5, seed=4)


def test_a_submission_is_scored_like_sklearn_and_a_missing_row_is_refused(tmp_path):
    ids = ["1.jpg", "2.jpg", "3.jpg"]
    truth = L.encode([[1], [1, 3], [18]])
    (tmp_path / "sub.csv").write_text("ImageID,Labels\n1.jpg,1\n2.jpg,1 19\n3.jpg,17\n")
    scored = H.score_submission(tmp_path / "sub.csv", ids, truth)
    predicted = L.encode([[1], [1, 19], [17]])
    assert scored["mean_f1"] == pytest.approx(f1_score(truth, predicted, average="samples", zero_division=0))
    assert scored["mean_f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    (tmp_path / "short.csv").write_text("ImageID,Labels\n1.jpg,1\n2.jpg,1 3\n")
    with pytest.raises(ValueError, match=r"short.csv: 1 test ImageIDs missing \(first: 3.jpg\)"):
        H.score_submission(tmp_path / "short.csv", ids, truth)
    (tmp_path / "other.csv").write_text("ImageID,Labels\n1.jpg,1\n9.jpg,1\n3.jpg,18\n")
    with pytest.raises(ValueError, match=r"other.csv: line 3: '9.jpg'"):
        H.score_submission(tmp_path / "other.csv", ids, truth)


def test_the_check_runs_the_main_job_and_scores_each_stage_on_the_hidden_labels(labelled, tmp_path, one_thread):
    work = tmp_path / "work"
    assert H.main(["--data", str(labelled), "--workdir", str(work), "--share", "0.2", "--seed", "4",
                   *[a for s in SMALL for a in ("--set", s)]]) == 0
    result = json.loads((work / "holdout.json").read_text())
    rows = {r["stage"]: r for r in result["stages"]}
    assert set(rows) == {"caption", "text", "fusion"}
    ids, truth = H.read_answers(work / "data" / "answers.csv")
    lines = (work / "output" / "predictions.csv").read_text().splitlines()[1:]
    predicted = dict(line.split(",", 1) for line in lines)
    multi_hot = L.encode([[int(x) for x in predicted[i].split()] for i in ids])
    assert rows["fusion"]["held_out"] == pytest.approx(f1_score(truth, multi_hot, average="samples"), abs=1e-4)
    fused_metrics = json.loads((work / "output" / "metrics" / "fusion.json").read_text())
    assert rows["fusion"]["estimate"] == fused_metrics["mean_f1_threshold_cv"]
    assert fused_metrics["n_eval"] == result["holdout"]["kept"] < 150  # the stages saw the kept records only
    assert (work / "holdout.png").stat().st_size > 0 and "| fusion |" in (work / "holdout.md").read_text()
    assert np.isfinite([r["held_out"] for r in rows.values()]).all()


def test_a_draw_reuses_the_main_jobs_frozen_features_instead_of_extracting_again(labelled, tmp_path, one_thread):
    """With the main job's image features of the source data at hand (same settings), the draw's features are
    those rows, picked by photo: equal to what extracting them again gives, and no photo is extracted again."""
    from multilabel_fusion import settings as C
    from multilabel_fusion.io.artifacts import ArtifactStore
    from multilabel_fusion.pipeline import run_all

    small = ["image.offline_fallback=efficientnet_lite0", "image.image_size=64", "image.cpu_precision=fp32",
             "image.head_epochs=2", "image.head_hidden=16", "trainer.num_workers=0", "pipeline.stages=[image]",
             "split.folds=2"]
    source = tmp_path / "main_output"
    run_all(C.load(overrides=small, data=labelled, output=source, models=tmp_path / "main_models"), stages=["image"])
    args = ["--data", str(labelled), "--share", "0.2", "--seed", "4", *[a for s in small for a in ("--set", s)]]
    assert H.main([*args, "--workdir", str(tmp_path / "reused"), "--reuse-from", str(source)]) == 0
    assert H.main([*args, "--workdir", str(tmp_path / "again"), "--reuse-from", "none"]) == 0
    reused = json.loads((tmp_path / "reused" / "holdout.json").read_text())["holdout"]
    assert list(reused["reused"]) == ["image"] and reused["reused"]["image"].startswith(str(source))
    assert "reused" not in json.loads((tmp_path / "again" / "holdout.json").read_text())["holdout"]
    metrics = [json.loads((tmp_path / w / "output" / "metrics" / "image.json").read_text()) for w in ("reused", "again")]
    assert [m["features"] for m in metrics] == ["reused", "computed"]  # the first draw extracted nothing
    assert metrics[0]["artifact_key"] == metrics[1]["artifact_key"]  # the same artifact, under the draw's own key
    a, b = (ArtifactStore(tmp_path / w / "output").require("image", metrics[0]["artifact_key"], "01")
            for w in ("reused", "again"))
    for name in ("train", "test", "train_depths", "test_depths"):
        # float16 on disk: a last-bit difference of the engines is one float16 step (0.004 at 4..8), hence rtol
        np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32), rtol=2e-3, atol=2e-3)
    assert (a["test_ids"] == b["test_ids"]).all() and (a["train_ids"] == b["train_ids"]).all()


def test_several_draws_each_in_its_folder_and_their_mean_difference(labelled, tmp_path, one_thread):
    work = tmp_path / "work"
    args = ["--data", str(labelled), "--workdir", str(work), "--share", "0.2", "--reuse-from", "none",
            *[a for s in SMALL for a in ("--set", s)]]
    with pytest.raises(SystemExit):  # argparse: one line, exit status 2
        H.main([*args, "--seed", "4", "4"])
    assert H.main([*args, "--seed", "4", "5"]) == 0
    draws = [json.loads((work / f"seed_{s}" / "holdout.json").read_text()) for s in (4, 5)]
    assert [d["holdout"]["seed"] for d in draws] == [4, 5]
    ids = [set(H.read_answers(work / f"seed_{s}" / "data" / "answers.csv")[0]) for s in (4, 5)]
    assert ids[0] != ids[1]  # two different draws
    summary = {r["stage"]: r for r in json.loads((work / "draws.json").read_text())["summary"]}
    assert set(summary) == {"caption", "text", "fusion"}
    fused = [next(r["difference"] for r in d["stages"] if r["stage"] == "fusion") for d in draws]
    assert summary["fusion"]["mean_difference"] == pytest.approx(np.mean(fused), abs=1e-4)
    assert summary["fusion"]["standard_error"] == pytest.approx(np.std(fused, ddof=1) / np.sqrt(2), abs=1e-4)
    assert "| fusion | " + " | ".join(f"{x:+.4f}" for x in fused) in (work / "draws.md").read_text()
