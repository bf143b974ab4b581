"""The canonical (Colab) route of every pretrained asset, proven offline: files placed exactly where torchvision,
gensim-data and ultralytics would have downloaded them (tiny or random content, temporary folders; never the user's
~/.cache, ~/gensim-data or the repository's own folders) are found, used, and recorded as what they are; gzipped
word2vec files load, and a damaged one is one line naming it."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.data import demo, text
from multilabel_fusion.data import reader as D
from multilabel_fusion.io import assets
from multilabel_fusion.io.atomic import DamagedFile

REPO = Path(__file__).resolve().parent.parent
SMALL = ["trainer.num_workers=0", "split.folds=2", "image.cpu_precision=fp32", "image.cpu_backend=torch",
         "image.head_epochs=2", "image.head_hidden=16", "image.feature_batch_size=8", "caption.epochs=2",
         "detector.image_size=64", "detector.zoom_size=96", "detector.batch_size=8", "detector.examples=2", "detector.threads=1",
         "detector.cpu_backend=torch"]

#: one intra-op thread (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    """A few demo records with 48 x 36 photos."""
    return demo.generate(tmp_path_factory.mktemp("canonical") / "data", 24, 6, seed=4, image_size=(48, 36))


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """Every canonical folder in ``tmp_path`` (torch hub, gensim-data, ultralytics' weights folder), and no network:
    a source found must be the file placed there, never a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.get_dir() follows TORCH_HOME
    monkeypatch.setenv("GENSIM_DATA_DIR", str(tmp_path / "gensim-data"))
    monkeypatch.setattr(assets, "_ultralytics_weights_dir", lambda: tmp_path / "ultralytics-weights")
    monkeypatch.setattr(assets, "online", lambda service, timeout=3.0: False)
    return tmp_path


def _cfg(data: Path, tmp_path: Path, *extra: str) -> config.Settings:
    return config.load(overrides=SMALL + list(extra), data=data, output=tmp_path / "out", models=tmp_path / "models",
                       assets=tmp_path / "no-assets")


# ------------------------------------------------------------------------------------------- ResNet50
def test_resnet50_in_the_torch_hub_cache_is_used_with_its_own_transform(few, offline):
    from PIL import Image
    from torchvision import models

    weights = models.ResNet50_Weights.IMAGENET1K_V1
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name  # where torchvision downloads it
    assert file.is_relative_to(offline)
    file.parent.mkdir(parents=True)
    torch.manual_seed(0)
    reference = models.resnet50().eval()
    torch.save(reference.state_dict(), file)
    cfg = _cfg(few, offline)
    assert (cfg.image.backbone, cfg.image.weights_version, cfg.image.eval_transform) == ("resnet50", "V1", "weights")

    found = assets.backbone_weights(cfg.image)
    assert (found.name, found.source, found.path, found.requested, found.tried) == (
        "resnet50", "local copy (torch hub cache)", file, None, [])
    assert found.identity == f"sha256:{assets.file_sha256(file)}"
    assert found.extra["torchvision_weights"] == "IMAGENET1K_V1" and "torch hub cache" in found.extra["description"]

    metrics = pipeline.run_stage("image", cfg)
    assert metrics["backbone"] == "resnet50" and metrics["weights"]["source"] == "local copy (torch hub cache)"
    assert metrics["weights"]["path"] == str(file) and metrics["feature_dim"] == 2048
    published = weights.transforms()
    assert metrics["transform"] == {"weights": "IMAGENET1K_V1", "resize_size": [256], "crop_size": [224],
                                    "interpolation": published.interpolation.value, "antialias": True,
                                    "mean": list(published.mean), "std": list(published.std)}
    artifact = pipeline.workspace(cfg).require("image")
    assert "shorter side 256 px, centre crop 224 px" in artifact.info["backbone"]["weights_used"]

    # the features are those of torchvision's published transform (PIL, resize 256, crop 224), not of a squash
    features = np.asarray(artifact["train"][:2], dtype=np.float32)
    reference.fc = torch.nn.Identity()
    photos = [Image.open(p).convert("RGB") for p in D.load(few).image_paths("train")[:2]]
    squash = models.ResNet50_Weights.IMAGENET1K_V1.transforms(crop_size=224, resize_size=224)
    with torch.no_grad():
        own = reference(torch.stack([published(p) for p in photos])).numpy()
        squashed = reference(torch.stack([squash(p.resize((224, 224), Image.BILINEAR)) for p in photos])).numpy()

    def error(x):
        return float(np.abs(features - x).max() / np.abs(x).max())

    assert error(own) < 0.05 and error(own) < error(squashed) / 3, (error(own), error(squashed))


def test_weights_version_and_transform_key_torchvision_features_only(few, tmp_path, offline):
    """The offline substitutes' keys never see the new settings (cached features stay valid); a torchvision
    backbone's key follows its weights' version and its transform."""
    from torchvision import models

    fallback = _cfg(few, tmp_path)  # no ResNet50 anywhere: the EfficientNet ensemble
    key = pipeline.workspace(fallback).key("image")
    assert pipeline.workspace(fallback).assets.backbone_weights(fallback.image).source == "offline fallback"
    for setting in ("image.eval_transform=squash", "image.weights_version=V2"):
        assert pipeline.workspace(_cfg(few, tmp_path, setting)).key("image") == key, setting
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    for version in ("V1", "V2"):
        name = Path(models.get_weight(f"ResNet50_Weights.IMAGENET1K_{version}").url).name
        torch.save(models.resnet50().state_dict(), hub / name)
    keys = {s: pipeline.workspace(_cfg(few, tmp_path, *s)).key("image") for s in
            [(), ("image.eval_transform=squash",), ("image.weights_version=V2",)]}
    assert len(set(keys.values()) | {key}) == 4
    with pytest.raises(config.ConfigError, match=r"^config: image.weights_version = 'V2': vgg16 has no torchvision "
                                                 r"weights IMAGENET1K_V2 \(only IMAGENET1K_V1\)$"):
        _cfg(few, tmp_path, "image.backbone=vgg16", "image.weights_version=V2")


# ------------------------------------------------------------------------------------------- glove-twitter-100
#: gensim-data's glove-twitter-100/__init__.py, as it ships beside the vectors.
GENSIM_INIT = '''import os

from gensim.models import KeyedVectors
from gensim.downloader import base_dir


def load_data():
    path = os.path.join(base_dir, 'glove-twitter-100', 'glove-twitter-100.gz')
    model = KeyedVectors.load_word2vec_format(path)
    return model
'''


def _caption_words(data: Path) -> list[str]:
    records = D.load(data)
    captions = list(records.train["Caption"]) + list(records.test["Caption"])
    return sorted({w for c in captions for w in text.clean_caption(c)})


def _word2vec_text(words: list[str], dim: int, seed: int = 0) -> tuple[str, np.ndarray]:
    vectors = np.random.default_rng(seed).normal(size=(len(words), dim)).round(4).astype(np.float32)
    lines = [f"{len(words)} {dim}"] + [w + " " + " ".join(f"{x:.4f}" for x in v) for w, v in zip(words, vectors)]
    return "\n".join(lines) + "\n", vectors


def test_glove_twitter_in_gensim_data_is_used_offline_and_converted_once(few, offline):
    words = _caption_words(few) + ["rt", "lol"]
    content, vectors = _word2vec_text(words, 100)
    folder = offline / "gensim-data" / "glove-twitter-100"  # gensim-data's layout: <GENSIM_DATA_DIR>/<name>/
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(GENSIM_INIT)
    with gzip.open(folder / "glove-twitter-100.gz", "wt", encoding="utf-8") as f:
        f.write(content)
    cfg = _cfg(few, offline)
    cache = offline / "models" / "vectors"

    metrics = pipeline.run_stage("caption", cfg)  # the first to ask for the vectors: converts the local copy
    found = metrics["vectors"]
    assert (found["name"], found["source"], found["requested"], found["tried"]) == (
        "glove-twitter-100", "local copy (gensim-data)", None, ["local copy: absent"])
    assert found["identity"] == "glove-twitter-100:gensim-data" and found["path"] == str(cache / "glove-twitter-100.kv")
    assert str(folder / "glove-twitter-100.gz") in found["description"] and "converted" in found["description"]
    assert (found["dim"], found["words"]) == (100, len(words)) and metrics["oov"]["oov_words"] == 0
    # a later run reads the converted copy: the same asset (identity), so the same artifact
    again = assets.word_vectors(cfg.caption, cache)
    assert (again.source, again.identity, again.tried) == ("local copy", found["identity"], [])
    np.testing.assert_array_equal(assets.load_vectors(again)[words[3]], vectors[3])
    assert pipeline.workspace(cfg).key("caption") == metrics["artifact_key"]


# ------------------------------------------------------------------------------------------- yolov5su.pt
def test_yolov5su_in_the_models_folder_is_the_canonical_detector(few, offline):
    from ultralytics import YOLO
    from ultralytics.utils import ROOT, YAML

    before = sorted(p.name for p in REPO.iterdir())
    coco = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    yolo = YOLO("yolov5nu.yaml")  # untrained, offline: ultralytics' own architecture file
    yolo.model.names = dict(coco)
    cfg = _cfg(few, offline, "detector.conf=0.001")
    file = assets.detector_weights_dir(cfg) / "yolov5su.pt"  # where the canonical download goes
    assert file == offline / "models" / "detector_weights" / "yolov5su.pt" and cfg.detector.weights == "yolov5su.pt"
    file.parent.mkdir(parents=True)
    yolo.save(str(file))

    found = assets.detector_weights(cfg)
    assert (found.name, found.source, found.path, found.requested, found.tried) == (
        "yolov5su.pt", "local copy (models folder)", file, None, ["path: absent"])
    metrics = pipeline.run_stage("detector", cfg)
    assert metrics["weights"]["source"] == "local copy (models folder)" and metrics["weights"]["path"] == str(file)
    assert metrics["weights"]["loader"] == "ultralytics" and metrics["weights"]["identity"] == found.identity
    assert metrics["detection"]["images"] == 30 and metrics["detections"] == "computed"
    assert sorted(p.name for p in REPO.iterdir()) == before  # nothing written at the repository root (no weights/)


# ------------------------------------------------------------------------------------------- vectors_path
@pytest.mark.parametrize("binary", [False, True])
def test_a_gzipped_word2vec_vectors_path_loads(tmp_path, offline, binary):
    from gensim.models import KeyedVectors

    words = ["dog", "cat", "horse"]
    kv = KeyedVectors(vector_size=5)
    kv.add_vectors(words, np.arange(15, dtype=np.float32).reshape(3, 5))
    path = tmp_path / "vectors.gz"
    kv.save_word2vec_format(str(path), binary=binary)
    caption = config.load(overrides=[f"caption.vectors_path={path}"]).caption
    found = assets.word_vectors(caption, tmp_path / "cache")
    assert (found.source, found.path, found.identity) == ("path", path, f"sha256:{assets.file_sha256(path)}")
    vectors = assets.load_vectors(found)
    assert vectors.index_to_key == words and vectors["cat"].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]


def test_a_damaged_vectors_path_is_one_line_naming_it(few, tmp_path, offline):
    good, _ = _word2vec_text(["dog", "cat"], 4)
    damaged = {"cut.gz": gzip.compress(good.encode())[:30], "foreign.gz": b"not gzip at all", "empty.txt": b"",
               "short.txt.gz": gzip.compress(b"2 4\ndog 1 2 3 4\ncat 1 2\n")}  # a vector of 2 numbers, not 4
    for name, data in damaged.items():
        path = tmp_path / name
        path.write_bytes(data)
        found = assets.word_vectors(config.load(overrides=[f"caption.vectors_path={path}"]).caption, tmp_path)
        with pytest.raises(DamagedFile) as err:
            assets.load_vectors(found)
        message = str(err.value)
        assert message.startswith(f"{path}: unreadable word vectors (") and "\n" not in message
        assert message.endswith("check the file given as caption.vectors_path")
    # the stage's command: it ends with that one line (exit status 1), not a traceback
    from multilabel_fusion import cli

    with pytest.raises(SystemExit) as ended:
        cli.stage_main("caption", ["--data", str(few), "--output", str(tmp_path / "out"), "--models",
                                   str(tmp_path / "models"), "--set", f"caption.vectors_path={tmp_path / 'cut.gz'}"])
    line = str(ended.value.code)
    assert line.startswith(f"error: {tmp_path / 'cut.gz'}: unreadable word vectors (") and "\n" not in line
