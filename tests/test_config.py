"""config.yaml schema: one-line errors before anything runs, typed overrides, immutable settings, the resolved YAML
dump, and which settings shape which result (read off the schema)."""

import argparse
import re

import pytest
import yaml

from multilabel_fusion import settings as C
from multilabel_fusion.settings import ConfigError


def error_of(overrides=None, path=None, **paths) -> str:
    with pytest.raises(ConfigError) as info:
        C.load(path, overrides, **paths)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config: ")
    return message


def shipped() -> dict:
    return yaml.safe_load(C.DEFAULT_CONFIG.read_text(encoding="utf-8"))


def write_config(tmp_path, raw: dict, name="my.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------- the shipped file


def test_shipped_config_validates_with_the_published_defaults():
    cfg = C.load()
    C.Settings.model_validate(shipped())  # the schema accepts the file as it is
    assert list(cfg.keys()) == list(C.SECTIONS) == list(shipped())  # same sections, in the file's order
    assert cfg.image.backbone == "resnet50" and cfg.caption.seq_len == 8 and cfg.fusion.hidden == 2000
    assert cfg.to_dict() == shipped()  # validation changes no default (ints stay ints, floats floats)
    assert cfg.path("data") == C.ROOT / "input" and cfg.path("assets") == C.ROOT / "assets"


def test_new_keys_and_their_defaults():
    cfg = C.load()
    assert cfg.paths.assets == "assets"
    assert cfg.data.bad_images == "error" and cfg.data.min_class_examples == 5
    assert cfg.detector.offline_weights == "yolov5n.pt"
    assert C.load(overrides=["detector.offline_weights=null"]).detector.offline_weights is None
    assert C.load(overrides=["data.bad_images=replace"]).data.bad_images == "replace"
    assert error_of(["data.bad_images=skip"]) == \
        "config: data.bad_images = 'skip': expected 'error' or 'replace'"
    assert error_of(["data.min_class_examples=0"]) == "config: data.min_class_examples = 0: must be >= 1"


def test_every_schema_key_is_in_the_shipped_file_and_commented():
    """The file stays the one place users read defaults: each key of the schema is there with a comment."""
    text = C.DEFAULT_CONFIG.read_text(encoding="utf-8")
    for name in ("assets", "bad_images", "min_class_examples", "offline_weights", "mixed_precision"):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{name}:"))
        assert "#" in line, line
    assert "compute capability >= 8.0" in text and "looked up in paths.assets" in text


# ----------------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_names_the_nearest_valid_one():
    assert error_of(["fusion.lrr=0.1"]) == "config: unknown key fusion.lrr (did you mean fusion.lr?)"
    assert "did you mean image.augment.hflip?" in error_of(["image.augment.hfilp=0.2"])
    assert error_of(["fusion.zzzz=1"]) == "config: unknown key fusion.zzzz"  # nothing close: no guess


def test_unknown_section_lists_the_sections():
    message = error_of(["nosection.x=1"])
    assert message == f"config: unknown section nosection (sections: {', '.join(C.SECTIONS)})"
    assert message.startswith("config: unknown section nosection (sections: paths, data, pipeline, ")
    assert "did you mean fusion?" in error_of(["fusoin.lr=0.1"])


def test_malformed_overrides():
    assert error_of(["fusion.lr"]) == "config: override 'fusion.lr' is not of the form section.key=value"
    assert "is not of the form section.key=value" in error_of(["fusion=0.1"])
    assert "is not of the form section.key=value" in error_of(["=0.1"])
    assert "image.augment is a section" in error_of(["image.augment=0.5"])
    assert "fusion.lr is a key, not a section" in error_of(["fusion.lr.x=1"])
    assert "not valid YAML" in error_of(["fusion.blocks=[image"])


def test_unknown_path_keyword():
    with pytest.raises(ConfigError, match=r"unknown key paths\.outptu \(did you mean paths\.output\?\)"):
        C.load(outptu="/tmp/x")


def test_typo_in_a_yaml_file_is_named_with_the_file(tmp_path):
    raw = shipped()
    raw["fusion"]["lrr"] = raw["fusion"].pop("lr")
    path = write_config(tmp_path, raw)
    message = error_of(path=path)
    assert message == f"config: unknown key fusion.lrr in {path} (did you mean fusion.lr?)"
    raw = shipped()
    raw["fusoin"] = raw.pop("fusion")
    assert f"unknown section fusoin in {path} (did you mean fusion?" in error_of(path=write_config(tmp_path, raw))


def test_problems_of_the_yaml_file_itself(tmp_path):
    raw = shipped()
    del raw["data"]["min_class_examples"]
    path = write_config(tmp_path, raw)
    assert error_of(path=path) == f"config: missing key data.min_class_examples in {path}"
    raw = shipped()
    raw["fusion"]["epochs"] = 0
    assert error_of(path=write_config(tmp_path, raw)) == f"config: fusion.epochs = 0: must be >= 1 in {path}"
    # an override repairs a bad file value, and the file's value is not blamed on the override
    assert C.load(path, ["fusion.epochs=3"]).fusion.epochs == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion:\n  lr: 0.1\n  lr: 0.2\n")
    assert "duplicate key 'lr'" in error_of(path=bad) and str(bad) in error_of(path=bad)
    bad.write_text("fusion: [unclosed\n")
    assert error_of(path=bad).startswith(f"config: {bad} is not valid YAML: ")
    bad.write_text("- just a list\n")
    assert "must be a mapping of sections" in error_of(path=bad)
    assert error_of(path=tmp_path / "missing.yaml") == f"config: no config file {tmp_path / 'missing.yaml'}"


# ----------------------------------------------------------------------------------------------- types and ranges


@pytest.mark.parametrize("override, expected", [
    ("fusion.lr=abc", "config: fusion.lr = 'abc': expected a number"),
    ("fusion.lr=true", "config: fusion.lr = True: expected a number"),
    ("fusion.lr=0", "config: fusion.lr = 0: must be > 0"),
    ("fusion.lr=.inf", "config: fusion.lr = inf: expected a finite number"),
    ("fusion.epochs=-1", "config: fusion.epochs = -1: must be >= 1"),
    ("fusion.epochs=abc", "config: fusion.epochs = 'abc': expected an integer"),
    ("fusion.epochs=2.5", "config: fusion.epochs = 2.5: expected an integer"),
    ("fusion.dropout=1.5", "config: fusion.dropout = 1.5: must be < 1"),
    ("fusion.dropout=-0.1", "config: fusion.dropout = -0.1: must be >= 0"),
    ("fusion.blocks=[]", "config: fusion.blocks = []: must not be empty"),
    ("fusion.blocks=image", "config: fusion.blocks = 'image': expected a list, e.g. [a, b]"),
    ("fusion.blocks=[image, 3]", "config: fusion.blocks[1] = 3: expected a string"),
    ("split.val_fraction=0", "config: split.val_fraction = 0: must be > 0"),
    ("split.val_fraction=1", "config: split.val_fraction = 1: must be < 1"),
    ("thresholds.rounds=0", "config: thresholds.rounds = 0: must be >= 1"),
    ("thresholds.at_least_one=maybe", "config: thresholds.at_least_one = 'maybe': expected true or false"),
    ("image.backbone=resnet",
     "config: image.backbone = 'resnet': unknown backbone 'resnet' (did you mean resnet50?): choose from resnet50, "
     "vgg16, efficientnet_lite0, efficientnet_lite2, as name[@size], several joined by +"),
    ("image.weights=coco", "config: image.weights = 'coco': expected 'imagenet' or 'random'"),
    ("image.cpu_precision=fp16", "config: image.cpu_precision = 'fp16': expected 'auto', 'fp32', 'bf16' or 'int8'"),
    ("image.feature_dtype=int8", "config: image.feature_dtype = 'int8': expected 'float16' or 'float32'"),
    ("image.feature_batch_size=0", "config: image.feature_batch_size = 0: expected auto or an integer >= 1"),
    ("image.head_hidden=-1", "config: image.head_hidden = -1: must be >= 0"),
    ("image.augment.hflip=2", "config: image.augment.hflip = 2: must be <= 1"),
    ("trainer.device=tpu", "config: trainer.device = 'tpu': expected 'auto', 'cpu', 'cuda' or 'mps'"),
    ("trainer.num_workers=-1", "config: trainer.num_workers = -1: expected auto or an integer >= 0"),
    ("trainer.num_workers=many", "config: trainer.num_workers = 'many': expected auto or an integer >= 0"),
    ("detector.conf=1", "config: detector.conf = 1: must be < 1"),
    ("detector.iou=0", "config: detector.iou = 0: must be > 0"),
    ("caption.seq_len=0", "config: caption.seq_len = 0: must be >= 1"),
    ("image=3", "config: override 'image=3' is not of the form section.key=value"),
])
def test_type_and_range_errors(override, expected):
    assert error_of([override]) == expected


def test_several_problems_on_one_line():
    message = error_of(["fusion.lr=abc", "fusion.epochs=-1"])
    assert message == "config: fusion.lr = 'abc': expected a number; fusion.epochs = -1: must be >= 1"


def test_valid_overrides_apply_with_their_types():
    cfg = C.load(overrides=[
        "fusion.lr=0.01", "fusion.blocks=[image, caption]", "caption.vectors_path=null", "fusion.epochs=3",
        "image.fine_tune=true", "trainer.num_workers=2", "image.feature_batch_size=auto", "caption.lr=1e-3",
        "image.augment.hflip=0", "image.head_hidden=0", "trainer.device=cpu",
    ], data="/tmp/x")
    assert cfg.fusion.lr == 0.01 and type(cfg.fusion.lr) is float
    assert cfg.fusion.blocks == ("image", "caption")  # a list setting is an immutable tuple
    assert cfg.caption.vectors_path is None
    assert cfg.fusion.epochs == 3 and type(cfg.fusion.epochs) is int
    assert cfg.image.fine_tune is True and cfg.trainer.num_workers == 2 and cfg.image.feature_batch_size == "auto"
    assert cfg.caption.lr == 0.001 and type(cfg.caption.lr) is float  # YAML 1.1 reads 1e-3 as text
    assert cfg.image.augment.hflip == 0.0 and cfg.image.head_hidden == 0 and cfg.trainer.device == "cpu"
    assert str(cfg.path("data")) == "/tmp/x"
    assert type(C.load(overrides=["fusion.lr=1"]).fusion.lr) is float  # an int is a fine float


def test_config_api():
    cfg = C.load()
    assert isinstance(cfg, C.Settings) and isinstance(cfg.image, C.Section) and isinstance(cfg.image.augment, C.Section)
    assert cfg["image"]["backbone"] == cfg.image.backbone and cfg.get("nope") is None
    with pytest.raises(AttributeError):
        cfg.nope
    section = cfg.section_dict("fusion")
    assert type(section) is dict and section == shipped()["fusion"]
    section["lr"] = 5
    assert cfg.fusion.lr == 0.001  # a copy
    assert type(cfg.section_dict("image")["augment"]) is dict
    with pytest.raises(KeyError):
        cfg.section_dict("nope")


def test_dump_yaml_round_trips_through_load(tmp_path):
    cfg = C.load(overrides=["fusion.lr=0.01", "fusion.blocks=[image, caption]", "caption.vectors_path=null",
                            "caption.weight_decay=1e-6", "image.weights_path=/w/resnet.pth"], output=tmp_path / "o")
    text = cfg.dump_yaml()
    assert "blocks: [image, caption]" in text
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    again = C.load(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.dump_yaml() == text
    assert again.caption.weight_decay == 1e-6 and again.paths.output == str(tmp_path / "o")


# ----------------------------------------------------------------------------------------------- command line


def parse(argv):
    return C.add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize("argv, fragment", [
    (["--set", "fusion.lrr=0.1"], "unknown key fusion.lrr (did you mean fusion.lr?)"),
    (["--set", "nosection.x=1"], "unknown section nosection (sections: paths, "),
    (["--set", "fusion.lr=abc"], "fusion.lr = 'abc': expected a number"),
    (["--set", "fusion.epochs=-1"], "fusion.epochs = -1: must be >= 1"),
    (["--set", "fusion.lr"], "override 'fusion.lr' is not of the form section.key=value"),
    (["--config", "/nonexistent/config.yaml"], "no config file /nonexistent/config.yaml"),
])
def test_from_args_exits_with_one_error_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        C.from_args(parse(argv))
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config: ") and fragment in lines[0]
    assert "Traceback" not in captured.err


def test_from_args_applies_options_and_overrides(tmp_path):
    args = parse(["--data", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "fusion.lr=0.01",
                  "--set", "fusion.blocks=[image, caption]"])
    cfg = C.from_args(args)
    assert cfg.path("data") == tmp_path and cfg.path("output") == tmp_path / "o"
    assert cfg.fusion.lr == 0.01 and cfg.fusion.blocks == ("image", "caption")
    assert cfg.paths.models == "models"  # not given: the file's value


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match=re.escape("did you mean fusion.lr?")):
        C.load(overrides=["fusion.lrr=0.1"])


def test_settings_are_immutable_and_an_override_makes_new_settings():
    cfg = C.load()
    with pytest.raises(Exception):
        cfg.fusion.lr = 0.5
    with pytest.raises(Exception):
        cfg.fusion = cfg.image
    with pytest.raises(AttributeError):
        cfg.fusion.blocks.append("image")  # a tuple
    changed = cfg.override("fusion.lr=0.01", "fusion.blocks=[image]")
    assert changed.fusion.lr == 0.01 and changed.fusion.blocks == ("image",)
    assert cfg.fusion.lr == 0.001 and cfg.fusion.blocks == tuple(shipped()["fusion"]["blocks"])  # untouched
    moved = cfg.with_paths(data="/tmp/elsewhere")
    assert moved.paths.data == "/tmp/elsewhere" and cfg.paths.data == "input"
    assert cfg.updated("fusion", blocks=["text"]).fusion.blocks == ("text",)
    with pytest.raises(ConfigError):
        cfg.override("fusion.lr=-1")  # validated like any override
    with pytest.raises(ConfigError):
        cfg.updated("fusion", lrr=0.1)


def test_what_shapes_a_result_is_read_off_the_schema():
    """Keys and run folders are derived from the schema's markers: no hand-written list of keys elsewhere."""
    cfg = C.load()
    image = cfg.image
    assert set(image.shaping("features")) == {"backbone", "weights", "offline_fallback", "image_size", "fine_tune",
                                              "cpu_precision", "feature_dtype", "depth_features", "hflip_average"}
    assert set(image.shaping("head")) == {"head_input", "head_hidden", "head_dropout", "head_lr", "head_batch_size",
                                          "head_epochs", "head_patience", "label1_weight"}
    assert set(image.shaping("head", weights_only=True)) == set(image.shaping("head")) - {"head_epochs",
                                                                                          "head_patience"}
    assert set(image.shaping("fine_tune", weights_only=True)) == {"lr", "batch_size", "max_train_images", "augment",
                                                                  "label1_weight"}
    assert set(cfg.caption.shaping()) - set(cfg.caption.shaping(weights_only=True)) == {"epochs", "patience"}
    assert set(cfg.detector.shaping()) == {"image_size", "zoom_size", "conf", "iou", "max_det", "multi_label"}  # not how to run
    # no second pass keys nothing: detections cached before zoom_size existed keep their key
    assert set(cfg.override("detector.zoom_size=null").detector.shaping()) == {"image_size", "conf", "iou", "max_det",
                                                                                "multi_label"}
    assert "comparisons" not in cfg.label_decoder.shaping() and "compare" not in cfg.label_decoder.shaping()
    assert set(cfg.label_decoder.shaping(weights_only=True)) == {"embed", "hidden", "proj_dropout", "lstm_dropout",
                                                                 "lr", "batch_size", "weight_decay", "grad_clip"}
    assert set(cfg.split.shaping("folds")) == {"folds", "val_fraction", "seed"}
    assert C.common_settings(cfg) == {"split": cfg.split.to_dict(),
                                      "trainer": {"seed": 0, "mixed_precision": True}}
    # a how-to-run setting changes no key: the same dict with another batch size
    assert cfg.override("detector.batch_size=2").detector.shaping() == cfg.detector.shaping()
