"""The one list of stages: what each runs, reads, writes, and which settings shape its result.

Everything that needs to know the stages asks here: the main job (order and dependencies), the stage
scripts, the notebooks, the benchmark and the fused network (which blocks exist, who makes them). Adding a
stage is one module in ``multilabel_fusion/stages/`` (with ``run_stage`` and ``artifact_spec``) plus one
entry below.

An artifact's key is the hash of its *spec*: the settings that shape it, the identities of the pretrained
assets it used, the keys of the artifacts it read and the data's fingerprint. A stage computes the keys of
its inputs from the current configuration and finds exactly those artifacts, never "the latest" one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from .config import Config


@dataclass(frozen=True)
class Stage:
    name: str  # short name used everywhere: pipeline.stages, fusion.blocks, artifacts, metrics
    number: str  # "01" … the order of the published documents
    title: str
    module: str  # multilabel_fusion.stages.<module>: run_stage(cfg, ...) and artifact_spec(cfg, env)
    sections: tuple[str, ...]  # configuration sections that shape its result
    not_shaping: tuple[str, ...] = ()  # keys of those sections that only say how to run (speed, logging)
    blocks: tuple[str, ...] = ()  # feature blocks the fused network can read from it (see ``block_arrays``)
    optional_asset: str | None = None  # without this asset the stage is skipped, loudly, not fatally
    reads: Callable[[Config], list[str]] = lambda cfg: []  # stages whose artifacts it reads
    reads_blocks: Callable[[Config], list[str]] = lambda cfg: []  # feature blocks it reads (keys in its spec)
    writes: str = ""

    @property
    def script(self) -> str:
        return f"stages/{self.number}_{self.module}.py"

    @property
    def label(self) -> str:
        return f"{self.number} {self.title}"

    def load(self):
        return importlib.import_module(f"multilabel_fusion.stages.{self.module}")

    def run(self, cfg: Config, **kwargs) -> dict[str, Any]:
        return self.load().run_stage(cfg, **kwargs)

    def settings(self, cfg: Config) -> dict[str, Any]:
        """The settings of this stage's sections that shape its result (how-to-run keys left out)."""
        return {section: {k: v for k, v in cfg[section].to_dict().items() if k not in self.not_shaping}
                for section in self.sections}


def _fusion_reads(cfg: Config) -> list[str]:
    return list(dict.fromkeys(block_owner(b).name for b in cfg.fusion.blocks))


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("image", "01", "image network", "image_network", ("image",),
          not_shaping=("feature_batch_size", "channels_last", "fuse_conv_bn", "bench_bare_seconds"),
          blocks=("image", "image_depths", "image_probs"),
          writes="pooled CNN features of every image, out-of-fold head probabilities, CNN-only submission"),
    Stage("caption", "02", "caption network", "caption_network", ("caption",), blocks=("caption", "caption_probs"),
          writes="out-of-fold Bi-LSTM caption features and probabilities, caption-only submission"),
    Stage("fusion", "03", "fused network", "fusion", ("fusion",), reads=_fusion_reads,
          reads_blocks=lambda cfg: list(cfg.fusion.blocks), writes="output/predictions.csv"),
    Stage("detector", "04", "YOLO detector", "detector", ("detector",),
          not_shaping=("batch_size", "threads", "channels_last", "examples"), blocks=("detector", "detector_boxes"),
          optional_asset="COCO detector weights", writes="per-label detection scores, detector submission"),
    Stage("label_decoder", "05", "label decoder", "label_decoder", ("label_decoder",), blocks=("label_decoder",),
          not_shaping=("compare", "bce_baseline", "data_sizes", "curve_variant", "threads"), reads=lambda cfg: ["image", "caption"],
          writes="out-of-fold per-label scores of a recurrent label decoder, decoder submission, decoders vs BCE table"),
    Stage("text", "07", "text n-grams", "text_ngrams", ("text",), blocks=("text",),
          writes="out-of-fold TF-IDF + logistic-regression probabilities, text-only submission"),
    Stage("joint_embedding", "06", "joint embedding", "joint_embedding", ("joint_embedding",),
          not_shaping=("compare_strategies", "compare_encoders", "learning_curve", "retrieval_top"),
          blocks=("joint_embedding", "joint_embedding_probs"), reads=lambda cfg: ["image"],
          writes="image-caption joint embedding, retrieval, zero-shot and neighbour label scores"),
]}

#: Settings every trained result depends on besides its own sections.
COMMON_SECTIONS = ("split",)
TRAINER_SHAPING = ("seed", "mixed_precision")


def get(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def blocks() -> list[str]:
    """Names of every feature block the fused network can read."""
    return [b for s in STAGES.values() for b in s.blocks]


def block_owner(name: str) -> Stage:
    """The stage that makes block ``name``."""
    for stage in STAGES.values():
        if name in stage.blocks:
            return stage
    raise KeyError(f"no stage makes a block {name!r}; blocks: {', '.join(blocks())}")


def check_names(cfg: Config) -> None:
    """``pipeline.stages`` and ``fusion.blocks`` name known stages (one-line ValueError otherwise)."""
    import difflib

    for where, names, allowed in (("pipeline.stages", cfg.pipeline.stages, list(STAGES)),
                                  ("fusion.blocks", cfg.fusion.blocks, blocks())):
        for name in names:
            if name not in allowed:
                near = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ValueError(f"config: {where} names {name!r}{hint}; choose from {', '.join(allowed)}")


def order(names: list[str], cfg: Config) -> list[str]:
    """``names`` plus every stage they read, each after what it reads (a stage listed twice runs once)."""
    out: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        if name in out:
            return
        if name in path:
            raise ValueError(f"stages read each other in a cycle: {' -> '.join(path + (name,))}")
        for dep in get(name).reads(cfg):
            visit(dep, path + (name,))
        out.append(name)

    for name in names:
        visit(name)
    return out


def digest(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def common_settings(cfg: Config) -> dict[str, Any]:
    """What every trained artifact shares: the split and the trainer's seed and precision."""
    return {"split": cfg.split.to_dict(), "trainer": {k: cfg.trainer[k] for k in TRAINER_SHAPING}}


_SPECS: dict[str, dict[str, Any]] = {}


def artifact_spec(name: str, cfg: Config, data_fingerprint: str) -> dict[str, Any]:
    """The full spec of stage ``name``'s artifact under ``cfg``; its hash is the artifact's key.

    Computed recursively (a fused network's spec holds its blocks' keys); memoised per configuration,
    since resolving assets (hashing weights files) is not free.
    """
    memo = digest({"name": name, "cfg": cfg.to_dict(), "data": data_fingerprint, "images": _image_state(cfg)})
    if memo not in _SPECS:
        stage = get(name)
        inputs = {dep: artifact_key(dep, cfg, data_fingerprint) for dep in stage.reads(cfg)}
        inputs.update({f"block:{b}": block_key(b, cfg, data_fingerprint) for b in stage.reads_blocks(cfg)})
        spec = {"stage": name, "data": data_fingerprint, "inputs": inputs, "settings": stage.settings(cfg)}
        spec.update(stage.load().artifact_spec(cfg))  # a stage may narrow "settings" and add assets, versions
        _SPECS[memo] = spec
    return _SPECS[memo]


def _image_state(cfg: Config):
    """With grey stand-ins for bad images, which files are bad is part of what made an artifact: looked up
    afresh each time (a repaired file must not find the memoised key of the broken one)."""
    if cfg.data.bad_images != "replace":
        return None
    from .stages.base import replaced_images

    return replaced_images(cfg)


def artifact_key(name: str, cfg: Config, data_fingerprint: str) -> str:
    return digest(artifact_spec(name, cfg, data_fingerprint))


def block_key(block: str, cfg: Config, data_fingerprint: str) -> str:
    """The key of what block ``block`` holds: its stage's artifact key, plus what the stage says shapes that block
    beyond it (``block_spec(cfg, block)``, e.g. the head settings behind the image network's probabilities)."""
    owner = block_owner(block)
    module = owner.load()
    extra = module.block_spec(cfg, block) if hasattr(module, "block_spec") else None
    return digest({"block": block, "artifact": artifact_key(owner.name, cfg, data_fingerprint), "extra": extra})


def block_location(block: str, cfg: Config, data_fingerprint: str) -> tuple[str, str]:
    """(artifact kind, key) where block ``block`` is kept: its stage's artifact, unless the stage keeps it apart
    (``block_artifact_kind(block)``, e.g. the image head's probabilities, kept under the block's own key)."""
    owner = block_owner(block)
    module = owner.load()
    kind = module.block_artifact_kind(block) if hasattr(module, "block_artifact_kind") else None
    if kind is None:
        return owner.name, artifact_key(owner.name, cfg, data_fingerprint)
    return kind, block_key(block, cfg, data_fingerprint)
