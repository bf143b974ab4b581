"""Spatial feature maps of a frozen backbone (the last convolutional output, before global pooling), streamed to
disk as float16 for the heads that look at where things are (:mod:`multilabel_fusion.networks.region_attention`).

The same loader, engine choice (OpenVINO on a CPU where faster, torch on a GPU) and conversion cache as the pooled
features (:mod:`.inference`, :mod:`.openvino_engine`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.images import ImageFiles, image_loader
from ..io.progress import progress
from ..networks.backbones import Backbone
from ..networks.device import describe_device
from ..networks.precision import AUTOCAST_DTYPES, gpu_inference_dtype
from . import openvino_engine
from .inference import cpu_supports_bf16

log = logging.getLogger(__name__)


def spatial_map(name: str, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map ``[B, C, h, w]`` of normalised images (what its pooling would average)."""
    if name.startswith("efficientnet_lite"):
        return net.extract_features(x)
    if name == "resnet50":
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, part)(x)
        return x
    if name == "vgg16":
        return net.features(x)
    raise ValueError(f"no spatial map for backbone {name!r}")


class MapNetwork(nn.Module):
    """uint8 images ``[B, 3, S, S]`` → the backbone's spatial map (normalisation inside: batches travel as uint8)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone.eval()
        self.name = backbone.name

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor]:
        return (spatial_map(self.name, self.backbone.net, self.backbone.normalise(images_uint8)),)


class MapExtractor:
    """How the maps are computed on one device: OpenVINO or torch (``cpu_backend`` as ``image.cpu_backend``),
    precision, batch; ``choices`` says which (the artifact's info, the stage's console line)."""

    def __init__(self, backbone: Backbone, device: torch.device, *, cpu_backend: str = "auto",
                 batch_size: int = 16, engine_cache: Path | None = None, mixed_precision: bool = True):
        self.network, self.device, self.batch_size = MapNetwork(backbone).to(device), device, int(batch_size)
        self.side = int(backbone.input_size)
        example = torch.randint(0, 256, (self.batch_size, 3, self.side, self.side), dtype=torch.uint8)
        with torch.inference_mode():
            self.shape = tuple(self.network(example[:1].to(device))[0].shape[1:])  # (C, h, w)
        self.engine, self.precision = None, "fp32"
        if device.type == "cuda":
            self.precision = ("bf16" if gpu_inference_dtype(device) == torch.bfloat16 else "fp16") if mixed_precision \
                else "fp32"
            backend = "torch (GPU)"
        else:
            self.precision = "bf16" if cpu_supports_bf16() and mixed_precision else "fp32"
            self.engine, backend, _ = openvino_engine.select(
                cpu_backend, "regions", graph=self.network, weights=self.network, example=example,
                cache_dir=engine_cache, precision=self.precision, kind="spatial map", name=backbone.name)
        self.choices: dict[str, Any] = {"backend": backend, "precision": self.precision, "batch_size": self.batch_size,
                                        "map_shape": list(self.shape), "side": self.side}
        log.info(f"[regions] maps: {backbone.name}@{self.side} -> {self.shape[0]} x {self.shape[1]} x {self.shape[2]} "
                 f"on {describe_device(device)}, {backend}, {self.precision}, batch {self.batch_size}")

    @torch.inference_mode()
    def _torch(self, images: torch.Tensor) -> np.ndarray:
        dtype = AUTOCAST_DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.network(images.to(self.device))[0].float().cpu().numpy()

    def __call__(self, paths: list[Path], out: np.ndarray, *, workers: int, on_bad: str = "error",
                 desc: str = "maps") -> dict[str, Any]:
        """Every photo's map into ``out`` ``[N, C, h*w]`` (float16; e.g. an artifact's file), batch by batch: with
        OpenVINO the next batch is decoded while this one runs. Returns the timing."""
        if out.shape != (len(paths), self.shape[0], self.shape[1] * self.shape[2]):
            raise ValueError(f"maps: output shape {out.shape} != {(len(paths), self.shape[0], self.shape[1] * self.shape[2])}")
        transform = getattr(self.network.backbone, "eval_transform", None)
        loader = image_loader(ImageFiles(paths, self.side, on_bad=on_bad, transform=transform), self.batch_size, workers)
        start, row, pending = time.perf_counter(), 0, None

        def write(rows: np.ndarray) -> None:
            nonlocal row
            out[row: row + len(rows)] = rows.reshape(len(rows), self.shape[0], -1).astype(np.float16)
            row += len(rows)
            bar.update(len(rows))

        with progress(total=len(paths), desc=desc, unit="img", smoothing=0.05) as bar:
            for images in loader:
                if self.engine is None:
                    write(self._torch(images))
                    continue
                job = self.engine.submit(images.numpy())
                if pending is not None:
                    write(pending.result()[0])
                pending = job
            if pending is not None:
                write(pending.result()[0])
        seconds = time.perf_counter() - start
        return {"images": len(paths), "seconds": round(seconds, 1), "images_per_s": round(len(paths) / max(seconds, 1e-9), 1)}
