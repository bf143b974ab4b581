"""How a CNN runs for feature extraction on the machine at hand: folded batch norm, layout, precision
chosen by measurement on a CPU, batch size; the streamed extraction loop and its bare-forward timing."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data.images import (EncodedImages, ImageFiles, JpegDecoder, collate_encoded, gpu_decode_wanted,
                           image_loader)
from ..io.hashing import file_digest
from ..io.progress import progress
from ..networks.backbones import Backbone, depth_extractor
from ..networks.device import describe_device
from ..networks.precision import AUTOCAST_DTYPES, gpu_inference_dtype
from . import openvino_engine

log = logging.getLogger(__name__)

def cpu_supports_bf16() -> bool:
    """True where bf16 instructions exist (AVX-512 BF16 / AMX); elsewhere bf16 is never tried."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def feature_batch_size(setting: Any, device: torch.device) -> int:
    """``auto``: 16 images per forward on a CPU (fastest measured: caches stay warm), 128 on a GPU."""
    if setting == "auto":
        return 16 if device.type == "cpu" else 128
    return int(setting)


@dataclass
class InferencePlan:
    """How a backbone runs for feature extraction on one device: which network copy, layout, precision, batch."""

    backbone: Backbone
    net: nn.Module  # the backbone's network, conv+batch-norm folded where possible (same outputs, fewer passes)
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    batch_size: int
    image_size: int
    memory_format: torch.memory_format
    choices: dict[str, Any]
    depths: bool = False  # net returns [pooled stage outputs ..., final]: multi-depth features in the same pass
    hflip: bool = False  # average the features of the image and its mirror image
    engine: Any = None  # an OpenVINOEngine running the same computation (uint8 in), or None: torch runs it
    gpu_decode: bool = False  # JPEGs decoded and resized on the device (CUDA), the loader only reading files
    int8_files: Path | None = None  # the folder of the quantized model (model.xml, model.bin) with cpu_precision int8

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)  # int8: OpenVINO runs it; torch (conversion, checks) in fp32
        if dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def example_batch(self) -> torch.Tensor:
        """A batch of random uint8 images of the extraction's shape (timing without any loading)."""
        return torch.randint(0, 256, (self.batch_size, 3, self.image_size, self.image_size), dtype=torch.uint8)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor):
        """uint8 [B, 3, S, S] → float32 features [B, dim] (normalised on the device, once per batch); with
        ``depths``, ``(features, depth_features)`` where the latter is every stage's pooled output and the final
        features concatenated; with ``hflip`` both are averaged with those of the mirrored images."""
        if self.engine is not None:
            return self.submit(images_uint8)()
        x = self.backbone.normalise(images_uint8.to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=self.memory_format)
        outputs = [self._forward(x)]
        if self.hflip:
            outputs.append(self._forward(x.flip(-1)))
        final = sum(o[0] for o in outputs) / len(outputs)
        if not self.depths:
            return final
        return final, sum(o[1] for o in outputs) / len(outputs)

    def submit(self, images_uint8: torch.Tensor) -> Callable[[], Any]:
        """Start computing what ``self(images_uint8)`` returns and give a function that waits for it: with an
        engine the batch runs while the caller decodes the next one; with torch it is computed here and now."""
        if self.engine is None:
            done = self(images_uint8)
            return lambda: done
        images = images_uint8.numpy()
        jobs = [self.engine.submit(images)]
        if self.hflip:
            jobs.append(self.engine.submit(np.ascontiguousarray(images[..., ::-1])))

        def result():
            outputs = [job.result() for job in jobs]
            averaged = [torch.from_numpy(sum(o[k] for o in outputs) / len(outputs)) for k in range(len(outputs[0]))]
            return (averaged[0], averaged[1]) if self.depths else averaged[0]

        return result

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.autocast():
            return self._outputs(x)

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The extraction's outputs of normalised images, in whatever precision the caller's autocast sets (none:
        fp32, as OpenVINO converts it)."""
        out = self.net(x)
        if not self.depths:
            return out.flatten(1).float(), None
        *stages, final = [out[k] for k in sorted(out, key=lambda k: (k == "final", k))]
        final = final.flatten(1).float()
        pooled = [s.float().mean((2, 3)) for s in stages] + [final]
        return final, torch.cat(pooled, 1)

    def depth_dims(self) -> list[int]:
        """Widths of the multi-depth features, stage by stage; the last is the final pooled features."""
        if not self.depths:
            return [self.backbone.dim]
        with torch.inference_mode():
            out = self.net(self.backbone.normalise(self.example_batch()[:1].to(self.device)))
        *stages, final = [out[k] for k in sorted(out, key=lambda k: (k == "final", k))]
        return [int(s.shape[1]) for s in stages] + [int(final.flatten(1).shape[1])]


def _fold_batch_norm(net: nn.Module) -> tuple[nn.Module, str]:
    """An inference copy of ``net`` with every conv+batch-norm pair folded into one conv (torch.fx)."""
    from torch.fx.experimental.optimization import fuse

    from ..networks.backbones import EnsembleNet

    if isinstance(net, EnsembleNet):  # each member on its own (the ensemble's own forward is not traceable)
        folded = [_fold_batch_norm(member) for member in net.nets]
        return net.replaced(nets=[f[0] for f in folded]), "; ".join(sorted({f[1] for f in folded}))
    try:
        return fuse(net.eval(), inplace=False), "conv+batch-norm folded (torch.fx)"
    except Exception as err:  # an architecture torch.fx cannot trace: run it as it is
        return net, f"not folded ({type(err).__name__})"


def _images_per_s(plan: InferencePlan, x: torch.Tensor, min_seconds: float = 0.0) -> float:
    """Images/s of ``plan(x)``, called once and then again until ``min_seconds`` have passed (no warm-up)."""
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        plan(x)
        calls += 1
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    return calls * len(x) / (time.perf_counter() - start)


def _time_precisions(plan: InferencePlan, precisions: tuple[str, ...], rounds: int = 3) -> dict[str, float]:
    """Median images/s of each precision over interleaved rounds at the real batch size.

    Interleaving makes a passing disturbance (another process, a frequency change) hit every candidate
    alike; a single short timing of each picked the slower precision once in a real run.
    """
    x = plan.example_batch()
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for precision in precisions:  # warm-up: oneDNN picks its kernels per precision on the first call
        plan.precision = precision
        plan(x)
    for _ in range(rounds):
        for precision in precisions:
            plan.precision = precision
            times[precision].append(_images_per_s(plan, x))
    return {p: round(float(np.median(t)), 1) for p, t in times.items()}


def prepare_inference(backbone: Backbone, cfg_image: dict, device: torch.device,
                      mixed_precision: bool = True, *, depths: bool = False, hflip: bool = False,
                      engine_cache: Path | None = None, calibration: list[Path] | None = None,
                      int8_model: tuple[bytes, bytes] | None = None) -> InferencePlan:
    """The fastest way to run ``backbone`` on ``device``, chosen by measuring where it is not obvious.

    On a CPU, bf16 made EfficientNet-Lite0 1.4x faster than fp32 but ResNet50 and VGG16 1.6x slower on an
    AVX-512 BF16 CPU without AMX (and AMX CPUs differ again), so ``cpu_precision: auto`` times both on a
    small batch and keeps the faster. ``cpu_backend`` (default torch for a bare dict): ``openvino`` runs the
    same network through OpenVINO (converted once, cached in ``engine_cache``), ``auto`` times both and keeps
    the faster; on a GPU torch always runs, and ``gpu_decode`` (default auto) decodes the JPEGs there too. What was
    chosen is logged in one line and kept in ``plan.choices`` (the artifact's info, the stage's metrics).

    ``cpu_precision: int8`` (CPU only) runs an NNCF int8 quantization of the network through OpenVINO, calibrated
    on the ``calibration`` photos (the last 16 check its agreement with fp32), or the stage's own quantized model
    ``int8_model`` (xml, bin) for a predictor.
    """
    if cfg_image.get("cpu_precision") == "int8" and device.type != "cpu":
        raise ValueError(f"image.cpu_precision int8 runs on a CPU (OpenVINO); on {device.type} choose auto")
    backbone.eval().to(device)
    fmt = torch.channels_last if cfg_image.get("channels_last", True) else torch.contiguous_format
    net, folded = _fold_batch_norm(backbone.net) if cfg_image.get("fuse_conv_bn", True) else (backbone.net, "off")
    if depths:  # the stage outputs of the (folded) network, returned by the same forward pass
        net = depth_extractor(backbone, net)
    net = net.to(device=device, memory_format=fmt)
    batch = feature_batch_size(cfg_image.get("feature_batch_size", "auto"), device)
    size = int(backbone.input_size or cfg_image["image_size"])  # an ensemble: its largest member's side
    choices: dict[str, Any] = {"conv_bn": folded, "channels_last": fmt == torch.channels_last, "batch_size": batch}
    choices.update(multi_depth=depths, hflip_average=hflip)
    plan = InferencePlan(backbone, net, device, "fp32", batch, size, fmt, choices, depths, hflip)
    plan.gpu_decode = choices["gpu_decode"] = gpu_decode_wanted(cfg_image.get("gpu_decode", "auto"), device)
    if device.type == "cuda":
        # bf16 only where the GPU computes it natively (compute capability >= 8.0); fp16 elsewhere (a T4)
        plan.precision = ("bf16" if gpu_inference_dtype(device) == torch.bfloat16 else "fp16") if mixed_precision else "fp32"
        choices["precision"] = f"{plan.precision} (GPU autocast)" if mixed_precision else "fp32 (mixed precision off)"
        choices["backend"] = "torch (GPU)"
        choices["gpu"] = torch.cuda.get_device_name(device)
        _log_plan(plan)
        return plan
    setting = cfg_image.get("cpu_precision", "auto")
    if setting not in ("auto", "fp32", "bf16", "int8"):
        raise ValueError(f"image.cpu_precision {setting!r}: choose auto, fp32, bf16 or int8")
    if setting == "int8":
        if calibration is None and int8_model is None:
            raise ValueError("image.cpu_precision int8: no calibration photos given")
        plan.precision, choices["precision"] = "int8", "int8 (asked for: NNCF post-training quantization)"
        _choose_int8_engine(plan, cfg_image.get("cpu_backend", "torch"), engine_cache, calibration, int8_model)
        _log_plan(plan)
        return plan
    if device.type != "cpu":
        choices["precision"] = f"fp32 ({device.type})"
    elif setting != "auto":
        plan.precision = setting
        choices["precision"] = f"{setting} (asked for)"
    elif not cpu_supports_bf16():
        choices["precision"] = "fp32 (this CPU has no bf16 instructions)"
    else:
        rates = _time_precisions(plan, ("fp32", "bf16"))
        plan.precision = max(rates, key=rates.get)
        choices["precision"] = f"{plan.precision} (measured here: " + ", ".join(
            f"{k} {v} img/s" for k, v in rates.items()) + ")"
    if device.type == "cpu":
        choose_cpu_backend(plan, cfg_image.get("cpu_backend", "torch"), engine_cache)
    else:
        choices["backend"] = f"torch ({device.type})"
    _log_plan(plan)
    return plan


def _log_plan(plan: InferencePlan) -> None:
    """One line: what runs the extraction (device, engine, precision, batch, layout, decoding on a GPU)."""
    c = plan.choices
    decode = "" if plan.device.type == "cpu" else (
        ", JPEGs decoded on the GPU" if plan.gpu_decode else ", images decoded on the CPU")
    log.info(f"[image] inference: {plan.backbone.name} on {describe_device(plan.device)}, {c['backend']}, "
             f"{c['precision']}, batch {plan.batch_size}, {'channels-last' if c['channels_last'] else 'NCHW'}, "
             f"{c['conv_bn']}{decode}")


def choose_cpu_backend(plan: InferencePlan, setting: str, engine_cache: Path | None) -> None:
    """Give ``plan`` an OpenVINO engine when ``image.cpu_backend`` asks for it or finds it faster here (see
    :func:`openvino_engine.select`); records the choice and the engines' agreement in ``plan.choices``."""
    graph = openvino_engine.UInt8Graph(plan.net, plan.backbone.normalise, plan._outputs)

    def torch_call(images: torch.Tensor):
        plan.engine = None
        return plan(images)

    plan.engine, plan.choices["backend"], agreement = openvino_engine.select(
        setting, "image", graph=graph, weights=plan.backbone, example=plan.example_batch(), cache_dir=engine_cache,
        precision=plan.precision, torch_call=torch_call, name=plan.backbone.name, depths=plan.depths,
        folded=plan.choices["conv_bn"])
    if agreement is not None:
        plan.choices["openvino_cosine_min"] = agreement


def _choose_int8_engine(plan: InferencePlan, setting: str, engine_cache: Path | None,
                        calibration: list[Path] | None, stored: tuple[bytes, bytes] | None) -> None:
    """The OpenVINO int8 engine for ``plan`` (see :func:`openvino_engine.select_int8`), calibrated on the photos'
    decoded batches as extraction decodes them; the quantized model's folder goes to ``plan.choices``."""
    paths = list(calibration or [])
    if stored is None and len(paths) < 32:
        raise ValueError(f"image.cpu_precision int8: {len(paths)} calibration photos; at least 32 (16 check it)")
    transform = getattr(plan.backbone, "eval_transform", None)

    def batches() -> list[np.ndarray]:
        dataset = ImageFiles(paths, plan.image_size, transform=transform)
        decoded = np.stack([dataset[i].numpy() for i in progress(range(len(paths)), desc="int8 calibration photos",
                                                                  unit="img")])
        calibrate, check = decoded[:-16], decoded[-16:]
        return [calibrate[i: i + plan.batch_size] for i in range(0, len(calibrate), plan.batch_size)] + [check]

    identity = hashlib.sha256("".join(file_digest(p, None) for p in paths).encode()).hexdigest()[:16]
    graph = openvino_engine.UInt8Graph(plan.net, plan.backbone.normalise, plan._outputs)
    plan.engine, plan.choices["backend"], made = openvino_engine.select_int8(
        setting, "image", graph=graph, weights=plan.backbone, example=plan.example_batch(), cache_dir=engine_cache,
        calibration=batches, calibration_id=f"{len(paths)} photos {identity}", stored=stored,
        name=plan.backbone.name, depths=plan.depths, folded=plan.choices["conv_bn"])
    if made is not None:
        plan.choices["int8_model"] = str(made.folder) if made.folder else None
        plan.choices["int8_cosine"] = made.record["int8_cosine"]
        plan.int8_files = made.folder


def extract(plan: InferencePlan, paths: list[Path], workers: int, out: np.ndarray | None = None,
            desc: str = "features", on_bad: str = "error",
            depths_out: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Pooled features of every image, streamed batch by batch into ``out`` (e.g. a memory-mapped cache file).

    Memory stays bounded by a few batches whatever the number of images; returns (features, timing), the
    timing's ``seconds`` unrounded (a short run takes well under 0.1 s: rates are computed from it).
    With a multi-depth plan, the depth features stream into ``depths_out`` in the same pass.
    """
    if out is None:
        out = np.empty((len(paths), plan.backbone.dim), dtype=np.float32)
    if out.shape != (len(paths), plan.backbone.dim):
        raise ValueError(f"extract: output shape {out.shape} != {(len(paths), plan.backbone.dim)}")
    transform = getattr(plan.backbone, "eval_transform", None)  # a weights' own resize and crop (older bundles: none)
    decoder = JpegDecoder(plan.device, plan.image_size, on_bad, transform) if plan.gpu_decode else None
    if decoder is not None:  # loader workers only read the files; the GPU decodes, resizes and crops
        loader = image_loader(EncodedImages(paths, plan.image_size, on_bad=on_bad, transform=transform),
                              plan.batch_size, workers, collate_fn=collate_encoded)
    else:
        loader = image_loader(ImageFiles(paths, plan.image_size, on_bad=on_bad, transform=transform),
                              plan.batch_size, workers)
    start, row = time.perf_counter(), 0

    def write(feats) -> None:
        nonlocal row
        if plan.depths:
            feats, depth_feats = feats
            if depths_out is not None:
                depths_out[row: row + len(feats)] = depth_feats.cpu().numpy()
        feats = feats.cpu().numpy()
        out[row: row + len(feats)] = feats
        row += len(feats)
        bar.update(len(feats))

    with progress(total=len(paths), desc=desc, unit="img", smoothing=0.05) as bar:
        pending = None  # the previous batch, still running while this one was decoded
        for images in loader:
            running = plan.submit(images if decoder is None else decoder(images))
            if pending is not None:
                write(pending())
            pending = running
        if pending is not None:
            write(pending())
    seconds = time.perf_counter() - start
    timing = {"images": len(paths), "seconds": seconds, "images_per_s": round(len(paths) / max(seconds, 1e-9), 1)}
    if decoder is not None:
        timing["decoded_on"] = {"gpu": decoder.counts["device"], "cpu": decoder.counts["cpu"]}
        if decoder.fallback:
            timing["gpu_decode_fallback"] = decoder.fallback
    return out, timing


def bare_forward_throughput(plan: InferencePlan, seconds: float = 10.0) -> float:
    """Images/s of everything but loading: the same call as :func:`extract` on a batch already in memory."""
    x = plan.example_batch()
    plan(x)  # warm-up
    return _images_per_s(plan, x, min_seconds=seconds)

