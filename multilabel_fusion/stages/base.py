"""What a stage is: one object that owns everything about its result.

A :class:`Stage` declares, once: its name, number and title; the settings section that shapes its key (which keys
of it shape what is read off the schema, :class:`multilabel_fusion.settings.Shapes`); the stages and blocks it
reads; :meth:`Stage.fit` (the keyed artifact, found or computed) and :meth:`Stage.run` (the artifact, then its
figures, submission and metrics); the feature blocks it offers the fused network and how they are read
(:meth:`Stage.block_arrays`); and its :class:`BlockPredictor`, which computes those blocks for new records, exports
itself into a bundle and reports its size. The registry (:mod:`.registry`) is the list of these objects; the
pipeline, the predictor, the bundle, the reports and the notebooks ask them and keep no list of their own.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from ..io.artifacts import Artifact, MissingArtifact
from ..io.atomic import load_torch
from ..networks.heads import MLPHead
from ..settings import Settings

log = logging.getLogger(__name__)

# ``Workspace`` and ``StageContext`` (multilabel_fusion.stages.context) appear in annotations as text only: that module
# imports this one, and no import points back at it.


class PredictorUnavailable(RuntimeError):
    """A stage cannot compute its blocks for a new record under these settings; the message says why."""


@dataclass(frozen=True)
class NewRecords:
    """Records the pipeline never saw: each a photo and its caption."""

    images: tuple[Path, ...]
    captions: tuple[str, ...]

    @classmethod
    def of(cls, images: Sequence[str | Path], captions: Sequence[str]) -> "NewRecords":
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        return cls(tuple(Path(p) for p in images), tuple(str(c) for c in captions))

    def __len__(self) -> int:
        return len(self.images)


def fold_mean(per_fold: Sequence[np.ndarray]) -> np.ndarray:
    """Fold models' outputs averaged exactly as cross-fitting averages the test rows (float32, summed in fold
    order), so that a test record's block row is the stage's own."""
    total: Any = 0
    for rows in per_fold:
        total = total + np.asarray(rows, dtype=np.float32) / len(per_fold)
    return total


def tensor_bytes(obj: Any) -> bytes:
    """``torch.save`` into bytes (a bundle entry)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def module_bytes(module: torch.nn.Module) -> bytes:
    """A whole network (architecture and weights, on the CPU) as a bundle entry; the module itself is left as it is."""
    import copy

    return tensor_bytes(copy.deepcopy(module).cpu())


def load_module(blob: bytes) -> torch.nn.Module:
    """A network from :func:`module_bytes` (a pickled module: the bundle's manifest vouches for it)."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


def load_tensors(blob: bytes) -> Any:
    """Tensors (a state dict) from a bundle entry; nothing but tensors and plain containers is unpickled."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def best_weights(run_dir: str, models_dir: Path, stage: "Stage") -> dict:
    """The best weights of a training run an artifact records, found under the current models folder."""
    path = models_dir / Path(run_dir).parent.name / Path(run_dir).name / "best.pt"
    if not path.is_file():
        raise MissingArtifact(f"{path}: the trained weights behind the '{stage.name}' artifact are missing; "
                              f"run {stage.hint} again")
    return load_torch(path, remedy=f"delete the folder {path.parent} and run {stage.hint} again")["model"]


def mlp_head(state: dict, hidden: int, dropout: float) -> MLPHead:
    head = MLPHead(int(state["mean"].shape[0]), hidden, dropout)
    head.load_state_dict(state)
    return head.eval()


class BlockPredictor:
    """A stage's blocks for new records, computed by the networks and models behind its artifact.

    ``blocks``: the blocks it computes; ``needs``: blocks of other stages it reads (the fused predictor computes
    those first and passes them in). :meth:`export` gives its bundle entries (a JSON-able description and files);
    :meth:`from_bundle` rebuilds it from them; :meth:`parts_mb` is its size, part by part.
    """

    stage: ClassVar[str] = ""
    needs: tuple[str, ...] = ()

    def __init__(self, blocks: Sequence[str]):
        self.blocks = tuple(blocks)
        self.description: dict[str, Any] = {}  # what it was made from (JSON): settings, the artifact's key
        self.device = torch.device("cpu")

    #: The fold networks it averages (one per fold of the shared split), if its outputs are fold averages.
    fold_networks: Sequence[torch.nn.Module] = ()

    @property
    def folds(self) -> int | None:
        """How many fold models it averages (None: it has none); they must match the fused network's."""
        return len(self.fold_networks) or None

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every block of ``self.blocks`` (float32, one row per record); ``given`` holds the blocks of ``needs``."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """The networks it runs (moved to the device by :meth:`to`): by default its fold networks."""
        return list(self.fold_networks)

    def to(self, device: torch.device) -> "BlockPredictor":
        self.device = device
        for module in self.modules():
            module.to(device)
        return self

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        """(description, files): files by bundle-relative name -> (the part they belong to, their bytes)."""
        raise NotImplementedError

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "BlockPredictor":
        """Rebuild from :meth:`export`'s description and files (``read(name)``; ``names``: the files present)."""
        raise NotImplementedError

    def parts_mb(self) -> dict[str, float]:
        """Megabytes of each part of what this predictor exports (the size a bundle gives it, uncompressed)."""
        parts: dict[str, float] = {}
        for part, data in self.export()[1].values():
            parts[part] = parts.get(part, 0.0) + len(data) / 2**20
        return parts


class Stage:
    """One stage of the pipeline (see the module's docstring). Subclasses set the class attributes and override
    what they do; an instance in the registry is the stage."""

    name: ClassVar[str] = ""  # used everywhere: pipeline.stages, fusion.blocks, artifacts, metrics
    number: ClassVar[str] = ""  # "01" ...: the order the pipeline runs them, and the script's prefix
    title: ClassVar[str] = ""
    module: ClassVar[str] = ""  # the script is stages/<number>_<module>.py
    section: ClassVar[str | None] = None  # the settings section that shapes its result
    blocks: ClassVar[tuple[str, ...]] = ()  # feature blocks the fused network can read from it
    writes: ClassVar[str] = ""
    optional_asset: ClassVar[str | None] = None  # without it the stage is skipped, loudly, not fatally
    predictor_type: ClassVar[type[BlockPredictor] | None] = None
    final: ClassVar[bool] = False  # the stage whose submission is output/predictions.csv (the fused network)
    reads_images: ClassVar[bool] = False  # its artifact is made from the photos: their content is in its key
    summary: ClassVar[str] = ""  # one line: what its notebook runs (README's table of notebooks)
    about: ClassVar[str] = ""  # what its notebook says about it
    notebook_cells: ClassVar[tuple[tuple[str, str], ...]] = ()  # (markdown, code) its notebook shows after its results

    # ------------------------------------------------------------------------------------------- identity
    @property
    def script(self) -> str:
        return f"stages/{self.number}_{self.module}.py"

    @property
    def label(self) -> str:
        return f"{self.number} {self.title}"

    @property
    def hint(self) -> str:
        """How a user makes this stage's artifact: its script."""
        return f"{self.script} (stage {self.label})"

    def __repr__(self) -> str:
        return f"<stage {self.label}>"

    # ------------------------------------------------------------------------------------------- what shapes it
    def reads(self, settings: "Settings", registry) -> tuple[str, ...]:
        """Stages whose artifacts it reads (their keys are in its spec); ``registry`` says who makes a block."""
        return ()

    def reads_blocks(self, settings: "Settings") -> tuple[str, ...]:
        """Feature blocks it reads (their keys are in its spec)."""
        return ()

    def effective_settings(self, ws: "Workspace") -> "Settings":  # noqa: F821
        """The settings this stage runs with under ``ws.settings`` (the fused network leaves out the blocks whose
        asset cannot be had)."""
        return ws.settings

    def settings_spec(self, settings: "Settings") -> dict[str, Any]:
        """The settings that shape its artifact: its section's, as the schema marks them."""
        return {self.section: settings[self.section].shaping()} if self.section else {}

    def spec(self, ws: "Workspace") -> dict[str, Any]:  # noqa: F821
        """What else shapes its artifact under ``ws.settings`` (asset identities from ``ws.assets``, code versions,
        the shared split and seed); may replace ``settings``. Raises
        :class:`multilabel_fusion.io.assets.AssetUnavailable` when an asset cannot be had."""
        return {}

    def block_spec(self, settings: "Settings", block: str) -> dict[str, Any] | None:
        """What shapes block ``block`` beyond the stage's artifact (e.g. the head behind the image probabilities)."""
        return None

    def block_kind(self, block: str) -> str | None:
        """The artifact kind block ``block`` is kept under when not the stage's own (keyed by the block's key)."""
        return None

    def block_problem(self, settings: "Settings", block: str) -> str | None:
        """Why block ``block`` cannot be made under ``settings`` (a setting it needs is off), or None: asked when the
        settings are checked, before any stage runs."""
        return None

    # ------------------------------------------------------------------------------------------- the work
    def found_or_computed(self, ctx: "StageContext", what: str, compute: Callable[[], "Artifact"], *,  # noqa: F821
                          kind: str | None = None, key: str | None = None, mmap: bool = False) -> tuple["Artifact", str]:
        """(the artifact, ``"reused"``) when ``kind``/``key`` (default: this stage's own) is kept, saying so in one
        line that names ``what`` it holds; else (``compute()``, ``"computed"``)."""
        found = ctx.store.load(kind or self.name, key or ctx.key(), mmap=mmap)
        if found is not None:
            log.info(f"[{self.name}] reusing {what} {found.dir}")
            return found, "reused"
        return compute(), "computed"

    def fit(self, ctx: "StageContext") -> "Artifact":  # noqa: F821
        """The stage's artifact for the current settings: found by key, or computed and kept."""
        raise NotImplementedError

    def run(self, ctx: "StageContext") -> dict[str, Any]:  # noqa: F821
        """The artifact, then the stage's submission, metrics file and figures; returns the metrics."""
        raise NotImplementedError

    def block_arrays(self, ctx: "StageContext", block: str) -> tuple[np.ndarray, np.ndarray]:  # noqa: F821
        """(train rows, test rows) of block ``block``: by default the artifact's ``train``/``test`` arrays for a
        block named as the stage, its out-of-fold ``probs``/``test_probs`` for ``<stage>_probs``."""
        art = ctx.require(self.name)
        ctx.check_rows(art, self)
        return (art["train"], art["test"]) if block == self.name else (art["probs"], art["test_probs"])

    def rows_for(self, settings: "Settings", art: "Artifact", picks: dict[str, tuple[str, np.ndarray]]):
        """The artifact's arrays for other records of the same photos (``picks[part] = (source part, source rows)``)
        when it depends on each photo alone (frozen features, detections), so a derived data set (the held-out
        check) computes nothing again; None when it does not (anything trained on the labels)."""
        return None

    # ------------------------------------------------------------------------------------------- new records
    def predictor_needs(self, settings: "Settings", blocks: Sequence[str]) -> tuple[str, ...]:
        """Blocks of other stages its predictor reads to compute ``blocks`` for a new record."""
        return ()

    def predictor(self, ws: "Workspace", blocks: Sequence[str]) -> BlockPredictor:  # noqa: F821
        """The :class:`BlockPredictor` of ``blocks`` from the artifacts of the workspace's settings (never trains;
        a missing artifact is a one-line error naming this stage's script)."""
        raise PredictorUnavailable(f"stage {self.label} offers no predictor for new records")
