"""image.cpu_precision int8: NNCF post-training quantization run by OpenVINO on a CPU. Refused where its features
drift from fp32's and never run off the CPU or through torch; on the stage, its own artifact key, the quantized
model kept in the artifact, reused by key, and the predictor (and a bundle) computing the stage's rows with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as D
from multilabel_fusion.features import openvino_engine
from multilabel_fusion.features.inference import prepare_inference
from multilabel_fusion.networks.backbones import load_backbone
from multilabel_fusion.stages import image as image_network
from multilabel_fusion.stages.base import NewRecords

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["image.backbone=efficientnet_lite0", "image.image_size=64", "image.head_epochs=2", "image.head_hidden=16",
         "trainer.num_workers=0", "split.folds=2"]


def test_int8_on_real_photos_is_refused_where_it_drifts_and_never_runs_off_the_cpu(shared_data, tmp_path):
    """At 64 px with 32 calibration photos the ImageNet Lite0's int8 features drift (median cosine ~0.96 on the 16
    check photos): refused with one line naming the figures. int8 asks for OpenVINO on a CPU: a GPU, the torch
    engine or too few photos are errors before anything runs."""
    backbone = load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    paths = D.load(shared_data, check_images=False).image_paths("train")[:48]
    cfg = {"image_size": 64, "cpu_precision": "int8", "feature_batch_size": 8, "cpu_backend": "openvino"}
    with pytest.raises(ValueError, match=r"int8 network's features drift from fp32's \(per-image cosine median 0\.9"):
        prepare_inference(backbone, cfg, torch.device("cpu"), engine_cache=tmp_path, calibration=paths)
    (made,) = [f for f in tmp_path.iterdir() if "int8_cosine" in (f / "record.json").read_text()]
    assert (made / "model.xml").read_text().count("FakeQuantize") > 10  # quantized for real, then refused
    with pytest.raises(ValueError, match="int8 runs on a CPU"):
        prepare_inference(backbone, cfg, torch.device("cuda"), calibration=paths)
    with pytest.raises(ValueError, match="int8 runs through OpenVINO: set image.cpu_backend"):
        prepare_inference(backbone, {**cfg, "cpu_backend": "torch"}, torch.device("cpu"), calibration=paths)
    with pytest.raises(ValueError, match="10 calibration photos; at least 32"):
        prepare_inference(backbone, cfg, torch.device("cpu"), engine_cache=tmp_path, calibration=paths[:10])
    with pytest.raises(config.ConfigError, match="cpu_precision"):
        config.load(overrides=["image.cpu_precision=int4"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return demo.generate(tmp_path_factory.mktemp("tiny") / "data", 40, 12, seed=3, image_size=(48, 36))


def test_int8_stage_keeps_its_model_reuses_it_and_the_predictor_gives_its_rows(tiny, tmp_path, monkeypatch):
    # generated pictures at 64 px drift more than photos: the agreement bar is the other test's; this one is
    # about keys, the artifact and the predictor
    monkeypatch.setattr(openvino_engine, "INT8_AGREEMENT", {"median": 0.0, "min": -1.0})
    cache = tmp_path / "engines"
    settings = config.load(overrides=SMALL + ["image.cpu_precision=int8", "image.cpu_backend=openvino",
                                              f"trainer.engine_cache={cache}"],
                           data=tiny, output=tmp_path / "out", models=tmp_path / "models")
    fp32 = settings.override("image.cpu_precision=fp32")
    ws = pipeline.workspace(settings)
    assert ws.key("image") != pipeline.workspace(fp32).key("image")  # other features, other key

    metrics = pipeline.run_stage("image", settings)
    assert metrics["extraction"]["precision"].startswith("int8")
    assert "quantized to int8" in metrics["extraction"]["backend"]
    art = ws.require("image")
    (folder,) = [f for f in cache.iterdir() if "int8_cosine" in (f / "record.json").read_text()]
    for name, array in image_network.INT8_FILES.items():
        assert np.asarray(art[array]).tobytes() == (folder / name).read_bytes()
    assert "FakeQuantize" in (folder / "model.xml").read_text()
    again = pipeline.run_stage("image", settings)
    assert again["features"] == "reused"

    shutil.rmtree(cache)  # the predictor runs the model the artifact keeps, whatever the cache holds
    data = D.load(tiny)
    records = NewRecords.of(data.image_paths("test"), data.test["Caption"].tolist())
    predictor = ws.registry.get("image").predictor(ws, ["image", "image_probs"])
    rows = predictor.transform(records, {})
    assert np.array_equal(rows["image"], np.asarray(art["test"], np.float32))
    assert not cache.exists() or not any(cache.iterdir())

    description, files = predictor.export()
    assert set(files) >= {"int8_model.xml", "int8_model.bin"}
    loaded = type(predictor).from_bundle(description, ["image", "image_probs"], lambda n: files[n][1], set(files),
                                         torch.device("cpu"))
    bundled = loaded.transform(records, {})
    assert np.array_equal(bundled["image"], rows["image"]) and np.array_equal(bundled["image_probs"],
                                                                              rows["image_probs"])
