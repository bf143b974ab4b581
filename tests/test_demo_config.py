import csv
import io

import pytest
from PIL import Image

from multilabel_fusion import settings as config
from multilabel_fusion.data import reader as data


def test_demo_data_has_the_raw_files_quirks_and_reads_exactly(demo_data):
    text = (demo_data / "train.csv").read_text()
    with pytest.raises(csv.Error):  # inner quotes are not doubled, as in the real file
        list(csv.reader(io.StringIO(text), strict=True))
    d = data.load(demo_data)
    assert len(d.train) == 120 and len(d.test) == 40
    assert d.train["Caption"].str.contains("\n").any() and d.train["Caption"].str.contains('"').any()
    assert d.test["ImageID"].iloc[0] == "30000.jpg"
    t = d.train_targets
    assert t.sum(1).min() >= 1 and t[:, 0].mean() > 0.4  # person is the commonest label
    with Image.open(d.image_paths("train")[0]) as im:
        assert im.mode == "RGB" and im.size == (160, 120)
    # the caption names at least one of its image's objects
    from multilabel_fusion.data import labels as L
    named = [any(L.LABEL_NAMES[x] in c for x in labs) for c, labs in zip(d.train["Caption"], d.train["Labels"])]
    assert all(named)


def test_config_defaults_and_overrides():
    cfg = config.load()
    assert cfg.image.backbone == "resnet50" and cfg.caption.seq_len == 8 and cfg.fusion.hidden == 2000
    assert cfg.path("data") == config.ROOT / "input"
    cfg = config.load(overrides=["fusion.lr=0.01", "fusion.blocks=[image, caption, detector]"], data="/tmp/x")
    assert cfg.fusion.lr == 0.01 and cfg.fusion.blocks == ("image", "caption", "detector")
    assert str(cfg.path("data")) == "/tmp/x"
    with pytest.raises(config.ConfigError, match=r"unknown key fusion.lrr \(did you mean fusion.lr\?\)"):
        config.load(overrides=["fusion.lrr=1"])
