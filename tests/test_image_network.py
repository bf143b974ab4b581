import json

import numpy as np
import pytest
import torch

from multilabel_fusion import cache, config, image_network
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
        calls.append(args[2]["image_size"])
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


# ------------------------------------------------------------------------------------------- weights
def test_weight_resolution_order(tmp_path, monkeypatch, capsys):
    # 1. an explicit file wins
    lite = image_network._build("efficientnet_lite0", "random", None)[0]
    path = tmp_path / "lite0.pth"
    torch.save(lite.state_dict(), path)
    bb = image_network.load_backbone({"backbone": "efficientnet_lite0", "weights": "imagenet",
                                      "weights_path": str(path), "offline_fallback": None})
    assert bb.weights_used == f"explicit file {path}"
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
