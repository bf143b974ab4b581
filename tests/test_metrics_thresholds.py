import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from multilabel_fusion.evaluation import metrics, thresholds


@pytest.mark.parametrize("seed", range(5))
def test_mean_f1_equals_sklearn_samples_average(seed):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((300, 18)) < 0.15).astype(int)
    y_pred = (rng.random((300, 18)) < 0.2).astype(int)
    y_true[:5] = 0  # rows with no labels on one or both sides
    y_pred[3:8] = 0
    expected = f1_score(y_true, y_pred, average="samples", zero_division=0)
    assert metrics.mean_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    pc = metrics.per_class(y_true, y_pred)
    assert np.allclose(pc["f1"], f, atol=1e-4) and np.allclose(pc["precision"], p, atol=1e-4)
    assert np.allclose(pc["recall"], r, atol=1e-4) and pc["support"] == s.tolist()


def test_decide_applies_thresholds_and_at_least_one_rule():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.3, 0.1]])
    assert thresholds.decide(probs, 0.5).tolist() == [[1, 1, 0], [0, 1, 0]]
    assert thresholds.decide(probs, 0.5, at_least_one=False).tolist() == [[1, 1, 0], [0, 0, 0]]
    assert thresholds.decide(probs, np.array([0.95, 0.5, 0.05]), at_least_one=False).tolist() == [[0, 1, 1], [0, 0, 1]]
    assert thresholds.decide(probs, np.array([0.95, 0.5, 0.05])).tolist() == [[1, 1, 1], [0, 1, 1]]  # top label forced on


def test_per_class_tuning_beats_a_global_threshold_on_a_constructed_case():
    # class 0 separates at ~0.4, class 1 at ~0.15: no single threshold serves both
    rng = np.random.default_rng(0)
    n = 600
    y = np.zeros((n, 3), dtype=int)
    y[:, 0] = rng.random(n) < 0.5
    y[:, 1] = rng.random(n) < 0.3
    y[:, 2] = 1  # always present and always the top score, like "person"
    probs = np.stack([
        np.where(y[:, 0], 0.45, 0.35) + rng.normal(0, 0.01, n),
        np.where(y[:, 1], 0.25, 0.05) + rng.normal(0, 0.01, n),
        np.full(n, 0.9),
    ], axis=1)
    t_global, f_global = thresholds.tune_global(probs, y)
    t_class, f_class = thresholds.tune_per_class(probs, y)
    assert f_class == pytest.approx(metrics.mean_f1(y, thresholds.decide(probs, t_class)))
    assert f_class > f_global + 0.05
    assert f_class > 0.99
    assert 0.35 < t_class[0] < 0.45 and 0.05 < t_class[1] < 0.25


@pytest.mark.parametrize("at_least_one", [True, False])
def test_tuned_f1_is_the_f1_of_the_predictions_written_under_either_rule(at_least_one):
    # many samples whose every score is low: forcing their top label on changes the F1, so a tuner that always
    # forces it (the old behaviour) reports another F1 than the predictions written with at_least_one=False
    rng = np.random.default_rng(3)
    n = 400
    y = (rng.random((n, 4)) < 0.3).astype(int)
    y[: n // 2] = 0
    y[: n // 2, 0] = rng.random(n // 2) < 0.5
    probs = np.clip(y * 0.5 + rng.random((n, 4)) * 0.45, 0, 1)
    probs[: n // 2] *= 0.2
    t, reported = thresholds.tune_per_class(probs, y, at_least_one=at_least_one)
    written = thresholds.decide(probs, t, at_least_one=at_least_one)
    assert reported == pytest.approx(metrics.mean_f1(y, written), abs=1e-12)
    g, reported_global = thresholds.tune_global(probs, y, at_least_one=at_least_one)
    assert reported_global == pytest.approx(metrics.mean_f1(y, thresholds.decide(probs, g, at_least_one=at_least_one)))


def _expected_f1(p_row, chosen):
    """Expected F1 of the label set ``chosen`` when label j is on with probability p_row[j], independently: every
    one of the 2^L label sets enumerated (no shortcut shared with the code under test)."""
    import itertools

    total = 0.0
    for y in itertools.product([0, 1], repeat=len(p_row)):
        y = np.array(y)
        weight = np.prod(np.where(y == 1, p_row, 1 - p_row))
        total += weight * metrics.mean_f1(y[None], chosen[None])
    return total


@pytest.mark.parametrize("at_least_one", [True, False])
def test_expected_f1_sets_are_the_best_of_every_label_set(at_least_one):
    """Against brute force: of all 2^6 label sets (not only top-k ones), none has a higher expected F1."""
    import itertools

    rng = np.random.default_rng(3)
    probs = rng.beta(0.5, 0.8, size=(25, 6))
    probs[0] = 0.0  # nothing possible: at_least_one forces the top label, else the empty set
    chosen = thresholds.expected_f1_decide(probs, at_least_one=at_least_one)
    assert chosen.dtype == np.uint8 and chosen.shape == probs.shape
    assert chosen[0].sum() == (1 if at_least_one else 0)
    for p_row, c in zip(probs, chosen):
        candidates = [np.array(s) for s in itertools.product([0, 1], repeat=6) if sum(s) >= int(at_least_one)]
        best = max(_expected_f1(p_row, s) for s in candidates)
        assert _expected_f1(p_row, c) == pytest.approx(best, abs=1e-12)


def test_expected_f1_sets_follow_the_other_labels_probabilities():
    """Sample-averaged F1 rewards a record's set as a whole: a 0.4 label is worth predicting beside other doubtful
    ones, but not beside one sure label (one fixed threshold cannot do both)."""
    sure = thresholds.expected_f1_decide(np.array([[0.99, 0.4, 0.0, 0.0]]))
    doubtful = thresholds.expected_f1_decide(np.array([[0.45, 0.4, 0.4, 0.4]]))
    assert sure.tolist() == [[1, 0, 0, 0]]
    assert doubtful.tolist() == [[1, 1, 1, 1]]


def _simulated(seed, n=1500, labels=8):
    """Labels drawn from known independent probabilities (so the probabilities are calibrated), five folds."""
    rng = np.random.default_rng(seed)
    probs = rng.beta(0.4, 1.6, size=(n, labels))
    y = (rng.random(probs.shape) < probs).astype(np.uint8)
    groups = np.array_split(rng.permutation(n), 5)
    return probs, y, groups


def test_auto_decision_takes_expected_f1_for_probabilities_and_thresholds_for_squashed_scores():
    probs, y, groups = _simulated(0)
    calibrated = thresholds.cross_fitted_decision(probs, y, groups, "auto")
    assert calibrated.rule == "expected_f1" and calibrated.f1_expected > calibrated.f1_per_class_cv
    # a monotone squash: the same ranking per label, no longer probabilities; per-class thresholds move with it
    squashed = thresholds.cross_fitted_decision(probs ** 6, y, groups, "auto")
    assert squashed.rule == "per_class" and squashed.f1_per_class_cv > squashed.f1_expected
    assert set(squashed.fold_rules) == {"per_class"}
    assert metrics.mean_f1(y, squashed.predictions) == pytest.approx(squashed.f1_per_class_cv)
    for d, p in ((calibrated, probs), (squashed, probs ** 6)):  # the submission's rule on every row, in-sample
        np.testing.assert_array_equal(d.chosen, thresholds.apply_rule(p, d.rule, d.thresholds))
    assert metrics.mean_f1(y, squashed.chosen) == pytest.approx(squashed.f1_tuned)


@pytest.mark.parametrize("setting", ["auto", "per_class", "expected_f1"])
def test_a_folds_decision_never_sees_its_own_labels(setting):
    """Cross-fitted: relabelling fold 0's rows changes neither the rule fold 0 gets nor its predictions; the
    submission's rule and thresholds (chosen on every row) may change."""
    probs, y, groups = _simulated(1)
    before = thresholds.cross_fitted_decision(probs, y, groups, setting)
    flipped = y.copy()
    flipped[groups[0]] = 1 - flipped[groups[0]]
    after = thresholds.cross_fitted_decision(probs, flipped, groups, setting)
    assert after.fold_rules[0] == before.fold_rules[0]
    assert np.array_equal(after.predictions[groups[0]], before.predictions[groups[0]])
    assert not np.array_equal(after.thresholds, before.thresholds)
    if setting != "auto":
        assert before.fold_rules == [setting] * 5


def test_apply_rule_dispatches_and_refuses_unknown_rules():
    probs = np.array([[0.99, 0.4, 0.0], [0.3, 0.3, 0.3]])
    assert thresholds.apply_rule(probs, "per_class", np.array([0.5, 0.35, 0.5])).tolist() == [[1, 1, 0], [1, 0, 0]]
    assert thresholds.apply_rule(probs, "expected_f1", 0.5).tolist() == thresholds.expected_f1_decide(probs).tolist()
    with pytest.raises(ValueError, match="unknown decision rule"):
        thresholds.apply_rule(probs, "top3", 0.5)
    with pytest.raises(ValueError, match="unknown decision"):
        thresholds.cross_fitted_decision(probs, probs > 0.5, [np.arange(2)], "top3")


def test_auto_decision_with_two_folds_still_cross_fits_the_predictions():
    """Two folds leave no third to tune the inner thresholds on (the case that once failed on an empty
    concatenation): the per-class rule is scored in-sample there, and predictions stay cross-fitted."""
    probs, y, groups = _simulated(2)
    two = [np.concatenate(groups[:2]), np.concatenate(groups[2:])]
    before = thresholds.cross_fitted_decision(probs, y, two, "auto")
    flipped = y.copy()
    flipped[two[0]] = 1 - flipped[two[0]]
    after = thresholds.cross_fitted_decision(probs, flipped, two, "auto")
    assert len(before.fold_rules) == 2 and set(before.fold_rules) <= set(thresholds.RULES)
    assert np.array_equal(after.predictions[two[0]], before.predictions[two[0]])
