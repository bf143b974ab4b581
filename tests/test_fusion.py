import json
from pathlib import Path

import numpy as np
import pytest

from multilabel_fusion import cache, config, data, demo, fusion, submission

SMALL = ["fusion.hidden=64", "fusion.epochs=40", "fusion.patience=40", "fusion.batch_size=64", "fusion.lr=0.01",
         "fusion.plateau_patience=10"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """More records than the shared demo fixture (tiny images): enough to learn 18 classes from features."""
    return demo.generate(tmp_path_factory.mktemp("fusion") / "data", n_train=800, n_test=50, seed=3,
                         image_size=(48, 36))


def _write_blocks(demo_data, output, seed=0):
    """Generated blocks: 'image' sees only the first 9 classes, 'caption' only the last 9 (noisily)."""
    d = data.load(demo_data)
    fp = d.fingerprint()
    rng = np.random.default_rng(seed)
    ids = {"train_ids": d.train["ImageID"].to_numpy(str), "test_ids": d.test["ImageID"].to_numpy(str)}
    y_train = d.train_targets.astype(np.float32)
    y_test = rng.random((len(d.test), 18)) < 0.1  # test labels are unknown; any features do
    for name, cols in (("image", slice(0, 9)), ("caption", slice(9, 18))):
        def feats(y):
            x = np.zeros((len(y), 32), dtype=np.float32)
            x[:, :9] = y[:, cols] * 2.0
            return x + rng.normal(0, 0.3, x.shape).astype(np.float32)

        cache.FeatureCache(output, name, {"generated": name}, fp).save(
            {"train": feats(y_train), "test": feats(y_test.astype(np.float32)), **ids})
    return d


def _cfg(demo_data, tmp_path, blocks):
    block_list = "[" + ", ".join(blocks) + "]"
    return config.load(overrides=SMALL + [f"fusion.blocks={block_list}"], data=demo_data,
                       output=tmp_path / "out", models=tmp_path / "models" / "_".join(blocks))


def test_fusion_beats_each_block_alone_and_writes_valid_predictions(demo_data, tmp_path):
    d = _write_blocks(demo_data, tmp_path / "out")
    scores = {}
    for blocks in (["image"], ["caption"], ["image", "caption"]):
        scores["+".join(blocks)] = fusion.run_stage(_cfg(demo_data, tmp_path, blocks))["val_mean_f1_tuned"]
    assert scores["image+caption"] > max(scores["image"], scores["caption"]) + 0.05
    assert scores["image+caption"] > 0.9
    predictions = tmp_path / "out" / "predictions.csv"
    assert submission.validate_file(predictions, demo_data / "test.csv") == len(d.test)
    figures = json.loads((tmp_path / "out" / "metrics" / "fusion.json").read_text())["figures"]
    assert set(figures) >= {"training_curves", "per_class_f1", "per_class_f1_all_stages", "error_cooccurrence"}
    assert figures["error_cooccurrence"] == str(tmp_path / "out" / "figures" / "fusion_error_cooccurrence.png")
    assert all(Path(path).stat().st_size > 10_000 for path in figures.values())


def test_fusion_reuses_a_finished_run(demo_data, tmp_path, capsys):
    _write_blocks(demo_data, tmp_path / "out")
    first = fusion.run_stage(_cfg(demo_data, tmp_path, ["image", "caption"]))
    capsys.readouterr()
    second = fusion.run_stage(_cfg(demo_data, tmp_path, ["image", "caption"]))
    assert "reusing the finished run" in capsys.readouterr().out
    assert second["val_mean_f1_tuned"] == first["val_mean_f1_tuned"]


def test_missing_or_mismatched_blocks_are_clear_errors(demo_data, tmp_path):
    d = _write_blocks(demo_data, tmp_path / "out")
    with pytest.raises(cache.MissingBlockError, match=r"no cached 'detector' features; run stages/04_detector.py"):
        fusion.run_stage(_cfg(demo_data, tmp_path, ["image", "detector"]))
    ids = {"train_ids": d.train["ImageID"].to_numpy(str)[::-1], "test_ids": d.test["ImageID"].to_numpy(str)}
    cache.FeatureCache(tmp_path / "out", "caption", {"reordered": True}, d.fingerprint()).save(
        {"train": np.zeros((len(d.train), 4)), "test": np.zeros((len(d.test), 4)), **ids})
    with pytest.raises(ValueError, match="cached 'caption' block: its train ImageIDs differ"):
        fusion.run_stage(_cfg(demo_data, tmp_path, ["image", "caption"]))
