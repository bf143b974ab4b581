"""COCO YOLO detectors behind one interface, and COCO class names mapped onto the 18 competition labels.

Two loaders, chosen by what the weights file holds:

* ultralytics' own formats (``yolov5su.pt``, ``yolov8n.pt``, ``.yaml``, exports) through ``ultralytics.YOLO``;
* ORIGINAL YOLOv5 checkpoints (pickled ``models.yolo.Model`` objects, e.g. the release ``yolov5n.pt``),
  which ultralytics refuses, through a restricted unpickler that maps the few YOLOv5 classes
  (Conv, C3, Bottleneck, SPPF, Concat, Detect, Model ...) onto small classes defined here. No
  YOLOv5 code (and not the heavy ``yolov5`` PyPI package) is needed; box decoding follows YOLOv5,
  NMS is torchvision's.
"""

from __future__ import annotations

import pickle
import pickletools
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision
from torch import nn

from ..data import labels as L
from ..data.images import unletterbox

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
    """Fold each Conv's batch norm into its convolution (torch's own eval-mode folding; ~20% faster)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for m in model.modules():
        if isinstance(m, Conv) and getattr(m, "bn", None) is not None:
            m.conv = fuse_conv_bn_eval(m.conv.eval(), m.bn.eval())
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
        self.engine = None  # a callable running the same network on uint8 images (OpenVINO), or None: torch

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 letterboxed images -> the network's raw (B, cells, 5 + nc) predictions, on the CPU."""
        if self.engine is not None:
            return torch.from_numpy(np.concatenate(self.engine(images.numpy()), -1))
        x = images.to(self.device, non_blocking=True).float().div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()

    @torch.inference_mode()
    def detect(self, batch, *, image_size, conf, iou, max_det, multi_label):
        images, metas = batch
        pred = self.forward(images)
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

