"""Stage 04: COCO name mapping, refusal of non-COCO checkpoints, weight resolution order, the detection
cache, the original-YOLOv5 loader on real images, and ultralytics' path with an untrained model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multilabel_fusion import cache, config, detector, submission
from multilabel_fusion import data as D
from multilabel_fusion import labels as L

OFFLINE = Path(__file__).resolve().parent.parent.parent / "shared" / "assets" / "yolov5n.pt"
COCO80 = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
          "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
          "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
          "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
          "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
          "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
          "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
          "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
          "teddy bear", "hair drier", "toothbrush"]
SMALL = ["trainer.num_workers=0", "detector.image_size=64", "detector.batch_size=16"]


def _cfg(demo_data, tmp_path, *extra):
    return config.load(overrides=SMALL + list(extra), data=demo_data, output=tmp_path / "out",
                       models=tmp_path / "models")


def _needs_offline_weights():
    if not OFFLINE.is_file():
        pytest.skip(f"offline YOLOv5n checkpoint not at {OFFLINE} (only on the project's machines)")


# --------------------------------------------------------------------------------- names -> labels
def test_coco_names_map_to_the_18_labels_by_name_in_any_order():
    columns = detector.label_columns(COCO80)
    assert columns[:18].tolist() == list(range(18))  # person..horse are COCO indices 0..17
    assert (columns[18:] == -1).all()  # sheep, chair, ... ignored
    # a dict with another order (and other spellings of the same names) maps by name, not by index
    order = np.random.default_rng(0).permutation(80)
    shuffled = {i: COCO80[k].upper().replace(" ", "_") for i, k in enumerate(order)}
    cols = detector.label_columns(shuffled)
    for i, k in enumerate(order):
        assert cols[i] == (k if k < 18 else -1)
    assert L.names()[cols[list(order).index(16)]] == "dog"


@pytest.mark.parametrize("names", [[str(i) for i in range(80)], ["cat", "dog", "bird"],
                                   {0: "person", 1: "car", 2: "forklift"}])
def test_a_checkpoint_without_coco_names_is_refused(names):
    with pytest.raises(ValueError, match=r"custom\.pt: not a COCO detector"):
        detector.label_columns(names, "custom.pt")


def test_untrained_ultralytics_model_is_refused_naming_the_file(tmp_path):
    from ultralytics import YOLO

    path = tmp_path / "untrained.pt"
    YOLO("yolov5nu.yaml").save(str(path))  # offline: architecture from ultralytics' yaml, names '0'..'79'
    assert detector.checkpoint_kind(path) == "ultralytics"
    with pytest.raises(ValueError, match=r"untrained\.pt: not a COCO detector.*'0', '1'"):
        detector.load_detector(path)


def test_ultralytics_path_detects_through_yolo_predict(demo_data):
    from ultralytics import YOLO

    yolo = YOLO("yolov5nu.yaml")
    yolo.model.names = dict(enumerate(COCO80))  # untrained, but with COCO's names: exercises the code path
    det = detector.UltralyticsDetector("yolov5nu.yaml", "cpu", yolo=yolo)
    assert det.columns[0] == 0 and det.columns[79] == -1
    paths = sorted((demo_data / "data").glob("*.jpg"))[:3]
    run = detector.detect_images(det, paths, image_size=64, conf=0.0, iou=0.45, max_det=20, batch_size=2, workers=0)
    assert run.scores.shape == (3, 18) and run.boxes.shape[1] == 6 and len(run.boxes) == len(run.box_class)
    assert set(np.unique(run.boxes[:, 0])) <= {0, 1, 2} and len(run.boxes) > 0


# --------------------------------------------------------------------------------- weights
def test_weight_resolution_order(tmp_path, monkeypatch, capsys):
    explicit, offline, cached_dir = tmp_path / "mine.pt", tmp_path / "offline.pt", tmp_path / "ul_weights"
    explicit.write_bytes(b"x")
    offline.write_bytes(b"y")
    cached_dir.mkdir()
    monkeypatch.setattr(detector, "_ultralytics_weights_dir", lambda: cached_dir)
    calls = []

    def failing_download(name):
        calls.append(name)
        raise ConnectionError("offline")

    def cfg(weights):
        return config.load(overrides=[f"detector.weights={weights}", f"detector.offline_weights={offline}"])

    # an existing path wins: no cache look-up, no download
    assert detector.resolve_weights(cfg(explicit), download=failing_download) == (explicit, "path")
    assert calls == []
    # a name: the download fails -> the offline copy, saying why
    assert detector.resolve_weights(cfg("yolov5su.pt"), download=failing_download) == (offline, "offline")
    assert calls == ["yolov5su.pt"] and "download yolov5su.pt: ConnectionError" in capsys.readouterr().out
    # a download that works is used
    got = tmp_path / "dl" / "yolov5su.pt"
    assert detector.resolve_weights(cfg("yolov5su.pt"), download=lambda n: got) == (got, "download")
    # ultralytics' cache comes before the download
    (cached_dir / "yolov5su.pt").write_bytes(b"z")
    assert detector.resolve_weights(cfg("yolov5su.pt"), download=failing_download) == (
        cached_dir / "yolov5su.pt", "cache")
    assert calls == ["yolov5su.pt"]
    # nothing anywhere: one error listing every place tried
    with pytest.raises(FileNotFoundError, match="no detector weights.*download yolov7.pt.*offline copy"):
        detector.resolve_weights(config.load(overrides=["detector.weights=yolov7.pt",
                                                        f"detector.offline_weights={tmp_path / 'none.pt'}"]),
                                 download=failing_download)


def test_download_fails_fast_when_offline(monkeypatch):
    import time

    monkeypatch.setattr(detector, "DOWNLOAD_HOST", ("host.invalid", 443))  # .invalid never resolves
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match="host.invalid unreachable"):
        detector._download("yolov5su.pt")
    assert time.perf_counter() - started < 5


# --------------------------------------------------------------------------------- letterbox
def test_letterbox_round_trip():
    image = np.zeros((213, 320, 3), np.uint8)
    boxed, meta = detector.letterbox(image, 640)
    assert boxed.shape == (640, 640, 3) and meta[0] == 2.0
    box = np.array([[10.0, 20.0, 300.0, 200.0]])
    r, left, top = meta[:3]
    in_boxed = box * r + np.array([left, top, left, top])
    assert np.allclose(detector.unletterbox(in_boxed, meta), box, atol=1e-4)
    assert (boxed[:top] == 114).all() and (boxed[top:top + 426] == 0).all()


# --------------------------------------------------------------------------------- the stage and its cache
class FakeDetector(detector.Detector):
    """COCO names; a person in every image (0.9), a dog (0.3) in every other one, a chair (ignored) always."""

    kind = "fake"

    def __init__(self):
        super().__init__(Path("fake.pt"), COCO80)

    def detect(self, batch, **kw):
        images, metas = batch
        assert images.shape[1:] == (3, kw["image_size"], kw["image_size"])
        out = []
        for meta in metas:
            k = len(out)
            cls = np.array([0, 56] + ([16] if k % 2 else []))
            conf = np.array([0.9, 0.8] + ([0.3] if k % 2 else []), np.float32)
            xyxy = np.tile(np.array([[1, 1, 20, 20]], np.float32), (len(cls), 1))
            out.append(detector.Detections(xyxy, conf, cls))
        return out


def test_stage_caches_detections_and_recomputes_on_changed_settings(demo_data, tmp_path, monkeypatch):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    loads = []
    monkeypatch.setattr(detector, "load_detector", lambda *a, **k: loads.append(a[0]) or FakeDetector())
    m1 = detector.run_stage(_cfg(demo_data, tmp_path, f"detector.weights={weights}"))
    assert len(loads) == 1 and m1["cache"] == "computed" and m1["weights"]["source"] == "path"
    out = tmp_path / "out"
    data = D.load(demo_data)
    block = cache.load_block(out, "detector", data.fingerprint())  # what stage 03 reads by name
    n_train, n_test = len(data.train), len(data.test)
    assert block["train"].shape == (n_train, 18) and block["test"].shape == (n_test, 18)
    assert block["train"][:, 0].min() == pytest.approx(0.9) and block["train"][:, 1:].max() == pytest.approx(0.3)
    assert np.array_equal(block["train_ids"], data.train["ImageID"].to_numpy(str))
    assert len(block["train_boxes"]) == len(block["train_box_class"]) and block["train_boxes"].shape[1] == 6
    assert submission.validate_file(m1["submission"], demo_data / "test.csv") == n_test
    assert (out / "figures" / "detector_examples.png").stat().st_size > 10_000
    saved = json.loads((out / "metrics" / "detector.json").read_text())
    assert saved["figures"]["examples"].endswith("detector_examples.png") and saved["detection"]["images_per_s"] > 0

    # same settings: the cache is loaded and nothing is detected
    def no_detection(*a, **k):
        raise AssertionError("detection ran although the cache holds it")

    monkeypatch.setattr(detector, "detect_images", no_detection)
    m2 = detector.run_stage(_cfg(demo_data, tmp_path, f"detector.weights={weights}"))
    assert m2["cache"] == "reused" and m2["val_mean_f1_tuned"] == m1["val_mean_f1_tuned"] and len(loads) == 1
    # a changed setting (or changed weights) recomputes
    with pytest.raises(AssertionError, match="detection ran"):
        detector.run_stage(_cfg(demo_data, tmp_path, f"detector.weights={weights}", "detector.conf=0.1"))
    weights.write_bytes(b"other weights")
    with pytest.raises(AssertionError, match="detection ran"):
        detector.run_stage(_cfg(demo_data, tmp_path, f"detector.weights={weights}"))


# --------------------------------------------------------------------------------- real detection
def test_original_yolov5_checkpoint_detects_on_real_images(shared_data):
    """The built-in loader on the offline YOLOv5n: a person in 0.jpg (labelled 1) with a plausible box, and
    the labels of the first 32 records recovered about as well as the yolov5 package does (ASSETS.md: 0.754
    over 320 records at 640 px; this loader gives 0.756 there and 0.83 on these 32 at 320 px)."""
    _needs_offline_weights()
    from multilabel_fusion.metrics import mean_f1
    from multilabel_fusion.thresholds import decide

    assert detector.checkpoint_kind(OFFLINE) == "yolov5"
    det = detector.load_detector(OFFLINE)
    assert isinstance(det, detector.YoloV5Detector) and len(det.names) == 80 and det.names[16] == "dog"
    data = D.load(shared_data, check_images=False)
    assert data.train["ImageID"].iloc[0] == "0.jpg" and data.train["Labels"].iloc[0] == (1,)
    paths = data.image_paths("train")[:32]
    run = detector.detect_images(det, paths, image_size=320, conf=0.25, iou=0.45, multi_label=False,
                                 batch_size=16, workers=0)
    assert run.scores[0, 0] > 0.7, run.scores[0]  # person, high confidence
    # boxes in image pixels as the original YOLOv5 code gives them (yolov5==7.0.14, AutoShape, size 320,
    # whose rectangular letterbox pads differently, hence the tolerance): 0.jpg person, 3.jpg car
    for row, cls, expected, expected_conf in ((0, 0, (92.5, 72.6, 230.6, 318.9), 0.797),
                                              (3, 2, (24.8, 198.9, 108.0, 267.6), 0.544)):
        mine = (run.boxes[:, 0] == row) & (run.box_class == cls)
        best = run.boxes[mine][np.argmax(run.boxes[mine, 5])]
        assert np.allclose(best[1:5], expected, atol=3), best
        assert abs(best[5] - expected_conf) < 0.05 and best[5] == run.scores[row, L.column_of(cls + 1)]
    f1 = mean_f1(data.train_targets[:32], decide(run.scores, 0.25))  # person when nothing is found
    assert f1 > 0.75, f1


def test_the_checkpoint_unpickler_refuses_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    path = tmp_path / "payload.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(detector.UnsupportedCheckpoint, match="refusing to unpickle builtins.print"):
        detector.load_yolov5_checkpoint(path)
