"""Stage 03: the YOLO detection baseline (published: YOLOv5 s/m/l/x, mean-F1 0.766-0.790).

The competition labels are MS-COCO category ids, so a COCO detector maps onto them by class name
(person -> 1, bicycle -> 2, ... horse -> 19); the other COCO classes are ignored. The stage runs the
detector over every train and test image once, keeps per image the highest confidence of each of the
18 labels (the block ``detector``) and the raw boxes (from which the block ``detector_boxes`` is computed), as an
artifact keyed by the weights' sha256 and the detection settings, tunes label thresholds and writes the baseline
submission. With ``detector.zoom_size`` it also runs a second pass over every photo at that size (the photos are at
most 320 px, so 480 enlarges every object 1.5x; the block ``detector_zoom``: each label's highest confidence there). That pass
alone scores lower (false positives on every class) but finds small objects in the background the first misses,
and the fused network weighs the two (docs/EXPERIMENTS.md).

Weights come from :class:`multilabel_fusion.io.assets.Assets` (explicit file → ``<paths.models>/detector_weights``
→ ``paths.assets`` → ultralytics' weights folder → download into ``<paths.models>/detector_weights`` →
``detector.offline_weights`` in ``paths.assets``); the detectors themselves are in
:mod:`multilabel_fusion.networks.yolov5`. Without any COCO weights the stage is skipped, loudly, and the
fused network goes on without its blocks.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.folds import held_out_rows
from ..evaluation.detector_examples import examples_figure
from ..evaluation.scoring import evaluate
from ..features import openvino_engine
from ..features.detection import (box_features, choose_detector_backend, detect_images, detector_precision,
                                  load_average)
from ..io.artifacts import Artifact, pick_rows
from ..io.atomic import write_json
from ..networks.device import describe_device
from ..networks.device import num_workers as resolve_workers
from ..networks.yolov5 import load_detector
from .base import BlockPredictor, NewRecords, PredictorUnavailable, Stage
from .context import StageContext, Workspace
from .outputs import finish

log = logging.getLogger(__name__)

#: Published YOLOv5 results on this competition (validation mean-F1), for the metrics file.
PUBLISHED = {"yolov5s": 0.766, "yolov5m": 0.777, "yolov5l": 0.787, "yolov5x": 0.790}

#: Bump when the detection code changes what ends up in the artifact.
CACHE_VERSION = 2  # 2: images decoded by the one OpenCV decoder (was PIL)

#: How detection runs: recorded in a predictor's description beside the settings that shape the artifact.
#: Torch and ultralytics run fp32 on every device; OpenVINO on a CPU in ``detector.cpu_precision``.
RUN_KEYS = ("batch_size", "threads", "channels_last", "cpu_backend")


def _workers(settings) -> int:
    return resolve_workers(settings.trainer.num_workers)


class Detector(Stage):
    name = "detector"
    number = "03"
    title = "YOLO detector"
    module = "detector"
    section = "detector"
    reads_images = True
    blocks = ("detector", "detector_boxes", "detector_zoom")
    writes = "per-label detection scores, detector submission"
    optional_asset = "COCO detector weights"
    summary = "YOLOv5 baseline + detector blocks"
    about = ("A COCO-pretrained YOLOv5 detects objects in every image; per-label detection scores give the detector "
             "baseline `output/submission_detector.csv` and the feature blocks (`detector`, `detector_boxes`, and "
             "`detector_zoom` from a second pass at `detector.zoom_size` that finds smaller objects) that the fused "
             "network stacks with the others. Much faster on a GPU.")

    def spec(self, ws: Workspace) -> dict[str, Any]:
        """What the detections depend on: the weights' content (sha256), image size and post-processing."""
        weights = ws.assets.detector_weights(ws.settings)
        return {"settings": {**ws.settings.detector.shaping(),
                             "bad_images": {"policy": ws.settings.data.bad_images, "replaced": ws.replaced_images()}},
                "version": CACHE_VERSION,
                "assets": {"detector": {"name": weights.name, "identity": weights.identity}}}

    def block_problem(self, settings, block: str) -> str | None:
        if block == "detector_zoom" and settings.detector.zoom_size is None:
            return "detector.zoom_size is null (no second pass): set a size, e.g. detector.zoom_size=480"
        return None

    def fit(self, ctx: StageContext) -> Artifact:
        return self._detections(ctx)[0]

    def _detections(self, ctx: StageContext) -> tuple[Artifact, str]:
        def detect() -> Artifact:
            weights = ctx.assets.detector_weights(ctx.settings)
            bad = ctx.bad_images()
            first = None
            if ctx.settings.detector.zoom_size is not None:  # the first pass made before, without a second: kept
                plain = ctx.derive(ctx.settings.updated("detector", zoom_size=None))
                first = ctx.store.load("detector", plain.key("detector"), mmap=True)
                if first is not None:
                    log.info(f"[detector] reusing the first pass {first.dir}; detecting at "
                             f"{ctx.settings.detector.zoom_size} px only")
            arrays, info = compute_block(ctx, weights.path, weights.source, first=first)
            info["bad_images"] = bad
            return ctx.store.save("detector", ctx.key(), ctx.spec(), arrays, info)

        return self.found_or_computed(ctx, "the detections (no detection run)", detect)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Weights -> detections of every image (artifact) -> baseline submission, metrics, figures."""
        settings = ctx.settings
        weights = ctx.assets.detector_weights(settings)
        found, cache_state = self._detections(ctx)
        info = found.info
        for part, frame in (("train", ctx.data.train), ("test", ctx.data.test)):
            if not np.array_equal(found[f"{part}_ids"], frame["ImageID"].to_numpy(str)):
                raise RuntimeError(f"{found.dir}: its {part} rows are not those of {part}.csv")
        timing = info["detection"]
        log.info(f"[detector] {timing['images_per_s']} images/s at {timing['image_size']} px on {timing['device']} "
                 f"({timing['images']} images in {timing['seconds']} s; {timing['seconds_per_20000_images']} s per "
                 "20,000)" + (" [measured when the cache was made]" if cache_state == "reused" else ""))
        extra = {
            "weights_used": f"{weights.path} ({weights.source}; {info['loader']})",
            "weights": {**weights.record(), "loader": info["loader"]},
            "settings": {k: settings.detector[k] for k in ("image_size", "conf", "iou", "max_det", "multi_label")},
            "detection": timing,
            "artifact": str(found.dir), "detections": cache_state, "bad_images": info.get("bad_images", []),
            "images_without_label_detection": {"train": int((found["train"].max(1) == 0).sum()),
                                               "test": int((found["test"].max(1) == 0).sum())},
            "published_val_mean_f1": PUBLISHED,
        }
        if "train_zoom" in found:
            extra["zoom"] = zoom_figures(ctx, found)
        metrics = finish(ctx, found["train"][ctx.eval_idx], found["test"], extra=extra)
        try:
            fig = examples_figure(found, np.asarray(metrics["thresholds"]),
                                  ctx.output_dir / "figures" / "detector_examples.png", val_idx=ctx.val_idx,
                                  image_paths=ctx.data.image_paths("train"), labels=ctx.data.train["Labels"].tolist(),
                                  image_size=int(settings.detector.image_size),
                                  at_least_one=settings.thresholds.at_least_one,
                                  n=int(settings.detector.examples or 6), seed=settings.split.seed,
                                  rule=metrics["decision"])
            metrics["figures"]["examples"] = str(fig)
            write_json(ctx.output_dir / "metrics" / "detector.json", metrics)
        except Exception as err:  # noqa: BLE001 - a figure never costs the stage its results
            log.warning(f"[detector] examples figure failed: {type(err).__name__}: {err}")
        return metrics

    def block_arrays(self, ws: Workspace, block: str) -> tuple[np.ndarray, np.ndarray]:
        """``detector``: each label's highest confidence; ``detector_boxes``: box counts, summed confidence and the
        largest box area per label, computed from the kept boxes."""
        found = ws.require("detector")
        for part in ("train", "test"):
            if not np.array_equal(found[f"{part}_ids"], getattr(ws.data, part)["ImageID"].to_numpy(str)):
                raise ValueError(f"{found.dir}: its {part} rows are not those of {part}.csv; re-run {self.script}")
        if block == "detector":
            return found["train"], found["test"]
        if block == "detector_zoom":
            problem = self.block_problem(ws.settings, block)  # the key says whether the artifact has a second pass
            if problem:
                raise ValueError(f"block {block}: {problem}")
            return found["train_zoom"], found["test_zoom"]
        return tuple(box_features(found[f"{part}_boxes"], found[f"{part}_box_class"], found["class_column"],
                                  len(found[part])) for part in ("train", "test"))

    def rows_for(self, settings, art: Artifact, picks: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Detections depend on each photo alone: a derived data set (the held-out check) takes them by photo."""
        return derived_rows(art, picks)

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "DetectorPredictor":
        detections = ws.require("detector")
        weights = ws.assets.detector_weights(ws.settings)
        d = ws.settings.detector
        description = {"weights": weights.name, "identity": weights.identity, "loader": detections.info["loader"],
                       **d.shaping(), **{key: d[key] for key in RUN_KEYS},
                       # the engine that computed the cached detections (the same detections to ~1e-6 either way)
                       "cpu_backend": openvino_engine.same_engine(detections.info.get("detection", {}).get("backend")),
                       "cpu_precision": detections.info.get("detection", {}).get("precision", "fp32"),
                       "workers": ws.settings.trainer.num_workers, "bad_images": ws.settings.data.bad_images,
                       "key": detections.key}
        return DetectorPredictor(blocks, description, weights.path)

def derived_rows(art: Artifact, picks: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The detections of other records of the same photos (``picks[part] = (source part, source rows)``), so a
    derived data set (the held-out check) detects nothing again: per-record arrays by row, and each kept box
    renumbered to its photo's new row."""
    out = pick_rows(art, picks, skip=("_boxes", "_box_class"))
    for part, (source, rows) in picks.items():
        boxes, box_class = np.asarray(art[f"{source}_boxes"]), np.asarray(art[f"{source}_box_class"])
        new_row = np.full(len(art[f"{source}_ids"]), -1, dtype=np.int64)
        new_row[np.asarray(rows)] = np.arange(len(rows))
        mapped = new_row[boxes[:, 0].astype(np.int64)]
        keep = np.flatnonzero(mapped >= 0)
        keep = keep[np.argsort(mapped[keep], kind="stable")]  # boxes in row order, as detection writes them
        picked = boxes[keep].copy()
        picked[:, 0] = mapped[keep]
        out[f"{part}_boxes"], out[f"{part}_box_class"] = picked, box_class[keep]
    return out


#: The first pass's arrays in the artifact (the second pass adds ``train_zoom`` / ``test_zoom``).
FIRST_PASS = ("train", "test", "train_ids", "test_ids", "train_boxes", "train_box_class", "test_boxes",
              "test_box_class", "class_names", "class_column")


def compute_block(ctx: StageContext, weights: Path, source: str,
                  first: Artifact | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Detect over every train and test image (and again at ``detector.zoom_size`` when set): the arrays and info
    the cache holds. ``first``: the detections of the same settings without a second pass, whose first pass is
    taken as it is."""
    d = ctx.settings.detector
    threads = int(d.threads) if d.get("threads") else (os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if first is None:
            detector, runs, timing = detection_pass(ctx, weights, int(d.image_size), threads)
            arrays = {
                "train": runs["train"].scores, "test": runs["test"].scores,
                "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str),
                "train_boxes": runs["train"].boxes, "train_box_class": runs["train"].box_class,
                "test_boxes": runs["test"].boxes, "test_box_class": runs["test"].box_class,
                "class_names": np.array(detector.names, dtype=str),
                "class_column": detector.columns.astype(np.int16),
            }
            loader = detector.kind
        else:
            arrays = {name: np.asarray(first[name]) for name in FIRST_PASS}
            timing, loader = dict(first.info["detection"]), first.info["loader"]
        if d.zoom_size is not None:
            _, zoom_runs, timing["zoom"] = detection_pass(ctx, weights, int(d.zoom_size), threads, second=True)
            arrays.update({"train_zoom": zoom_runs["train"].scores, "test_zoom": zoom_runs["test"].scores})
    finally:
        torch.set_num_threads(previous_threads)
    info = {"weights": str(weights), "weights_source": source, "loader": loader, "detection": timing}
    return arrays, info


def detection_pass(ctx: StageContext, weights: Path, size: int, threads: int,
                   second: bool = False) -> tuple[Any, dict, dict[str, Any]]:
    """One pass over every train and test photo at ``size``: (the detector, its runs by part, their timing). Each
    pass loads its own network: OpenVINO compiles (and checks) a network for one input shape."""
    d = ctx.settings.detector
    detector = load_detector(weights, ctx.device, channels_last=bool(d.channels_last))
    kw = dict(image_size=size, conf=float(d.conf), iou=float(d.iou), max_det=int(d.max_det),
              multi_label=bool(d.multi_label), batch_size=int(d.batch_size), workers=_workers(ctx.settings))
    backend, precision = choose_detector_backend(
        detector, d.cpu_backend, image_size=size, batch_size=kw["batch_size"],
        cache_dir=ctx.settings.trainer.engine_cache, precision=detector_precision(d.cpu_precision))
    log.info(f"[detector] {weights.name}: {detector.kind}, {len(detector.names)} classes "
             f"({int((detector.columns >= 0).sum())} map to labels) | {size} px"
             f"{' (second pass, block detector_zoom)' if second else ''}, conf {kw['conf']}, "
             f"iou {kw['iou']}, batch {kw['batch_size']}, {threads} threads, {kw['workers']} loader workers, "
             f"device {describe_device(ctx.device)}, {precision}, images decoded on the CPU | {backend}")
    load_before = load_average()
    runs = {part: detect_images(detector, ctx.data.image_paths(part), on_bad=ctx.settings.data.bad_images,
                                desc=f"detect {part}" + (f" at {size} px" if second else ""), **kw)
            for part in ("train", "test")}
    return detector, runs, timing_of(ctx, runs, kw, threads, backend, precision, [load_before, load_average()])


def timing_of(ctx: StageContext, runs: dict, kw: dict, threads: int, backend: str, precision: str,
              load: list) -> dict[str, Any]:
    """How fast one detection pass over every photo ran, and on what."""
    n = sum(len(r.scores) for r in runs.values())
    seconds = sum(r.seconds for r in runs.values())
    return {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / max(seconds, 1e-9), 2),
            "seconds_per_20000_images": round(20000 * seconds / max(n, 1), 1),
            "image_size": kw["image_size"], "batch_size": kw["batch_size"], "threads": threads,
            "loader_workers": kw["workers"], "channels_last": bool(ctx.settings.detector.channels_last),
            "device": str(ctx.device), "backend": backend, "precision": precision, "decode": "cpu",
            "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else None,
            # 1-minute load average before and after: other work on the machine slows detection down
            "load_average_before_after": load}


def zoom_figures(ctx: StageContext, found: Artifact) -> dict[str, Any]:
    """The second pass on its own (out-of-fold, the stage's decision) and how fast it ran, for the metrics file."""
    scored = evaluate(np.asarray(found["train_zoom"])[ctx.eval_idx], ctx.y_eval, held_out_rows(ctx.folds)[1],
                      ctx.settings.thresholds, estimate=ctx.estimate, epoch_selection="nothing trained")
    timing = found.info["detection"].get("zoom", {})
    figure = scored.get("mean_f1_threshold_cv", scored["val_mean_f1_tuned"])
    log.info(f"[detector] second pass at {timing.get('image_size')} px (block detector_zoom): mean-F1 {figure} on its "
             f"own ({ctx.estimate}); {timing.get('images_per_s')} images/s")
    return {"image_size": timing.get("image_size"), "mean_f1": figure, "per_class_f1": scored["per_class"]["f1"],
            "detection": timing}


class DetectorPredictor(BlockPredictor):
    """The detector's weights file run with the settings behind the stage's artifact."""

    stage = "detector"

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], weights: Path, keep: Any = None):
        super().__init__(blocks)
        self.description, self.weights = description, Path(weights)
        self.detectors: dict[int, Any] = {}  # by input size: the passes its blocks need
        self._keep = keep  # a bundle's unpacked weights live as long as the predictor

    def sizes(self) -> dict[int, tuple[str, ...]]:
        """Input size -> the blocks computed from the pass at that size."""
        d, out = self.description, {}
        if {"detector", "detector_boxes"} & set(self.blocks):
            out[int(d["image_size"])] = ("detector", "detector_boxes")
        if "detector_zoom" in self.blocks:
            if d.get("zoom_size") is None:
                raise PredictorUnavailable("block detector_zoom: the detections were made without a second pass "
                                           "(detector.zoom_size is null)")
            out.setdefault(int(d["zoom_size"]), ())
            out[int(d["zoom_size"])] += ("detector_zoom",)
        return out

    def to(self, device: torch.device) -> "DetectorPredictor":
        self.device = device
        d = self.description
        self.detectors = {}
        for size in self.sizes():
            detector = load_detector(self.weights, device, channels_last=bool(d["channels_last"]))
            choose_detector_backend(detector, d.get("cpu_backend", "torch"), image_size=size,
                                    batch_size=int(d["batch_size"]), cache_dir=None,
                                    precision=d.get("cpu_precision", "fp32"))
            self.detectors[size] = detector
        return self

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = self.description
        if not self.detectors:
            self.to(self.device)
        previous = torch.get_num_threads()
        torch.set_num_threads(int(d["threads"]) if d.get("threads") else (os.cpu_count() or 1))
        out = {}
        try:
            for size, blocks in self.sizes().items():
                detector = self.detectors[size]
                run = detect_images(detector, list(records.images), image_size=size, conf=float(d["conf"]),
                                    iou=float(d["iou"]), max_det=int(d["max_det"]), multi_label=bool(d["multi_label"]),
                                    batch_size=int(d["batch_size"]), workers=resolve_workers(d["workers"]),
                                    desc=f"detect at {size} px", on_bad=d["bad_images"])
                if "detector_zoom" in blocks:
                    out["detector_zoom"] = run.scores
                if "detector" in blocks:
                    out["detector"] = run.scores
                    out["detector_boxes"] = box_features(run.boxes, run.box_class, detector.columns, len(records))
        finally:
            torch.set_num_threads(previous)
        return {b: out[b] for b in self.blocks}

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        name = self.description["weights"]
        return dict(self.description), {name: (f"detector weights ({name})", self.weights.read_bytes())}

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "DetectorPredictor":
        folder = tempfile.TemporaryDirectory(prefix="mlf-detector-")
        path = Path(folder.name) / description["weights"]
        path.write_bytes(read(description["weights"]))
        return cls(blocks, description, path, keep=folder)


Detector.predictor_type = DetectorPredictor  # what reads its part of a bundle
