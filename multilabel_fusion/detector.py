"""Stage 04: the YOLO detection baseline (published: YOLOv5 s/m/l/x, mean-F1 0.766-0.790).

The competition labels are MS-COCO category ids, so a COCO detector maps onto them by class name
(person -> 1, bicycle -> 2, ... horse -> 19); the other COCO classes are ignored. The stage runs the
detector over every train and test image, caches per image the highest confidence of each of the
18 labels (an N x 18 block, which the fused network can read as the feature block ``detector``) and
the raw boxes, tunes label thresholds on the validation part and writes the baseline submission.

Weights are resolved like every other asset: ``detector.weights`` as an existing file -> the
ultralytics weights cache -> ultralytics' download (works in Colab; fails fast offline) -> the offline
copy ``detector.offline_weights``. Two loaders, chosen by what the file holds:

* ultralytics' own formats (``yolov5su.pt``, ``yolov8n.pt``, ``.yaml``, exports) through ``ultralytics.YOLO``;
* ORIGINAL YOLOv5 checkpoints (pickled ``models.yolo.Model`` objects, e.g. the release ``yolov5n.pt``),
  which ultralytics refuses, through a restricted unpickler that maps the few YOLOv5 classes
  (Conv, C3, Bottleneck, SPPF, Concat, Detect, Model ...) onto small classes defined here. No
  YOLOv5 code (and not the heavy ``yolov5`` PyPI package) is needed; box decoding and NMS follow YOLOv5.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import socket
import time
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision
from torch import nn
from tqdm.auto import tqdm

from . import labels as L
from . import pipeline
from .atomic import write_json
from .cache import FeatureCache
from .config import ROOT, Config
from .trainer import file_digest
from .trainer import num_workers as resolve_workers

#: Published YOLOv5 results on this competition (validation mean-F1), for the metrics file.
PUBLISHED = {"yolov5s": 0.766, "yolov5m": 0.777, "yolov5l": 0.787, "yolov5x": 0.790}

#: Bump when the detection code changes what ends up in the cache.
CACHE_VERSION = 1

#: Host probed before trying a download, so an offline machine fails in milliseconds, not minutes.
DOWNLOAD_HOST = ("github.com", 443)


# --------------------------------------------------------------------------------------------------
# class names -> competition labels


def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").split())


def names_list(names: Sequence[str] | dict) -> list[str]:
    """A checkpoint's ``names`` (list, tuple or ``{index: name}`` dict) as a list in index order."""
    if isinstance(names, dict):
        keys = sorted(int(k) for k in names)
        if keys != list(range(len(keys))):
            raise ValueError(f"class indices {keys[:5]}... are not 0..{len(keys) - 1}")
        by_int = {int(k): v for k, v in names.items()}
        return [str(by_int[k]) for k in keys]
    return [str(n) for n in names]


def label_columns(names: Sequence[str] | dict, source: str | Path = "checkpoint") -> np.ndarray:
    """For each detector class, the column (0..17) of the competition label with the same COCO name, or -1.

    The mapping is by name, never by index, so any checkpoint trained on COCO's classes works whatever
    their order; classes outside the 18 labels (chair, cup ...) map to -1 and are ignored. A checkpoint
    whose names do not include the 18 COCO names of the labels is refused (its scores would mean nothing).
    """
    found = names_list(names)
    column_of_name = {_norm(L.LABEL_NAMES[i]): c for c, i in enumerate(L.LABEL_IDS)}
    columns = np.array([column_of_name.get(_norm(n), -1) for n in found], dtype=np.int64)
    missing = [n for n, c in column_of_name.items() if c not in set(columns.tolist())]
    if missing:
        shown = ", ".join(repr(n) for n in found[:8]) + (" ..." if len(found) > 8 else "")
        raise ValueError(
            f"{source}: not a COCO detector: its {len(found)} class names ({shown}) lack "
            f"{len(missing)} of the 18 COCO names the competition labels map to ({', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}). Use a COCO-trained checkpoint (e.g. yolov5su.pt, yolov5n.pt)."
        )
    return columns


# --------------------------------------------------------------------------------------------------
# original YOLOv5 checkpoints without the YOLOv5 code: small stand-ins for its pickled classes


def _autopad(k, p=None):
    return p if p is not None else (k // 2 if isinstance(k, int) else [x // 2 for x in k])


class Conv(nn.Module):
    """conv -> batch norm -> activation (``bn`` is folded into ``conv`` by :func:`_fuse`)."""

    def forward(self, x):
        x = self.conv(x)
        if getattr(self, "bn", None) is not None:
            x = self.bn(x)
        return self.act(x)


class DWConv(Conv):
    pass


class Focus(nn.Module):
    def forward(self, x):
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Bottleneck(nn.Module):
    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class BottleneckCSP(nn.Module):
    def forward(self, x):
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class C3(nn.Module):
    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPP(nn.Module):
    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """YOLOv5's anchor-based head: returns (B, anchors x cells, 5 + nc) as xywh (pixels), objectness, class scores."""

    def forward(self, xs):
        out = []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            y = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            stride = float(self.stride[i])
            yv, xv = torch.meshgrid(torch.arange(ny, device=x.device, dtype=y.dtype),
                                    torch.arange(nx, device=x.device, dtype=y.dtype), indexing="ij")
            grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2)
            anchor = (self.anchors[i].to(y.dtype) * stride).view(1, self.na, 1, 1, 2)
            xy = (y[..., 0:2] * 2 - 0.5 + grid) * stride
            wh = (y[..., 2:4] * 2) ** 2 * anchor
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no))
        return torch.cat(out, 1)


class Model(nn.Module):
    """YOLOv5's ``models.yolo.Model``: runs ``self.model`` following each layer's ``.f`` (inputs) and ``self.save``."""

    def forward(self, x):
        saved: list[Any] = []
        for m in self.model:
            if m.f != -1:
                x = saved[m.f] if isinstance(m.f, int) else [x if j == -1 else saved[j] for j in m.f]
            x = m(x)
            saved.append(x if m.i in self.save else None)
        return x


_SHIMS: dict[str, dict[str, type]] = {
    "models.common": {c.__name__: c for c in (Conv, DWConv, Focus, Bottleneck, BottleneckCSP, C3, SPP, SPPF, Concat)},
    "models.yolo": {"Model": Model, "DetectionModel": Model, "Detect": Detect},
}
#: What else an original checkpoint may reference: tensors, torch layers, containers, numpy arrays, its options.
_ALLOWED = {
    "torch._utils": None, "collections": {"OrderedDict", "defaultdict"}, "_codecs": {"encode"},
    "builtins": {"set", "frozenset", "slice", "dict", "list", "tuple", "bytearray", "complex", "range", "object"},
    "numpy": {"ndarray", "dtype"}, "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"}, "argparse": {"Namespace"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


def _allowed(module: str, name: str) -> bool:
    if module == "torch._utils":
        return name.startswith("_rebuild")
    if module.startswith("torch.nn.modules.") or module == "numpy.dtypes":
        return True
    if module == "torch":  # classes and dtypes (torch.Size, torch.float16 ...), never functions
        obj = getattr(torch, name, None)
        return isinstance(obj, (type, torch.dtype))
    return name in _ALLOWED.get(module, ())


class UnsupportedCheckpoint(ValueError):
    pass


class _YoloV5Unpickler(pickle.Unpickler):
    """Resolves YOLOv5's classes to the stand-ins above; allows torch / numpy / plain containers only."""

    def find_class(self, module: str, name: str):
        if module in _SHIMS:
            if name in _SHIMS[module]:
                return _SHIMS[module][name]
            raise UnsupportedCheckpoint(
                f"original-YOLOv5 class {module}.{name} has no stand-in here (supported: detection models built "
                f"from {', '.join(sorted(_SHIMS['models.common']))}); convert the checkpoint to ultralytics' format"
            )
        module = "builtins" if module == "__builtin__" else module
        if _allowed(module, name):
            return super().find_class(module, name)
        raise UnsupportedCheckpoint(f"refusing to unpickle {module}.{name} from a weights file")


_pickle_module = types.ModuleType("yolov5_shim_pickle")
_pickle_module.Unpickler = _YoloV5Unpickler
_pickle_module.load = lambda f, **kw: _YoloV5Unpickler(f, **kw).load()
_pickle_module.__name__ = "yolov5_shim_pickle"


def checkpoint_kind(path: str | Path) -> str:
    """``'yolov5'`` for an original YOLOv5 checkpoint, ``'ultralytics'`` for anything ultralytics loads."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml") or not path.is_file():
        return "ultralytics"
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = z.read(pkl)
    except (zipfile.BadZipFile, StopIteration, OSError):
        return "ultralytics"
    modules = set()
    ops = list(pickletools.genops(data))
    for k, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            modules.add(str(arg).split(" ")[0])
        elif op.name == "STACK_GLOBAL" and k >= 2:
            modules.add(str(ops[k - 2][1]))
    if any(m.startswith("ultralytics") for m in modules):
        return "ultralytics"
    if any(m.startswith("models.") for m in modules):
        return "yolov5"
    return "ultralytics"


def _fuse(model: nn.Module) -> None:
    """Fold each Conv's batch norm into its convolution (exact in eval mode; ~20% faster)."""
    for m in model.modules():
        if isinstance(m, Conv) and getattr(m, "bn", None) is not None:
            conv, bn = m.conv, m.bn
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused.weight.data = conv.weight.data * scale.view(-1, 1, 1, 1)
            bias = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias.data = (bias - bn.running_mean) * scale + bn.bias
            m.conv = fused
            m.bn = None


def load_yolov5_checkpoint(path: str | Path) -> tuple[nn.Module, list[str]]:
    """An original YOLOv5 checkpoint as an eval-mode float32 module (fused) and its class names."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    else:
        model = ckpt
    if not isinstance(model, Model):
        raise UnsupportedCheckpoint(f"{path}: holds {type(model).__name__}, not a YOLOv5 detection model")
    model = model.float().eval()
    for m in model.modules():
        if isinstance(m, nn.Upsample):
            m.recompute_scale_factor = None  # attribute missing from checkpoints pickled by older torch
        elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.SiLU)):
            m.inplace = getattr(m, "inplace", False)
    if not isinstance(model.model[-1], Detect):
        raise UnsupportedCheckpoint(f"{path}: last layer is {type(model.model[-1]).__name__}, not Detect")
    with torch.no_grad():
        _fuse(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, names_list(model.names)


# --------------------------------------------------------------------------------------------------
# detectors: one interface for both loaders


@dataclass
class Detections:
    """Boxes of one image in its own pixel coordinates."""

    xyxy: np.ndarray  # (k, 4) float32
    conf: np.ndarray  # (k,) float32
    cls: np.ndarray  # (k,) int64, the checkpoint's class index


class Detector:
    """A loaded COCO detector: ``names``, ``columns`` (class -> label column or -1) and ``detect(batch)``."""

    kind = ""
    needs_letterbox = True  # False: the detector letterboxes itself

    def __init__(self, path: Path, names: list[str]):
        self.path = Path(path)
        self.names = names
        self.columns = label_columns(names, path)

    def detect(self, batch, *, image_size: int, conf: float, iou: float, max_det: int,
               multi_label: bool) -> list[Detections]:
        raise NotImplementedError


class YoloV5Detector(Detector):
    """Original YOLOv5 checkpoint through the stand-in classes; letterboxed batches, YOLOv5's NMS."""

    kind = "yolov5-original (built-in loader)"

    def __init__(self, path: Path, device: torch.device | str = "cpu", channels_last: bool = False):
        model, names = load_yolov5_checkpoint(path)
        super().__init__(path, names)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.model = model.to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.stride = int(max(model.stride))

    @torch.inference_mode()
    def detect(self, batch, *, image_size, conf, iou, max_det, multi_label):
        images, metas = batch
        x = images.to(self.device, non_blocking=True).float().div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pred = self.model(x).float().cpu()
        out = []
        for p, meta in zip(pred, metas):
            boxes, scores, cls = nms(p, conf=conf, iou=iou, max_det=max_det, multi_label=multi_label)
            out.append(Detections(unletterbox(boxes.numpy(), meta), scores.numpy(), cls.numpy()))
        return out


class UltralyticsDetector(Detector):
    """ultralytics' own formats through ``ultralytics.YOLO`` (its letterbox and NMS)."""

    kind = "ultralytics"
    needs_letterbox = False

    def __init__(self, path: Path | str, device: torch.device | str = "cpu", yolo=None):
        if yolo is None:
            threads = torch.get_num_threads()
            from ultralytics import YOLO  # sets OMP_NUM_THREADS=1 for later processes; threads restored below

            torch.set_num_threads(threads)
            yolo = YOLO(str(path))
        super().__init__(Path(path), names_list(yolo.names))
        self.yolo = yolo
        self.device = str(torch.device(device))

    def detect(self, batch, *, image_size, conf, iou, max_det, multi_label):
        images, metas = batch
        results = self.yolo.predict(list(images), imgsz=image_size, conf=conf, iou=iou, max_det=max_det,
                                    device=self.device, verbose=False)
        out = []
        for r in results:
            b = r.boxes
            out.append(Detections(b.xyxy.cpu().numpy().astype(np.float32), b.conf.cpu().numpy().astype(np.float32),
                                  b.cls.cpu().numpy().astype(np.int64)))
        return out


def load_detector(path: str | Path, device: torch.device | str = "cpu", channels_last: bool = False) -> Detector:
    """The right loader for what the file holds; refuses (ValueError) a checkpoint without COCO's class names."""
    path = Path(path)
    if checkpoint_kind(path) == "yolov5":
        return YoloV5Detector(path, device, channels_last)
    return UltralyticsDetector(path, device)


def nms(pred: torch.Tensor, *, conf: float, iou: float, max_det: int, multi_label: bool):
    """YOLOv5 post-processing of one image: (N, 5 + nc) xywh/objectness/class -> boxes xyxy, scores, classes."""
    pred = pred[pred[:, 4] > conf]
    scores = pred[:, 5:] * pred[:, 4:5]
    xy, wh = pred[:, :2], pred[:, 2:4]
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)
    if multi_label:
        i, j = (scores > conf).nonzero(as_tuple=True)
        boxes, score, cls = boxes[i], scores[i, j], j
    else:
        score, cls = scores.max(1)
        keep = score > conf
        boxes, score, cls = boxes[keep], score[keep], cls[keep]
    if len(score) > 30000:
        top = score.topk(30000).indices
        boxes, score, cls = boxes[top], score[top], cls[top]
    keep = torchvision.ops.batched_nms(boxes, score, cls, iou)[:max_det]
    return boxes[keep], score[keep], cls[keep]


# --------------------------------------------------------------------------------------------------
# images


def letterbox(image: np.ndarray, size: int, fill: int = 114) -> tuple[np.ndarray, tuple[float, float, float, int, int]]:
    """Resize (long side = ``size``) and pad to ``size`` x ``size`` centred, as YOLOv5; meta = (ratio, padx, pady, h, w)."""
    from PIL import Image

    h, w = image.shape[:2]
    r = min(size / h, size / w)
    nw, nh = int(round(w * r)), int(round(h * r))
    if (nw, nh) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    px, py = (size - nw) / 2, (size - nh) / 2
    top, left = int(round(py - 0.1)), int(round(px - 0.1))
    out = np.full((size, size, 3), fill, dtype=np.uint8)
    out[top:top + nh, left:left + nw] = image
    return out, (r, left, top, h, w)


def unletterbox(xyxy: np.ndarray, meta) -> np.ndarray:
    r, left, top, h, w = meta
    out = xyxy.astype(np.float32).copy()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / r).clip(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / r).clip(0, h)
    return out


def read_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class ImageStream(torch.utils.data.Dataset):
    """Decodes (and letterboxes) images in DataLoader workers."""

    def __init__(self, paths: Sequence[Path], size: int, letterboxed: bool):
        self.paths, self.size, self.letterboxed = list(paths), size, letterboxed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = read_rgb(self.paths[i])
        if self.letterboxed:
            boxed, meta = letterbox(image, self.size)
            return torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1))), meta
        return np.ascontiguousarray(image[..., ::-1]), (1.0, 0, 0) + image.shape[:2]  # BGR, as ultralytics wants


def _collate(items):
    images, metas = zip(*items)
    if isinstance(images[0], torch.Tensor):
        return torch.stack(images), list(metas)
    return list(images), list(metas)


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
                  desc: str = "detect") -> DetectionRun:
    """Run the detector over ``paths`` (batched, workers decoding images) with a progress bar in images/s."""
    loader = torch.utils.data.DataLoader(
        ImageStream(paths, image_size, detector.needs_letterbox), batch_size=batch_size, shuffle=False,
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
# weights


def _resolve_path(value: str | Path) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else ROOT / p).resolve()


def _online(host: tuple[str, int] | None = None, timeout: float = 3.0) -> bool:
    host = host or DOWNLOAD_HOST
    try:
        socket.create_connection(host, timeout=timeout).close()
        return True
    except OSError:
        return False


def _ultralytics_weights_dir() -> Path:
    threads = torch.get_num_threads()
    from ultralytics.utils import SETTINGS  # importing ultralytics sets OMP_NUM_THREADS=1; keep ours

    torch.set_num_threads(threads)
    return Path(SETTINGS["weights_dir"])


def _download(name: str) -> Path:
    """ultralytics' own download of a named asset into its weights folder (raises when impossible)."""
    if not _online():
        raise ConnectionError(f"{DOWNLOAD_HOST[0]} unreachable (offline machine)")
    from ultralytics.utils.downloads import attempt_download_asset

    target = _ultralytics_weights_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    got = Path(attempt_download_asset(target))
    if not got.is_file():
        raise FileNotFoundError(f"download of {name} produced no file")
    return got


def resolve_weights(cfg: Config, *, download: Callable[[str], Path] | None = None) -> tuple[Path, str]:
    """(weights file, where it came from): explicit path -> ultralytics cache -> download -> offline copy."""
    d = cfg.detector
    tried = []
    if d.weights:
        explicit = _resolve_path(d.weights)
        if explicit.is_file():
            return explicit, "path"
        tried.append(f"path {explicit}: not a file")
        name = Path(str(d.weights)).name
        try:
            cached = _ultralytics_weights_dir() / name
        except Exception as err:  # ultralytics not installed
            cached = None
            tried.append(f"ultralytics cache: {err}")
        if cached is not None and cached.is_file():
            return cached, "cache"
        if cached is not None:
            tried.append(f"cache {cached}: absent")
        try:
            got = (download or _download)(name)
            return Path(got), "download"
        except Exception as err:  # noqa: BLE001 - any failure falls through to the offline copy
            tried.append(f"download {name}: {type(err).__name__}: {str(err).strip()[:160]}")
    if d.get("offline_weights"):
        offline = _resolve_path(d.offline_weights)
        if offline.is_file():
            print("detector weights: " + "; ".join(tried) + f" -> using the offline copy {offline}")
            return offline, "offline"
        tried.append(f"offline copy {offline}: not a file")
    raise FileNotFoundError("no detector weights: " + "; ".join(tried))


def file_identity(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path, chars=None)}


# --------------------------------------------------------------------------------------------------
# the stage


def cache_settings(cfg: Config, identity: dict[str, Any]) -> dict[str, Any]:
    """What the cached detections depend on: the weights' content, image size and post-processing."""
    d = cfg.detector
    return {"version": CACHE_VERSION, "weights": identity, "image_size": int(d.image_size), "conf": float(d.conf),
            "iou": float(d.iou), "max_det": int(d.max_det), "multi_label": bool(d.multi_label)}


def _workers(cfg: Config) -> int:
    return resolve_workers(cfg.trainer.num_workers)


def compute_block(ctx: pipeline.StageContext, weights: Path, source: str) -> tuple[dict[str, np.ndarray], dict]:
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
        runs = {part: detect_images(detector, ctx.data.image_paths(part), desc=f"detect {part}", **kw)
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


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on Windows
        return None


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False, args=None) -> dict[str, Any]:
    """Stage 04 end to end: weights -> detections of every image (cached) -> baseline submission, metrics, figures."""
    ctx = pipeline.prepare(cfg, demo_mode)
    weights, source = resolve_weights(cfg)
    identity = file_identity(weights)
    print(f"[detector] weights: {weights} (from {source}; {identity['bytes']:,} bytes, "
          f"sha256 {identity['sha256'][:12]})")
    cache = FeatureCache(ctx.output_dir, "detector", cache_settings(cfg, identity), ctx.fingerprint)
    found = cache.load()
    if found is not None:
        print(f"[detector] reusing cached detections {cache.dir} (no detection run)")
        cache_state = "reused"
    else:
        arrays, info = compute_block(ctx, weights, source)
        found = cache.save(arrays, info)
        cache_state = "computed"
    info = found["manifest"]["info"]
    for part, frame in (("train", ctx.data.train), ("test", ctx.data.test)):
        if not np.array_equal(found[f"{part}_ids"], frame["ImageID"].to_numpy(str)):
            raise RuntimeError(f"{cache.dir}: cached {part} rows are not those of {part}.csv")
    timing = info["detection"]
    print(f"[detector] {timing['images_per_s']} images/s at {timing['image_size']} px on {timing['device']} "
          f"({timing['images']} images in {timing['seconds']} s; {timing['seconds_per_20000_images']} s per 20,000)"
          + (" [measured when the cache was made]" if cache_state == "reused" else ""))
    extra = {
        "weights_used": f"{weights} ({source}; {info['loader']})",
        "weights": {**identity, "path": str(weights), "source": source, "loader": info["loader"]},
        "settings": {k: cfg.detector[k] for k in ("image_size", "conf", "iou", "max_det", "multi_label")},
        "detection": timing,
        "feature_cache": str(cache.dir), "cache": cache_state,
        "images_without_label_detection": {"val": int((found["train"][ctx.val_idx].max(1) == 0).sum()),
                                           "test": int((found["test"].max(1) == 0).sum())},
        "published_val_mean_f1": PUBLISHED,
    }
    metrics = pipeline.finish(ctx, "detector", found["train"][ctx.val_idx], found["test"], extra=extra)
    try:
        fig = examples_figure(ctx, found, np.asarray(metrics["thresholds"]),
                              ctx.output_dir / "figures" / "detector_examples.png")
        metrics["figures"]["examples"] = str(fig)
        write_json(ctx.output_dir / "metrics" / "detector.json", metrics)
    except Exception as err:  # noqa: BLE001 - a figure never costs the stage its results
        print(f"[detector] examples figure failed: {type(err).__name__}: {err}")
    return metrics


def examples_figure(ctx: pipeline.StageContext, found: dict[str, Any], thresholds: np.ndarray, path: Path,
                    n: int | None = None, seed: int | None = None) -> Path:
    """A few validation images with their label boxes (conf >= the label's threshold), true and predicted labels."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .reports import _save
    from .thresholds import decide

    n = n or int(ctx.cfg.detector.get("examples", 6))
    rng = np.random.default_rng(ctx.cfg.split.seed if seed is None else seed)
    rows = np.sort(rng.choice(ctx.val_idx, size=min(n, len(ctx.val_idx)), replace=False))
    pred = decide(found["train"][rows], thresholds, at_least_one=ctx.cfg.thresholds.at_least_one)
    columns, names = found["class_column"], found["class_names"]
    boxes, box_class = found["train_boxes"], found["train_box_class"]
    paths = ctx.data.image_paths("train")
    ncols = 3
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.4 * nrows), squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax, row, p in zip(axes.flat, rows, pred):
        ax.imshow(read_rgb(paths[row]))
        mine = boxes[:, 0] == row
        # one object often carries several labels (a cat / dog box): nearly identical boxes share a frame and caption
        groups: list[tuple[np.ndarray, list]] = []
        order = np.argsort(-boxes[mine, 5], kind="stable")
        for (x1, y1, x2, y2, conf), k in zip(boxes[mine][order, 1:].tolist(), box_class[mine][order]):
            col = int(columns[k])
            if col < 0 or conf < thresholds[col]:
                continue
            box = np.array([x1, y1, x2, y2])
            same = next((g for g in groups if _iou(g[0], box) > 0.9), None)
            if same is None:
                groups.append((box, [(conf, col, names[k])]))
            else:
                same[1].append((conf, col, names[k]))
        for (x1, y1, x2, y2), found_here in groups:
            color = colors(found_here[0][1] % 20)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.6, color=color))
            ax.text(x1, y1, " / ".join(f"{name} {conf:.2f}" for conf, _, name in found_here), fontsize=7,
                    color="white", va="bottom", bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
        true_ids = sorted(ctx.data.train["Labels"].iloc[row])
        pred_ids = L.decode(p[None])[0]
        ok = set(true_ids) == set(pred_ids)
        ax.set_title(f"{ctx.data.train['ImageID'].iloc[row]}\ntrue: {_label_text(true_ids)}\n"
                     f"pred: {_label_text(pred_ids)}", fontsize=8, color="darkgreen" if ok else "firebrick")
        ax.axis("off")
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    fig.suptitle("YOLO detector on validation images (boxes at or above the tuned per-label thresholds)")
    return _save(fig, path)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _label_text(ids: Sequence[int]) -> str:
    return ", ".join(f"{i} {L.LABEL_NAMES[i]}" for i in ids) or "-"
