"""BCE's ``pos_weight`` (every section that trains with BCE) and stage 07, the ResNet + LSTM report's one network:
the weights themselves, the loss using them, the default keys left as they were, one training step of the network,
its cross-fitting (no held-out row's probability from a network that saw it) and the stage on demo data, read by
the fused network and its predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from multilabel_fusion import pipeline
from multilabel_fusion import settings as S
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as D
from multilabel_fusion.io.assets import Asset, Assets
from multilabel_fusion.io.hashing import digest
from multilabel_fusion.networks.concat import ConcatLSTM, make_optimizer
from multilabel_fusion.predict import Predictor
from multilabel_fusion.stages import concat as concat_stage
from multilabel_fusion.stages.base import NewRecords, fold_mean
from multilabel_fusion.stages.context import Workspace
from multilabel_fusion.stages.registry import default as default_registry
from multilabel_fusion.training import trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- pos_weight


def test_pos_weight_is_negatives_over_positives_and_one_where_undefined():
    y = np.array([[1, 1, 0, 1],
                  [0, 1, 0, 1],
                  [0, 0, 0, 1],
                  [0, 0, 0, 1]])
    weights = trainer.pos_weight(y)
    assert weights.dtype == torch.float32
    # 1 positive in 4 rows: 3 negatives per positive; 2 in 4: 1; no positive, or no negative: 1 (documented)
    assert weights.tolist() == [3.0, 1.0, 1.0, 1.0]


def test_the_loss_uses_pos_weight_and_off_is_the_published_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 4), torch.tensor([[1.0, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]])
    weights = trainer.pos_weight(targets.numpy())
    loss = trainer.weighted_bce(0.5, 4, pos_weight=weights)(logits, targets)
    p = torch.sigmoid(logits)
    class_weight = torch.tensor([0.5, 1, 1, 1])
    by_hand = -(class_weight * (weights * targets * p.log() + (1 - targets) * (1 - p).log())).mean()
    assert torch.allclose(loss, by_hand)
    assert torch.allclose(trainer.bce_for("auto", 0.5, targets.numpy())(logits, targets), by_hand)
    off = trainer.bce_for("off", 0.5, targets.numpy())
    assert off.pos_weight is None and torch.allclose(off(logits, targets),
                                                     trainer.weighted_bce(0.5, 4)(logits, targets))
    assert not torch.allclose(off(logits, targets), by_hand)


def test_every_bce_section_has_pos_weight_off_by_default_and_yaml_off_reads_as_off():
    cfg = S.load()
    assert (cfg.image.pos_weight, cfg.caption.pos_weight, cfg.fusion.pos_weight) == ("off", "off", "off")
    assert cfg.concat.pos_weight == "auto"  # the report's
    assert S.load(overrides=["fusion.pos_weight=off"]).fusion.pos_weight == "off"  # YAML 1.1 reads off as false
    with pytest.raises(S.ConfigError, match="caption.pos_weight"):
        S.load(overrides=["caption.pos_weight=always"])


# ---------------------------------------------------------------- the default keys


class FixedAssets(Assets):
    """Assets of fixed identity, so that keys depend on the settings and the data alone (any machine)."""

    def backbone_weights(self, image):
        return Asset("backbone weights", "resnet50", "asked for", "sha256:resnet",
                     extra={"torchvision_weights": "IMAGENET1K_V1"})

    def word_vectors(self, caption, cache_dir):
        return Asset("word vectors", "glove-twitter-100", "asked for", "sha256:glove")

    def detector_weights(self, settings):
        return Asset("detector weights", "yolov5su.pt", "asked for", "sha256:yolo")


#: Keys of the default configuration on the demo data below, computed by the code before pos_weight and stage 07
#: existed (commit 54dfa5f): the cached features, blocks and training runs made on the real data must stay valid.
KEYS_BEFORE = {
    "default": {"image": "7c600d20cb40", "caption": "44c8c872597e", "text": "c721d9990aa3", "detector": "c075059ee9eb",
                "label_decoder": "a0b62ccf29aa", "joint_embedding": "b2d8ded97b2a", "fusion": "f3dd6c2adf36", "block:image_probs": "0b1ef1c5f67a", "run:caption": "d7c0718cff3b",
                "run:fusion": "2519ae66fa59", "run:image_head": "4a9ccd454556", "run:image_finetune": "d2c4f788d254"},
    "image.fine_tune=true": {"image": "07cbd5a41e28", "fusion": "d356ea6382ab", "block:image_probs": "fe733c949782"},
}


#: The default of those days: no second detector pass (``detector.zoom_size`` and its block came later).
BEFORE_ZOOM = ("detector.zoom_size=null", "fusion.blocks=[image_probs, caption_probs, detector, detector_boxes, text]")


def _keys(data: Path, tmp_path: Path, *overrides: str, before_zoom: bool = True) -> dict[str, str]:
    chosen = [*BEFORE_ZOOM, *overrides] if before_zoom else list(overrides)
    cfg = S.load(overrides=chosen, data=data, output=tmp_path / "out", models=tmp_path / "models")
    ws = Workspace(cfg, default_registry(), assets=FixedAssets())
    keys = {name: ws.key(name) for name in ("image", "caption", "text", "detector", "label_decoder", "joint_embedding",
                                            "fusion")}
    keys["block:image_probs"] = ws.block_key("image_probs")
    keys["run:caption"] = digest(cfg.caption.shaping(weights_only=True))  # what keys each training run's folder
    keys["run:fusion"] = digest(cfg.fusion.shaping(weights_only=True))
    keys["run:image_head"] = digest(cfg.image.shaping("head", weights_only=True))
    keys["run:image_finetune"] = digest(cfg.image.shaping("fine_tune", weights_only=True))
    return keys


def test_default_keys_are_those_made_before_pos_weight_and_auto_keys_what_it_trains(tmp_path, monkeypatch):
    data = demo.generate(tmp_path / "data", n_train=60, n_test=20, seed=3, image_size=(48, 36))
    monkeypatch.setattr(Workspace, "images_fingerprint", property(lambda self: "images"))  # any JPEG encoder
    for overrides, expected in KEYS_BEFORE.items():
        keys = _keys(data, tmp_path, *([] if overrides == "default" else [overrides]))
        assert {k: keys[k] for k in expected} == expected, overrides
    before = KEYS_BEFORE["default"]
    for section, changed in (("caption", {"caption", "label_decoder", "fusion", "run:caption"}),  # 05 reads 02's
                             ("fusion", {"fusion", "run:fusion"}),
                             ("image", {"fusion", "block:image_probs", "run:image_head", "run:image_finetune"})):
        keys = _keys(data, tmp_path, f"{section}.pos_weight=auto")
        assert {k for k in before if keys[k] != before[k]} == changed, section
    # fine-tuned, the image features themselves come from networks trained with it
    tuned = _keys(data, tmp_path, "image.fine_tune=true", "image.pos_weight=auto")
    assert tuned["image"] != KEYS_BEFORE["image.fine_tune=true"]["image"]
    # the second detector pass (today's default) is other detections and another fused network, nothing else
    zoomed = _keys(data, tmp_path, before_zoom=False)
    assert {k for k in before if zoomed[k] != before[k]} == {"detector", "fusion", "run:fusion"}


# ---------------------------------------------------------------- the network


def test_one_training_step_of_the_concatenation_network():
    torch.manual_seed(0)
    vectors = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    model = ConcatLSTM(12, vectors, hidden=6, fc_hidden=16, dropout=0.1)
    image = torch.rand(16, 12) * 5
    ids = torch.randint(2, 30, (16, 5))
    lengths = torch.tensor([5, 1, 3, 4] * 4)
    targets = (torch.rand(16, 18) < 0.3).float()
    model.fit_standardisation(image.numpy())
    assert model.feature_dim == 12 and model(image, ids, lengths).shape == (16, 18)
    frozen, lstm_before, fc_before = (model.embedding.weight.clone(), model.lstm.weight_ih_l0.clone(),
                                      model.head[0].weight.clone())
    optimizer = make_optimizer(model, "adadelta", 1.0, 0.0)
    assert isinstance(optimizer, torch.optim.Adadelta)
    loss_fn = trainer.bce_for("auto", 1.0, targets.numpy())
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(model(image, ids, lengths), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.lstm.weight_ih_l0, lstm_before) and not torch.equal(model.head[0].weight, fc_before)
    assert torch.equal(model.embedding.weight, frozen)  # the word vectors stay as they were
    # depth and direction: the last layer's final state(s)
    deep = ConcatLSTM(12, vectors, hidden=6, layers=3, bidirectional=False, fc_hidden=16)
    assert deep.lstm.num_layers == 3 and deep.feature_dim == 6 and deep.eval()(image, ids, lengths).shape == (16, 18)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(model, "sgd", 0.1, 0.0)


# ---------------------------------------------------------------- the stage

SMALL = ["split.folds=3", "image.offline_fallback=efficientnet_lite0", "image.image_size=64",
         "image.feature_batch_size=32", "image.head_epochs=2", "image.head_hidden=16", "trainer.num_workers=0",
         "caption.epochs=2", "concat.epochs=3", "concat.hidden=8", "concat.fc_hidden=16", "concat.batch_size=16",
         "fusion.epochs=2", "fusion.hidden=16"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, recorded_selections):
    """The stage on demo data (--demo's folders, the demo data made small beforehand), recording what each fold's
    network trained on and what its pos_weight counted."""
    root = tmp_path_factory.mktemp("concat")
    demo.generate(root / "out" / "demo" / "input", n_train=120, n_test=40, seed=3, image_size=(48, 36))
    cfg = S.load(overrides=SMALL, output=root / "out", models=root / "models")
    seen: dict[str, list] = {"pos_weight": []}
    bce_for = trainer.bce_for

    def recorded_bce(setting, label1_weight, targets):
        if setting == "auto":  # the concatenation network's (the image head's is off)
            seen["pos_weight"].append(len(targets))
        return bce_for(setting, label1_weight, targets)

    with recorded_selections("concat") as seen["selection"], pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "bce_for", recorded_bce)
        metrics = pipeline.run_stage("concat", cfg, demo_mode=True)
    return cfg, metrics, seen


def test_the_stage_writes_its_block_submission_and_metrics(ran):
    cfg, metrics, _ = ran
    ws = pipeline.workspace(cfg, demo_mode=True)
    art = ws.require("concat")
    assert art["probs"].shape == (120, 18) and art["test_probs"].shape == (40, 18)
    assert np.isfinite(art["probs"]).all() and np.isfinite(art["test_probs"]).all()
    out = ws.output_dir
    assert out == cfg.path("output") / "demo"
    sub = pd.read_csv(out / "submission_concat.csv")
    assert list(sub.columns) == ["ImageID", "Labels"] and len(sub) == 40
    assert (out / "metrics" / "concat.json").is_file() and metrics["artifact_key"] == art.key
    assert len(metrics["fold_runs"]) == 3 and 0 <= metrics["val_mean_f1_tuned"] <= 1
    train, test, _ = ws.block_arrays("concat_probs")
    assert np.array_equal(train, art["probs"]) and np.array_equal(test, art["test_probs"])
    # the same settings again: found by its key, nothing trained
    assert pipeline.run_stage("concat", cfg, demo_mode=True)["probabilities"] == "reused"


def test_no_held_out_row_comes_from_a_network_that_saw_it(ran):
    cfg, _, seen = ran
    ws = pipeline.workspace(cfg, demo_mode=True)
    art = ws.require("concat")
    assert [k for k, *_ in seen["selection"]] == [0, 1, 2]
    covered = np.concatenate([held for *_, held in seen["selection"]])
    assert sorted(covered.tolist()) == list(range(120))  # every training record held out once
    # pos_weight counted on each fold's training rows alone (the held-out and selection rows excluded)
    assert seen["pos_weight"] == [len(train) for _, train, _, _ in seen["selection"]]
    predictor = ws.registry.get("concat").predictor(ws, ["concat_probs"])
    image_train, image_test = ws.block_arrays("image")[:2]
    captions = NewRecords.of(ws.data.image_paths("train"), ws.data.train["Caption"].tolist())
    ids, lengths = predictor.encode(captions)
    test_rows = []
    for (k, train_idx, select_idx, held_idx), network in zip(seen["selection"], predictor.networks):
        assert not set(train_idx) & set(held_idx) and not set(select_idx) & set(held_idx)
        batches = concat_stage.PairBatches(image_train[held_idx], ids[held_idx], lengths[held_idx], None,
                                           cfg.concat.batch_size)
        # each held-out row is exactly what the network of its fold (trained without it) gives it
        assert np.array_equal(trainer.predict(network, batches, torch.device("cpu")), art["probs"][held_idx]), k
        test_ids, test_lengths = predictor.encode(NewRecords.of(ws.data.image_paths("test"),
                                                                ws.data.test["Caption"].tolist()))
        test_rows.append(trainer.predict(network, concat_stage.PairBatches(image_test, test_ids, test_lengths, None,
                                                                           cfg.concat.batch_size), torch.device("cpu")))
    assert np.array_equal(fold_mean(test_rows), art["test_probs"])  # test rows: the mean over the fold networks


def test_the_fused_network_reads_concat_probs_and_the_predictor_gives_its_rows(ran, tmp_path):
    cfg, _, _ = ran
    fused = cfg.override("fusion.blocks=[image_probs, caption_probs, concat_probs]")
    metrics = pipeline.run_stage("fusion", fused, demo_mode=True)
    assert list(metrics["blocks"]) == ["image_probs", "caption_probs", "concat_probs"]
    assert metrics["blocks"]["concat_probs"]["dim"] == 18
    ws = pipeline.workspace(fused, demo_mode=True)
    data = D.load(ws.settings.path("data"))
    paths, captions = data.image_paths("test"), data.test["Caption"].tolist()
    predictor = Predictor.load(fused, demo_mode=True, warm_up=False)
    assert predictor.predictors["concat"].needs == ("image",)
    rows = predictor.blocks(paths, captions)["concat_probs"]
    assert rows.dtype == np.float32 and np.array_equal(rows, ws.block_arrays("concat_probs")[1])
    predictor.export(tmp_path / "predictor.zip")
    loaded = Predictor.load(bundle=tmp_path / "predictor.zip", warm_up=False)
    assert np.array_equal(loaded.blocks(paths, captions)["concat_probs"], rows)


def test_the_stage_is_opt_in_and_runs_before_the_fused_network():
    cfg, registry = S.load(), default_registry()
    assert "concat" not in cfg.pipeline.stages and "concat_probs" not in cfg.fusion.blocks
    assert registry.names.index("concat") < registry.names.index("fusion")
    assert registry.get("concat").script == "stages/07_concat_network.py"
    assert registry.get("fusion").script == "stages/09_fused_network.py"
    assert (Path(__file__).resolve().parent.parent / registry.get("concat").script).is_file()


def test_a_head_counts_pos_weight_on_its_fit_rows_and_off_describes_runs_as_before(tmp_path, monkeypatch):
    from multilabel_fusion.networks.precision import training_precision
    from multilabel_fusion.training.heads import HeadSettings, train_head

    hs = HeadSettings(8, 0.1, 0.01, 16, 2, 2, 0.5)
    assert "pos_weight" not in hs.described() and HeadSettings(**{**vars(hs), "pos_weight": "auto"}).described()[
        "pos_weight"] == "auto"
    counted = []
    bce_for = trainer.bce_for
    monkeypatch.setattr(trainer, "bce_for", lambda s, w, y: counted.append((s, len(y))) or bce_for(s, w, y))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), (rng.random((40, 18)) < 0.3).astype(np.float32)
    fit, select, held = np.arange(0, 24), np.arange(24, 32), np.arange(32, 40)
    train_head(x, x[:5], y, HeadSettings(**{**vars(hs), "pos_weight": "auto"}), fit_idx=fit, select_idx=select,
               held_idx=held, run_dir=tmp_path / "run", name="head", settings={}, device=torch.device("cpu"),
               precision=training_precision(torch.device("cpu"), False), seed=0)
    assert counted == [("auto", 24)]
