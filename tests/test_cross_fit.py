"""Cross-fitting: out-of-fold rows come from models that never saw them, test rows are fold averages, and the
thresholds are tuned on the out-of-fold probabilities of every training record."""

import numpy as np
import pytest

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.data import demo
from multilabel_fusion.data import folds as F
from multilabel_fusion.data import labels as L
from multilabel_fusion.data.folds import fold_indices
from multilabel_fusion.evaluation.metrics import mean_f1
from multilabel_fusion.evaluation.scoring import evaluate
from multilabel_fusion.evaluation.thresholds import decide, tune_per_class
from multilabel_fusion.stages import text
from multilabel_fusion.training.crossfit import cross_fit


def test_folds_are_stratified_disjoint_and_cover_every_record():
    rng = np.random.default_rng(0)
    y = (rng.random((500, 18)) < 0.1).astype(np.uint8)
    y[:, 0] = 1
    folds = fold_indices(y, 5, 0.2, seed=1)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(500))  # each record held out exactly once
    for fit, h in folds:
        assert not set(fit) & set(h) and len(fit) + len(h) == 500
    assert [h.tolist() for _, h in fold_indices(y, 5, 0.2, seed=1)] == [h.tolist() for _, h in folds]  # seeded
    assert [h.tolist() for _, h in fold_indices(y, 5, 0.2, seed=2)] != [h.tolist() for _, h in folds]
    one = fold_indices(y, 1, 0.2, seed=1)
    assert len(one) == 1 and len(one[0][1]) == 100


def _evaluate(folds, y, probs, at_least_one=True):
    """A stage's figures from the held-out probabilities ``probs`` (one row per record) as its run computes them."""
    eval_idx, groups = F.held_out_rows(folds)
    thresholds = config.load(overrides=[f"thresholds.at_least_one={str(at_least_one).lower()}"]).thresholds
    return evaluate(probs[eval_idx], y[eval_idx], groups, thresholds, estimate="test", epoch_selection="test"), \
        thresholds


def test_cross_fit_puts_each_row_from_the_model_that_did_not_see_it_and_averages_the_test():
    n = 200
    y = np.zeros((n, 18), np.uint8)
    y[:, 0] = 1
    folds = fold_indices(np.random.default_rng(0).integers(0, 2, (n, 18)), 4, 0.2, seed=0)
    seen_by = {}

    def fold(k, fit_idx, held_idx):
        seen_by[k] = set(fit_idx.tolist())
        return ({"who": np.full((len(held_idx), 1), k, np.float32)},
                {"test": np.full((3, 2), float(k), np.float32)}, {"k": k})

    cf = cross_fit(folds, n, fold, "test")
    who = cf.held["who"][:, 0].astype(int)
    assert all(i not in seen_by[who[i]] for i in range(n))  # never from a model trained on the record
    assert not np.isnan(cf.held["who"]).any()
    assert np.allclose(cf.test["test"], np.mean(range(4)))  # the test rows: the mean of the 4 fold models
    assert [f["k"] for f in cf.folds] == [0, 1, 2, 3]


def test_a_memorising_model_scores_at_chance_out_of_fold(tmp_path):
    """Captions that are unique nonsense words and random labels: a model that saw a record can recall its
    labels, one that did not cannot. The text stage's out-of-fold F1 must stay near what always predicting the
    commonest labels gives; an in-sample figure (the leak the issue describes) is far higher."""
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    demo.generate(root, n_train=240, n_test=20, seed=3, image_size=(32, 24))
    from multilabel_fusion.data.reader import read_records

    out = ["ImageID,Labels,Caption"]
    labels = []
    for record in read_records(root / "train.csv", with_labels=True):
        image_id = record.image_id
        lab = sorted(set(rng.choice(L.LABEL_IDS[:6], size=int(rng.integers(1, 3)), replace=False).tolist()))
        labels.append(lab)
        word = "".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), 10))
        out.append(f'{image_id},{" ".join(map(str, lab))},"{word} {word}q {word}z"')
    (root / "train.csv").write_text("\n".join(out) + "\n")
    cfg = config.load(overrides=["text.min_df=1", "text.C=100.0"], data=root, output=tmp_path / "out",
                      models=tmp_path / "models")
    m = pipeline.run_stage("text", cfg)
    y = L.encode(labels)
    ws = pipeline.workspace(cfg)
    art = ws.require("text")
    x = text.vectorise(list(ws.data.train["Caption"]), cfg.text)
    in_sample = text.fit_predict(x, y, [x], 100.0)[0]
    assert mean_f1(y, decide(in_sample, 0.5)) > 0.95  # the model can memorise...
    baseline = max(mean_f1(y, decide(np.tile(y.mean(0), (len(y), 1)), t)) for t in np.arange(0.05, 0.9, 0.05))
    assert m["val_mean_f1_tuned"] < baseline + 0.08  # ...but no out-of-fold row comes from a model that saw it
    assert not np.isnan(np.asarray(art["probs"])).any() and m["held_out"] == "out-of-fold (5 folds)"


def test_thresholds_are_tuned_on_every_out_of_fold_row_and_a_cross_fitted_figure_is_reported():
    rng = np.random.default_rng(1)
    n = 600
    y = (rng.random((n, 18)) < 0.2).astype(np.uint8)
    probs = np.clip(y * 0.3 + rng.random((n, 18)) * 0.6, 0, 1).astype(np.float32)
    folds = fold_indices(y, 5, 0.2, seed=0)
    m, thresholds = _evaluate(folds, y, probs)
    t, f1 = tune_per_class(probs, y, rounds=thresholds.rounds)
    assert m["thresholds"] == [round(float(x), 2) for x in t]  # tuned on all n out-of-fold rows
    assert m["val_mean_f1_tuned"] == pytest.approx(round(f1, 4)) and m["n_eval"] == n
    assert len(m["fold_mean_f1_tuned"]) == 5 and m["fold_spread"] >= 0
    # thresholds tuned on the other folds' rows cannot beat the in-sample tuning on average
    assert m["mean_f1_threshold_cv"] <= m["val_mean_f1_tuned"] + 1e-9
    assert m["mean_f1_threshold_cv"] > m["val_mean_f1_at_0.5"] - 0.05
    single, _ = _evaluate(fold_indices(y, 1, 0.2, seed=0), y, probs)
    assert 100 < single["n_eval"] < 140 and "mean_f1_threshold_cv" not in single  # the 20 % validation part


def test_selection_rows_are_a_stratified_seeded_part_of_the_fit_rows():
    rng = np.random.default_rng(3)
    y = (rng.random((800, 18)) < 0.08).astype(np.uint8)
    y[:, 0] = 1
    fit, held = fold_indices(y, 5, 0.2, seed=0)[0]
    split = config.load(overrides=["split.selection_fraction=0.125"]).split

    def selection(k, fit, held, split=split):  # what StageContext.selection asks
        return F.selection(y, k, fit, held, split.selection_fraction, split.seed)

    train, select = selection(0, fit, held)
    assert sorted(np.concatenate([train, select]).tolist()) == fit.tolist()  # a partition of the fit rows
    assert not set(select) & set(held) and abs(len(select) - 0.125 * len(fit)) <= 2
    rare = y[fit].sum(0) >= 16  # labels with enough fit rows appear among the selection rows too
    assert (y[select].sum(0)[rare] > 0).all()
    assert selection(0, fit, held)[1].tolist() == select.tolist()  # seeded
    assert selection(1, fit, held)[1].tolist() != select.tolist()  # each fold draws its own
    off = config.load(overrides=["split.selection_fraction=0"]).split
    assert [a.tolist() for a in selection(0, fit, held, off)] == [fit.tolist(), held.tolist()]
    with pytest.raises(config.ConfigError, match="selection_fraction"):
        config.load(overrides=["split.selection_fraction=0.5"])


@pytest.mark.parametrize("fraction", [0.2, 0.0])
def test_held_out_labels_choose_nothing_unless_selection_is_off(tmp_path, fraction):
    """The held-out rows' probabilities must not depend on their own labels: not trained on, and (with a
    selection part) not used to choose the epoch either. With ``selection_fraction: 0`` the held-out rows choose
    the epoch, and changing their labels changes their probabilities: the leak the selection part removes."""
    import torch

    from multilabel_fusion.networks.precision import training_precision
    from multilabel_fusion.training.heads import HeadSettings, train_head

    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = (x @ rng.normal(size=(12, 18)) + rng.normal(size=(n, 18)) > 0.8).astype(np.uint8)
    fit, held = fold_indices(y, 3, 0.2, seed=0)[0]
    split = config.load(overrides=[f"split.selection_fraction={fraction}"]).split
    hs = HeadSettings(16, 0.0, 0.05, 32, 12, 2, 1.0)
    outputs = []
    for variant in range(2):
        targets = y.copy()
        if variant:
            targets[held] = 1 - targets[held]  # other labels for the held-out rows only
        fit_rows, select_rows = F.selection(targets, 0, fit, held, split.selection_fraction, split.seed)
        _, _, held_probs, _ = train_head(
            x, x[:5], targets, hs, fit_idx=fit_rows, select_idx=select_rows, held_idx=held,
            run_dir=tmp_path / f"run{variant}", name="head", settings={"variant": variant},
            device=torch.device("cpu"), precision=training_precision("cpu", True), seed=0)
        outputs.append(held_probs)
    same = np.allclose(outputs[0], outputs[1])
    assert same if fraction else not same
