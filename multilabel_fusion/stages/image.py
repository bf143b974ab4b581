"""Stage 01: the image network (network 1 of the three-network report) — ImageNet backbones, cached features,
optional fine-tuning, the CNN submission.

Default (fast on a CPU): a frozen backbone turns every train and test image into one pooled feature vector, kept as
an artifact keyed by the backbone, its weights' identity and the image size; a small MLP head is trained on it per
fold. Fine-tune mode (the published first network): backbone + 18-way head trained end to end per fold with
albumentations augmentation; features and probabilities then come from the fold networks. Both write the CNN-only
submission. Blocks: ``image`` (pooled features), ``image_depths`` (every backbone stage's pooled output),
``image_probs`` (the head's out-of-fold probabilities).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.images import ImageFiles, augmentation, image_loader
from ..features import openvino_engine
from ..features.inference import extract, prepare_inference
from ..io.artifacts import Artifact, pick_rows
from ..networks.backbones import Backbone, BackboneEnsemble, ImageClassifier, build_backbone, weights_transform
from ..networks.device import model_size_mb, num_workers
from ..networks.heads import MLPHead
from ..networks.precision import training_precision
from ..settings import Settings, common_settings
from ..training import trainer
from ..training.crossfit import cross_fit, fill_in_sample
from ..training.heads import HeadSettings, predict_heads, train_head
from .base import (BlockPredictor, NewRecords, PredictorUnavailable, Stage, best_weights, load_module, load_tensors,
                   mlp_head, module_bytes, tensor_bytes)
from .context import StageContext, Workspace
from .outputs import cpu_name, finish, load_metrics, records

log = logging.getLogger(__name__)

PREPROCESSING_VERSION = 2  # bump when decoding/resizing changes, so old features are not reused
HEAD_KIND = "image_head"  # artifact kind of the head's out-of-fold probabilities (keyed by the block's key)


class ImageNetwork(Stage):
    name = "image"
    number = "01"
    title = "image network"
    module = "image_network"
    section = "image"
    reads_images = True
    blocks = ("image", "image_depths", "image_probs")
    writes = "pooled CNN features of every image, out-of-fold head probabilities, CNN-only submission"
    summary = "image features + CNN-only submission"
    about = ("A ResNet50 (ImageNet weights) turns every photo into a 2048-d feature vector, kept in "
             "`output/artifacts/image/<key>/` (the key names the backbone, its weights and the image size); a small "
             "head trained per fold on those features gives out-of-fold probabilities (the block `image_probs` of "
             "the fused network) and the CNN-only submission `output/submission_image.csv`. `image.fine_tune=true` "
             "runs the published end-to-end fine-tuning instead, one network per fold, so that features and "
             "probabilities of a training record still come from a network that never saw it (five fine-tunings: "
             "use a GPU).")

    # ------------------------------------------------------------------------------------------- keys
    def spec(self, ws: Workspace) -> dict[str, Any]:
        """What the image features depend on: the backbone and the identity of its weights, image size, precision
        setting, storage dtype, and — in fine-tune mode — everything that shapes the fine-tuned weights."""
        settings = ws.settings
        ci = settings.image
        weights = ws.assets.backbone_weights(ci)
        shaping = ci.shaping("features")
        shaping["bad_images"] = {"policy": settings.data.bad_images, "replaced": ws.replaced_images()}
        spec: dict[str, Any] = {"settings": shaping, "version": PREPROCESSING_VERSION,
                                "assets": {"backbone": {"name": weights.name, "identity": weights.identity}}}
        transform = weights_transform(weights, ci.eval_transform)
        if transform is not None:  # only a torchvision backbone's own transform: other backbones' keys stay as they were
            spec["transform"] = transform
        if ci.fine_tune:
            shaping["fine_tune_settings"] = ci.shaping("fine_tune")
            spec["common"] = common_settings(settings)
        return spec

    def block_spec(self, settings: Settings, block: str) -> dict[str, Any] | None:
        """The out-of-fold head probabilities also depend on the head's settings, the folds and the seed."""
        if block != "image_probs":
            return None
        head = "the fine-tuned networks' own heads" if settings.image.fine_tune else settings.image.shaping("head")
        return {"head": head, "common": common_settings(settings)}

    def block_kind(self, block: str) -> str | None:
        """The head's out-of-fold probabilities are kept apart from the features (other settings shape them)."""
        return HEAD_KIND if block == "image_probs" else None

    # ------------------------------------------------------------------------------------------- the features
    def fit(self, ctx: StageContext) -> Artifact:
        return self._features(ctx)[0]

    def _features(self, ctx: StageContext) -> tuple[Artifact, str]:
        """The features (extracted, or from the fine-tuned fold networks) and whether they were computed now."""
        def computed() -> Artifact:
            ci = ctx.settings.image
            workers = num_workers(ctx.settings.trainer.num_workers, ctx.device)
            weights = ctx.assets.backbone_weights(ci)
            bad = ctx.bad_images()
            if ci.fine_tune:
                return fine_tuned_block(ctx, weights, workers, bad)
            return extract_block(ctx, build_backbone(weights, ci.image_size, ci.eval_transform), workers, bad)

        return self.found_or_computed(ctx, "the features", computed, mmap=True)

    def head(self, ctx: StageContext, block: Artifact) -> Artifact:
        """The block ``image_probs``: one MLP head per fold on the frozen features (or, fine-tuned, the fold
        networks' own heads), kept as the ``image_head`` artifact under the block's key."""
        key = ctx.block_key("image_probs")
        found = ctx.store.load(HEAD_KIND, key)
        if found is not None:
            if not ctx.settings.image.fine_tune:
                log.info(f"[image] reusing the head's out-of-fold probabilities {found.dir}")
            return found
        spec = {"features": ctx.key(), **self.block_spec(ctx.settings, "image_probs")}
        if ctx.settings.image.fine_tune:
            return ctx.store.save(HEAD_KIND, key, spec, {
                "probs": np.asarray(block["train_probs"], dtype=np.float32),
                "test_probs": np.asarray(block["test_probs"], dtype=np.float32)},
                {"folds": block.info["fine_tune"]["folds"], "history": block.info["fine_tune"]["history"]})
        return train_heads(ctx, block, key, spec)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Backbone → (fine-tune) → features (artifact) → head per fold → CNN submission + metrics."""
        ci = ctx.settings.image
        weights = ctx.assets.backbone_weights(ci)
        extra: dict[str, Any] = {"backbone": weights.name, "weights_used": weights.extra.get("description"),
                                 "weights": weights.record(), "requested_backbone": ci.backbone,
                                 "mode": "fine-tune" if ci.fine_tune else "frozen", "image_size": ci.image_size,
                                 "transform": weights_transform(weights, ci.eval_transform) or "squash"}
        block, extra["features"] = self._features(ctx)
        extra.update({"artifact": str(block.dir), "extraction": block.info.get("extraction"),
                      "bad_images": block.info.get("bad_images", []), "feature_dim": int(block["train"].shape[1]),
                      "depth_dims": block.info.get("depth_dims")})
        head = self.head(ctx, block)
        if ci.fine_tune:
            tuned = block.info["fine_tune"]
            extra["fine_tune_folds"] = tuned["folds"]
            extra["fine_tune_images"] = [f["images"] for f in tuned["folds"]]
            history = pd.DataFrame(tuned["history"])
        else:
            history = pd.DataFrame(head.info.get("history", []))
            extra["head_folds"] = head.info.get("folds")
        held_probs, test_probs = np.asarray(head["probs"])[ctx.eval_idx], np.asarray(head["test_probs"])
        history = history[history["fold"] == 0] if len(history) else history
        extra["head_artifact"] = str(head.dir)
        extra["backbone_size_mb"] = block.info.get("backbone_size_mb")
        bench = load_metrics(ctx.output_dir, "image_benchmark")
        figures = {}
        if bench:  # the throughput figures of `--bench`, measured on this machine, travel with the stage's metrics
            extra["benchmark"] = bench
            if (ctx.output_dir / "figures" / "image_benchmark.png").is_file():
                figures["extraction_throughput"] = ctx.output_dir / "figures" / "image_benchmark.png"
        return finish(ctx, held_probs, test_probs, history=history, extra=extra, extra_figures=figures)

    # ------------------------------------------------------------------------------------------- blocks
    def block_arrays(self, ws: Workspace, block: str) -> tuple[np.ndarray, np.ndarray]:
        """``image``: pooled features; ``image_depths``: every stage's pooled output; ``image_probs``: the head's
        out-of-fold probabilities."""
        if block == "image_probs":
            found = ws.store.require(HEAD_KIND, ws.block_key("image_probs"), self.hint)
            return found["probs"], found["test_probs"]
        art = ws.require("image")
        ws.check_rows(art, self)
        if block == "image_depths":
            if "train_depths" not in art:
                raise ValueError(f"{art.dir}: no multi-depth features (image.depth_features was off)")
            return art["train_depths"], art["test_depths"]
        return art["train"], art["test"]

    def rows_for(self, settings: Settings, art: Artifact, picks: dict[str, tuple[str, np.ndarray]]):
        """The frozen features of other records of the same photos (``picks[part] = (source part, source rows)``),
        so a derived data set (the held-out check) extracts nothing again; None in fine-tune mode, where a record's
        features depend on which records trained the networks."""
        if settings.image.fine_tune:
            return None
        return pick_rows(art, picks)

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "ImagePredictor":
        ci = ws.settings.image
        if ci.fine_tune:
            raise PredictorUnavailable("image.fine_tune=true: the predictor uses the frozen backbone's features "
                                       "(image.fine_tune=false)")
        image = ws.require("image")
        extraction = str(image.info.get("extraction", {}).get("precision", "fp32"))
        precision = extraction.split()[0] if extraction.split()[0] in ("fp32", "bf16", "int8") else "fp32"  # GPU: fp32
        description = {"backbone": image.info["backbone"]["name"], "dim": image.info["backbone"]["dim"],
                       "weights_used": image.info["backbone"]["weights_used"], "image_size": ci.image_size,
                       "depth_features": bool(ci.depth_features), "hflip_average": bool(ci.hflip_average),
                       "feature_dtype": ci.feature_dtype, "cpu_precision": precision,
                       "channels_last": bool(ci.channels_last), "fuse_conv_bn": bool(ci.fuse_conv_bn),
                       "feature_batch_size": ci.feature_batch_size, "head_input": ci.head_input,
                       "head_hidden": ci.head_hidden, "head_dropout": ci.head_dropout,
                       "workers": ws.settings.trainer.num_workers, "bad_images": ws.settings.data.bad_images,
                       "mixed_precision": bool(ws.settings.trainer.mixed_precision), "key": image.key,
                       "cpu_backend": openvino_engine.same_engine(image.info.get("extraction", {}).get("backend")),
                       "gpu_decode": ci.gpu_decode}
        heads = []
        if "image_probs" in blocks:
            kind, key = ws.block_location("image_probs")
            kept = ws.store.require(kind, key, self.hint)
            heads = [mlp_head(best_weights(f["run_dir"], ws.models_dir, self), ci.head_hidden, ci.head_dropout)
                     for f in kept.info["folds"]]
        backbone = build_backbone(ws.assets.backbone_weights(ci), ci.image_size, ci.eval_transform)  # as the stage
        int8 = (tuple(np.asarray(image[INT8_FILES[name]]).tobytes() for name in INT8_FILES)
                if precision == "int8" else None)
        return ImagePredictor(blocks, description, backbone, heads, int8)


# ----------------------------------------------------------------------------------------------- computing


#: ``image.cpu_precision: int8`` calibrates on this many training photos, and checks on 16 more (a sample that
#: depends on the data only, as the features' key does).
INT8_CALIBRATION_PHOTOS = 300


#: The int8 network's files and the artifact arrays that keep them.
INT8_FILES = {"model.xml": "int8_model_xml", "model.bin": "int8_model_bin"}


def int8_calibration(paths: Sequence[Path]) -> list[Path]:
    """The training photos an int8 quantization is calibrated on (the last 16 check it), the same for every run."""
    n = min(INT8_CALIBRATION_PHOTOS + 16, len(paths))
    return [paths[i] for i in sorted(np.random.default_rng(0).choice(len(paths), n, replace=False))]


def _plan(ctx: StageContext, backbone: Backbone):
    ci = ctx.settings.image
    calibration = int8_calibration(ctx.data.image_paths("train")) if ci.cpu_precision == "int8" else None
    return prepare_inference(backbone, ci, ctx.device, ctx.settings.trainer.mixed_precision,
                             depths=bool(ci.depth_features), hflip=bool(ci.hflip_average),
                             engine_cache=ctx.settings.trainer.engine_cache, calibration=calibration)


def _extraction_info(ctx: StageContext, choices: dict[str, Any], depth_dims: list[int], workers: int,
                     timings: list[dict], bad_images: list[str] | None) -> dict[str, Any]:
    """What the artifact's info says about an extraction: throughput, machine, the inference plan's choices."""
    n, seconds = sum(t["images"] for t in timings), sum(t["seconds"] for t in timings)
    decoded = {where: sum(t["decoded_on"][where] for t in timings if "decoded_on" in t) for where in ("gpu", "cpu")}
    fallbacks = sorted({t["gpu_decode_fallback"] for t in timings if "gpu_decode_fallback" in t})
    return {"extraction": {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / max(seconds, 1e-9), 1),
                           "device": str(ctx.device), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                           "loader_workers": workers, "torch_threads": torch.get_num_threads(), **choices,
                           **({"decoded_on": decoded} if choices.get("gpu_decode") else {}),
                           **({"gpu_decode_fallback": fallbacks} if fallbacks else {})},
            "depth_dims": depth_dims,  # widths of {part}_depths, stage by stage; the last = the pooled features
            "bad_images": bad_images or []}


def extract_block(ctx: StageContext, backbone: Backbone, workers: int, bad_images: list[str] | None = None) -> Artifact:
    """Extract every train and test image with the frozen backbone straight into the artifact's files (atomic: an
    interrupted run leaves nothing usable)."""
    ci = ctx.settings.image
    plan = _plan(ctx, backbone)
    depth_dims = plan.depth_dims()
    key = ctx.key()
    log.info(f"[image] extracting {backbone.name} features of {len(ctx.data.train) + len(ctx.data.test)} images -> "
             f"{ctx.store.dir('image', key)}")
    with ctx.store.writer("image", key, ctx.spec()) as w:
        timings = []
        for part in ("train", "test"):
            paths = ctx.data.image_paths(part)
            out = w.array(part, (len(paths), backbone.dim), ci.feature_dtype)
            depths = w.array(f"{part}_depths", (len(paths), sum(depth_dims)), ci.feature_dtype) if plan.depths else None
            timings.append(extract(plan, paths, workers, out, f"{part} images", on_bad=ctx.settings.data.bad_images,
                                   depths_out=depths)[1])
        w.put("train_ids", ctx.data.train["ImageID"].to_numpy(str))
        w.put("test_ids", ctx.data.test["ImageID"].to_numpy(str))
        if plan.int8_files is not None:  # what computed the features, kept with them (the predictor runs it)
            for name in INT8_FILES:
                w.put(INT8_FILES[name], np.frombuffer((plan.int8_files / name).read_bytes(), np.uint8))
        w.info.update(_extraction_info(ctx, plan.choices, depth_dims, workers, timings, bad_images))
        w.info["backbone"] = {"name": backbone.name, "weights_used": backbone.weights_used, "dim": backbone.dim}
        w.info["backbone_size_mb"] = model_size_mb(backbone)
    return ctx.store.load("image", key)


def fine_tune(ctx: StageContext, backbone: Backbone, k: int, fit_idx: np.ndarray, held_idx: np.ndarray,
              workers: int):
    """Train backbone + head end to end on fold ``k``'s fit part (its selection share chooses the epoch; the
    held-out rows are never seen); returns (classifier with its best weights, FitResult)."""
    ci = ctx.settings.image
    if isinstance(backbone, BackboneEnsemble):
        raise ValueError(f"config: image.fine_tune: {backbone.name} is an ensemble of backbones; fine-tuning trains one "
                         "(set image.backbone / image.offline_fallback to a single network, or fine_tune: false)")
    train_idx, select_idx = ctx.selection(k, fit_idx, held_idx)
    if ci.max_train_images:
        train_idx = np.random.default_rng(ctx.settings.split.seed + k).permutation(train_idx)[: ci.max_train_images]
    paths = ctx.data.image_paths("train")
    torch.manual_seed(ctx.settings.trainer.seed + k)  # the head's initialisation: the same whatever ran before
    model = ImageClassifier(backbone)
    if ci.channels_last:
        model.to(memory_format=torch.channels_last)
    on_bad = ctx.settings.data.bad_images
    size = int(backbone.input_size or ci.image_size)
    train_set = ImageFiles([paths[i] for i in train_idx], size, augmentation(size, ci.augment),
                           ctx.targets[train_idx], on_bad=on_bad)
    select_set = ImageFiles([paths[i] for i in select_idx], size, None, ctx.targets[select_idx], on_bad=on_bad,
                            transform=backbone.eval_transform)
    optimizer = torch.optim.Adam(model.parameters(), lr=ci.lr)
    spec = ctx.spec()
    shaping = dict(spec["settings"])
    shaping["fine_tune_settings"] = ci.shaping("fine_tune", weights_only=True)
    run_dir = ctx.run_dir(f"image_finetune_{backbone.name}", {"settings": shaping, "assets": spec["assets"],
                                                               "fold": [k, len(ctx.folds)]})
    result = trainer.fit(
        model,
        image_loader(train_set, ci.batch_size, workers, shuffle=True, seed=ctx.settings.trainer.seed + k),
        image_loader(select_set, ci.batch_size, workers),
        ctx.targets[select_idx],
        loss_fn=trainer.bce_for(ci.pos_weight, ci.label1_weight, ctx.targets[train_idx]),
        optimizer=optimizer,
        run_dir=run_dir,
        epochs=ci.epochs,
        patience=ci.patience,
        device=ctx.device,
        precision=training_precision(ctx.device, ctx.settings.trainer.mixed_precision),
        resume=ctx.resume,
        settings={**spec, "fold": k, "n_fit": len(train_idx)},
        name=f"image-finetune-{backbone.name} fold {k + 1}",
    )
    result.extra["n_fit"] = len(train_idx)
    result.extra["run_dir"] = str(run_dir)
    return model, result


def fine_tuned_block(ctx: StageContext, weights, workers: int, bad_images: list[str] | None = None) -> Artifact:
    """Cross-fitted fine-tuning: one backbone + head per fold, fine-tuned from the pretrained weights on the fold's
    fit part. A training record's features and probabilities come from the network of the fold that held it out
    (so they are out of fold, like the caption network's); the test records' are the mean over the fold networks.
    With ``split.folds: 1`` the fit rows get the one network's (in-sample) features."""
    ci = ctx.settings.image
    train_paths, test_paths = ctx.data.image_paths("train"), ctx.data.image_paths("test")
    timings, histories, in_sample = [], [], {}
    described: list = []  # the first fold's inference plan, for the artifact's info

    def rows(model, plan, paths, desc):
        feats = np.empty((len(paths), model.backbone.dim), dtype=np.float32)
        depths = np.empty((len(paths), sum(plan.depth_dims())), dtype=np.float32) if plan.depths else None
        _, timing = extract(plan, paths, workers, feats, desc, on_bad=ctx.settings.data.bad_images, depths_out=depths)
        timings.append(timing)
        with torch.no_grad():
            probs = torch.sigmoid(model.head.cpu().eval()(torch.from_numpy(feats))).numpy()
        out = {"": feats, "_probs": probs}
        if depths is not None:
            out["_depths"] = depths
        return out

    def fold(k, fit_idx, held_idx):
        backbone = build_backbone(weights, ci.image_size, ci.eval_transform)
        model, result = fine_tune(ctx, backbone, k, fit_idx, held_idx, workers)
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
                 "run": result.extra["run_dir"], "training": result.extra.get("training")})

    log.info(f"[image] fine-tuning {weights.name} on each of {len(ctx.folds)} fold(s), then extracting its held-out "
             f"and test images -> {ctx.store.dir('image', ctx.key())}")
    cf = cross_fit(ctx.folds, len(ctx.data.train), fold, "image")
    arrays = {**cf.held, **cf.test}
    fill_in_sample(arrays, in_sample)
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
        w.info["fine_tune"] = {"folds": cf.folds, "history": records(pd.concat(histories, ignore_index=True)),
                               "out_of_fold": len(ctx.folds) > 1, "test": "mean over the fold networks"}
    return ctx.store.load("image", ctx.key())


def train_heads(ctx: StageContext, block: Artifact, key: str, spec: dict[str, Any]) -> Artifact:
    """One MLP head per fold on the frozen features: out-of-fold probabilities for every training record, test
    probabilities averaged over the fold models (kept as the ``image_head`` artifact)."""
    ci = ctx.settings.image
    hs = HeadSettings(ci.head_hidden, ci.head_dropout, ci.head_lr, ci.head_batch_size, ci.head_epochs,
                      ci.head_patience, ci.label1_weight, pos_weight=ci.pos_weight)
    parts = ("train", "test") if ci.head_input == "pooled" else ("train_depths", "test_depths")
    if parts[0] not in block:
        raise ValueError(f"{block.dir}: image.head_input=depths needs image.depth_features=true")
    train_x, test_x = (np.asarray(block[part], dtype=np.float32) for part in parts)
    histories = []
    head_settings = ci.shaping("head", weights_only=True)
    precision = training_precision(ctx.device, ctx.settings.trainer.mixed_precision)

    def fold(k, fit_idx, held_idx):
        run_dir = ctx.run_dir("image_head", {"features": ctx.key(), "head": head_settings, "fold": [k, len(ctx.folds)]})
        fit_rows, select_rows = ctx.selection(k, fit_idx, held_idx)
        head, result, held, test = train_head(
            train_x, test_x, ctx.targets, hs, fit_idx=fit_rows, select_idx=select_rows, held_idx=held_idx,
            run_dir=run_dir, name="image_head", settings={"features": ctx.key(), "fold": k, **head_settings},
            device=ctx.device, precision=precision, seed=ctx.settings.trainer.seed, resume=ctx.resume)
        histories.append(result.history.assign(fold=k))
        return {"probs": held}, {"test_probs": test}, {"best_epoch": result.best_epoch, "run_dir": str(run_dir),
                                                        "seconds": round(result.seconds, 1),
                                                        "head_size_mb": model_size_mb(head),
                                                        "training": result.extra.get("training")}

    cf = cross_fit(ctx.folds, len(ctx.data.train), fold, "image")
    history = pd.concat(histories, ignore_index=True)
    return ctx.store.save(HEAD_KIND, key, spec, {"probs": cf.held["probs"], "test_probs": cf.test["test_probs"]},
                          {"folds": cf.folds, "history": records(history)})


# ----------------------------------------------------------------------------------------------- new records


class ImagePredictor(BlockPredictor):
    """The backbone run as stage 01 ran it (its extraction plan and the precision its artifact records), and the
    fold heads behind ``image_probs``."""

    stage = "image"

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], backbone: Backbone, heads: list[MLPHead],
                 int8_model: tuple[bytes, bytes] | None = None):
        super().__init__(blocks)
        self.description, self.backbone, self.heads = description, backbone, heads
        self.int8_model = int8_model  # the stage's quantized network (xml, bin) with cpu_precision int8
        self._plan = None

    @property
    def fold_networks(self) -> list[torch.nn.Module]:
        return list(self.heads)

    def to(self, device: torch.device) -> "ImagePredictor":
        super().to(device)
        m = self.description
        settings = {key: m[key] for key in ("image_size", "channels_last", "fuse_conv_bn", "feature_batch_size",
                                            "cpu_precision")}
        settings["cpu_backend"] = m.get("cpu_backend", "torch")
        settings["gpu_decode"] = m.get("gpu_decode", "auto")
        if self.int8_model is not None and device.type != "cpu":
            settings["cpu_precision"] = "fp32"  # int8 runs on a CPU only: a GPU gives the fp32 features, said here
            log.warning(f"[image] the stage's features are int8 (OpenVINO, CPU); on {device.type} the predictor "
                        "computes fp32 features instead (per-image cosine ~0.99 to the stage's)")
        self._plan = prepare_inference(self.backbone, settings, device, m["mixed_precision"],
                                       depths=m["depth_features"], hflip=m["hflip_average"],
                                       int8_model=self.int8_model if settings["cpu_precision"] == "int8" else None)
        return self

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m, paths = self.description, list(records.images)
        if self._plan is None:
            self.to(self.device)
        feats = np.empty((len(paths), m["dim"]), dtype=m["feature_dtype"])
        depths = (np.empty((len(paths), sum(self._plan.depth_dims())), dtype=m["feature_dtype"])
                  if self._plan.depths else None)
        extract(self._plan, paths, num_workers(m["workers"], self.device), feats, "image features",
                on_bad=m["bad_images"], depths_out=depths)
        out = {"image": np.asarray(feats, dtype=np.float32)}
        if depths is not None:
            out["image_depths"] = np.asarray(depths, dtype=np.float32)
        if "image_probs" in self.blocks:
            source = out["image" if m["head_input"] == "pooled" else "image_depths"]
            out["image_probs"] = predict_heads(self.heads, source, self.device,
                                               training_precision(self.device, m["mixed_precision"]))
        return {b: out[b] for b in self.blocks}

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        files = {"backbone.pt": (f"image backbone ({self.description['backbone']})", module_bytes(self.backbone))}
        for i, head in enumerate(self.heads):
            files[f"head_{i}.pt"] = (f"image heads ({len(self.heads)} folds)", tensor_bytes(head.state_dict()))
        if self.int8_model is not None:
            for name, blob in zip(INT8_FILES, self.int8_model):
                files[f"int8_{name}"] = ("the backbone quantized to int8 (OpenVINO), as the stage ran it", blob)
        return {**self.description, "heads": len(self.heads)}, files

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "ImagePredictor":
        backbone = load_module(read("backbone.pt"))
        heads = [mlp_head(load_tensors(read(f"head_{i}.pt")), description["head_hidden"], description["head_dropout"])
                 for i in range(int(description.get("heads", 0))) if f"head_{i}.pt" in names]
        int8 = (tuple(read(f"int8_{name}") for name in INT8_FILES)
                if description.get("cpu_precision") == "int8" else None)
        return cls(blocks, description, backbone, heads, int8)


ImageNetwork.predictor_type = ImagePredictor  # what reads its part of a bundle
