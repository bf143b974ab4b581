"""Image feature extraction benchmark: full extraction (decode, resize, forward) vs the bare forward pass."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import reader as D
from ..evaluation import figures as plots
from ..features import openvino_engine
from ..features.inference import bare_forward_throughput, extract, prepare_inference
from ..io.assets import AssetUnavailable
from ..io.atomic import write_json
from ..networks.backbones import Backbone, load_backbone
from ..networks.device import num_workers, select_device
from ..settings import Settings
from ..stages.context import resolve_data
from ..stages.image import int8_calibration
from ..stages.outputs import cpu_name, load_metrics

log = logging.getLogger(__name__)

FORWARD_RATIO_TARGET = 0.90


def _benchmark_backbone(name: str, cfg: Settings, device: torch.device) -> Backbone:
    """The backbone to time: its real weights where they can be had, else random ones (same speed), saying so."""
    settings = {**cfg.image.to_dict(), "backbone": name, "offline_fallback": None}
    try:
        return load_backbone(settings)
    except AssetUnavailable as err:
        log.info(f"[image benchmark] {err}\n[image benchmark] timing {name} with random weights instead: "
                 f"throughput does not depend on the weight values")
        backbone = load_backbone({**settings, "weights": "random", "weights_path": None})
        backbone.weights_used = "random (ImageNet weights unavailable here; timed for speed only)"
        return backbone


def benchmark(cfg: Settings, images: int | str = 512, demo_mode: bool | str = False,
              backbones: list[str] | None = None, backends: list[str] | None = None) -> dict[str, Any]:
    """Full extraction (decode, resize, forward) vs bare forward, per backbone, on the same machine in one run.

    ``images="all"`` times every train and test image: the real time to extract the whole data set. The bare
    forward is measured before and after the extraction and averaged, so a drift in machine load shows
    up in both figures instead of skewing the ratio. Results are merged into
    ``output/metrics/image_benchmark.json`` (one entry per backbone) with a figure beside them.

    On a CPU with OpenVINO installed and ``image.cpu_backend: auto``, each backbone is timed with both engines
    (``backends``, default torch and openvino; entries ``<backbone> (<engine>)``) and the entries carry OpenVINO's
    speed-up over torch; otherwise with the engine ``image.cpu_backend`` names.
    """
    import tempfile

    cfg, _ = resolve_data(cfg, demo_mode)
    data_dir = cfg.path("data")
    data = D.load(data_dir, check_images=False)
    everything = data.image_paths("train") + data.image_paths("test")
    paths = everything if images == "all" else everything[: int(images)]
    device = select_device(cfg.trainer.device)
    workers = num_workers(cfg.trainer.num_workers, device)
    out_dir = cfg.path("output")
    results = load_metrics(out_dir, "image_benchmark") or {}
    if backends is None:
        both = device.type == "cpu" and openvino_engine.version() is not None and cfg.image.cpu_backend == "auto"
        backends = ["torch", "openvino"] if both else [cfg.image.cpu_backend]
    for name, backend in [(n, b) for n in backbones or [cfg.image.backbone] for b in backends]:
        entry = f"{name} ({backend})" if len(backends) > 1 else name
        backbone = _benchmark_backbone(name, cfg, device)
        settings = {**cfg.image.to_dict(), "cpu_backend": backend}
        int8 = settings["cpu_precision"] == "int8" and backend != "torch" and device.type == "cpu"
        if settings["cpu_precision"] == "int8" and not int8:  # torch (or a GPU) beside it: the fastest it has
            settings["cpu_precision"] = "auto"
        plan = prepare_inference(backbone, settings, device, cfg.trainer.mixed_precision,
                                 engine_cache=cfg.trainer.engine_cache,
                                 calibration=int8_calibration(data.image_paths("train")) if int8 else None)
        bare_before = bare_forward_throughput(plan, cfg.image.bench_bare_seconds)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".bench.") as tmp:  # bounded memory, like the stage
            sink = np.lib.format.open_memmap(Path(tmp) / "features.npy", mode="w+", dtype=np.float16,
                                             shape=(len(paths), backbone.dim))
            _, timing = extract(plan, paths, workers, sink, f"benchmark {entry}")
            del sink
        bare_after = bare_forward_throughput(plan, cfg.image.bench_bare_seconds)
        bare = (bare_before + bare_after) / 2
        full = len(paths) / max(timing["seconds"], 1e-9)  # unrounded seconds: a short run takes < 0.1 s
        ratio = full / bare
        results[entry] = {
            "backbone": name, "engine": backend, "weights_used": backbone.weights_used, "device": str(device),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loader_workers": workers, "image_size": plan.image_size, **plan.choices,
            "images": len(paths), "whole_dataset": len(paths) == len(everything), "data": str(data_dir),
            "extraction_seconds": round(timing["seconds"], 2), "full_extraction_images_per_s": round(full, 1),
            "bare_forward_images_per_s": round(bare, 1),
            "bare_forward_before_after": [round(bare_before, 1), round(bare_after, 1)],
            "ratio": round(ratio, 3), "ratio_target": FORWARD_RATIO_TARGET,
            "meets_target": bool(round(ratio, 3) >= FORWARD_RATIO_TARGET),
            "estimated_seconds_for_20000_images": round(20000 / full),
            "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
        if backend == "openvino" and "torch" in backends:  # both timed in this run, on this machine
            speedup = {kind: round(results[entry][kind] / results[f"{name} (torch)"][kind], 2)
                       for kind in ("full_extraction_images_per_s", "bare_forward_images_per_s")}
            results[entry]["openvino_over_torch"] = results[f"{name} (torch)"]["openvino_over_torch"] = speedup
            log.info(f"[image benchmark] {name}: OpenVINO over torch, full extraction "
                     f"{speedup['full_extraction_images_per_s']}x, bare forward {speedup['bare_forward_images_per_s']}x")
        log.info(f"[image benchmark] {entry} on {device} ({plan.choices['precision']}), {len(paths)} images: "
                 f"full extraction {full:.1f} img/s ({timing['seconds']:.1f} s), bare forward {bare:.1f} img/s, "
                 f"ratio {ratio:.2f} (target >= {FORWARD_RATIO_TARGET:.2f})")
        write_json(out_dir / "metrics" / "image_benchmark.json", results)  # after each backbone: nothing lost
    plots.throughput(results, out_dir / "figures" / "image_benchmark.png")
    return results
