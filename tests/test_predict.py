"""The predictor: a new photo and caption labelled by exactly the trained artifacts of a configuration.

On generated demo data with tiny settings: the main job runs once, then the predictor must give the test records
the rows of predictions.csv (every block, the probabilities and the labels), load an exported bundle in a fresh
process without output/ or models/, and stop with one line naming the stage to run when a piece is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.data import demo
from multilabel_fusion.data import labels as L
from multilabel_fusion.data import reader as D
from multilabel_fusion.pipeline import run_all
from multilabel_fusion.predict import Predictor, fold_mean
from multilabel_fusion.predict.__main__ import main
from multilabel_fusion.stages.outputs import load_metrics

REPO = Path(__file__).resolve().parent.parent
#: the offline default is a two-network ensemble: the predictor must run it as stage 01 did (small sizes here)
SMALL = ["image.offline_fallback=efficientnet_lite0@64+efficientnet_lite2@48", "image.image_size=64", "image.head_epochs=3", "image.head_hidden=32", "caption.epochs=2", "fusion.epochs=3",
         "fusion.hidden=64", "trainer.num_workers=0", "detector.image_size=64", "detector.zoom_size=96", "detector.batch_size=16"]
OTHER_BLOCKS = "fusion.blocks=[image, image_depths, caption, detector_boxes]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Demo data and every stage of the default pipeline run on it (output/ and models/ in a temporary folder)."""
    root = tmp_path_factory.mktemp("predict")
    demo.generate(root / "data", n_train=120, n_test=40, seed=7, image_size=(48, 36))
    run_all(_cfg(root), demo_mode=False)
    return root


def _cfg(root: Path, *extra: str, output: Path | None = None) -> config.Settings:
    return config.load(overrides=SMALL + list(extra), data=root / "data", output=output or root / "output",
                       models=root / "models")


def _args(root: Path, *extra: str, output: Path | None = None) -> list[str]:
    return ["--data", str(root / "data"), "--output", str(output or root / "output"), "--models", str(root / "models"),
            *[a for s in SMALL + list(extra) for a in ("--set", s)]]


def _cli(*args: str, cwd: Path = REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "multilabel_fusion.predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fold_mean_is_the_stages_average_of_test_rows():
    folds = [np.float32([[0.1, 0.7]]), np.float32([[0.3, 0.2]]), np.float32([[0.9, 0.4]])]
    expected = 0 + folds[0] / 3 + folds[1] / 3 + folds[2] / 3  # cross_fit's order of float32 additions
    assert fold_mean(folds).dtype == np.float32 and np.array_equal(fold_mean(folds), expected)


@pytest.mark.parametrize("blocks", [[], [OTHER_BLOCKS], ["thresholds.decision=expected_f1"]],
                         ids=["default blocks", "features and boxes", "expected-F1 decision"])
def test_test_records_get_exactly_their_rows_of_predictions_csv(trained, tmp_path, blocks):
    cfg = _cfg(trained, *blocks)
    run_all(cfg, demo_mode=False, stages=["fusion"])  # reuses every trained run; writes this fusion's predictions
    predictor = Predictor.load(cfg)
    assert predictor.manifest["decision"] == load_metrics(trained / "output", "fusion")["decision"]
    if blocks == ["thresholds.decision=expected_f1"]:
        assert predictor.manifest["decision"] == "expected_f1"
    data = D.load(trained / "data")
    paths, captions = data.image_paths("test"), data.test["Caption"].tolist()

    written = predictor.predict_csv(trained / "data" / "test.csv", trained / "data" / "data", tmp_path / "labels.csv")
    assert written.read_text() == (trained / "output" / "predictions.csv").read_text()
    probs, labels = predictor.predict(paths, captions)
    assert np.array_equal(probs, np.load(trained / "output" / "probabilities" / "fusion.npz")["test"])
    ctx = pipeline.workspace(cfg).context("fusion")  # the fused network's settings (blocks that can be had)
    rows = predictor.blocks(paths, captions)
    assert list(rows) == list(ctx.settings.fusion.blocks)
    for name, computed in rows.items():  # each block as its stage computed the test rows
        assert np.array_equal(computed, ctx.block_arrays(name)[1]), name
    for i in range(3):  # one record at a time: other batch shapes, the same labels
        one = predictor.predict_one(paths[i], captions[i])
        assert one.labels == L.decode(labels[i: i + 1])[0]
        assert np.allclose(one.probabilities, probs[i], atol=1e-5)


def test_one_photo_on_the_command_line_then_a_bundle_in_a_fresh_process_without_output_or_models(trained, tmp_path):
    run_all(_cfg(trained), demo_mode=False, stages=["fusion"])
    photo, caption = trained / "data" / "data" / "30003.jpg", D.load(trained / "data").test["Caption"].iloc[3]
    result = _cli(*_args(trained), "--image", str(photo), "--caption", caption, "--all", "--export",
                  str(tmp_path / "predictor.zip"))
    assert result.returncode == 0, result.stderr
    expected = (trained / "output" / "predictions.csv").read_text().splitlines()[4].split(",")[1].split()
    shown = [line.split() for line in result.stdout.splitlines() if line.endswith("<- predicted")]
    assert sorted(int(row[0]) for row in shown) == sorted(int(x) for x in expected)  # its row of predictions.csv
    fused = load_metrics(trained / "output", "fusion")
    for row in shown:
        assert L.LABEL_NAMES[int(row[0])].startswith(row[1])
        if fused["decision"] == "per_class":  # the threshold used, as fusion recorded it
            assert float(row[-3]) == fused["thresholds"][L.column_of(int(row[0]))]
    assert "bundle" in result.stdout and "within the 100 MB limit" in result.stdout
    parts = {"image_probs": "image heads", "caption_probs": "caption networks", "detector": "detector weights",
             "detector_boxes": "detector weights", "detector_zoom": "detector weights", "text": "n-gram vectorisers",
             "image": "image backbone"}
    for block in load_metrics(trained / "output", "fusion")["blocks"]:
        assert parts[block] in result.stdout, block
    assert "image backbone" in result.stdout and "fused networks" in result.stdout

    moved = tmp_path / "elsewhere"  # another machine: no output/, no models/, only the bundle and the new photos
    moved.mkdir()
    for name in ("output", "models"):
        shutil.move(str(trained / name), str(moved / name))
    try:
        result = _cli("--bundle", str(tmp_path / "predictor.zip"), "--csv", str(trained / "data" / "test.csv"),
                      "--images", str(trained / "data" / "data"), "--out", str(tmp_path / "from_bundle.csv"),
                      cwd=tmp_path)
    finally:
        for name in ("output", "models"):
            shutil.move(str(moved / name), str(trained / name))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from_bundle.csv").read_text() == (trained / "output" / "predictions.csv").read_text()


def _stop(args: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_a_missing_piece_is_one_line_naming_the_stage_to_run(trained, tmp_path):
    run_all(_cfg(trained), demo_mode=False, stages=["fusion"])
    photo = ["--image", str(trained / "data" / "data" / "30000.jpg"), "--caption", "a dog"]
    # settings nothing was trained for: no fused network (and nothing is trained now)
    runs = sorted((trained / "models").glob("*/*"))
    result = _cli(*_args(trained, "fusion.hidden=48"), *photo)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: ") and "no 'fusion' artifact" in lines[-1] and "stages/09_fused_network.py" in lines[-1]
    assert sorted((trained / "models").glob("*/*")) == runs  # no training run started

    copy = tmp_path / "output"
    shutil.copytree(trained / "output", copy)
    # the decision is the fused network's keyed artifact: fusion.json only reports it, and another stage's metrics
    # file in its place changes no label ...
    (copy / "metrics" / "fusion.json").write_text((copy / "metrics" / "text.json").read_text())  # another stage's
    def answer(out: str) -> list[str]:  # the labelled record, without the timings
        return [line for line in out.splitlines() if not line.startswith(("predictor:", "predicted in"))]

    result = _cli(*_args(trained, output=copy), *photo)
    assert result.returncode == 0, result.stderr
    assert answer(result.stdout) == answer(_cli(*_args(trained), *photo).stdout) and answer(result.stdout)
    # ... while without the decision artifact it stops, naming the stage that writes it
    shutil.rmtree(copy / "artifacts" / "decision")
    assert "stages/09_fused_network.py" in _stop(_args(trained, output=copy) + photo)
    shutil.copytree(trained / "output" / "artifacts" / "decision", copy / "artifacts" / "decision")
    for kind, script in (("text_models", "stages/04_text_ngrams.py"), ("caption_vocabulary", "stages/02_caption_network.py"),
                         ("image_head", "stages/01_image_network.py")):
        shutil.rmtree(copy / "artifacts" / kind)
        assert script in _stop(_args(trained, output=copy) + photo), kind
        shutil.copytree(trained / "output" / "artifacts" / kind, copy / "artifacts" / kind)
    assert "image file not found" in _stop(_args(trained) + ["--image", str(tmp_path / "no.jpg"), "--caption", "x"])
    bad_csv = tmp_path / "new.csv"
    bad_csv.write_text('ImageID,Caption\n30000.jpg,"a dog"\n123.jpg,"a cat"\n')
    message = _stop(_args(trained) + ["--csv", str(bad_csv), "--images", str(trained / "data" / "data")])
    assert f"{bad_csv}: line 3 (123.jpg)" in message and "image file not found" in message
    assert "not a predictor bundle" in _stop(["--bundle", str(bad_csv), "--image", str(bad_csv), "--caption", "x"])


def test_a_prediction_by_the_expected_f1_rule_shows_no_thresholds():
    from multilabel_fusion.predict import Prediction

    probs = np.zeros(18, dtype=np.float32)
    probs[[0, 16]] = [0.97, 0.4]
    by_sets = Prediction("a.jpg", "a man and his dog", probs, [1], np.full(18, 0.3), True, 0.01, "expected_f1")
    text = by_sets.describe(every_label=True)
    assert "highest expected F1" in text and "threshold" not in text
    assert by_sets.rows()[0]["threshold"] is None and [r["id"] for r in by_sets.rows()] == [1]
    by_thresholds = Prediction("a.jpg", "a man and his dog", probs, [1, 18], np.full(18, 0.3), True, 0.01)
    assert "thresholds of the fused network" in by_thresholds.describe()
    assert [r["threshold"] for r in by_thresholds.rows()] == [pytest.approx(0.3)] * 2
