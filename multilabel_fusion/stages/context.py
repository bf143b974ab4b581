"""A run's view of the stages: the data read and folded once, artifact keys, and the context a stage runs in.

An artifact's key is the hash of its *spec*: the settings that shape it (its section's, as the schema marks them),
the identities of the pretrained assets it used, the keys of the artifacts it read and the data's fingerprint. A
stage computes the keys of its inputs from the current settings and finds exactly those artifacts, never "the
latest" one. A :class:`Workspace` holds what one run shares (the loaded data and folds, resolved assets, computed
specs); nothing is kept in a module, so no run can be handed another configuration's result.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data import demo
from ..data import folds as F
from ..data import reader as D
from ..data.images import find_bad_images
from ..io.artifacts import Artifact, ArtifactStore
from ..io.assets import Assets
from ..io.atomic import write_text
from ..io.hashing import digest
from ..networks.device import seed_everything, select_device
from ..settings import Settings, common_settings
from .base import Stage

log = logging.getLogger(__name__)

#: A demo run writes under ``<output>/demo/`` (its generated data in ``<output>/demo/input/``) and ``<models>/demo/``:
#: results made from real data are never overwritten by demo rows.
DEMO_FOLDER = "demo"


def _in_demo_folders(settings: Settings) -> bool:
    output = settings.path("output")
    return output.name == DEMO_FOLDER and settings.path("data") == output / "input"


def demo_layout(settings: Settings, demo_mode: bool | str = False) -> tuple[Settings, bool, str | None]:
    """(settings, is_demo, note): with ``demo_mode=True``, or ``'auto'`` without competition files in ``paths.data``,
    new settings whose paths point at the demo folders, and what to tell the user once."""
    if _in_demo_folders(settings):
        return settings, True, None
    data_dir = settings.path("data")
    has_data = (data_dir / "train.csv").is_file() and (data_dir / "test.csv").is_file()
    if not (demo_mode is True or (demo_mode == "auto" and not has_data)):
        return settings, False, None
    output, models = settings.path("output") / DEMO_FOLDER, settings.path("models") / DEMO_FOLDER
    why = f"No competition data in {data_dir}" if demo_mode == "auto" else "Demo run (--demo)"
    note = (f"{why}: running on generated demo data in {output / 'input'}.\n"
            f"  Demo results go to {output}/ and checkpoints to {models}/ (never over results from real data).\n"
            f"  (Put the Kaggle files in input/ or pass --data PATH to run on the real data.)")
    return settings.with_paths(output=output, models=models, data=output / "input"), True, note


def resolve_data(settings: Settings, demo_mode: bool | str = False) -> tuple[Settings, bool]:
    """The settings to run with and whether they are a demo run's: the competition folder must hold the data, or
    (``demo_mode``) the generated demo data is made in the demo folders, and the user is told so."""
    settings, is_demo, note = demo_layout(settings, demo_mode)
    data_dir = settings.path("data")
    if not is_demo:
        if not ((data_dir / "train.csv").is_file() and (data_dir / "test.csv").is_file()):
            raise D.DataError(f"{data_dir}: no competition data here (train.csv and test.csv); put the Kaggle files "
                              "there, pass --data PATH, or run on generated demo data with --demo")
        return settings, False
    if note:
        log.info(note)
    demo.ensure(data_dir)
    return settings, True


class Workspace:
    """What one run shares: its settings, the registry, the data (read, checked and folded once), the resolved
    assets, the artifact store and the specs computed so far. Immutable settings: :meth:`derive` makes a workspace
    for other settings that shares the data and assets."""

    def __init__(self, settings: Settings, registry, *, demo: bool = False, resume: bool = False,
                 assets: Assets | None = None, shared: dict | None = None):
        self.settings, self.registry, self.demo, self.resume = settings, registry, demo, resume
        self.assets = assets or Assets()
        self._shared = shared if shared is not None else {"data": {}, "specs": {}}

    def derive(self, settings: Settings) -> "Workspace":
        return Workspace(settings, self.registry, demo=self.demo, resume=self.resume, assets=self.assets,
                         shared=self._shared)

    # ------------------------------------------------------------------------------------------- data
    def _loaded(self) -> tuple[D.CompetitionData, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        data_dir, split = self.settings.path("data"), self.settings.split
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (data_dir / "train.csv", data_dir / "test.csv"))
        key = (str(data_dir.resolve()), stamp, split.folds, split.val_fraction, split.seed)
        cache = self._shared["data"]
        if key not in cache:
            data = D.load(data_dir)
            targets = data.train_targets
            try:
                folds = F.fold_indices(targets, split.folds, split.val_fraction, split.seed)
            except ValueError:  # fewer records than folds: said below, in one line
                folds = None
            F.check_enough(targets, folds, split.folds, split.selection_fraction, split.seed,
                           str(data_dir / "train.csv"))
            cache.clear()
            cache[key] = (data, targets, folds)
        return cache[key]

    @property
    def data(self) -> D.CompetitionData:
        return self._loaded()[0]

    @property
    def targets(self) -> np.ndarray:
        return self._loaded()[1]

    @property
    def folds(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(fit, held-out) record indices shared by every stage; the held-out parts cover all records (K > 1)."""
        return self._loaded()[2]

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint()

    @property
    def images_fingerprint(self) -> str:
        """The content of every train and test photo (a changed photo changes the keys of what was made from it)."""
        memo = self._shared.setdefault("images", {})
        key = str(self.settings.path("data").resolve())
        if key not in memo:
            from ..data.fingerprint import images_fingerprint

            paths = self.data.image_paths("train") + self.data.image_paths("test")
            memo[key] = images_fingerprint(paths, self.output_dir / "cache" / "image_hashes.json")
        return memo[key]

    @property
    def output_dir(self) -> Path:
        return self.settings.path("output")

    @property
    def models_dir(self) -> Path:
        return self.settings.path("models")

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.output_dir)

    def replaced_images(self) -> list[str] | None:
        """With ``data.bad_images: replace``, the names of the images a grey one stands in for (part of the key of
        every artifact made from the images: a repaired file is read again, never served from the old artifact)."""
        if self.settings.data.bad_images != "replace":
            return None
        folder = self.settings.path("data") / "data"
        if str(folder) not in self._shared.setdefault("replaced", {}):  # decodes every image: once a run
            self._shared["replaced"][str(folder)] = (
                sorted(p.name for p, _ in find_bad_images(sorted(folder.glob("*")))) if folder.is_dir() else [])
        return self._shared["replaced"][str(folder)]

    # ------------------------------------------------------------------------------------------- keys
    def spec(self, name: str) -> dict[str, Any]:
        """The full spec of stage ``name``'s artifact under these settings; its hash is the artifact's key.

        Computed recursively (a fused network's spec holds its blocks' keys) and kept for this run only.
        """
        memo = digest({"name": name, "cfg": self.settings.to_dict(), "data": self.fingerprint,
                       "images": self.replaced_images()})
        specs = self._shared["specs"]
        if memo not in specs:
            stage = self.registry.get(name)
            inputs = {dep: self.key(dep) for dep in stage.reads(self.settings, self.registry)}
            inputs.update({f"block:{b}": self.block_key(b) for b in stage.reads_blocks(self.settings)})
            spec = {"stage": name, "data": self.fingerprint, "inputs": inputs,
                    "settings": stage.settings_spec(self.settings)}
            if stage.reads_images:
                spec["images"] = self.images_fingerprint
            spec.update(stage.spec(self))
            specs[memo] = spec
        return specs[memo]

    def key(self, name: str) -> str:
        return digest(self.spec(name))

    def block_key(self, block: str) -> str:
        """The key of what block ``block`` holds: its stage's artifact key, plus what the stage says shapes that
        block beyond it (:meth:`Stage.block_spec`)."""
        owner = self.registry.block_owner(block)
        return digest({"block": block, "artifact": self.key(owner.name),
                       "extra": owner.block_spec(self.settings, block)})

    def block_location(self, block: str) -> tuple[str, str]:
        """(artifact kind, key) where block ``block`` is kept: its stage's artifact, unless the stage keeps it apart
        (:meth:`Stage.block_kind`, e.g. the image head's probabilities, kept under the block's own key)."""
        owner = self.registry.block_owner(block)
        kind = owner.block_kind(block)
        if kind is None:
            return owner.name, self.key(owner.name)
        return kind, self.block_key(block)

    def require(self, name: str) -> Artifact:
        """Exactly the artifact of stage ``name`` for these settings, or a one-line error naming its script."""
        return self.store.require(name, self.key(name), self.registry.get(name).hint)

    def check_rows(self, art: Artifact, stage: Stage) -> None:
        """The artifact's rows are this data's records (a ValueError naming the stage to run again otherwise)."""
        for part in ("train", "test"):
            if f"{part}_ids" in art and not np.array_equal(art[f"{part}_ids"],
                                                          getattr(self.data, part)["ImageID"].to_numpy(str)):
                raise ValueError(f"{art.dir}: its {part} ImageIDs differ from {self.data.root}; re-run {stage.script}")

    def block_arrays(self, block: str) -> tuple[np.ndarray, np.ndarray, str]:
        """(train rows, test rows, key) of feature block ``block`` for these settings (float32), asked of the stage
        that makes it; a block without a row for some training record is refused."""
        owner = self.registry.block_owner(block)
        train, test = owner.block_arrays(self, block)
        train, test = np.asarray(train, dtype=np.float32), np.asarray(test, dtype=np.float32)
        if np.isnan(train).any():
            raise ValueError(f"block {block!r} has no out-of-fold row for some training records (made with other "
                             f"folds?); re-run {owner.script}")
        return train, test, self.block_key(block)

    def run_dir(self, network: str, settings: dict[str, Any]) -> Path:
        """The checkpoint folder of one training run, keyed by the settings that shape its weights.

        ``settings`` must leave out how long to train (epochs, patience): raising them continues the same run
        (``--resume``) instead of starting another; no run ever writes into another run's folder.
        """
        key = digest({"network": network, "data": self.fingerprint, **common_settings(self.settings), **settings})
        folder = self.models_dir / network / key
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "config.yaml", self.settings.dump_yaml())
        return folder

    # ------------------------------------------------------------------------------------------- a stage's context
    def context(self, name: str) -> "StageContext":
        """The context stage ``name`` runs in: these settings as the stage sees them, the device, the seed set."""
        stage = self.registry.get(name)
        settings = stage.effective_settings(self)
        return StageContext(stage, settings, self.registry, given=self.settings, demo=self.demo, resume=self.resume,
                            assets=self.assets, shared=self._shared)


class StageContext(Workspace):
    """The workspace as one stage sees it: the device it runs on, its warnings, when it started, the selection part
    of each fold, its bad images."""

    def __init__(self, stage: Stage, settings: Settings, registry, *, given: Settings | None = None, **kwargs):
        super().__init__(settings, registry, **kwargs)
        self.stage = stage
        self.given = given or settings  # the run's settings, before the stage narrowed them
        self.registry.check_names(settings)
        data, folds = self.data, self.folds
        seed_everything(settings.trainer.seed)
        self.device = select_device(settings.trainer.device)
        layout = (f"{len(folds)} folds of ~{len(folds[0][1])} held-out records" if len(folds) > 1
                  else f"{len(folds[0][0])} fit / {len(folds[0][1])} validation")
        log.info(f"data: {data.root} ({len(data.train)} train records: {layout}; {len(data.test)} test) | "
                 f"device: {self.device}")
        self.warnings = F.class_warnings(self.targets, folds[0][1], settings.data.min_class_examples)
        for warning in self.warnings:
            log.warning(f"WARNING: {data.root / 'train.csv'}: {warning}")
        self.started = time.time()

    @property
    def cfg(self) -> Settings:
        return self.settings

    @property
    def train_idx(self) -> np.ndarray:
        """The first fold's fit part (with ``split.folds: 1``, the training part of the one split)."""
        return self.folds[0][0]

    @property
    def val_idx(self) -> np.ndarray:
        return self.folds[0][1]

    @property
    def eval_idx(self) -> np.ndarray:
        """Records with a held-out prediction: every training record with K folds, the validation part with one."""
        return F.held_out_rows(self.folds)[0]

    @property
    def y_eval(self) -> np.ndarray:
        return self.targets[self.eval_idx]

    @property
    def y_val(self) -> np.ndarray:
        return self.targets[self.val_idx]

    @property
    def estimate(self) -> str:
        k = len(self.folds)
        return f"out-of-fold ({k} folds)" if k > 1 else "validation split"

    def spec(self, name: str | None = None) -> dict[str, Any]:
        """The spec of a stage's artifact under these settings (default: this stage's)."""
        return super().spec(name or self.stage.name)

    def key(self, name: str | None = None) -> str:
        return super().key(name or self.stage.name)

    def selection(self, k: int, fit_idx: np.ndarray, held_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows to train on, rows that choose the epoch) for fold ``k`` (:func:`multilabel_fusion.data.folds.selection`)."""
        split = self.settings.split
        return F.selection(self.targets, k, fit_idx, held_idx, split.selection_fraction, split.seed)

    @property
    def selection_note(self) -> str:
        return F.selection_note(self.settings.split.selection_fraction)

    def bad_images(self, part: str | None = None) -> list[str]:
        """Images that cannot be read: an error naming the first (``data.bad_images: error``), or the list to
        record in the metrics file (``replace``: grey images stand in for them)."""
        parts = [part] if part else ["train", "test"]
        bad = []
        for p in parts:
            bad += find_bad_images(self.data.image_paths(p),
                                   desc=f"checking {p} images" if sys.stderr.isatty() else None)
        if not bad:
            return []
        listed = [f"{path}: {why}" for path, why in bad]
        if self.settings.data.bad_images == "error":
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise D.DataError(f"{listed[0]}{more}; fix or remove the file, or set data.bad_images=replace")
        log.info(f"[{self.stage.name}] {len(bad)} unreadable images replaced by grey (data.bad_images=replace): "
                 + "; ".join(listed[:3]) + (" ..." if len(bad) > 3 else ""))
        return listed
