import json
import shutil

import numpy as np
import pytest
import torch

from multilabel_fusion import cache, config, data, image_network, trainer
from multilabel_fusion.data import DataError
from multilabel_fusion.image_network import WeightsUnavailable

SMALL = ["image.image_size=64", "image.feature_batch_size=32", "image.head_epochs=3", "image.head_hidden=32",
         "trainer.num_workers=0"]


def _cfg(demo_data, tmp_path, *extra):
    return config.load(overrides=SMALL + list(extra), data=demo_data, output=tmp_path / "out",
                       models=tmp_path / "models")


# ------------------------------------------------------------------------------------------- the cache
def test_cache_hit_miss_and_never_a_broken_cache(tmp_path):
    arrays = {"train": np.arange(12, dtype=np.float16).reshape(4, 3), "train_ids": np.array(["0.jpg"] * 4)}
    first = cache.FeatureCache(tmp_path, "image", {"backbone": "a", "size": 64}, "data1")
    assert first.load() is None
    first.save(arrays, info={"seconds": 1})
    hit = cache.FeatureCache(tmp_path, "image", {"size": 64, "backbone": "a"}, "data1").load()
    assert hit is not None and np.array_equal(hit["train"], arrays["train"])
    assert cache.FeatureCache(tmp_path, "image", {"backbone": "a", "size": 96}, "data1").load() is None
    assert cache.FeatureCache(tmp_path, "image", {"backbone": "a", "size": 64}, "data2").load() is None
    assert cache.load_block(tmp_path, "image", "data1")["manifest"]["info"] == {"seconds": 1}
    # a damaged array (e.g. an interrupted copy) is a miss, not a crash and not reused
    (first.dir / "train.npy").write_bytes((first.dir / "train.npy").read_bytes()[:-8])
    assert first.load() is None
    with pytest.raises(cache.MissingBlockError, match="damaged"):
        cache.load_block(tmp_path, "image", "data1")
    # a folder without its manifest (written last) is never used
    (first.dir / "manifest.json").unlink()
    assert first.load() is None


def test_stage_reuses_the_cache_and_recomputes_on_changed_settings(demo_data, tmp_path, monkeypatch):
    calls = []
    real_extract = image_network.extract

    def counting_extract(*args, **kwargs):
        calls.append(args[0].image_size)  # extract(plan, paths, workers, out, desc)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(image_network, "extract", counting_extract)
    m1 = image_network.run_stage(_cfg(demo_data, tmp_path))
    assert calls == [64, 64]  # train and test
    assert m1["backbone"] == "efficientnet_lite0" or m1["weights_used"].startswith("ImageNet")
    m2 = image_network.run_stage(_cfg(demo_data, tmp_path))
    assert calls == [64, 64] and m2["feature_cache"] == m1["feature_cache"]
    assert m2["val_mean_f1_tuned"] == m1["val_mean_f1_tuned"]
    image_network.run_stage(_cfg(demo_data, tmp_path, "image.image_size=96"))
    assert calls == [64, 64, 96, 96]
    metrics = json.loads((tmp_path / "out" / "metrics" / "image.json").read_text())
    assert len(metrics["per_class"]["f1"]) == 18 and metrics["extraction"]["images_per_s"] > 0
    assert (tmp_path / "out" / "submission_image.csv").is_file()
    assert (tmp_path / "out" / "figures" / "image_training.png").stat().st_size > 10_000


def test_interrupted_extraction_leaves_no_cache(demo_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo_data, broken)
    bad = sorted((broken / "data").iterdir())[-1]  # a test image: the train part is extracted first
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=bad.name):
        image_network.run_stage(_cfg(broken, tmp_path))
    image_dir = tmp_path / "out" / "features" / "image"
    assert not any(p.name.endswith(".tmp") or (p / "manifest.json").exists() for p in image_dir.iterdir())
    assert not (image_dir / "latest.json").exists()
    shutil.copy(demo_data / "data" / bad.name, bad)  # repaired: the stage now extracts and caches
    m = image_network.run_stage(_cfg(broken, tmp_path))
    assert (image_dir / "latest.json").exists() and m["extraction"]["images"] == 160


# ------------------------------------------------------------------------------------------- fast inference
def test_inference_plan_gives_the_backbones_own_features():
    backbone = image_network.load_backbone({"backbone": "resnet50", "weights": "random"})
    with torch.no_grad():  # non-trivial batch-norm statistics, so that folding them has something to fold
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        reference = backbone.eval()(images)
    plan = image_network.prepare_inference(backbone, {"image_size": 64, "cpu_precision": "fp32"}, torch.device("cpu"))
    assert plan.choices["conv_bn"].startswith("conv+batch-norm folded") and plan.precision == "fp32"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plan.net.modules())
    assert torch.allclose(plan(images), reference, rtol=1e-3, atol=1e-4)
    # auto precision: fp32 on a CPU without bf16 instructions, else the faster of the two as measured here
    auto = image_network.prepare_inference(backbone, {"image_size": 64}, torch.device("cpu"))
    assert auto.precision in ("fp32", "bf16") and auto.batch_size == 16
    if image_network.cpu_supports_bf16():
        assert "measured here" in auto.choices["precision"]
    features = auto(images)
    cosine = torch.nn.functional.cosine_similarity(features, reference).min()
    assert features.dtype == torch.float32 and cosine > 0.99
    with pytest.raises(ValueError, match="cpu_precision"):
        image_network.prepare_inference(backbone, {"image_size": 64, "cpu_precision": "int8"}, torch.device("cpu"))


def test_benchmark_times_each_backbone_and_records_it(demo_data, tmp_path, monkeypatch):
    from torchvision import models

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(models.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = _cfg(demo_data, tmp_path, "image.bench_bare_seconds=0.5")
    results = image_network.benchmark(cfg, "all", backbones=["efficientnet_lite0", "resnet50"])
    saved = json.loads((tmp_path / "out" / "metrics" / "image_benchmark.json").read_text())
    assert saved == json.loads(json.dumps(results)) and set(saved) == {"efficientnet_lite0", "resnet50"}
    lite, resnet = saved["efficientnet_lite0"], saved["resnet50"]
    assert lite["weights_used"].startswith("ImageNet") and "speed only" in resnet["weights_used"]
    assert lite["images"] == 160 and lite["whole_dataset"] and lite["extraction_seconds"] > 0
    # the ratio comes from unrounded rates; the file keeps rates to 0.1 img/s
    assert resnet["ratio"] == pytest.approx(resnet["full_extraction_images_per_s"] / resnet["bare_forward_images_per_s"],
                                            rel=0.01)
    assert resnet["meets_target"] == (resnet["ratio"] >= 0.90)
    assert (tmp_path / "out" / "figures" / "image_benchmark.png").stat().st_size > 10_000
    assert not list((tmp_path / "out").glob(".bench.*"))  # the temporary feature file is gone
    # the stage's metrics file carries the benchmark figures
    metrics = image_network.run_stage(cfg)
    assert metrics["benchmark"]["resnet50"]["images"] == 160


# ------------------------------------------------------------------------------------------- weights
def test_weight_resolution_order(tmp_path, monkeypatch, capsys):
    # 1. an explicit file wins
    lite = image_network._build("efficientnet_lite0", "random", None)[0]
    path = tmp_path / "lite0.pth"
    torch.save(lite.state_dict(), path)
    bb = image_network.load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet",
                                      "weights_path": str(path), "offline_fallback": None})
    assert bb.weights_used == f"explicit file {path} (sha256 {trainer.file_digest(path)})"
    # 2. the torch hub cache comes before the download
    from torchvision import models

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    cached.parent.mkdir(parents=True)
    reference = models.resnet50()
    torch.save(reference.state_dict(), cached)
    bb = image_network.load_backbone({"backbone": "resnet50", "weights": "imagenet", "offline_fallback": None})
    assert "torch hub cache" in bb.weights_used and bb.dim == 2048
    assert torch.equal(bb.net.conv1.weight, reference.conv1.weight)
    cached.unlink()

    # 3. a failed download falls back to the offline backbone, saying so; without a fallback it is an error
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(models.ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", offline)
    bb = image_network.load_backbone({"backbone": "resnet50", "weights": "imagenet",
                                      "offline_fallback": "efficientnet_lite0"})
    assert bb.name == "efficientnet_lite0" and "fallback: resnet50 weights unavailable" in bb.weights_used
    assert "falling back to backbone efficientnet_lite0" in capsys.readouterr().out
    with pytest.raises(WeightsUnavailable, match="could not be downloaded"):
        image_network.load_backbone({"backbone": "resnet50", "weights": "imagenet", "offline_fallback": None})
    # 4. random weights only when asked
    bb = image_network.load_backbone({"backbone": "vgg16", "weights": "random", "offline_fallback": None})
    assert bb.weights_used == "random initialisation (asked for)" and bb.dim == 4096


# ------------------------------------------------------------------------------------------- training
def test_one_real_training_step_on_cpu(shared_data, tmp_path):
    """Backbone + head, one optimiser step on 16 real competition images with the published augmentation."""
    d = data.load(shared_data, check_images=False)
    paths, targets = d.image_paths("train")[:24], d.train_targets[:24]
    backbone = image_network.load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    model = image_network.ImageClassifier(backbone)
    before = model.backbone.net._conv_stem.weight.detach().clone()
    aug = image_network.augmentation(96, {"scale_min": 0.6, "hflip": 0.5, "vflip": 0.1})
    train = image_network.image_loader(image_network.ImageFiles(paths[:16], 96, aug, targets[:16]), 16, 0)
    val = image_network.image_loader(image_network.ImageFiles(paths[16:], 96, None, targets[16:]), 8, 0)
    images, _ = next(iter(train))
    assert images.shape == (16, 3, 96, 96) and images.dtype == torch.uint8
    result = trainer.fit(model, train, val, targets[16:], loss_fn=trainer.weighted_bce(0.5),
                         optimizer=torch.optim.Adam(model.parameters(), lr=1e-4), checkpoint_dir=tmp_path / "ckpt",
                         epochs=1, patience=1, device=torch.device("cpu"), settings={"test": 1}, name="one-step")
    assert np.isfinite(result.history["train_loss"][0]) and 0 <= result.best_score <= 1
    assert not torch.equal(model.backbone.net._conv_stem.weight, before)
    assert (tmp_path / "ckpt" / "last.pt").is_file() and (tmp_path / "ckpt" / "best.pt").is_file()



def test_fine_tune_trains_on_cpu_and_resumes(demo_data, tmp_path):
    ft = ["image.fine_tune=true", "image.max_train_images=24", "image.batch_size=8", "image.epochs=1",
          "image.backbone=efficientnet_lite0"]
    m1 = image_network.run_stage(_cfg(demo_data, tmp_path, *ft))
    assert m1["mode"] == "fine-tune" and len(m1["history"]) == 1
    assert np.isfinite(m1["history"][0]["train_loss"])
    ckpt = torch.load(tmp_path / "models" / "image_finetune_efficientnet_lite0" / "last.pt", weights_only=False)
    pretrained = image_network.load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet"})
    key = "backbone.net._conv_stem.weight"
    assert not torch.equal(ckpt["model"][key], pretrained.net._conv_stem.weight)  # the backbone was trained
    # a second epoch resumes from last.pt instead of starting again
    m2 = image_network.run_stage(_cfg(demo_data, tmp_path, *ft[:-1], "image.epochs=2"), resume=True)
    assert [row["epoch"] for row in m2["history"]] == [1, 2]
    assert m2["feature_cache"] != m1["feature_cache"]  # features come from the newly fine-tuned network
