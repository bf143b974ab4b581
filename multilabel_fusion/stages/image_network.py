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
from ..engine.artifacts import pick_rows
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


def fine_tune(ctx: base.StageContext, backbone: Backbone, k: int, fit_idx: np.ndarray, held_idx: np.ndarray,
              resume: bool, workers: int):
    """Train backbone + head end to end on fold ``k``'s fit part (its selection share chooses the epoch; the
    held-out rows are never seen); returns (classifier with its best weights, FitResult)."""
    ci = ctx.cfg.image
    if isinstance(backbone, BackboneEnsemble):
        raise ValueError(f"config: image.fine_tune: {backbone.name} is an ensemble of backbones; fine-tuning trains one "
                         "(set image.backbone / image.offline_fallback to a single network, or fine_tune: false)")
    train_idx, select_idx = ctx.selection(k, fit_idx, held_idx)
    if ci.max_train_images:
        train_idx = np.random.default_rng(ctx.cfg.split.seed + k).permutation(train_idx)[: ci.max_train_images]
    paths = ctx.data.image_paths("train")
    torch.manual_seed(ctx.cfg.trainer.seed + k)  # the head's initialisation: the same whatever ran before
    model = ImageClassifier(backbone)
    if ci.channels_last:
        model.to(memory_format=torch.channels_last)
    on_bad = ctx.cfg.data.bad_images
    size = int(backbone.input_size or ci.image_size)
    train_set = ImageFiles([paths[i] for i in train_idx], size, augmentation(size, ci.augment),
                           ctx.targets[train_idx], on_bad=on_bad)
    select_set = ImageFiles([paths[i] for i in select_idx], size, None, ctx.targets[select_idx], on_bad=on_bad)
    optimizer = torch.optim.Adam(model.parameters(), lr=ci.lr)
    shaping = {k2: v for k2, v in ctx.spec()["settings"].items()}
    shaping["fine_tune_settings"] = {k2: v for k2, v in shaping["fine_tune_settings"].items()
                                     if k2 not in ("epochs", "patience")}
    run_dir = ctx.run_dir(f"image_finetune_{backbone.name}", {"settings": shaping, "assets": ctx.spec()["assets"],
                                                               "fold": [k, len(ctx.folds)]})
    result = trainer.fit(
        model,
        image_loader(train_set, ci.batch_size, workers, shuffle=True, seed=ctx.cfg.trainer.seed + k),
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
        settings={**ctx.spec(), "fold": k, "n_fit": len(train_idx)},
        name=f"image-finetune-{backbone.name} fold {k + 1}",
    )
    result.extra["n_fit"] = len(train_idx)
    result.extra["run_dir"] = str(run_dir)
    return model, result


def _plan(ctx: base.StageContext, backbone: Backbone):
    ci = ctx.cfg.image
    return prepare_inference(backbone, ci, ctx.device, ctx.cfg.trainer.mixed_precision,
                             depths=bool(ci.depth_features), hflip=bool(ci.hflip_average))


def _extraction_info(ctx: base.StageContext, choices: dict[str, Any], depth_dims: list[int], workers: int,
                     timings: list[dict], bad_images: list[str] | None) -> dict[str, Any]:
    """What the artifact's info says about an extraction: throughput, machine, the inference plan's choices."""
    n, seconds = sum(t["images"] for t in timings), sum(t["seconds"] for t in timings)
    return {"extraction": {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / max(seconds, 1e-9), 1),
                           "device": str(ctx.device), "cpu": base.cpu_name(), "cpu_count": os.cpu_count(),
                           "loader_workers": workers, "torch_threads": torch.get_num_threads(), **choices},
            "depth_dims": depth_dims,  # widths of {part}_depths, stage by stage; the last = the pooled features
            "bad_images": bad_images or []}


def extract_block(ctx: base.StageContext, backbone: Backbone, workers: int, bad_images: list[str] | None = None):
    """Extract every train and test image with the frozen backbone straight into the artifact's files (atomic: an
    interrupted run leaves nothing usable)."""
    ci = ctx.cfg.image
    plan = _plan(ctx, backbone)
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
        w.put("train_ids", ctx.data.train["ImageID"].to_numpy(str))
        w.put("test_ids", ctx.data.test["ImageID"].to_numpy(str))
        w.info.update(_extraction_info(ctx, plan.choices, depth_dims, workers, timings, bad_images))
        w.info["backbone"] = {"name": backbone.name, "weights_used": backbone.weights_used, "dim": backbone.dim}
        w.info["backbone_size_mb"] = model_size_mb(backbone)
    return ctx.store.load("image", key)


def fine_tuned_block(ctx: base.StageContext, weights, workers: int, resume: bool,
                     bad_images: list[str] | None = None):
    """Cross-fitted fine-tuning: one backbone + head per fold, fine-tuned from the pretrained weights on the fold's
    fit part. A training record's features and probabilities come from the network of the fold that held it out
    (so they are out of fold, like the caption network's); the test records' are the mean over the fold networks.
    With ``split.folds: 1`` the fit rows get the one network's (in-sample) features."""
    ci = ctx.cfg.image
    train_paths, test_paths = ctx.data.image_paths("train"), ctx.data.image_paths("test")
    timings, histories, in_sample = [], [], {}
    described: list = []  # the first fold's inference plan, for the artifact's info

    def rows(model, plan, paths, desc):
        feats = np.empty((len(paths), model.backbone.dim), dtype=np.float32)
        depths = np.empty((len(paths), sum(plan.depth_dims())), dtype=np.float32) if plan.depths else None
        _, timing = extract(plan, paths, workers, feats, desc, on_bad=ctx.cfg.data.bad_images, depths_out=depths)
        timings.append(timing)
        with torch.no_grad():
            probs = torch.sigmoid(model.head.cpu().eval()(torch.from_numpy(feats))).numpy()
        out = {"": feats, "_probs": probs}
        if depths is not None:
            out["_depths"] = depths
        return out

    def fold(k, fit_idx, held_idx):
        backbone = build_backbone(weights, ci.image_size)
        model, result = fine_tune(ctx, backbone, k, fit_idx, held_idx, resume, workers)
        histories.append(result.history.assign(fold=k))
        plan = _plan(ctx, model.backbone)
        if not described:  # its choices, not the plan itself: keeping every fold's network would hold K in memory
            described.append((plan.choices, plan.depth_dims(), model_size_mb(model.backbone)))
        if len(ctx.folds) == 1:  # one split: the fit rows get the one network's (in-sample) features
            in_sample.update({f"train{s}": v for s, v in rows(model, plan, train_paths, "train images").items()})
        held = rows(model, plan, [train_paths[i] for i in held_idx], f"fold {k + 1}: held-out images")
        test = rows(model, plan, test_paths, f"fold {k + 1}: test images")
        return ({f"train{s}": v for s, v in held.items()}, {f"test{s}": v for s, v in test.items()},
                {"best_epoch": result.best_epoch, "best_select_mean_f1": result.best_score,
                 "seconds": round(result.seconds, 1), "reused": result.reused, "images": result.extra["n_fit"],
                 "run": result.extra["run_dir"]})

    print(f"[image] fine-tuning {weights.name} on each of {len(ctx.folds)} fold(s), then extracting its held-out "
          f"and test images -> {ctx.store.dir('image', ctx.key())}")
    cf = base.cross_fit(ctx, fold)
    arrays = {**cf.held, **cf.test}
    for name, values in in_sample.items():
        missing = np.isnan(arrays[name]).any(1)
        arrays[name][missing] = values[missing]
    with ctx.store.writer("image", ctx.key(), ctx.spec()) as w:
        for name, values in arrays.items():
            w.put(name, values.astype(np.float32 if name.endswith("_probs") else ci.feature_dtype))
        w.put("train_ids", ctx.data.train["ImageID"].to_numpy(str))
        w.put("test_ids", ctx.data.test["ImageID"].to_numpy(str))
        choices, depth_dims, size_mb = described[0]
        w.info.update(_extraction_info(ctx, choices, depth_dims, workers, timings, bad_images))
        w.info["backbone"] = {"name": weights.name, "weights_used": weights.extra.get("description"),
                              "dim": int(arrays["train"].shape[1])}
        w.info["backbone_size_mb"] = size_mb
        w.info["fine_tune"] = {"folds": cf.folds, "history": base._records(pd.concat(histories, ignore_index=True)),
                               "out_of_fold": len(ctx.folds) > 1, "test": "mean over the fold networks"}
    return ctx.store.load("image", ctx.key())


def rows_for(cfg: Config, art, picks: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The frozen features of other records of the same photos (``picks[part] = (source part, source rows)``), so
    a derived data set (the held-out check) extracts nothing again; None in fine-tune mode, where a record's
    features depend on which records trained the networks."""
    if cfg.image.fine_tune:
        return None
    return pick_rows(art, picks)


def block_spec(cfg: Config, block: str) -> dict[str, Any] | None:
    """The out-of-fold head probabilities also depend on the head's settings, the folds and the seed."""
    from .. import registry

    if block != "image_probs":
        return None
    ci = cfg.image
    head = ("the fine-tuned networks' own heads" if ci.fine_tune
            else {k: ci[k] for k in HEAD_KEYS + ("head_epochs", "head_patience")})
    return {"head": head, "common": registry.common_settings(cfg)}


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


def fine_tuned_probs(ctx: base.StageContext, block):
    """The block ``image_probs`` in fine-tune mode: the fold networks' own heads (out of fold; test rows averaged),
    kept where the frozen mode keeps its head's probabilities."""
    from .. import registry

    key = registry.block_key("image_probs", ctx.cfg, ctx.fingerprint)
    found = ctx.store.load("image_head", key)
    if found is not None:
        return found
    return ctx.store.save("image_head", key, {"features": ctx.key(), **block_spec(ctx.cfg, "image_probs")},
                          {"probs": np.asarray(block["train_probs"], dtype=np.float32),
                           "test_probs": np.asarray(block["test_probs"], dtype=np.float32)},
                          {"folds": block.info["fine_tune"]["folds"], "history": block.info["fine_tune"]["history"]})


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    """Stage 01 end to end: backbone → (fine-tune) → features (artifact) → head per fold → CNN submission + metrics."""
    ctx = base.prepare(cfg, "image", demo_mode)
    ci = cfg.image
    workers = trainer.num_workers(cfg.trainer.num_workers, ctx.device)
    weights = assets.backbone_weights(ci)
    extra: dict[str, Any] = {"backbone": weights.name, "weights_used": weights.extra.get("description"),
                             "weights": weights.record(), "requested_backbone": ci.backbone,
                             "mode": "fine-tune" if ci.fine_tune else "frozen", "image_size": ci.image_size}
    block = ctx.store.load("image", ctx.key(), mmap=True)
    if block is None:
        bad = ctx.bad_images()
        if ci.fine_tune:
            block = fine_tuned_block(ctx, weights, workers, resume, bad)
        else:
            block = extract_block(ctx, build_backbone(weights, ci.image_size), workers, bad)
        extra["features"] = "computed"
    else:
        print(f"[image] reusing the features {block.dir}")
        extra["features"] = "reused"
    extra.update({"artifact": str(block.dir), "extraction": block.info.get("extraction"),
                  "bad_images": block.info.get("bad_images", []), "feature_dim": int(block["train"].shape[1]),
                  "depth_dims": block.info.get("depth_dims")})
    if ci.fine_tune:
        head = fine_tuned_probs(ctx, block)
        tuned = block.info["fine_tune"]
        extra["fine_tune_folds"] = tuned["folds"]
        extra["fine_tune_images"] = [f["images"] for f in tuned["folds"]]
        history = pd.DataFrame(tuned["history"])
    else:
        head = train_head(ctx, block, resume)
        history = pd.DataFrame(head.info.get("history", []))
        extra["head_folds"] = head.info.get("folds")
    held_probs, test_probs = np.asarray(head["probs"])[ctx.eval_idx], np.asarray(head["test_probs"])
    history = history[history["fold"] == 0] if len(history) else history
    extra["head_artifact"] = str(head.dir)
    extra["backbone_size_mb"] = block.info.get("backbone_size_mb")
    bench = base.load_metrics(ctx.output_dir, "image_benchmark")
    figures = {}
    if bench:  # the throughput figures of `--bench`, measured on this machine, travel with the stage's metrics
        extra["benchmark"] = bench
        if (ctx.output_dir / "figures" / "image_benchmark.png").is_file():
            figures["extraction_throughput"] = ctx.output_dir / "figures" / "image_benchmark.png"
    return base.finish(ctx, held_probs, test_probs, history=history, extra=extra, extra_figures=figures)
