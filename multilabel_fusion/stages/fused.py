"""Stage 09: the fused network (network 3 of the three-network report) on the stacked blocks, and
``output/predictions.csv``.

The published network is Linear(→2000), ReLU, dropout 0.05, Linear(→18) trained with weighted BCE. Here it is a
stacker: trained per fold on the same folds as every other stage, so that each training record's prediction comes
from a network that never saw it, while the learned blocks it reads (caption, text, image head) are themselves out
of fold. Blocks are named in ``fusion.blocks`` (any block a stage of the registry offers). For each, the key is
computed from the current settings and exactly that artifact is read — or the stage stops with a one-line error
naming the stage to run. A block whose stage needs an asset that cannot be had (the detector without COCO weights)
is left out, loudly, and the metrics file says so. Its decision (rule, thresholds) is kept as a keyed artifact
(:data:`multilabel_fusion.stages.outputs.DECISION`), which the predictor labels with.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..evaluation import figures as plots
from ..evaluation.scoring import decide_as
from ..io.artifacts import Artifact, MissingArtifact
from ..io.assets import AssetUnavailable
from ..io.atomic import write_json
from ..networks.device import model_size_mb
from ..networks.heads import MLPHead
from ..networks.precision import training_precision
from ..settings import Settings, common_settings
from ..training.crossfit import cross_fit
from ..training.heads import HeadSettings, predict_heads, train_head
from .base import (BlockPredictor, NewRecords, PredictorUnavailable, Stage, best_weights, load_tensors, mlp_head,
                   tensor_bytes)
from .context import StageContext, Workspace
from .outputs import finish, load_metrics, records

log = logging.getLogger(__name__)

MODEL_SIZE_LIMIT_MB = 100

#: What the fused network's notebook shows after its results (``metrics``: what the stage returned).
COMPARISON_CELL = '''\
compared = metrics["comparison"]  # every stage whose metrics file describes the current settings
display(pd.DataFrame([{"stage": r["stage"], "mean-F1 at 0.5": r["at_0.5"], "one tuned threshold": r["global"],
                       "tuned per-class thresholds": r["tuned"]} for r in compared]).set_index("stage"))
pd.DataFrame({r["key"]: r["per_class_f1"] for r in compared}, index=L.names()).rename_axis("per-class F1")
'''


def available_blocks(ws: Workspace) -> tuple[list[str], dict[str, str]]:
    """The blocks of ``fusion.blocks`` that can be had, and why each other one is left out.

    Only an optional stage's missing asset leaves a block out; anything else is an error.
    """
    kept, dropped = [], {}
    for name in ws.settings.fusion.blocks:
        stage = ws.registry.block_owner(name)
        if stage.optional_asset:
            try:
                stage.spec(ws)
            except AssetUnavailable as err:
                dropped[name] = f"no {stage.optional_asset} ({err})"
                continue
        kept.append(name)
    return kept, dropped


class FusedNetwork(Stage):
    name = "fusion"
    number = "09"
    title = "fused network"
    module = "fused_network"
    section = "fusion"
    writes = "output/predictions.csv"
    final = True
    summary = "`output/predictions.csv` (first runs any earlier stage whose blocks are not cached yet)"
    about = ("An MLP on the stacked blocks of the earlier stages (`fusion.blocks`: out-of-fold image, caption, n-gram "
             "probabilities and the detector's blocks), trained per fold, writes **`output/predictions.csv`**, the "
             "file to upload. A block missing for the current settings is computed first by its own stage (quick once "
             "notebooks 01-04 ran); the detector's blocks are left out, saying so, where no COCO detector weights can "
             "be had.")
    notebook_cells = (("## Every stage compared\nEvery stage whose metrics file describes the current settings: "
                       "mean-F1 at 0.5, with one tuned threshold and with tuned per-class thresholds, and per-class F1.",
                       COMPARISON_CELL),)

    def reads(self, settings: Settings, registry) -> tuple[str, ...]:
        return tuple(dict.fromkeys(registry.block_owner(b).name for b in settings.fusion.blocks))

    def reads_blocks(self, settings: Settings) -> tuple[str, ...]:
        return tuple(settings.fusion.blocks)

    def effective_settings(self, ws: Workspace) -> Settings:
        """``fusion.blocks`` narrowed to the blocks that can be had (the key follows what is used)."""
        kept, dropped = available_blocks(ws)
        if not dropped:
            return ws.settings
        if not kept:
            raise AssetUnavailable("fusion: none of the blocks " + ", ".join(ws.settings.fusion.blocks) + " can be had")
        return ws.settings.updated("fusion", blocks=kept)

    def spec(self, ws: Workspace) -> dict[str, Any]:
        return {"common": common_settings(ws.settings)}

    def load_features(self, ctx: StageContext) -> tuple[np.ndarray, np.ndarray, dict]:
        """Concatenate the named blocks (float32), each from the artifact of the current settings, rows checked."""
        train_parts, test_parts, used = [], [], {}
        for name in ctx.settings.fusion.blocks:
            train, test, key = ctx.block_arrays(name)
            train_parts.append(train)
            test_parts.append(test)
            owner = ctx.registry.block_owner(name).name
            used[name] = {"key": key, "dim": int(train.shape[1]), "stage": owner, "artifact_key": ctx.key(owner)}
        return np.concatenate(train_parts, 1), np.concatenate(test_parts, 1), used

    def fit(self, ctx: StageContext) -> Artifact:
        """The fused network per fold on the stacked blocks: out-of-fold and fold-averaged test probabilities."""
        found = ctx.store.load("fusion", ctx.key())
        if found is not None and "history" in found.info:
            log.info(f"[fusion] reusing the fused networks' probabilities {found.dir}")
            return found
        cf = ctx.settings.fusion
        train_x, test_x, used = self.load_features(ctx)
        described = ", ".join(f"{name} ({block['dim']})" for name, block in used.items())
        log.info(f"[fusion] blocks {described} -> {train_x.shape[1]} features")
        hs = HeadSettings(cf.hidden, cf.dropout, cf.lr, cf.batch_size, cf.epochs, cf.patience, cf.label1_weight,
                          cf.grad_clip, plateau_patience=cf.plateau_patience, plateau_factor=cf.plateau_factor,
                          pos_weight=cf.pos_weight)
        shaping = cf.shaping(weights_only=True)
        precision = training_precision(ctx.device, ctx.settings.trainer.mixed_precision)
        histories, sizes = [], []

        def fold(k, fit_idx, held_idx):
            run_dir = ctx.run_dir("fusion", {"fusion": shaping, "inputs": {b: v["key"] for b, v in used.items()},
                                             "fold": [k, len(ctx.folds)]})
            fit_rows, select_rows = ctx.selection(k, fit_idx, held_idx)
            model, result, held, test = train_head(
                train_x, test_x, ctx.targets, hs, fit_idx=fit_rows, select_idx=select_rows, held_idx=held_idx,
                run_dir=run_dir, name=f"fusion fold {k + 1}", settings={**ctx.spec(), "fold": k}, device=ctx.device,
                precision=precision, seed=ctx.settings.trainer.seed, resume=ctx.resume)
            histories.append(result.history.assign(fold=k))
            sizes.append(model_size_mb(model))
            return {"probs": held}, {"test_probs": test}, {"best_epoch": result.best_epoch, "run_dir": str(run_dir),
                                                            "seconds": round(result.seconds, 1),
                                                            "reused": result.reused}

        cross = cross_fit(ctx.folds, len(ctx.data.train), fold, "fusion")
        history = pd.concat(histories, ignore_index=True)
        return ctx.store.save("fusion", ctx.key(), ctx.spec(), {
            "probs": cross.held["probs"], "test_probs": cross.test["test_probs"],
            "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str)},
            {"folds": cross.folds, "blocks": used, "history": records(history), "network_mb": sizes[0]})

    def run(self, ctx: StageContext) -> dict[str, Any]:
        asked = list(ctx.given.fusion.blocks)
        dropped = available_blocks(ctx.derive(ctx.given))[1]
        for name, why in dropped.items():
            log.warning(f"[fusion] WARNING: leaving out the '{name}' block: {why}")
        art = self.fit(ctx)
        used, folds = art.info["blocks"], art.info["folds"]
        history = pd.DataFrame(art.info["history"])
        probs, test_probs = np.asarray(art["probs"]), np.asarray(art["test_probs"])
        held_probs = probs[ctx.eval_idx]
        size = predictor_size_mb(ctx, used, art.info["network_mb"])
        extra = {"blocks": used, "blocks_asked": asked, "blocks_left_out": dropped, "fold_runs": folds,
                 "best_epochs": [f["best_epoch"] for f in folds],
                 "train_seconds": round(sum(f["seconds"] for f in folds), 1),
                 "run_dir": folds[0]["run_dir"], "model_size": size}
        metrics = finish(ctx, held_probs, test_probs, history=history[history["fold"] == 0], extra=extra,
                         submission_path=ctx.output_dir / "predictions.csv")
        rows = comparison(ctx)
        metrics["comparison"] = rows
        metrics["figures"]["per_class_f1_all_stages"] = str(plots.per_class_f1(
            {r["key"]: r["per_class_f1"] for r in rows}, ctx.output_dir / "figures" / "per_class_f1_all_stages.png",
            "Per-class validation F1 of every stage (tuned thresholds)"))
        metrics["figures"]["error_cooccurrence"] = str(plots.error_cooccurrence(
            ctx.y_eval, decide_as(metrics, held_probs),
            ctx.output_dir / "figures" / "fusion_error_cooccurrence.png",
            f"Fused network: wrong predictions vs the image's true labels ({ctx.estimate})"))
        write_json(ctx.output_dir / "metrics" / "fusion.json", metrics)  # now naming every figure
        log.info("\nValidation mean-F1 of every stage (thresholds: 0.5 / one tuned global / tuned per class):")
        log.info(format_table(rows))
        log.info(f"\nModel size to predict a new image+caption: {size['total_mb']} MB "
                 f"({'within' if size['within_limit'] else 'OVER'} the {MODEL_SIZE_LIMIT_MB} MB limit)")
        if dropped:
            log.info(f"[fusion] fused WITHOUT: {', '.join(dropped)} (see 'blocks_left_out' in the metrics file)")
        log.info(f"Upload {ctx.output_dir / 'predictions.csv'} to Kaggle (validated: {len(ctx.data.test)} rows).")
        return metrics

    def predictor_needs(self, settings: Settings, blocks: Sequence[str]) -> tuple[str, ...]:
        return tuple(settings.fusion.blocks)

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "FusionPredictor":
        fused = ws.require("fusion")
        f = ws.settings.fusion
        heads = [mlp_head(best_weights(run["run_dir"], ws.models_dir, self), f.hidden, f.dropout)
                 for run in fused.info["folds"]]
        description = {"hidden": f.hidden, "dropout": f.dropout, "blocks": list(f.blocks), "folds": len(heads),
                       "mixed_precision": bool(ws.settings.trainer.mixed_precision), "key": fused.key}
        return FusionPredictor(("fusion",), description, heads)


def comparison(ctx: StageContext) -> list[dict[str, Any]]:
    """Every stage's validation mean-F1 from its metrics file — only where the file describes the artifact of the
    current settings (a stale file from other settings is left out, not compared)."""
    rows = []
    owners = list(dict.fromkeys(ctx.registry.block_owner(b).name for b in ctx.settings.fusion.blocks))
    for name in owners + [ctx.stage.name]:
        m = load_metrics(ctx.output_dir, name)
        if not m:
            continue
        try:
            current = ctx.key(name)
        except AssetUnavailable:
            continue
        if m.get("artifact_key") != current:
            log.info(f"[fusion] {name}: its metrics file is from other settings; not compared")
            continue
        rows.append({"stage": m["title"], "at_0.5": m["val_mean_f1_at_0.5"],
                     "global": m["val_mean_f1_global_threshold"], "tuned": m["val_mean_f1_tuned"],
                     "key": name, "per_class_f1": m["per_class"]["f1"], "blocks": m.get("blocks")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<22} {'F1 @0.5':>8} {'global':>8} {'tuned':>8}", "-" * 49]
    lines += [f"{r['stage']:<22} {r['at_0.5']:>8.4f} {r['global']:>8.4f} {r['tuned']:>8.4f}" for r in rows]
    return "\n".join(lines)


def predictor_size_mb(ctx: StageContext, used: dict[str, dict], fusion_mb: float) -> dict[str, Any]:
    """Size of everything needed to predict a new image and caption: each stage's predictor behind the blocks used
    (as it would export itself into a bundle), and the fused networks."""
    parts: dict[str, float | None] = {}
    blocks_of: dict[str, list[str]] = {}
    for block, u in used.items():
        blocks_of.setdefault(u["stage"], []).append(block)
    for stage, blocks in blocks_of.items():
        try:
            parts.update({p: round(mb, 1) for p, mb in ctx.registry.get(stage).predictor(ctx, blocks).parts_mb().items()})
        except (PredictorUnavailable, MissingArtifact) as err:
            parts[f"{stage} (no predictor: {err})"] = None
        except Exception as err:  # noqa: BLE001 - a size report never costs the stage its results
            log.warning(f"[fusion] the size of stage {stage}'s predictor is unknown: {type(err).__name__}: {err}")
            parts[f"{stage} (size unknown: {type(err).__name__})"] = None
    k = len(ctx.folds)
    parts[f"fused networks ({k} folds)"] = round(fusion_mb * k, 1)
    known = {p: v for p, v in parts.items() if v is not None}
    total = round(sum(known.values()), 1)
    return {"parts_mb": parts, "total_mb": total, "limit_mb": MODEL_SIZE_LIMIT_MB,
            "within_limit": total <= MODEL_SIZE_LIMIT_MB}


class FusionPredictor(BlockPredictor):
    """The fold networks of the fused network on the blocks its stages compute; its one output, ``fusion``, is the
    probabilities the decision labels."""

    stage = "fusion"

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], heads: list[MLPHead]):
        super().__init__(blocks)
        self.description, self.heads = description, heads
        self.needs = tuple(description["blocks"])

    @property
    def fold_networks(self) -> list[torch.nn.Module]:
        return list(self.heads)

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.concatenate([given[name] for name in self.needs], 1)
        precision = training_precision(self.device, self.description["mixed_precision"])
        return {"fusion": predict_heads(self.heads, x, self.device, precision)}

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        k = len(self.heads)
        return dict(self.description), {f"network_{i}.pt": (f"fused networks ({k} folds)", tensor_bytes(h.state_dict()))
                                         for i, h in enumerate(self.heads)}

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "FusionPredictor":
        heads = [mlp_head(load_tensors(read(f"network_{i}.pt")), description["hidden"], description["dropout"])
                 for i in range(int(description["folds"]))]
        return cls(blocks, description, heads)


FusedNetwork.predictor_type = FusionPredictor  # what reads its part of a bundle
