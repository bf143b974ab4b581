"""Issue 28, GPU paths without a GPU: what extraction and training chose is said in one line and kept; JPEG decoding
on the device is chosen only for CUDA; its tensor logic (torchvision's decoder + the tensor resize), run here on the
CPU, gives the OpenCV path's images to 1 grey level and the same features; files it cannot take go to the CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from multilabel_fusion import settings as config
from multilabel_fusion.data import images as I
from multilabel_fusion.data.images import (EncodedImages, ImageFiles, JpegDecoder, collate_encoded,
                                           gpu_decode_wanted)
from multilabel_fusion.features import inference
from multilabel_fusion.features.inference import prepare_inference
from multilabel_fusion.networks import device as device_mod
from multilabel_fusion.networks.backbones import load_backbone
from multilabel_fusion.networks.precision import Precision, training_precision
from multilabel_fusion.training import trainer

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def _photos(shared_data, n: int = 12) -> list:
    return sorted((shared_data / "data").glob("*.jpg"))[:n]


def _batch(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def _decode(decoder: JpegDecoder, items: list) -> torch.Tensor:
    return decoder(collate_encoded(items))  # as the loader hands them over


# ------------------------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cuda", True), (True, "cuda", True), (False, "cuda", False), ("auto", "cuda:1", True),
    ("auto", "cpu", False), (True, "cpu", False), (True, "mps", False), (False, "cpu", False)])
def test_gpu_decoding_only_on_cuda_with_the_setting_on(setting, device, expected):
    assert gpu_decode_wanted(setting, torch.device(device)) is expected


def test_gpu_decode_setting_is_validated_and_shapes_no_key():
    cfg = config.load()
    assert cfg.image.gpu_decode == "auto"
    assert cfg.override("image.gpu_decode=true").image.gpu_decode is True
    assert cfg.override("image.gpu_decode=false").image.shaping("features") == cfg.image.shaping("features")
    with pytest.raises(config.ConfigError, match="gpu_decode"):
        cfg.override("image.gpu_decode=sometimes")
    with pytest.raises(ValueError, match="gpu_decode"):
        gpu_decode_wanted("yes", torch.device("cuda"))


def test_device_and_precision_descriptions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert device_mod.describe_device(torch.device("cuda:0")) == "cuda:0 (Tesla T4)"
    assert device_mod.describe_device(CPU) == "cpu"
    assert Precision("cuda", torch.float16, True).describe() == "fp16 autocast + GradScaler"
    assert Precision("cuda", torch.bfloat16, False).describe() == "bf16 autocast (no GradScaler)"
    assert training_precision(CPU, True).describe() == "fp32"


# ------------------------------------------------------------------------------------------- saying it


def test_a_cpu_extraction_says_what_it_chose_in_one_line(shared_data, caplog):
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "random"})
    with caplog.at_level(logging.INFO, logger="multilabel_fusion"):
        plan = prepare_inference(backbone, {"image_size": 32, "cpu_precision": "fp32", "feature_batch_size": 3,
                                            "cpu_backend": "torch", "gpu_decode": True}, CPU)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[image] inference:")]
    assert lines == ["[image] inference: efficientnet_lite0 on cpu, torch (asked for), fp32 (asked for), batch 3, "
                     f"channels-last, {plan.choices['conv_bn']}"]
    assert plan.gpu_decode is False and plan.choices["gpu_decode"] is False  # true asks for it only on CUDA
    assert plan.choices["batch_size"] == 3 and "gpu" not in plan.choices
    _, timing = inference.extract(plan, _photos(shared_data, 2), 0)
    assert "decoded_on" not in timing


def test_a_cpu_training_run_says_what_it_chose_and_keeps_it(tmp_path, caplog):
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), (torch.rand(40, 18) > 0.5).float()
    model = nn.Linear(6, 18)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="multilabel_fusion"):
        result = trainer.fit(model, train, DataLoader(TensorDataset(x, y), batch_size=16), y.numpy(),
                             loss_fn=nn.BCEWithLogitsLoss(), optimizer=torch.optim.Adam(model.parameters()),
                             run_dir=tmp_path / "run", epochs=1, patience=1, device=CPU, name="toy")
    assert "[toy] training on cpu, fp32, batch 8, torch" in [r.getMessage() for r in caplog.records]
    assert result.extra["training"] == {"device": "cpu", "precision": "fp32", "batch_size": 8, "engine": "torch"}


# ------------------------------------------------------------------------------------------- the same images


@pytest.mark.parametrize("size", [64, 224, 320])  # 64/224: every photo shrinks; 320: most enlarge on one side
def test_device_decoding_gives_the_cpu_paths_images(shared_data, size):
    """torchvision's decoder + the tensor resize (what runs on the GPU) against OpenCV's decode + resize: every pixel
    within 1 grey level, on average within 0.15."""
    paths = _photos(shared_data)
    reference = torch.stack(_batch(ImageFiles(paths, size))).float()
    items = _batch(EncodedImages(paths, size))
    assert all(t.dim() == 1 for t, _ in items)  # the loader only read the files
    decoder = JpegDecoder(CPU, size)
    got = _decode(decoder, items).float()
    assert decoder.counts == {"device": len(paths), "cpu": 0}
    diff = (got - reference).abs()
    assert diff.max() <= 1 and diff.mean() <= 0.15


def test_device_decoding_applies_a_weights_own_transform_as_the_cpu_path_does(shared_data):
    """ResNet50's published evaluation transform (shorter side 256, centre crop 224: torchvision ops) on the decoded
    photos, on the device path as on the CPU path: the same geometry, pixels within the decoders' rounding."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224)])
    paths = _photos(shared_data, 6)
    reference = torch.stack(_batch(ImageFiles(paths, 224, transform=transform))).float()
    decoder = JpegDecoder(CPU, 224, transform=transform)
    got = _decode(decoder, _batch(EncodedImages(paths, 224, transform=transform))).float()
    assert got.shape == reference.shape == (6, 3, 224, 224) and decoder.counts == {"device": 6, "cpu": 0}
    diff = (got - reference).abs()
    assert diff.max() <= 3 and diff.mean() <= 0.3
    squashed = torch.stack(_batch(ImageFiles(paths, 224))).float()
    assert (squashed - reference).abs().mean() > 5  # the transform was applied, not the square resize


def test_device_decoding_gives_the_same_features(shared_data):
    """The ImageNet EfficientNet-Lite0 over real photos, extracted through the device-decoding path (run on the CPU)
    and through the loader's OpenCV path: per-image cosine >= 0.9995 (1-grey-level rounding differences)."""
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    plan = prepare_inference(backbone, {"image_size": 96, "cpu_precision": "fp32", "feature_batch_size": 4,
                                        "cpu_backend": "torch"}, CPU)
    paths = _photos(shared_data, 8)
    cpu_path, _ = inference.extract(plan, paths, 0)
    plan.gpu_decode = True
    device_path, timing = inference.extract(plan, paths, 1)  # a loader worker reads the files, as on a GPU
    assert timing["decoded_on"] == {"gpu": 8, "cpu": 0}
    cosine = (cpu_path * device_path).sum(1) / np.linalg.norm(cpu_path, axis=1) / np.linalg.norm(device_path, axis=1)
    assert np.linalg.norm(cpu_path, axis=1).min() > 1.0 and cosine.min() >= 0.9995


# ------------------------------------------------------------------------------------------- falling back


def _png_and_rotated_jpeg(tmp_path):
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (40, 1, 3))
    png = tmp_path / "a.png"
    Image.fromarray(gradient).save(png)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: OpenCV applies it, torchvision's GPU decoder would not
    rotated = tmp_path / "rotated.jpg"
    Image.fromarray(gradient).save(rotated, "JPEG", exif=exif, quality=95)
    return png, rotated


def test_files_the_gpu_decoder_cannot_take_come_decoded_by_the_cpu_path(shared_data, tmp_path):
    png, rotated = _png_and_rotated_jpeg(tmp_path)
    missing = tmp_path / "missing.jpg"
    paths = [png, rotated, missing, _photos(shared_data, 1)[0]]
    items = _batch(EncodedImages(paths, 32, on_bad="replace"))
    assert [t.dim() for t, _ in items] == [3, 3, 3, 1]
    got = _decode(JpegDecoder(CPU, 32), items)
    reference = torch.stack(_batch(ImageFiles(paths, 32, on_bad="replace")))
    assert (got[:3] == reference[:3]).all() and (got[2] == I.GREY).all()
    assert (got[3].float() - reference[3].float()).abs().max() <= 1
    with pytest.raises(I.BadImageError, match="missing.jpg"):
        EncodedImages([missing], 32)[0]


def test_a_jpeg_the_decoder_rejects_is_decoded_on_the_cpu(shared_data, monkeypatch, caplog):
    paths = _photos(shared_data, 3)
    items = _batch(EncodedImages(paths, 48))
    rejected = items[1][0]
    real = I.decode_jpegs

    def picky(data, device):
        if any(torch.equal(t, rejected) for t in data):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, device)

    monkeypatch.setattr(I, "decode_jpegs", picky)
    decoder = JpegDecoder(CPU, 48)
    with caplog.at_level(logging.WARNING):
        got = _decode(decoder, items)
    assert decoder.active and decoder.counts == {"device": 2, "cpu": 1} and not caplog.records
    assert (got.float() - torch.stack(_batch(ImageFiles(paths, 48))).float()).abs().max() <= 1


def test_a_decoder_that_never_works_falls_back_wholesale_with_one_line(shared_data, monkeypatch, caplog):
    paths = _photos(shared_data, 4)
    calls = []

    def broken(data, device):
        calls.append(len(data))
        raise RuntimeError("torchvision was built without nvjpeg")

    monkeypatch.setattr(I, "decode_jpegs", broken)
    decoder = JpegDecoder(CPU, 40)
    items = _batch(EncodedImages(paths, 40))
    with caplog.at_level(logging.WARNING):
        first, second = _decode(decoder, items[:2]), _decode(decoder, items[2:])
    assert calls == [2, 1, 1]  # the batch, then each file once; the second batch is not tried on the device
    assert not decoder.active and "built without nvjpeg" in decoder.fallback
    assert [r.getMessage() for r in caplog.records] == [
        "[image] decoding JPEGs on cpu failed (RuntimeError: torchvision was built without nvjpeg): decoding on the CPU"]
    reference = torch.stack(_batch(ImageFiles(paths, 40)))
    assert torch.equal(torch.cat([first, second]), reference) and decoder.counts == {"device": 0, "cpu": 4}


def test_a_corrupt_jpeg_follows_on_bad_on_the_cpu_fallback(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8" + b"\x00" * 200 + b"\xff\xd9")  # JPEG markers, nothing decodable between
    items = _batch(EncodedImages([broken], 16))
    assert items[0][0].dim() == 1  # looks like a JPEG: the device decoder gets it, rejects it, the CPU path too
    decoder = JpegDecoder(CPU, 16, on_bad="replace")
    assert (_decode(decoder, items) == I.GREY).all()
    assert decoder.active  # a bad file is no reason to stop decoding on the device
    with pytest.raises(I.BadImageError, match="broken.jpg"):
        _decode(JpegDecoder(CPU, 16), items)
