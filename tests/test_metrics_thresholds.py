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
