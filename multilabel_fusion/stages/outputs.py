"""What every stage writes once its probabilities exist: the decision (kept as a keyed artifact), the validated
submission, the probabilities for notebooks, the figures, the metrics file and the resolved configuration."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.folds import held_out_rows
from ..evaluation import figures as plots
from ..evaluation import submission
from ..evaluation.scoring import decide_as, evaluate
from ..io.artifacts import Artifact
from ..io.atomic import atomic_path, write_json, write_text
from ..io.hashing import digest
from ..io.machine import cpu_name
from .context import StageContext, Workspace

log = logging.getLogger(__name__)

#: Artifact kind of a stage's decision (rule, thresholds, at-least-one), keyed by its artifact and the thresholds
#: settings: what the predictor labels with, never a "latest" metrics file.
DECISION = "decision"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def records(history) -> list[dict]:
    """A training history (a DataFrame) as JSON records."""
    return [] if history is None else json.loads(history.to_json(orient="records"))


def load_metrics(output_dir: Path, stage: str) -> dict[str, Any] | None:
    path = Path(output_dir) / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def decision_key(ws: Workspace, stage: str) -> str:
    """The key of stage ``stage``'s decision: its artifact's key and every thresholds setting."""
    return digest({"decision": stage, "artifact": ws.key(stage), "thresholds": ws.settings.thresholds.shaping()})


def require_decision(ws: Workspace, stage: str) -> Artifact:
    """The decision stage ``stage`` wrote for these settings, or a one-line error naming its script."""
    found = ws.store.require(DECISION, decision_key(ws, stage), ws.registry.get(stage).hint)
    return found


def finish(ctx: StageContext, held_probs: np.ndarray, test_probs: np.ndarray, *,
           history=None, extra: dict[str, Any] | None = None, submission_path: Path | None = None,
           extra_figures: dict[str, Path] | None = None) -> dict[str, Any]:
    """Tune the decision, keep it, write the stage's submission, metrics file (with its artifact key), figures and
    configuration.

    ``held_probs``: one row per ``ctx.eval_idx`` (out-of-fold with K folds); ``test_probs``: one per test record.
    ``extra_figures`` (name -> path of a figure the stage made itself) are recorded in ``metrics["figures"]`` with
    the stage's own, so readers (notebooks, the benchmark) find every figure there.
    """
    out, stage = ctx.output_dir, ctx.stage.name
    title = ctx.stage.label
    metrics = {"stage": stage, "title": title, "data": str(ctx.data.root), "demo_data": ctx.demo,
               "artifact_key": ctx.key(), "n_fit": len(ctx.train_idx), "n_val": len(ctx.val_idx),
               "warnings": list(ctx.warnings)}
    groups = held_out_rows(ctx.folds)[1]
    metrics.update(evaluate(held_probs, ctx.y_eval, groups, ctx.settings.thresholds, estimate=ctx.estimate,
                            epoch_selection=ctx.selection_note))
    decided = {k: metrics[k] for k in ("decision", "thresholds", "at_least_one")}
    ctx.store.save(DECISION, decision_key(ctx, stage), {"decision": stage, "artifact": metrics["artifact_key"],
                                                        "thresholds": ctx.settings.thresholds.shaping()},
                   {"thresholds": np.asarray(metrics["thresholds"], dtype=np.float64)},
                   {**decided, "stage": stage, "mean_f1_threshold_cv": metrics.get("mean_f1_threshold_cv"),
                    "val_mean_f1_tuned": metrics["val_mean_f1_tuned"]})
    test_pred = decide_as(decided, test_probs)
    sub_path = submission_path or out / f"submission_{stage}.csv"
    submission.write(sub_path, ctx.data.test["ImageID"].tolist(), test_pred,
                     allow_empty=not ctx.settings.thresholds.at_least_one)
    with atomic_path(out / "probabilities" / f"{stage}.npz") as tmp, open(tmp, "wb") as f:  # for notebooks
        np.savez_compressed(f, val=held_probs.astype(np.float32), test=test_probs.astype(np.float32),
                            val_idx=ctx.eval_idx, test_ids=ctx.data.test["ImageID"].to_numpy(str),
                            artifact_key=np.array(metrics["artifact_key"]))
    figures = {}
    if history is not None and len(history):
        figures["training_curves"] = str(plots.training_curves(
            history, out / "figures" / f"{stage}_training.png", title))
    if len(ctx.folds) > 1:
        figures["fold_scores"] = str(plots.fold_scores(
            metrics["fold_mean_f1_tuned"], metrics.get("mean_f1_threshold_cv"), out / "figures" / f"{stage}_folds.png",
            f"{title}: mean-F1 per fold"))
    figures["per_class_f1"] = str(plots.per_class_f1(
        {stage: metrics["per_class"]["f1"]}, out / "figures" / f"{stage}_per_class_f1.png",
        f"{title}: per-class validation F1"))
    figures.update({name: str(path) for name, path in (extra_figures or {}).items()})
    config_path = write_text(out / "metrics" / f"{stage}.config.yaml", ctx.settings.dump_yaml())
    metrics.update({"submission": str(sub_path), "config": str(config_path), "figures": figures,
                    "history": records(history), "machine": machine_info(),
                    "wall_seconds": round(time.time() - ctx.started, 1)})
    metrics.update(extra or {})
    write_json(out / "metrics" / f"{stage}.json", metrics)
    cv = (f", {metrics['mean_f1_threshold_cv']:.4f} with a cross-fitted decision (folds "
          f"{min(metrics['fold_mean_f1_tuned']):.4f}-{max(metrics['fold_mean_f1_tuned']):.4f})"
          if "mean_f1_threshold_cv" in metrics else "")
    log.info(f"[{stage}] {ctx.estimate} mean-F1: {metrics['val_mean_f1_at_0.5']:.4f} at 0.5, "
             f"{metrics['val_mean_f1_tuned']:.4f} with per-class thresholds, {metrics['val_mean_f1_expected_f1']:.4f} "
             f"with expected-F1 sets{cv}; submission by {metrics['decision'].replace('_', '-')} -> {sub_path}")
    return metrics
