"""Stage 03: the fused network on the concatenated feature blocks, and ``output/predictions.csv``.

The published network is Linear(→2000), ReLU, dropout 0.05, Linear(→18) trained with weighted BCE.
Blocks are named in ``fusion.blocks`` (``image``, ``caption``, ``detector`` …: the registry's block stages).
For each, the key is computed from the current configuration and exactly that artifact is read — or the
stage stops with a one-line error naming the stage to run. A block whose stage needs an asset that cannot
be had (the detector without COCO weights) is left out, loudly, and the metrics file says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import assets, registry
from ..config import Config
from ..engine.atomic import write_json
from ..engine.trainer import model_size_mb
from ..evaluation.thresholds import decide
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
        stage = registry.get(name)
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
    """Concatenate the named blocks (float32), each the artifact of the current settings, rows checked."""
    train_ids = ctx.data.train["ImageID"].to_numpy(str)
    test_ids = ctx.data.test["ImageID"].to_numpy(str)
    train_parts, test_parts, used = [], [], {}
    for name in names:
        block = ctx.require(name)
        for part, ids in (("train", train_ids), ("test", test_ids)):
            if not np.array_equal(block[f"{part}_ids"], ids):
                raise ValueError(f"{block.dir}: its {part} ImageIDs differ from {ctx.data.root}; "
                                 f"re-run {registry.get(name).script}")
        train_parts.append(np.asarray(block["train"], dtype=np.float32))
        test_parts.append(np.asarray(block["test"], dtype=np.float32))
        used[name] = {"key": block.key, "dim": int(block["train"].shape[1]), "dir": str(block.dir)}
    return np.concatenate(train_parts, 1), np.concatenate(test_parts, 1), used


def comparison(ctx: base.StageContext) -> list[dict[str, Any]]:
    """Every stage's validation mean-F1 from its metrics file — only where the file describes the artifact of the
    current settings (a stale file from other settings is left out, not compared)."""
    rows = []
    for name in list(ctx.cfg.fusion.blocks) + ["fusion"]:
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
    if "image" in used:
        parts["image backbone"] = ctx.require("image").info.get("backbone_size_mb")
    if "caption" in used:
        parts["caption network (with its embedding rows)"] = ctx.require("caption").info.get("checkpoint_mb")
    if "detector" in used:
        detector = ctx.require("detector")
        weights = Path(detector.info.get("weights", ""))
        parts["detector weights"] = round(weights.stat().st_size / 2**20, 1) if weights.is_file() else None
    parts["fusion network"] = fusion_mb
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
    run_dir = ctx.run_dir("fusion", {"fusion": shaping, "inputs": {k: v["key"] for k, v in used.items()}})
    model, result, val_probs, test_probs = train_on_features(
        ctx, train_x, test_x, hs, run_dir=run_dir, name="fusion", resume=resume, settings=ctx.spec())
    ctx.store.save("fusion", ctx.key(), ctx.spec(), {
        "train_probs_val": val_probs.astype(np.float32), "val_idx": ctx.val_idx,
        "test_probs": test_probs.astype(np.float32), "test_ids": ctx.data.test["ImageID"].to_numpy(str)},
        {"run_dir": str(run_dir), "blocks": used})
    size = predictor_size_mb(ctx, used, model_size_mb(model))
    extra = {"blocks": used, "blocks_asked": asked, "blocks_left_out": dropped, "best_epoch": result.best_epoch,
             "train_seconds": round(result.seconds, 1), "run_dir": str(run_dir), "model_size": size}
    metrics = base.finish(ctx, val_probs, test_probs, history=result.history, extra=extra,
                          submission_path=ctx.output_dir / "predictions.csv")
    rows = comparison(ctx)
    metrics["comparison"] = rows
    metrics["figures"]["per_class_f1_all_stages"] = str(reports.per_class_f1(
        {r["key"]: r["per_class_f1"] for r in rows}, ctx.output_dir / "figures" / "per_class_f1_all_stages.png",
        "Per-class validation F1 of every stage (tuned thresholds)"))
    metrics["figures"]["error_cooccurrence"] = str(reports.error_cooccurrence(
        ctx.y_val, decide(val_probs, np.asarray(metrics["thresholds"]), at_least_one=cfg.thresholds.at_least_one),
        ctx.output_dir / "figures" / "fusion_error_cooccurrence.png",
        "Fused network: wrong predictions vs the image's true labels (validation)"))
    write_json(ctx.output_dir / "metrics" / "fusion.json", metrics)  # now naming every figure
    print("\nValidation mean-F1 of every stage (thresholds: 0.5 / one tuned global / tuned per class):")
    print(format_table(rows))
    print(f"\nModel size to predict a new image+caption: {size['total_mb']} MB "
          f"({'within' if size['within_limit'] else 'OVER'} the {MODEL_SIZE_LIMIT_MB} MB limit)")
    if dropped:
        print(f"[fusion] fused WITHOUT: {', '.join(dropped)} (see 'blocks_left_out' in the metrics file)")
    print(f"Upload {ctx.output_dir / 'predictions.csv'} to Kaggle (validated: {len(ctx.data.test)} rows).")
    return metrics
