"""Stage 03: the fused network on the concatenated cached feature blocks, and ``output/predictions.csv``.

The published network is Linear(→2000), ReLU, dropout 0.05, Linear(→18) trained with weighted BCE.
Blocks are read by name (``fusion.blocks``: ``image``, ``caption``, ``detector`` …) from the caches
the other stages wrote, and checked to describe the same records in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import pipeline, reports
from .atomic import write_json
from .cache import load_block
from .config import Config
from .heads import HeadSettings, train_on_features
from .thresholds import decide
from .trainer import model_size_mb

COMPARED_STAGES = ("image", "caption", "detector", "fusion")
MODEL_SIZE_LIMIT_MB = 100


def load_features(ctx: pipeline.StageContext, names: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Concatenate the named blocks (float32), checking each matches the data's records and order."""
    train_ids = ctx.data.train["ImageID"].to_numpy(str)
    test_ids = ctx.data.test["ImageID"].to_numpy(str)
    train_parts, test_parts, used = [], [], {}
    for name in names:
        block = load_block(ctx.output_dir, name, ctx.fingerprint)
        for part, ids in (("train", train_ids), ("test", test_ids)):
            if not np.array_equal(block[f"{part}_ids"], ids):
                raise ValueError(f"cached '{name}' block: its {part} ImageIDs differ from {ctx.data.root}; "
                                 f"re-run the stage that writes it")
        train_parts.append(block["train"].astype(np.float32))
        test_parts.append(block["test"].astype(np.float32))
        used[name] = {"key": block["manifest"]["key"], "dim": int(block["train"].shape[1])}
    return np.concatenate(train_parts, 1), np.concatenate(test_parts, 1), used


def comparison(output_dir) -> list[dict[str, Any]]:
    """Every stage's validation mean-F1 (from its metrics file), for the closing table."""
    rows = []
    for stage in COMPARED_STAGES:
        m = pipeline.load_metrics(output_dir, stage)
        if m:
            rows.append({"stage": m["title"], "at_0.5": m["val_mean_f1_at_0.5"],
                         "global": m["val_mean_f1_global_threshold"], "tuned": m["val_mean_f1_tuned"],
                         "key": stage, "per_class_f1": m["per_class"]["f1"], "blocks": m.get("blocks")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<22} {'F1 @0.5':>8} {'global':>8} {'tuned':>8}", "-" * 49]
    lines += [f"{r['stage']:<22} {r['at_0.5']:>8.4f} {r['global']:>8.4f} {r['tuned']:>8.4f}" for r in rows]
    return "\n".join(lines)


def predictor_size_mb(output_dir, models_dir, fusion_mb: float) -> dict[str, Any]:
    """Size of everything needed to predict a new image and caption: backbone, caption network, fusion."""
    image = pipeline.load_metrics(output_dir, "image") or {}
    caption_checkpoint = Path(models_dir) / "caption" / "best.pt"  # the network with its embedding rows
    parts = {"image backbone": image.get("backbone_size_mb"),
             "caption network (with its embedding rows)":
                 round(caption_checkpoint.stat().st_size / 2**20, 1) if caption_checkpoint.is_file() else None,
             "fusion network": fusion_mb}
    known = {k: v for k, v in parts.items() if v is not None}
    total = round(sum(known.values()), 1)
    return {"parts_mb": parts, "total_mb": total, "limit_mb": MODEL_SIZE_LIMIT_MB,
            "within_limit": total <= MODEL_SIZE_LIMIT_MB}


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False, args=None) -> dict[str, Any]:
    ctx = pipeline.prepare(cfg, demo_mode)
    cf = cfg.fusion
    train_x, test_x, used = load_features(ctx, list(cf.blocks))
    described = ", ".join(f"{name} ({block['dim']})" for name, block in used.items())
    print(f"[fusion] blocks {described} -> {train_x.shape[1]} features")
    hs = HeadSettings(cf.hidden, cf.dropout, cf.lr, cf.batch_size, cf.epochs, cf.patience, cf.label1_weight,
                      cf.grad_clip, plateau_patience=cf.plateau_patience, plateau_factor=cf.plateau_factor)
    model, result, val_probs, test_probs = train_on_features(
        ctx, train_x, test_x, hs, name="fusion", resume=resume,
        settings={**ctx.run_settings("fusion"), "blocks": {k: v["key"] for k, v in used.items()}})
    size = predictor_size_mb(ctx.output_dir, ctx.models_dir, model_size_mb(model))
    extra = {"blocks": used, "best_epoch": result.best_epoch, "train_seconds": round(result.seconds, 1),
             "model_size": size}
    metrics = pipeline.finish(ctx, "fusion", val_probs, test_probs, history=result.history, extra=extra,
                              submission_path=ctx.output_dir / "predictions.csv")
    rows = comparison(ctx.output_dir)
    metrics["figures"]["per_class_f1_all_stages"] = str(reports.per_class_f1(
        {r["key"]: r["per_class_f1"] for r in rows}, ctx.output_dir / "figures" / "per_class_f1_all_stages.png",
        "Per-class validation F1 of every stage (tuned thresholds)"))
    metrics["figures"]["error_cooccurrence"] = str(reports.error_cooccurrence(
        ctx.y_val, decide(val_probs, np.asarray(metrics["thresholds"])),
        ctx.output_dir / "figures" / "fusion_error_cooccurrence.png",
        "Fused network: wrong predictions vs the image's true labels (validation)"))
    write_json(ctx.output_dir / "metrics" / "fusion.json", metrics)  # now naming every figure
    print("\nValidation mean-F1 of every stage (thresholds: 0.5 / one tuned global / tuned per class):")
    print(format_table(rows))
    print(f"\nModel size to predict a new image+caption: {size['total_mb']} MB "
          f"({'within' if size['within_limit'] else 'OVER'} the {MODEL_SIZE_LIMIT_MB} MB limit)")
    print(f"Upload {ctx.output_dir / 'predictions.csv'} to Kaggle (validated: {len(ctx.data.test)} rows).")
    return metrics
