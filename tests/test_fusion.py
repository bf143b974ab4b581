import json
from pathlib import Path

import numpy as np
import pytest

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as data
from multilabel_fusion.io.artifacts import ArtifactStore, MissingArtifact
from multilabel_fusion.io.hashing import digest
from multilabel_fusion.evaluation import submission

SMALL = ["fusion.hidden=64", "fusion.epochs=40", "fusion.patience=40", "fusion.batch_size=64", "fusion.lr=0.01",
         "fusion.plateau_patience=10"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """More records than the shared demo fixture (tiny images): enough to learn 18 classes from features."""
    return demo.generate(tmp_path_factory.mktemp("fusion") / "data", n_train=800, n_test=50, seed=3,
                         image_size=(48, 36))


def _cfg(demo_data, tmp_path, blocks, *extra):
    block_list = "[" + ", ".join(blocks) + "]"
    return config.load(overrides=SMALL + [f"fusion.blocks={block_list}", *extra], data=demo_data,
                       output=tmp_path / "out", models=tmp_path / "models")


def _run_fusion(cfg):
    """The fused network's stage alone (what stages/09_fused_network.py runs once its blocks exist)."""
    ws = pipeline.workspace(cfg)
    return ws.registry.get("fusion").run(ws.context("fusion"))


def _write_blocks(demo_data, tmp_path, seed=0, ids_order=slice(None)):
    """Generated blocks stored under the keys the current settings give: 'image' sees only the first 9 classes,
    'caption' only the last 9 (noisily)."""
    d = data.load(demo_data)
    cfg = _cfg(demo_data, tmp_path, ["image", "caption"])
    store = ArtifactStore(tmp_path / "out")
    rng = np.random.default_rng(seed)
    ids = {"train_ids": d.train["ImageID"].to_numpy(str)[ids_order], "test_ids": d.test["ImageID"].to_numpy(str)}
    y_train = d.train_targets.astype(np.float32)
    y_test = rng.random((len(d.test), 18)) < 0.1  # test labels are unknown; any features do
    for name, cols in (("image", slice(0, 9)), ("caption", slice(9, 18))):
        def feats(y):
            x = np.zeros((len(y), 32), dtype=np.float32)
            x[:, :9] = y[:, cols] * 2.0
            return x + rng.normal(0, 0.3, x.shape).astype(np.float32)

        spec = pipeline.workspace(cfg).spec(name)
        store.save(name, digest(spec), spec,
                   {"train": feats(y_train), "test": feats(y_test.astype(np.float32)), **ids})
    return d


def test_fusion_beats_each_block_alone_and_writes_valid_predictions(demo_data, tmp_path):
    d = _write_blocks(demo_data, tmp_path)
    scores = {}
    for blocks in (["image"], ["caption"], ["image", "caption"]):
        scores["+".join(blocks)] = _run_fusion(_cfg(demo_data, tmp_path, blocks))["val_mean_f1_tuned"]
    assert scores["image+caption"] > max(scores["image"], scores["caption"]) + 0.05
    assert scores["image+caption"] > 0.9
    predictions = tmp_path / "out" / "predictions.csv"
    assert submission.validate_file(predictions, demo_data / "test.csv") == len(d.test)
    saved = json.loads((tmp_path / "out" / "metrics" / "fusion.json").read_text())
    figures = saved["figures"]
    assert set(figures) >= {"training_curves", "per_class_f1", "per_class_f1_all_stages", "error_cooccurrence"}
    assert figures["error_cooccurrence"] == str(tmp_path / "out" / "figures" / "fusion_error_cooccurrence.png")
    assert all(Path(path).stat().st_size > 10_000 for path in figures.values())
    # the resolved configuration is saved beside the outputs and loads back to the same settings
    again = config.load(saved["config"])
    assert again.fusion.blocks == ("image", "caption") and again.fusion.hidden == 64


def test_fusion_reuses_a_finished_run_and_each_block_set_has_its_own_run(demo_data, tmp_path, caplog):
    _write_blocks(demo_data, tmp_path)
    first = _run_fusion(_cfg(demo_data, tmp_path, ["image", "caption"]))
    other = _run_fusion(_cfg(demo_data, tmp_path, ["image"]))
    caplog.clear()
    second = _run_fusion(_cfg(demo_data, tmp_path, ["image", "caption"]))
    assert "reusing" in caplog.text
    assert second["val_mean_f1_tuned"] == first["val_mean_f1_tuned"]
    assert first["run_dir"] == second["run_dir"] != other["run_dir"]  # another block set never overwrote it


def test_missing_or_mismatched_blocks_are_clear_errors(demo_data, tmp_path):
    _write_blocks(demo_data, tmp_path)
    # a block made with other settings is not used: its key differs, and the error names the stage to run
    with pytest.raises(MissingArtifact, match=r"no 'caption' artifact for the current settings.*run "
                                              r"stages/02_caption_network.py"):
        _run_fusion(_cfg(demo_data, tmp_path, ["image", "caption"], "caption.seq_len=6"))
    _write_blocks(demo_data, tmp_path / "reordered", ids_order=slice(None, None, -1))
    cfg = _cfg(demo_data, tmp_path / "reordered", ["image", "caption"])
    with pytest.raises(ValueError, match="its train ImageIDs differ"):
        _run_fusion(cfg)


def test_at_least_one_setting_means_the_same_in_the_report_and_the_written_predictions(demo_data, tmp_path):
    from multilabel_fusion.data import labels as L
    from multilabel_fusion.evaluation.metrics import mean_f1

    d = _write_blocks(demo_data, tmp_path)
    m = _run_fusion(_cfg(demo_data, tmp_path, ["image", "caption"], "thresholds.at_least_one=false"))
    assert m["at_least_one"] is False
    # rebuild the validation predictions from the probabilities and thresholds the stage used
    art = ArtifactStore(tmp_path / "out").load("fusion", m["artifact_key"])
    probs = art["probs"]  # out-of-fold: every training record's row from the fold network that did not see it
    assert not np.isnan(probs).any()
    pred = probs >= np.asarray(m["thresholds"])
    assert m["val_mean_f1_tuned"] == pytest.approx(mean_f1(d.train_targets, pred), abs=1e-4)
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[1:]
    test_pred = art["test_probs"] >= np.asarray(m["thresholds"])  # no label forced on
    assert [r.split(",")[1] for r in rows] == [" ".join(map(str, x)) for x in L.decode(test_pred)]
    assert len(rows) == len(d.test)
