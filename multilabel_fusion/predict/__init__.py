"""Labels for a new photo and caption from exactly what was trained for a configuration, or from one bundle file.

    python -m multilabel_fusion.predict --data ../shared/comp5329 --image PHOTO.jpg --caption "A dog on a couch"
    python -m multilabel_fusion.predict --data ../shared/comp5329 --csv new.csv --images photos/ --out labels.csv
    python -m multilabel_fusion.predict --data ../shared/comp5329 --export predictor.zip
    python -m multilabel_fusion.predict --bundle predictor.zip --image PHOTO.jpg --caption "A dog on a couch"

The predictor reads the artifacts of the configuration it is given (``config.yaml``, ``--set``, ``--data`` as every
stage): it asks the final stage of the registry (the fused network) for its predictor and every stage whose blocks
that reads for theirs (:meth:`multilabel_fusion.stages.base.Stage.predictor`); each computes its blocks for a new
record exactly as its stage computed the test records' rows, so the labels of a test record equal its row of
``output/predictions.csv``. The decision (rule and thresholds) is the fused network's keyed decision artifact. It
never trains; a missing piece is a one-line error naming the stage to run.

``--export`` writes everything into one zip: a manifest (JSON) and each stage predictor's files under its stage's
name (network weights, the vocabulary and its embedding rows, the n-gram models, the detector's weights). ``--bundle``
predicts from it alone, on a machine without ``output/``, ``models/`` or the competition data. The backbone and the
n-gram models inside are pickles: load only bundles you made or trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import __version__
from .. import settings as S
from ..data import labels as L
from ..data import reader as D
from ..data.images import image_problem
from ..evaluation import submission
from ..evaluation.scoring import decide_as, decision_of
from ..io.atomic import atomic_path
from ..networks.device import select_device
from ..stages import registry as stage_registry
from ..stages.base import BlockPredictor, NewRecords, PredictorUnavailable, fold_mean  # noqa: F401 - fold_mean: API
from ..stages.context import Workspace, resolve_data
from ..stages.outputs import require_decision
from ..stages.registry import Registry

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 2
SIZE_LIMIT_MB = 100


class PredictorError(RuntimeError):
    """A configuration or bundle the predictor cannot use; the message says why in one line."""


#: What a bundle's manifest must hold, besides what each stage's description holds.
MANIFEST_KEYS = ("format", "final", "blocks", "folds", "decision", "thresholds", "at_least_one", "stages", "files")


def _read_entry(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as err:
        raise PredictorError(f"{path}: {name} cannot be read from the zip ({type(err).__name__}: {err}); the bundle is "
                             "damaged: export it again") from None


def _manifest(path: Path, blob: bytes) -> dict[str, Any]:
    """The manifest of a bundle, checked for the keys this version reads (one line otherwise)."""
    try:
        manifest = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as err:
        raise PredictorError(f"{path}: not a predictor bundle (manifest.json is not JSON: {err})") from None
    if not isinstance(manifest, dict):
        raise PredictorError(f"{path}: not a predictor bundle (manifest.json is not an object)")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise PredictorError(f"{path}: bundle format {manifest.get('format')}, this version reads {BUNDLE_FORMAT} "
                             "(export it again with this version)")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise PredictorError(f"{path}: its manifest lacks {', '.join(missing)} (export the bundle again)")
    return manifest


@dataclass
class Prediction:
    """The fused network's answer for one record: probabilities of the 18 labels, the labels kept, and how they were
    kept (``rule``: per-class ``thresholds``, or the set with the highest expected F1, which has none)."""

    image: str
    caption: str
    probabilities: np.ndarray
    labels: list[int]
    thresholds: np.ndarray
    at_least_one: bool
    seconds: float
    rule: str = "per_class"

    def rows(self, every_label: bool = False) -> list[dict[str, Any]]:
        order = np.argsort(-self.probabilities, kind="stable")
        return [{"id": L.LABEL_IDS[c], "name": L.LABEL_NAMES[L.LABEL_IDS[c]], "probability": float(self.probabilities[c]),
                 "threshold": float(self.thresholds[c]) if self.rule == "per_class" else None,
                 "predicted": L.LABEL_IDS[c] in self.labels}
                for c in order if every_label or L.LABEL_IDS[c] in self.labels]

    def describe(self, every_label: bool = False) -> str:
        forced = "; at least the most probable label" if self.at_least_one else ""
        if self.rule == "per_class":
            head, how = f" {'threshold':>9}", f"(thresholds of the fused network{forced})"
        else:
            head, how = "", f"(the labels with the highest expected F1 given these probabilities{forced})"
        lines = [f"{self.image}  \"{self.caption}\"",
                 f"{'':2}{'id':>3}  {'label':<14} {'probability':>11}{head}{'':2}{how}"]
        for r in self.rows(every_label):
            mark = "  <- predicted" if every_label and r["predicted"] else ""
            threshold = f" {r['threshold']:>9.2f}" if r["threshold"] is not None else ""
            lines.append(f"{'':2}{r['id']:>3}  {r['name']:<14} {r['probability']:>11.3f}{threshold}{mark}")
        return "\n".join(lines)


@dataclass
class Predictor:
    """Everything needed to label new records, loaded once: :meth:`load` (artifacts or a bundle), then
    :meth:`predict_one`, :meth:`predict` or :meth:`predict_csv`; :meth:`export` writes the bundle."""

    manifest: dict[str, Any]  # blocks, decision, label names, where it all came from (JSON)
    device: torch.device
    predictors: dict[str, BlockPredictor] = field(default_factory=dict)  # by stage, in the order they run
    load_seconds: float = 0.0
    final: str = "fusion"

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, settings: S.Settings | None = None, *, bundle: str | Path | None = None,
             demo_mode: bool | str = False, device: str | None = None, warm_up: bool = True,
             registry: Registry | None = None) -> "Predictor":
        """From the artifacts of ``settings`` (default: ``config.yaml``), or from a bundle written by :meth:`export`.

        ``warm_up``: label one grey photo once, so that the first real prediction does not pay for what the
        libraries prepare on their first call (WordNet, kernels: a few seconds on a CPU)."""
        started = time.perf_counter()
        registry = registry or stage_registry.default()
        if bundle is not None:
            predictor = cls._from_bundle(Path(bundle), select_device(device or "auto"), registry)
        else:
            settings = settings if settings is not None else S.load()
            predictor = cls._from_artifacts(settings, demo_mode, select_device(device or settings.trainer.device),
                                            registry)
        for part in predictor.predictors.values():
            part.to(predictor.device)
        if warm_up:
            predictor._warm_up()
        predictor.load_seconds = time.perf_counter() - started
        return predictor

    @staticmethod
    def _needed(ws: Workspace, final) -> dict[str, list[str]]:
        """The blocks each stage's predictor computes: the final stage's, those it reads, what those read ..."""
        wanted: dict[str, list[str]] = {final.name: []}
        queue = list(final.predictor_needs(ws.settings, ()))
        while queue:
            block = queue.pop(0)
            owner = ws.registry.block_owner(block)
            if block in wanted.setdefault(owner.name, []):
                continue
            wanted[owner.name].append(block)
            queue += [b for b in owner.predictor_needs(ws.settings, wanted[owner.name]) if b not in queue]
        needs = {name: {ws.registry.block_owner(b).name for b in ws.registry.get(name).predictor_needs(
            ws.settings, blocks)} - {name} for name, blocks in wanted.items()}
        ordered: list[str] = []
        while len(ordered) < len(wanted):  # each after the stages whose blocks it needs (the registry's order else)
            ready = [n for n in ws.registry.names if n in wanted and n not in ordered and needs[n] <= set(ordered)]
            if not ready:
                raise PredictorError(f"the predictors of {sorted(set(wanted) - set(ordered))} need each other's blocks")
            ordered.append(ready[0])
        return {name: wanted[name] for name in ordered}

    @classmethod
    def _from_artifacts(cls, settings: S.Settings, demo_mode: bool | str, device: torch.device,
                        registry: Registry) -> "Predictor":
        registry.check_names(settings)
        settings, _ = resolve_data(settings, demo_mode)  # the data's fingerprint is part of every key
        final = registry.final()
        ws = Workspace(settings, registry)
        narrowed = final.effective_settings(ws)
        for name in set(settings.fusion.blocks) - set(narrowed.fusion.blocks):
            log.info(f"[predict] the fused network leaves out the '{name}' block, as its stage does")
        ws = ws.derive(narrowed)
        ws.require(final.name)  # its networks first: the decision is only ever kept beside them
        decision = require_decision(ws, final.name)
        parts = {}
        try:
            for name, blocks in cls._needed(ws, final).items():
                parts[name] = registry.get(name).predictor(ws, blocks)
        except PredictorUnavailable as err:
            raise PredictorError(str(err)) from None
        k = parts[final.name].folds
        for name, part in parts.items():
            count = part.folds
            if count and count != k:
                raise PredictorError(f"{count} {name} fold models for {k} fused fold models: the artifacts were made "
                                     "with other folds")
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "package": __version__,
            "labels": {"ids": list(L.LABEL_IDS), "names": L.names()},
            "final": final.name, "blocks": list(narrowed.fusion.blocks), "folds": k,
            "decision": decision_of(decision.info), "thresholds": [float(t) for t in decision.info["thresholds"]],
            "at_least_one": bool(decision.info["at_least_one"]),
            "stages": {name: {"blocks": list(part.blocks)} for name, part in parts.items()},
            "source": {"data": str(settings.path("data")), "data_fingerprint": ws.fingerprint,
                       "output": str(settings.path("output")),
                       "keys": {name: part.description.get("key") for name, part in parts.items()},
                       "decision_key": decision.key,
                       "mean_f1_threshold_cv": decision.info.get("mean_f1_threshold_cv"),
                       "val_mean_f1_tuned": decision.info.get("val_mean_f1_tuned")},
        }
        return cls(manifest, device, parts, final=final.name)

    def _warm_up(self) -> None:
        from PIL import Image

        with tempfile.TemporaryDirectory(prefix="mlf-warm-up-") as folder:
            photo = Path(folder) / "grey.jpg"
            Image.new("RGB", (320, 240), (128, 128, 128)).save(photo)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # no progress bars for it
                self.predict([photo], ["a photo"])

    # ------------------------------------------------------------------------------------------- predicting

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.manifest["thresholds"], dtype=np.float64)

    @property
    def decision(self) -> str:
        """The fused network's decision rule."""
        return decision_of(self.manifest)

    def _computed(self, images: Sequence[str | Path], captions: Sequence[str]) -> dict[str, np.ndarray]:
        records = NewRecords.of(images, captions)
        given: dict[str, np.ndarray] = {}
        for part in self.predictors.values():  # in order: what a predictor needs comes first
            given.update({k: np.asarray(v, dtype=np.float32) for k, v in part.transform(records, given).items()})
        return given

    def blocks(self, images: Sequence[str | Path], captions: Sequence[str]) -> dict[str, np.ndarray]:
        """Every block the fused network reads, one row per record, as its stage computes a test record's row."""
        computed = self._computed(images, captions)
        return {name: computed[name] for name in self.manifest["blocks"]}

    def predict(self, images: Sequence[str | Path], captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, 18], multi-hot labels [N, 18]) of the fused network for the records (photo, caption)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        probs = self._computed(images, captions)[self.final]
        return probs, decide_as(self.manifest, probs)

    def predict_one(self, image: str | Path, caption: str) -> Prediction:
        problem = image_problem(image)
        if problem:
            raise D.DataError(f"{image}: {problem}")
        if not caption.strip():
            raise D.DataError(f"{image}: the caption is empty")
        started = time.perf_counter()
        probs, labels = self.predict([image], [caption])
        return Prediction(str(image), caption, probs[0], L.decode(labels)[0], self.thresholds,
                          self.manifest["at_least_one"], time.perf_counter() - started, self.decision)

    def predict_csv(self, csv_path: str | Path, images_dir: str | Path, out: str | Path) -> Path:
        """Labels of every record of a test-format CSV (``ImageID,Caption``, read exactly as ``test.csv``) whose photos
        are in ``images_dir``, written atomically as a validated submission (``ImageID,Labels``)."""
        csv_path, images_dir = Path(csv_path), Path(images_dir)
        records = D.read_records(csv_path, with_labels=False)
        paths = [images_dir / r.image_id for r in records]
        for record, path in zip(records, paths):
            problem = image_problem(path)
            if problem:
                raise D.DataError(f"{csv_path}: line {record.line} ({record.image_id}): {path}: {problem}")
        _, labels = self.predict(paths, [r.caption for r in records])
        return submission.write(out, [r.image_id for r in records], labels,
                                allow_empty=not self.manifest["at_least_one"])

    # ------------------------------------------------------------------------------------------- the bundle

    def export(self, path: str | Path) -> dict[str, Any]:
        """Write the self-contained bundle (one zip); returns the size of each part and of the file against the limit."""
        files: dict[str, tuple[str, bytes]] = {}
        stages = {}
        for name, part in self.predictors.items():
            description, entries = part.export()
            stages[name] = {"blocks": list(part.blocks), "description": description}
            files.update({f"{name}/{entry}": value for entry, value in entries.items()})
        parts: dict[str, float] = {}
        for part, data in files.values():
            parts[part] = parts.get(part, 0) + len(data) / 2**20
        manifest = {**self.manifest, "stages": stages, "parts_mb": {p: round(v, 2) for p, v in parts.items()},
                    "exported": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                    "files": {name: hashlib.sha256(data).hexdigest() for name, (_, data) in files.items()}}
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("manifest.json", json.dumps(manifest, indent=2))
                for name, (_, data) in files.items():
                    archive.writestr(name, data)
        total = Path(path).stat().st_size / 2**20
        return {"path": str(path), "parts_mb": manifest["parts_mb"], "total_mb": round(total, 2),
                "uncompressed_mb": round(sum(parts.values()), 2), "limit_mb": SIZE_LIMIT_MB,
                "within_limit": total <= SIZE_LIMIT_MB}

    @classmethod
    def _from_bundle(cls, path: Path, device: torch.device, registry: Registry) -> "Predictor":
        """A bundle's predictors, after every entry was checked against the sha256 its manifest lists (nothing is
        unpickled before that). The check catches damage and edits of an entry alone; it does not authenticate the
        bundle: whoever rewrites the manifest too can make a bundle run code when loaded, so load only bundles you
        made or trust."""
        if not path.is_file():
            raise PredictorError(f"{path}: bundle not found (write one with --export)")
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise PredictorError(f"{path}: not a predictor bundle (not a readable zip file: {err})") from None
        with archive:
            names = set(archive.namelist())
            if "manifest.json" not in names:
                raise PredictorError(f"{path}: not a predictor bundle (no manifest.json)")
            manifest = _manifest(path, _read_entry(path, archive, "manifest.json"))
            files = manifest["files"]
            for name in sorted(names - {"manifest.json"}):
                if name not in files:
                    raise PredictorError(f"{path}: {name} is not listed in its manifest (an entry added to it)")
            contents = {}
            for name, expected in files.items():
                if name not in names:
                    raise PredictorError(f"{path}: {name} is missing (its manifest lists it)")
                data = _read_entry(path, archive, name)
                if hashlib.sha256(data).hexdigest() != expected:
                    raise PredictorError(f"{path}: {name} does not match the sha256 its manifest lists (damaged or "
                                         "changed); export the bundle again")
                contents[name] = data
        parts = {}
        try:
            for name, entry in manifest["stages"].items():
                if name not in registry:
                    raise PredictorError(f"{path}: the bundle needs a stage {name!r} this installation does not have")
                kind = registry.get(name).predictor_type
                prefix = f"{name}/"
                parts[name] = kind.from_bundle(entry["description"], entry["blocks"],
                                               lambda n, p=prefix: contents[p + n],
                                               {n[len(prefix):] for n in contents if n.startswith(prefix)}, device)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, pickle.UnpicklingError) as err:
            raise PredictorError(f"{path}: a bundle this version cannot read ({type(err).__name__}: {err})") from None
        return cls(manifest, device, parts, final=manifest["final"])
