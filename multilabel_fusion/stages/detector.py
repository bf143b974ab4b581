"""Stage 04: the YOLO detection baseline (published: YOLOv5 s/m/l/x, mean-F1 0.766-0.790).

The competition labels are MS-COCO category ids, so a COCO detector maps onto them by class name
(person -> 1, bicycle -> 2, ... horse -> 19); the other COCO classes are ignored. The stage runs the
detector over every train and test image once, keeps per image the highest confidence of each of the
18 labels (an N x 18 block, which the fused network can read as the feature block ``detector``) and
the raw boxes as an artifact keyed by the weights' sha256 and the detection settings, tunes label
thresholds on the validation part and writes the baseline submission.

Weights come from :func:`multilabel_fusion.assets.detector_weights` (explicit file → ultralytics cache →
download → ``detector.offline_weights`` in ``paths.assets``); the detectors themselves are in
:mod:`multilabel_fusion.networks.yolov5`. Without any COCO weights the stage is skipped, loudly, and the
fused network goes on without the block.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import assets
from ..config import Config
from ..data import labels as L
from ..data.images import ImageStream, _collate
from ..engine.artifacts import pick_rows
from ..engine.atomic import write_json
from ..engine.trainer import num_workers as resolve_workers
from ..networks.yolov5 import Detector, load_detector
from ..reports.detector_examples import examples_figure
from . import base

#: Published YOLOv5 results on this competition (validation mean-F1), for the metrics file.
PUBLISHED = {"yolov5s": 0.766, "yolov5m": 0.777, "yolov5l": 0.787, "yolov5x": 0.790}

#: Bump when the detection code changes what ends up in the artifact.
CACHE_VERSION = 2  # 2: images decoded by the one OpenCV decoder (was PIL)


@dataclass
class DetectionRun:
    scores: np.ndarray  # (N, 18) float32: highest confidence of each label per image, 0 if none
    boxes: np.ndarray  # (M, 6) float32: image row, x1, y1, x2, y2, confidence
    box_class: np.ndarray  # (M,) int16: the checkpoint's class index
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return len(self.scores) / max(self.seconds, 1e-9)


def detect_images(detector: Detector, paths: Sequence[Path], *, image_size: int, conf: float, iou: float,
                  max_det: int = 300, multi_label: bool = True, batch_size: int = 32, workers: int = 1,
                  desc: str = "detect", on_bad: str = "error") -> DetectionRun:
    """Run the detector over ``paths`` (batched, workers decoding images) with a progress bar in images/s."""
    loader = torch.utils.data.DataLoader(
        ImageStream(paths, image_size, detector.needs_letterbox, on_bad=on_bad), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
    scores = np.zeros((len(paths), L.NUM_CLASSES), dtype=np.float32)
    boxes, classes = [], []
    columns = detector.columns
    row = 0
    start = time.perf_counter()
    with tqdm(total=len(paths), desc=desc, unit="img", smoothing=0.1, mininterval=2) as bar:
        for batch in loader:
            for det in detector.detect(batch, image_size=image_size, conf=conf, iou=iou, max_det=max_det,
                                       multi_label=multi_label):
                col = columns[det.cls]
                hit = col >= 0
                np.maximum.at(scores[row], col[hit], det.conf[hit])
                if len(det.conf):
                    boxes.append(np.column_stack([np.full(len(det.conf), row, np.float32), det.xyxy, det.conf]))
                    classes.append(det.cls.astype(np.int16))
                row += 1
            bar.update(len(batch[1]))
    seconds = time.perf_counter() - start
    return DetectionRun(
        scores, np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 6), np.float32),
        np.concatenate(classes) if classes else np.zeros(0, np.int16), seconds)


# --------------------------------------------------------------------------------------------------
# the stage


DETECTION_KEYS = ("image_size", "conf", "iou", "max_det", "multi_label")


def artifact_spec(cfg: Config) -> dict[str, Any]:
    """What the detections depend on: the weights' content (sha256), image size and post-processing."""
    weights = assets.detector_weights(cfg)
    return {"settings": {**{k: cfg.detector[k] for k in DETECTION_KEYS},
                         "bad_images": {"policy": cfg.data.bad_images, "replaced": base.replaced_images(cfg)}},
            "version": CACHE_VERSION,
            "assets": {"detector": {"name": weights.name, "identity": weights.identity}}}


def _workers(cfg: Config) -> int:
    return resolve_workers(cfg.trainer.num_workers)


def compute_block(ctx: base.StageContext, weights: Path, source: str) -> tuple[dict[str, np.ndarray], dict]:
    """Detect over every train and test image: the arrays and info the cache holds."""
    d = ctx.cfg.detector
    threads = int(d.threads) if d.get("threads") else (os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        detector = load_detector(weights, ctx.device, channels_last=bool(d.channels_last))
        kw = dict(image_size=int(d.image_size), conf=float(d.conf), iou=float(d.iou), max_det=int(d.max_det),
                  multi_label=bool(d.multi_label), batch_size=int(d.batch_size), workers=_workers(ctx.cfg))
        print(f"[detector] {weights.name}: {detector.kind}, {len(detector.names)} classes "
              f"({int((detector.columns >= 0).sum())} map to labels) | {kw['image_size']} px, conf {kw['conf']}, "
              f"iou {kw['iou']}, batch {kw['batch_size']}, {threads} threads, {kw['workers']} loader workers, "
              f"device {ctx.device}")
        load_before = _load_average()
        runs = {part: detect_images(detector, ctx.data.image_paths(part), desc=f"detect {part}",
                                    on_bad=ctx.cfg.data.bad_images, **kw)
                for part in ("train", "test")}
        load_after = _load_average()
    finally:
        torch.set_num_threads(previous_threads)
    n = sum(len(r.scores) for r in runs.values())
    seconds = sum(r.seconds for r in runs.values())
    arrays = {
        "train": runs["train"].scores, "test": runs["test"].scores,
        "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str),
        "train_boxes": runs["train"].boxes, "train_box_class": runs["train"].box_class,
        "test_boxes": runs["test"].boxes, "test_box_class": runs["test"].box_class,
        "class_names": np.array(detector.names, dtype=str),
        "class_column": detector.columns.astype(np.int16),
    }
    timing = {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / max(seconds, 1e-9), 2),
              "seconds_per_20000_images": round(20000 * seconds / max(n, 1), 1),
              "image_size": kw["image_size"], "batch_size": kw["batch_size"], "threads": threads,
              "loader_workers": kw["workers"], "channels_last": bool(d.channels_last), "device": str(ctx.device),
              "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else None,
              # 1-minute load average before and after: other work on the machine slows detection down
              "load_average_before_after": [load_before, load_after]}
    info = {"weights": str(weights), "weights_source": source, "loader": detector.kind, "detection": timing}
    return arrays, info


def rows_for(cfg: Config, art, picks: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
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


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None


def box_features(boxes: np.ndarray, box_class: np.ndarray, class_column: np.ndarray, n: int,
                  min_conf: float = 0.25, side: float = 320.0) -> np.ndarray:
    """Per image and label, from the same detections at no extra cost: how many boxes (confidence >= ``min_conf``),
    their summed confidence, and the largest box's area as a fraction of a ``side``² image — (n, 3 x 18)."""
    out = np.zeros((n, 3, L.NUM_CLASSES), dtype=np.float32)
    if len(boxes):
        col = np.asarray(class_column)[box_class.astype(np.int64)]
        keep = col >= 0
        rows, col, conf = boxes[keep, 0].astype(np.int64), col[keep], boxes[keep, 5]
        area = ((boxes[keep, 3] - boxes[keep, 1]) * (boxes[keep, 4] - boxes[keep, 2])) / side**2
        sure = conf >= min_conf
        np.add.at(out[:, 0], (rows[sure], col[sure]), 1.0)
        np.add.at(out[:, 1], (rows, col), conf)
        np.maximum.at(out[:, 2], (rows[sure], col[sure]), area[sure])
    return out.reshape(n, -1)


def block_arrays(ctx: base.StageContext, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``detector``: each label's highest confidence; ``detector_boxes``: box counts, summed confidence and the
    largest box area per label, computed from the kept boxes."""
    found = ctx.require("detector")
    for part in ("train", "test"):
        if not np.array_equal(found[f"{part}_ids"], getattr(ctx.data, part)["ImageID"].to_numpy(str)):
            raise ValueError(f"{found.dir}: its {part} rows are not those of {part}.csv; re-run stages/04_detector.py")
    if name == "detector":
        return found["train"], found["test"]
    return tuple(box_features(found[f"{part}_boxes"], found[f"{part}_box_class"], found["class_column"],
                              len(found[part])) for part in ("train", "test"))


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    """Stage 04 end to end: weights -> detections of every image (artifact) -> baseline submission, metrics, figures."""
    ctx = base.prepare(cfg, "detector", demo_mode)
    weights = assets.detector_weights(cfg)
    found = ctx.store.load("detector", ctx.key())
    if found is not None:
        print(f"[detector] reusing the detections {found.dir} (no detection run)")
        cache_state = "reused"
    else:
        bad = ctx.bad_images()
        arrays, info = compute_block(ctx, weights.path, weights.source)
        info["bad_images"] = bad
        found = ctx.store.save("detector", ctx.key(), ctx.spec(), arrays, info)
        cache_state = "computed"
    info = found.info
    for part, frame in (("train", ctx.data.train), ("test", ctx.data.test)):
        if not np.array_equal(found[f"{part}_ids"], frame["ImageID"].to_numpy(str)):
            raise RuntimeError(f"{found.dir}: its {part} rows are not those of {part}.csv")
    timing = info["detection"]
    print(f"[detector] {timing['images_per_s']} images/s at {timing['image_size']} px on {timing['device']} "
          f"({timing['images']} images in {timing['seconds']} s; {timing['seconds_per_20000_images']} s per 20,000)"
          + (" [measured when the cache was made]" if cache_state == "reused" else ""))
    extra = {
        "weights_used": f"{weights.path} ({weights.source}; {info['loader']})",
        "weights": {**weights.record(), "loader": info["loader"]},
        "settings": {k: cfg.detector[k] for k in ("image_size", "conf", "iou", "max_det", "multi_label")},
        "detection": timing,
        "artifact": str(found.dir), "detections": cache_state, "bad_images": info.get("bad_images", []),
        "images_without_label_detection": {"train": int((found["train"].max(1) == 0).sum()),
                                           "test": int((found["test"].max(1) == 0).sum())},
        "published_val_mean_f1": PUBLISHED,
    }
    metrics = base.finish(ctx, found["train"][ctx.eval_idx], found["test"], extra=extra)
    try:
        fig = examples_figure(ctx, found, np.asarray(metrics["thresholds"]),
                              ctx.output_dir / "figures" / "detector_examples.png", rule=metrics["decision"])
        metrics["figures"]["examples"] = str(fig)
        write_json(ctx.output_dir / "metrics" / "detector.json", metrics)
    except Exception as err:  # noqa: BLE001 - a figure never costs the stage its results
        print(f"[detector] examples figure failed: {type(err).__name__}: {err}")
    return metrics


