"""Stage 03: the fused network on the concatenated feature blocks, and ``output/predictions.csv``.

The published network is Linear(→2000), ReLU, dropout 0.05, Linear(→18) trained with weighted BCE. Here it is a
stacker: trained per fold on the same folds as every other stage, so that each training record's prediction
comes from a network that never saw it, while the learned blocks it reads (caption, text, image head) are
themselves out-of-fold. Blocks are named in ``fusion.blocks`` (``image``, ``caption_probs``, ``text``,
``detector`` …: the registry's blocks). For each, the key is computed from the current configuration and exactly
that artifact is read — or the stage stops with a one-line error naming the stage to run. A block whose stage
needs an asset that cannot be had (the detector without COCO weights) is left out, loudly, and the metrics file
says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import assets, registry
from ..config import Config
from ..engine.atomic import write_json
from ..engine.trainer import model_size_mb
from ..networks.heads import HeadSettings, train_on_features
from ..reports import figures as reports
from . import base

MODEL_SIZE_LIMIT_MB = 100
HOW_LONG = ("epochs", "patience")


def available_blocks(cfg: Config) -> tuple[list[str], dict[str, str]]:
    """The blocks of ``fusion.blocks`` that can be had, and why each other one is left out.

    Only an optional stage's missing asset leaves a block out; anything else is an error.
    """
    kept, dropped = [], {}
    for name in cfg.fusion.blocks:
        stage = registry.block_owner(name)
        if stage.optional_asset:
            try:
                stage.load().artifact_spec(cfg)
            except assets.AssetUnavailable as err:
                dropped[name] = f"no {stage.optional_asset} ({err})"
                continue
        kept.append(name)
    return kept, dropped


def fused_config(cfg: Config) -> Config:
    """``cfg`` with ``fusion.blocks`` narrowed to the blocks that can be had (the key follows what is used)."""
    kept, dropped = available_blocks(cfg)
    if not dropped:
        return cfg
    if not kept:
        raise assets.AssetUnavailable("fusion: none of the blocks " + ", ".join(cfg.fusion.blocks) + " can be had")
    narrowed = Config.wrap(cfg.to_dict())
    narrowed["fusion"]["blocks"] = kept
    return narrowed


def artifact_spec(cfg: Config) -> dict[str, Any]:
    return {"common": registry.common_settings(cfg)}


def load_features(ctx: base.StageContext, names: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Concatenate the named blocks (float32), each from the artifact of the current settings, rows checked."""
    train_parts, test_parts, used = [], [], {}
    for name in names:
        train, test, key = base.block_arrays(ctx, name)
        train_parts.append(train)
        test_parts.append(test)
        owner = registry.block_owner(name).name
        used[name] = {"key": key, "dim": int(train.shape[1]), "stage": owner, "artifact_key": ctx.key(owner)}
    return np.concatenate(train_parts, 1), np.concatenate(test_parts, 1), used


def comparison(ctx: base.StageContext) -> list[dict[str, Any]]:
    """Every stage's validation mean-F1 from its metrics file — only where the file describes the artifact of the
    current settings (a stale file from other settings is left out, not compared)."""
    rows = []
    for name in list(dict.fromkeys(registry.block_owner(b).name for b in ctx.cfg.fusion.blocks)) + ["fusion"]:
        m = base.load_metrics(ctx.output_dir, name)
        if not m:
            continue
        try:
            current = ctx.key(name)
        except assets.AssetUnavailable:
            continue
        if m.get("artifact_key") != current:
            print(f"[fusion] {name}: its metrics file is from other settings; not compared")
            continue
        rows.append({"stage": m["title"], "at_0.5": m["val_mean_f1_at_0.5"],
                     "global": m["val_mean_f1_global_threshold"], "tuned": m["val_mean_f1_tuned"],
                     "key": name, "per_class_f1": m["per_class"]["f1"], "blocks": m.get("blocks")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<22} {'F1 @0.5':>8} {'global':>8} {'tuned':>8}", "-" * 49]
    lines += [f"{r['stage']:<22} {r['at_0.5']:>8.4f} {r['global']:>8.4f} {r['tuned']:>8.4f}" for r in rows]
    return "\n".join(lines)


def predictor_size_mb(ctx: base.StageContext, used: dict[str, dict], fusion_mb: float) -> dict[str, Any]:
    """Size of everything needed to predict a new image and caption: the networks behind every block used."""
    parts: dict[str, float | None] = {}
    stages = {u["stage"] for u in used.values()}
    k = len(ctx.folds)
    if "image" in stages:
        parts["image backbone"] = ctx.require("image").info.get("backbone_size_mb")
    if "caption" in stages:
        one = ctx.require("caption").info.get("checkpoint_mb")
        parts[f"caption networks ({k} folds, with their embedding rows)"] = round(one * k, 1) if one else None
    if "detector" in stages:
        detector = ctx.require("detector")
        weights = Path(detector.info.get("weights", ""))
        parts["detector weights"] = round(weights.stat().st_size / 2**20, 1) if weights.is_file() else None
    parts[f"fusion networks ({k} folds)"] = round(fusion_mb * k, 1)
    known = {k: v for k, v in parts.items() if v is not None}
    total = round(sum(known.values()), 1)
    return {"parts_mb": parts, "total_mb": total, "limit_mb": MODEL_SIZE_LIMIT_MB,
            "within_limit": total <= MODEL_SIZE_LIMIT_MB}


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    asked = list(cfg.fusion.blocks)
    _, dropped = available_blocks(cfg)
    for name, why in dropped.items():
        print(f"[fusion] WARNING: leaving out the '{name}' block: {why}")
    cfg = fused_config(cfg)
    ctx = base.prepare(cfg, "fusion", demo_mode)
    cf = cfg.fusion
    train_x, test_x, used = load_features(ctx, list(cf.blocks))
    described = ", ".join(f"{name} ({block['dim']})" for name, block in used.items())
    print(f"[fusion] blocks {described} -> {train_x.shape[1]} features")
    hs = HeadSettings(cf.hidden, cf.dropout, cf.lr, cf.batch_size, cf.epochs, cf.patience, cf.label1_weight,
                      cf.grad_clip, plateau_patience=cf.plateau_patience, plateau_factor=cf.plateau_factor)
    shaping = {k: v for k, v in cf.to_dict().items() if k not in HOW_LONG}
    histories, sizes = [], []

    def fold(k, fit_idx, held_idx):
        run_dir = ctx.run_dir("fusion", {"fusion": shaping, "inputs": {b: v["key"] for b, v in used.items()},
                                         "fold": [k, len(ctx.folds)]})
        model, result, held, test = train_on_features(
            ctx, train_x, test_x, hs, fold=k, fit_idx=fit_idx, held_idx=held_idx, run_dir=run_dir,
            name=f"fusion fold {k + 1}", resume=resume, settings={**ctx.spec(), "fold": k})
        histories.append(result.history.assign(fold=k))
        sizes.append(model_size_mb(model))
        return {"probs": held}, {"test_probs": test}, {"best_epoch": result.best_epoch, "run_dir": str(run_dir),
                                                        "seconds": round(result.seconds, 1), "reused": result.reused}

    cross = base.cross_fit(ctx, fold)
    probs, test_probs = cross.held["probs"], cross.test["test_probs"]
    ctx.store.save("fusion", ctx.key(), ctx.spec(), {
        "probs": probs, "test_probs": test_probs, "train_ids": ctx.data.train["ImageID"].to_numpy(str),
        "test_ids": ctx.data.test["ImageID"].to_numpy(str)}, {"folds": cross.folds, "blocks": used})
    history = pd.concat(histories, ignore_index=True)
    held_probs = probs[ctx.eval_idx]
    size = predictor_size_mb(ctx, used, sizes[0])
    extra = {"blocks": used, "blocks_asked": asked, "blocks_left_out": dropped, "fold_runs": cross.folds,
             "best_epochs": [f["best_epoch"] for f in cross.folds],
             "train_seconds": round(sum(f["seconds"] for f in cross.folds), 1),
             "run_dir": cross.folds[0]["run_dir"], "model_size": size}
    metrics = base.finish(ctx, held_probs, test_probs, history=history[history["fold"] == 0], extra=extra,
                          submission_path=ctx.output_dir / "predictions.csv")
    rows = comparison(ctx)
    metrics["comparison"] = rows
    metrics["figures"]["per_class_f1_all_stages"] = str(reports.per_class_f1(
        {r["key"]: r["per_class_f1"] for r in rows}, ctx.output_dir / "figures" / "per_class_f1_all_stages.png",
        "Per-class validation F1 of every stage (tuned thresholds)"))
    metrics["figures"]["error_cooccurrence"] = str(reports.error_cooccurrence(
        ctx.y_eval, base.decide_as(metrics, held_probs),
        ctx.output_dir / "figures" / "fusion_error_cooccurrence.png",
        f"Fused network: wrong predictions vs the image's true labels ({ctx.estimate})"))
    write_json(ctx.output_dir / "metrics" / "fusion.json", metrics)  # now naming every figure
    print("\nValidation mean-F1 of every stage (thresholds: 0.5 / one tuned global / tuned per class):")
    print(format_table(rows))
    print(f"\nModel size to predict a new image+caption: {size['total_mb']} MB "
          f"({'within' if size['within_limit'] else 'OVER'} the {MODEL_SIZE_LIMIT_MB} MB limit)")
    if dropped:
        print(f"[fusion] fused WITHOUT: {', '.join(dropped)} (see 'blocks_left_out' in the metrics file)")
    print(f"Upload {ctx.output_dir / 'predictions.csv'} to Kaggle (validated: {len(ctx.data.test)} rows).")
    return metrics
