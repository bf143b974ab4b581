"""The detector over many images: batched runs with a progress bar, per-label scores and the kept boxes, and the
per-label box features computed from those boxes at no extra cost."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import labels as L
from ..data.images import ImageStream, _collate
from ..io.progress import progress
from ..networks.yolov5 import Detector, YoloV5Detector
from . import openvino_engine
from .inference import cpu_supports_bf16


class _RawPredictions(torch.nn.Module):
    """What OpenVINO runs for a YOLOv5 checkpoint: uint8 images -> (boxes xywh, objectness and class scores); two
    outputs, so that the agreement check compares the scores on their own, not dwarfed by pixel coordinates."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        pred = self.model(images.float() / 255)
        return pred[..., :4], pred[..., 4:]


def detector_precision(setting: str) -> str:
    """``detector.cpu_precision``: ``auto`` is bf16 where the CPU computes bf16 (OpenVINO's own default there),
    else fp32."""
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"detector.cpu_precision {setting!r}: choose auto, fp32 or bf16")
    return ("bf16" if cpu_supports_bf16() else "fp32") if setting == "auto" else setting


def choose_detector_backend(detector: Detector, setting: str, *, image_size: int, batch_size: int,
                            cache_dir: Path | None, precision: str = "fp32") -> tuple[str, str]:
    """Run an original YOLOv5 checkpoint through OpenVINO on a CPU when ``detector.cpu_backend`` asks for it or
    finds it faster here (:func:`openvino_engine.select`), in ``precision`` (``detector.cpu_precision``, resolved by
    :func:`detector_precision`); ultralytics' formats, GPUs and torch run fp32. Returns what was chosen and why, and
    the precision that runs."""
    if not isinstance(detector, YoloV5Detector):
        return "ultralytics (its own engine)", "fp32"
    if detector.device.type != "cpu":
        return f"torch ({detector.device.type})", "fp32"
    detector.engine = None
    example = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    engine, how, agreement = openvino_engine.select(
        setting, "detector", graph=_RawPredictions(detector.model), weights=detector.model, example=example,
        cache_dir=cache_dir, precision=precision, torch_call=detector.forward, name=detector.path.name)
    detector.engine = engine
    return (how + (f", outputs agree at cosine {agreement}" if agreement is not None else ""),
            precision if engine is not None else "fp32")


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
    with progress(total=len(paths), desc=desc, unit="img", smoothing=0.1, mininterval=2) as bar:
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


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None
