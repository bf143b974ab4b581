"""A stage's figures from its held-out probabilities: at 0.5, tuned, expected-F1, per fold, cross-fitted.

Every figure is the F1 of predictions made with ``thresholds.at_least_one`` as set, exactly as written. The
submission's rule (``thresholds.decision``) and thresholds are chosen on all held-out rows;
``mean_f1_threshold_cv`` chooses them on the other folds' rows for each fold instead, so that not even the 18
thresholds (or the choice of rule) have seen the rows they are scored on: the figure to quote.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import mean_f1, per_class
from .thresholds import apply_rule, cross_fitted_decision, decide, tune_global


def evaluate(held_probs: np.ndarray, y: np.ndarray, groups: list[np.ndarray], thresholds: Any, *,
             estimate: str, epoch_selection: str) -> dict[str, Any]:
    """Held-out figures (out-of-fold with K folds) at 0.5, with a tuned global threshold, with tuned per-class
    thresholds, with the expected-F1 sets, per fold, and with a decision that is itself cross-fitted.

    ``held_probs`` and ``y``: one row per held-out record; ``groups``: the rows of each fold (positions in them);
    ``thresholds``: the settings section (``at_least_one``, ``rounds``, ``decision``). ``fold_mean_f1_tuned``,
    ``per_class`` and the figures use the submission's decision.
    """
    rule, rounds = thresholds.at_least_one, thresholds.rounds
    t_global, f1_global = tune_global(held_probs, y, at_least_one=rule)
    decision = cross_fitted_decision(held_probs, y, groups, thresholds.decision, rounds=rounds, at_least_one=rule)
    t_class, chosen_pred = decision.thresholds, decision.chosen
    fold_scores = [round(mean_f1(y[rows], chosen_pred[rows]), 4) for rows in groups]
    out = {
        "held_out": estimate,
        "epoch_selection": epoch_selection,
        "folds": len(groups),
        "n_eval": int(len(y)),
        "val_mean_f1_at_0.5": round(mean_f1(y, decide(held_probs, 0.5, at_least_one=rule)), 4),
        "val_mean_f1_global_threshold": round(f1_global, 4),
        "global_threshold": t_global,
        "val_mean_f1_tuned": round(decision.f1_tuned, 4),
        "val_mean_f1_expected_f1": round(decision.f1_expected, 4),
        "decision": decision.rule,
        "decision_setting": thresholds.decision,
        "fold_mean_f1_tuned": fold_scores,
        "fold_spread": round(float(np.max(fold_scores) - np.min(fold_scores)), 4),
        "thresholds": [round(float(t), 2) for t in t_class],
        "at_least_one": bool(rule),
        "per_class": per_class(y, chosen_pred),
    }
    if len(groups) > 1:
        out["mean_f1_threshold_cv"] = round(mean_f1(y, decision.predictions), 4)
        out["mean_f1_per_class_cv"] = round(decision.f1_per_class_cv, 4)
        out["fold_decisions"] = decision.fold_rules
    return out


def decision_of(record: dict[str, Any]) -> str:
    """The decision rule a metrics file, decision artifact or bundle manifest records; one made before the rule was
    recorded used per-class thresholds."""
    return record.get("decision", "per_class")


def decide_as(record: dict[str, Any], probs: np.ndarray) -> np.ndarray:
    """Labels of ``probs`` exactly as the stage of ``record`` wrote its submission (its rule and thresholds); reads a
    metrics file, a stage's decision artifact's info or a predictor's manifest, which record the same three keys."""
    return apply_rule(probs, decision_of(record), np.asarray(record["thresholds"]),
                      at_least_one=record["at_least_one"])
