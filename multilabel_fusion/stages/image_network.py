"""Stage 01: the image network — ImageNet backbones, cached features, optional fine-tuning, CNN submission.

Default (fast on a CPU): a frozen backbone turns every train and test image into one pooled feature
vector, kept as an artifact keyed by the backbone, its weights' identity and the image size; a small MLP head
is trained on it. Fine-tune mode (the published first network): backbone + 18-way head trained end to end
with albumentations augmentation, then features are extracted from the fine-tuned backbone. Both write the
CNN-only submission.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import assets
from ..config import Config
from ..data.images import ImageFiles, augmentation, image_loader
from ..engine import trainer
from ..engine.inference import extract, prepare_inference
from ..engine.precision import training_precision
from ..engine.trainer import model_size_mb
from ..networks.backbones import Backbone, BackboneEnsemble, ImageClassifier, build_backbone
from ..networks.heads import HeadSettings, train_on_features
from . import base

PREPROCESSING_VERSION = 2  # bump when decoding/resizing changes, so old features are not reused
FINE_TUNE_KEYS = ("lr", "batch_size", "epochs", "patience", "max_train_images", "augment", "label1_weight")
HEAD_KEYS = ("head_input", "head_hidden", "head_dropout", "head_lr", "head_batch_size", "label1_weight")  # head_epochs/patience: how long


def artifact_spec(cfg: Config) -> dict[str, Any]:
    """What the image features depend on: backbone and the identity of its weights, image size, precision
    setting, storage dtype, and — in fine-tune mode — everything that shapes the fine-tuned weights."""
    ci = cfg.image
    weights = assets.backbone_weights(ci)
    settings = {k: ci[k] for k in ("backbone", "weights", "offline_fallback", "image_size", "feature_dtype",
                                   "cpu_precision", "fine_tune", "depth_features", "hflip_average")}
    settings["bad_images"] = {"policy": cfg.data.bad_images, "replaced": base.replaced_images(cfg)}
    spec: dict[str, Any] = {"settings": settings, "version": PREPROCESSING_VERSION,
                            "assets": {"backbone": {"name": weights.name, "identity": weights.identity}}}
    if ci.fine_tune:
        from .. import registry

        settings["fine_tune_settings"] = {k: ci[k] for k in FINE_TUNE_KEYS}
        spec["common"] = registry.common_settings(cfg)
    return spec


def fine_tune(ctx: base.StageContext, backbone: Backbone, resume: bool, workers: int):
    """Train backbone + head end to end on the fit part; returns (classifier, FitResult)."""
    ci = ctx.cfg.image
    if isinstance(backbone, BackboneEnsemble):
        raise ValueError(f"config: image.fine_tune: {backbone.name} is an ensemble of backbones; fine-tuning trains one "
                         "(set image.backbone / image.offline_fallback to a single network, or fine_tune: false)")
    fit_idx, select_idx = ctx.selection(0, ctx.train_idx, ctx.val_idx)  # the validation part is only scored
    if ci.max_train_images:
        fit_idx = np.random.default_rng(ctx.cfg.split.seed).permutation(fit_idx)[: ci.max_train_images]
    paths = ctx.data.image_paths("train")
    model = ImageClassifier(backbone)
    if ci.channels_last:
        model.to(memory_format=torch.channels_last)
    on_bad = ctx.cfg.data.bad_images
    size = int(backbone.input_size or ci.image_size)
    train_set = ImageFiles([paths[i] for i in fit_idx], size, augmentation(size, ci.augment),
                           ctx.targets[fit_idx], on_bad=on_bad)
    select_set = ImageFiles([paths[i] for i in select_idx], size, None, ctx.targets[select_idx], on_bad=on_bad)
    optimizer = torch.optim.Adam(model.parameters(), lr=ci.lr)
    shaping = {k: v for k, v in ctx.spec()["settings"].items()}
    shaping["fine_tune_settings"] = {k: v for k, v in shaping["fine_tune_settings"].items()
                                     if k not in ("epochs", "patience")}
    run_dir = ctx.run_dir(f"image_finetune_{backbone.name}", {"settings": shaping,
                                                               "assets": ctx.spec()["assets"]})
    result = trainer.fit(
        model,
        image_loader(train_set, ci.batch_size, workers, shuffle=True, seed=ctx.cfg.trainer.seed),
        image_loader(select_set, ci.batch_size, workers),
        ctx.targets[select_idx],
        loss_fn=trainer.weighted_bce(ci.label1_weight),
        optimizer=optimizer,
        run_dir=run_dir,
        epochs=ci.epochs,
        patience=ci.patience,
        device=ctx.device,
        precision=training_precision(ctx.device, ctx.cfg.trainer.mixed_precision),
        resume=resume,
        settings={**ctx.spec(), "n_fit": len(fit_idx)},
        name=f"image-finetune-{backbone.name}",
    )
    result.extra["n_fit"] = len(fit_idx)
    result.extra["run_dir"] = str(run_dir)
    return model, result


def extract_block(ctx: base.StageContext, backbone: Backbone, workers: int, head: torch.nn.Module | None = None,
                  bad_images: list[str] | None = None):
    """Extract every train and test image straight into the artifact's files (atomic: an interrupted run leaves
    nothing usable). A fine-tuned network's own head scores the features in the same pass."""
    ci = ctx.cfg.image
    plan = prepare_inference(backbone, ci, ctx.device, ctx.cfg.trainer.mixed_precision,
                             depths=bool(ci.depth_features), hflip=bool(ci.hflip_average))
    depth_dims = plan.depth_dims()
    key = ctx.key()
    print(f"[image] extracting {backbone.name} features of {len(ctx.data.train) + len(ctx.data.test)} images -> "
          f"{ctx.store.dir('image', key)}")
    with ctx.store.writer("image", key, ctx.spec()) as w:
        timings = []
        for part in ("train", "test"):
            paths = ctx.data.image_paths(part)
            out = w.array(part, (len(paths), backbone.dim), ci.feature_dtype)
            depths = w.array(f"{part}_depths", (len(paths), sum(depth_dims)), ci.feature_dtype) if plan.depths else None
            timings.append(extract(plan, paths, workers, out, f"{part} images", on_bad=ctx.cfg.data.bad_images,
                                   depths_out=depths)[1])
            if head is not None:
                with torch.no_grad():
                    w.put(f"{part}_probs", torch.sigmoid(head.cpu().eval()(torch.from_numpy(
                        np.asarray(out, dtype=np.float32)))).numpy())
        w.put("train_ids", ctx.data.train["ImageID"].to_numpy(str))
        w.put("test_ids", ctx.data.test["ImageID"].to_numpy(str))
        n, seconds = sum(t["images"] for t in timings), sum(t["seconds"] for t in timings)
        w.info["extraction"] = {"images": n, "seconds": round(seconds, 1),
                                "images_per_s": round(n / max(seconds, 1e-9), 1), "device": str(ctx.device),
                                "cpu": base.cpu_name(), "cpu_count": os.cpu_count(), "loader_workers": workers,
                                "torch_threads": torch.get_num_threads(), **plan.choices}
        w.info["backbone"] = {"name": backbone.name, "weights_used": backbone.weights_used, "dim": backbone.dim}
        w.info["backbone_size_mb"] = model_size_mb(backbone)
        w.info["depth_dims"] = depth_dims  # widths of {part}_depths, stage by stage; the last = the pooled features
        w.info["bad_images"] = bad_images or []
    return ctx.store.load("image", key)


def block_spec(cfg: Config, block: str) -> dict[str, Any] | None:
    """The out-of-fold head probabilities also depend on the head's settings, the folds and the seed."""
    from .. import registry

    if block != "image_probs":
        return None
    ci = cfg.image
    return {"head": {k: ci[k] for k in HEAD_KEYS + ("head_epochs", "head_patience")},
            "common": registry.common_settings(cfg)}


def block_artifact_kind(block: str) -> str | None:
    """The head's out-of-fold probabilities are kept apart from the features (other settings shape them)."""
    return "image_head" if block == "image_probs" else None


def block_arrays(ctx: base.StageContext, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``image``: pooled features; ``image_depths``: every stage's pooled output; ``image_probs``: the head's
    out-of-fold probabilities."""
    if name == "image_probs":
        from .. import registry

        key = registry.block_key("image_probs", ctx.cfg, ctx.fingerprint)
        found = ctx.store.require("image_head", key, f"{ctx.stage.script if ctx.stage.name == 'image' else 'stages/01_image_network.py'}")
        return found["probs"], found["test_probs"]
    block = ctx.require("image")
    if name == "image_depths":
        if "train_depths" not in block:
            raise ValueError(f"{block.dir}: no multi-depth features (image.depth_features was off)")
        return block["train_depths"], block["test_depths"]
    return block["train"], block["test"]


def train_head(ctx: base.StageContext, block, resume: bool):
    """One MLP head per fold on the frozen features: out-of-fold probabilities for every training record, test
    probabilities averaged over the fold models (kept as the ``image_head`` artifact)."""
    from .. import registry

    ci = ctx.cfg.image
    key = registry.block_key("image_probs", ctx.cfg, ctx.fingerprint)
    found = ctx.store.load("image_head", key)
    if found is not None:
        print(f"[image] reusing the head's out-of-fold probabilities {found.dir}")
        return found
    hs = HeadSettings(ci.head_hidden, ci.head_dropout, ci.head_lr, ci.head_batch_size, ci.head_epochs,
                      ci.head_patience, ci.label1_weight)
    parts = ("train", "test") if ci.head_input == "pooled" else ("train_depths", "test_depths")
    if parts[0] not in block:
        raise ValueError(f"{block.dir}: image.head_input=depths needs image.depth_features=true")
    train_x, test_x = (np.asarray(block[part], dtype=np.float32) for part in parts)
    histories = []

    def fold(k, fit_idx, held_idx):
        run_dir = ctx.run_dir("image_head", {"features": ctx.key(), "head": {k2: ci[k2] for k2 in HEAD_KEYS},
                                             "fold": [k, len(ctx.folds)]})
        head, result, held, test = train_on_features(
            ctx, train_x, test_x, hs, fold=k, fit_idx=fit_idx, held_idx=held_idx, run_dir=run_dir, name="image_head",
            settings={"features": ctx.key(), "fold": k, **{k2: ci[k2] for k2 in HEAD_KEYS}}, resume=resume)
        histories.append(result.history.assign(fold=k))
        return {"probs": held}, {"test_probs": test}, {"best_epoch": result.best_epoch, "run_dir": str(run_dir),
                                                        "seconds": round(result.seconds, 1),
                                                        "head_size_mb": model_size_mb(head)}

    cf = base.cross_fit(ctx, fold)
    history = pd.concat(histories, ignore_index=True)
    return ctx.store.save("image_head", key, {"features": ctx.key(), **block_spec(ctx.cfg, "image_probs")},
                          {"probs": cf.held["probs"], "test_probs": cf.test["test_probs"]},
                          {"folds": cf.folds, "history": base._records(history)})


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    """Stage 01 end to end: backbone → (fine-tune) → features (artifact) → head per fold → CNN submission + metrics."""
    ctx = base.prepare(cfg, "image", demo_mode)
    ci = cfg.image
    workers = trainer.num_workers(cfg.trainer.num_workers, ctx.device)
    weights = assets.backbone_weights(ci)
    extra: dict[str, Any] = {"backbone": weights.name, "weights_used": weights.extra.get("description"),
                             "weights": weights.record(), "requested_backbone": ci.backbone,
                             "mode": "fine-tune" if ci.fine_tune else "frozen", "image_size": ci.image_size}
    history = None
    block = ctx.store.load("image", ctx.key(), mmap=True)
    if block is None:
        bad = ctx.bad_images()
        backbone = build_backbone(weights, ci.image_size)
        head = None
        if ci.fine_tune:
            classifier, result = fine_tune(ctx, backbone, resume, workers)
            history, head = result.history, classifier.head
            extra.update({"fine_tune_best_epoch": result.best_epoch, "fine_tune_best_val_mean_f1": result.best_score,
                          "fine_tune_seconds": round(result.seconds, 1), "fine_tune_reused": result.reused,
                          "fine_tune_images": result.extra["n_fit"], "fine_tune_run": result.extra["run_dir"]})
        block = extract_block(ctx, backbone, workers, head, bad)
        extra["features"] = "computed"
    else:
        print(f"[image] reusing the features {block.dir}")
        extra["features"] = "reused"
    extra.update({"artifact": str(block.dir), "extraction": block.info.get("extraction"),
                  "bad_images": block.info.get("bad_images", []), "feature_dim": int(block["train"].shape[1]),
                  "depth_dims": block.info.get("depth_dims")})
    if ci.fine_tune:  # one fine-tuned network (fold 1's fit part): not cross-fitted, so said loudly
        probs = np.asarray(block["train_probs"], dtype=np.float32)
        held_probs, test_probs = probs[ctx.val_idx], np.asarray(block["test_probs"])
        extra["fine_tune_note"] = ("fine-tuned once on the first fold's fit part: figures are on its held-out part, "
                                   "and the features of the other training records are in-sample")
        if len(ctx.folds) > 1:
            print(f"[image] WARNING: {extra['fine_tune_note']}")
            ctx.folds = ctx.folds[:1]
    else:
        head = train_head(ctx, block, resume)
        held_probs, test_probs = np.asarray(head["probs"])[ctx.eval_idx], np.asarray(head["test_probs"])
        history = pd.DataFrame(head.info.get("history", []))
        history = history[history["fold"] == 0] if len(history) else history
        extra.update({"head_folds": head.info.get("folds"), "head_artifact": str(head.dir)})
    extra["backbone_size_mb"] = block.info.get("backbone_size_mb")
    bench = base.load_metrics(ctx.output_dir, "image_benchmark")
    figures = {}
    if bench:  # the throughput figures of `--bench`, measured on this machine, travel with the stage's metrics
        extra["benchmark"] = bench
        if (ctx.output_dir / "figures" / "image_benchmark.png").is_file():
            figures["extraction_throughput"] = ctx.output_dir / "figures" / "image_benchmark.png"
    return base.finish(ctx, held_probs, test_probs, history=history, extra=extra, extra_figures=figures)
