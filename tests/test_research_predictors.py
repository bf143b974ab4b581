"""The predictors of stages 05 (label decoder) and 06 (joint embedding): for a test record they compute exactly the
stage's own test rows, through the fused network's predictor give exactly the rows of predictions.csv, and survive a
bundle round trip.

On generated demo data with tiny settings: image features (EfficientNet-Lite0 at 64 px, with multi-depth features),
the caption network, the stage, then the fused network on ``[image_probs, caption_probs, label_decoder]`` or
``[image_probs, joint_embedding]``. Equality is exact: each predictor runs the stage's own float32 computations on
the same inputs, in the same batches, on the same device and with the same CPU threads, and averages the folds as
the stage averaged its test rows (:func:`multilabel_fusion.stages.base.fold_mean`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multilabel_fusion import pipeline
from multilabel_fusion import settings as C
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as D
from multilabel_fusion.predict import Predictor
from multilabel_fusion.stages.base import NewRecords

SMALL = ["split.folds=3", "image.offline_fallback=efficientnet_lite0", "image.image_size=64", "image.feature_batch_size=32",
         "image.head_epochs=2", "image.head_hidden=16", "trainer.num_workers=0", "caption.epochs=2",
         "label_decoder.epochs=2", "label_decoder.hidden=16", "label_decoder.embed=8", "joint_embedding.epochs=2",
         "joint_embedding.hidden=32", "joint_embedding.embed_dim=16", "joint_embedding.rnn_hidden=8",
         "joint_embedding.batch_size=16", "joint_embedding.selection_size=20", "joint_embedding.knn=5",
         "fusion.epochs=2", "fusion.hidden=16"]
DECODERS = {"seq2seq (image depths)": ["label_decoder.variant=seq2seq"],
            "init_hidden+caption (caption_probs)": ["label_decoder.variant=init_hidden+caption"]}
EMBEDDINGS = {"mean vectors": ["joint_embedding.encoder=mean"], "GRU": ["joint_embedding.encoder=gru"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("research_predictors")
    demo.generate(root / "data", n_train=120, n_test=40, seed=3, image_size=(48, 36))
    return root


@pytest.fixture
def bundle_types(monkeypatch):
    """The bundle rebuilds each stage's predictor from ``Stage.predictor_type``; the stages ported before 05 and 06
    leave it unset (a gap of the core, reported), so it is set here for them, to their own predictor classes."""
    from multilabel_fusion.stages import caption, fused, image

    for stage, kind in ((image.ImageNetwork, image.ImagePredictor), (caption.CaptionNetwork, caption.CaptionPredictor),
                        (fused.FusedNetwork, fused.FusionPredictor)):
        if stage.predictor_type is None:
            monkeypatch.setattr(stage, "predictor_type", kind)


def _settings(root: Path, *extra: str) -> C.Settings:
    return C.load(overrides=SMALL + list(extra), data=root / "data", output=root / "output", models=root / "models")


def _fused(root: Path, blocks: str, *extra: str):
    """The fused network on ``blocks`` (every stage it reads run first), its workspace and its predictor."""
    settings = _settings(root, f"fusion.blocks={blocks}", *extra)
    pipeline.run_all(settings, demo_mode=False, stages=["fusion"])
    return pipeline.workspace(settings), Predictor.load(settings)


def _test_records(root: Path) -> tuple[list[Path], list[str]]:
    data = D.load(root / "data")
    return data.image_paths("test"), data.test["Caption"].tolist()


def _same_rows_and_predictions(root: Path, tmp_path: Path, ws, predictor: Predictor, stage_blocks: list[str]) -> None:
    paths, captions = _test_records(root)
    records = NewRecords.of(paths, captions)
    # the image stage's predictor gives the test records their stored features (what the stages read)
    given = predictor.predictors["image"].transform(records, {})
    for block in ("image", "image_depths"):
        if block in given:
            assert np.array_equal(given[block], ws.block_arrays(block)[1]), block
    blocks = predictor.blocks(paths, captions)
    for block in stage_blocks:
        test_rows = ws.block_arrays(block)[1]
        assert blocks[block].dtype == np.float32 and blocks[block].shape == test_rows.shape
        assert np.array_equal(blocks[block], test_rows), block  # exactly the stage's own test rows
    written = predictor.predict_csv(root / "data" / "test.csv", root / "data" / "data", tmp_path / "labels.csv")
    assert written.read_text() == (root / "output" / "predictions.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(DECODERS.values()), ids=list(DECODERS))
def test_label_decoder_predictor_gives_the_stages_test_rows(root, tmp_path, variant):
    ws, predictor = _fused(root, "[image_probs, caption_probs, label_decoder]", *variant)
    decoder = predictor.predictors["label_decoder"]
    needs = {"seq2seq": ("image", "image_depths"), "init_hidden+caption": ("image", "caption_probs")}
    assert decoder.needs == needs[variant[0].split("=")[1]]
    _same_rows_and_predictions(root, tmp_path, ws, predictor, ["label_decoder"])


@pytest.mark.slow
@pytest.mark.parametrize("encoder", list(EMBEDDINGS.values()), ids=list(EMBEDDINGS))
def test_joint_embedding_predictor_gives_the_stages_test_rows(root, tmp_path, encoder):
    ws, predictor = _fused(root, "[image_probs, joint_embedding]", *encoder)
    assert predictor.predictors["joint_embedding"].needs == ("image",)
    _same_rows_and_predictions(root, tmp_path, ws, predictor, ["joint_embedding"])
    # the probabilities block (the stage's submission) too, though this fused network does not read it
    paths, captions = _test_records(root)
    probs = ws.registry.get("joint_embedding").predictor(ws, ["joint_embedding_probs"])
    rows = probs.transform(NewRecords.of(paths, captions), {"image": ws.block_arrays("image")[1]})
    assert list(rows) == ["joint_embedding_probs"]
    assert np.array_equal(rows["joint_embedding_probs"], ws.block_arrays("joint_embedding_probs")[1])


@pytest.mark.slow
@pytest.mark.parametrize("blocks, extra", [
    ("[image_probs, caption_probs, label_decoder]", DECODERS["seq2seq (image depths)"]),
    ("[image_probs, joint_embedding]", EMBEDDINGS["mean vectors"])], ids=["label decoder", "joint embedding"])
def test_bundle_round_trip_gives_the_same_predictions(root, tmp_path, bundle_types, blocks, extra):
    ws, predictor = _fused(root, blocks, *extra)
    size = predictor.export(tmp_path / "predictor.zip")
    stage = "label_decoder" if "label_decoder" in blocks else "joint_embedding"
    assert any(part.startswith({"label_decoder": "label decoders", "joint_embedding": "joint embedding"}[stage])
               for part in size["parts_mb"])
    loaded = Predictor.load(bundle=tmp_path / "predictor.zip")
    paths, captions = _test_records(root)
    assert np.array_equal(loaded.blocks(paths, captions)[stage], ws.block_arrays(stage)[1])
    probs, labels = predictor.predict(paths, captions)
    again_probs, again_labels = loaded.predict(paths, captions)
    assert np.array_equal(probs, again_probs) and np.array_equal(labels, again_labels)
