"""Labels for a new photo and caption from exactly what was trained for a configuration, or from one bundle file.

    python -m multilabel_fusion.predict --data ../shared/comp5329 --image PHOTO.jpg --caption "A dog on a couch"
    python -m multilabel_fusion.predict --data ../shared/comp5329 --csv new.csv --images photos/ --out labels.csv
    python -m multilabel_fusion.predict --data ../shared/comp5329 --export predictor.zip
    python -m multilabel_fusion.predict --bundle predictor.zip --image PHOTO.jpg --caption "A dog on a couch"

The predictor reads the artifacts of the configuration it is given (``config.yaml``, ``--set``, ``--data`` as every
stage): the artifact keys are computed from the settings, so it finds exactly the backbone, image-head, caption,
n-gram, detector and fused networks behind ``output/predictions.csv``, and the thresholds and at-least-one rule that
the fused network's metrics file records. It never trains; a missing piece is a one-line error naming the stage to
run. Each block of a record is computed by the functions its stage uses (image decoding and extraction plan, caption
cleaning and vocabulary, TF-IDF vectorisers, detection), the fold models' outputs averaged over the folds as the
stages average the test rows, so the labels of a test record equal its row of ``predictions.csv``.

``--export`` writes everything into one zip (weights of every network, the vocabulary and its embedding rows, the
n-gram models, the detector's weights, thresholds, label names, settings); ``--bundle`` predicts from it alone, on a
machine without ``output/``, ``models/`` or the competition data. The n-gram models inside are a pickle: load only
bundles you made or trust.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__, assets, registry
from . import config as C
from .data import labels as L
from .data import reader as D
from .data import text
from .data.images import image_problem
from .engine.artifacts import ArtifactStore, MissingArtifact
from .engine.atomic import atomic_path
from .engine.inference import extract, prepare_inference
from .engine.precision import training_precision
from .engine.trainer import num_workers, predict, select_device
from .evaluation import submission
from .networks.backbones import Backbone, load_backbone
from .networks.caption_lstm import Batches, CaptionBiLSTM, cpu_threads, extract_features
from .networks.heads import MLPHead, _loader
from .stages import base, caption_network, fusion, text_ngrams
from .stages.detector import box_features, detect_images

BUNDLE_FORMAT = 1
SIZE_LIMIT_MB = fusion.MODEL_SIZE_LIMIT_MB
#: Blocks a new record can be given (stages 05 and 06 score a record against the training data: not here).
BLOCKS = ("image", "image_depths", "image_probs", "caption", "caption_probs", "detector", "detector_boxes", "text")


class PredictorError(RuntimeError):
    """A configuration or bundle the predictor cannot use; the message says why in one line."""


def fold_mean(per_fold: Sequence[np.ndarray]) -> np.ndarray:
    """The fold models' outputs averaged exactly as :func:`multilabel_fusion.stages.base.cross_fit` averages the
    test rows (float32, summed in fold order), so a test record's block row is the stage's own."""
    total: Any = 0
    for rows in per_fold:
        total = total + np.asarray(rows, dtype=np.float32) / len(per_fold)
    return total


def _hint(stage: str) -> str:
    s = registry.get(stage)
    return f"{s.script} (stage {s.label})"


def _weights(run_dir: str, models_dir: Path, stage: str) -> dict:
    """The best weights of a training run recorded by an artifact, found under the current models folder."""
    path = models_dir / Path(run_dir).parent.name / Path(run_dir).name / "best.pt"
    if not path.is_file():
        raise MissingArtifact(f"{path}: the trained weights behind the '{stage}' artifact are missing; "
                              f"run {_hint(stage)} again")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _head(state: dict, hidden: int, dropout: float) -> MLPHead:
    head = MLPHead(int(state["mean"].shape[0]), hidden, dropout)
    head.load_state_dict(state)
    return head.eval()


def _caption_network(state: dict, settings: dict) -> CaptionBiLSTM:
    net = CaptionBiLSTM(np.zeros(tuple(state["embedding.weight"].shape), np.float32), settings["hidden"],
                        settings["dropout"], train_embeddings=settings["train_embeddings"])
    net.load_state_dict(state)
    return net.eval()


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

    manifest: dict[str, Any]  # settings, blocks, thresholds, label names, where it all came from (JSON)
    device: torch.device
    backbone: Backbone | None = None
    image_heads: list[MLPHead] = field(default_factory=list)
    vocabulary: text.Vocabulary | None = None
    caption_networks: list[CaptionBiLSTM] = field(default_factory=list)
    detector: Any = None  # multilabel_fusion.networks.yolov5.Detector
    detector_file: Path | None = None
    text_models: text_ngrams.TextModels | None = None
    fusion_heads: list[MLPHead] = field(default_factory=list)
    load_seconds: float = 0.0
    _plan: Any = None
    _keep: Any = None  # a bundle's unpacked detector weights live as long as the predictor

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, cfg: C.Config | None = None, *, bundle: str | Path | None = None, demo_mode: bool | str = False,
             device: str | None = None, warm_up: bool = True) -> "Predictor":
        """From the artifacts of ``cfg`` (default: ``config.yaml``), or from a bundle written by :meth:`export`.

        ``warm_up``: label one grey photo once, so that the first real prediction does not pay for what the
        libraries prepare on their first call (WordNet, kernels: a few seconds on a CPU)."""
        started = time.perf_counter()
        if bundle is not None:
            predictor = cls._from_bundle(Path(bundle), select_device(device or "auto"))
        else:
            cfg = C.Config.wrap((cfg if cfg is not None else C.load()).to_dict())  # the caller's stays as it was
            predictor = cls._from_artifacts(cfg, demo_mode, select_device(device or cfg.trainer.device))
        predictor._prepare()
        if warm_up:
            predictor._warm_up()
        predictor.load_seconds = time.perf_counter() - started
        return predictor

    @classmethod
    def _from_artifacts(cls, cfg: C.Config, demo_mode: bool | str, device: torch.device) -> "Predictor":
        registry.check_names(cfg)
        data_dir, _ = base.resolve_data_dir(cfg, demo_mode)  # the data's fingerprint is part of every key
        _, dropped = fusion.available_blocks(cfg)
        for name, why in dropped.items():
            print(f"[predict] the fused network leaves out the '{name}' block, as stage 03 does: {why}")
        cfg = fusion.fused_config(cfg)
        blocks = list(cfg.fusion.blocks)
        unknown = [b for b in blocks if b not in BLOCKS]
        if unknown:
            raise PredictorError(f"fusion.blocks: the predictor cannot compute the block {unknown[0]!r} for a new record "
                                 f"(it can: {', '.join(BLOCKS)})")
        owners = {registry.block_owner(b).name for b in blocks}
        if "image" in owners and cfg.image.fine_tune:
            raise PredictorError("image.fine_tune=true: the predictor uses the frozen backbone's features "
                                 "(image.fine_tune=false)")
        fingerprint = D.load(data_dir, check_images=False).fingerprint()
        store, models = ArtifactStore(cfg.path("output")), cfg.path("models")

        def require(stage: str):
            return store.require(stage, registry.artifact_key(stage, cfg, fingerprint), _hint(stage))

        fused = require("fusion")
        metrics = base.load_metrics(cfg.path("output"), "fusion")
        if metrics is None or metrics.get("artifact_key") != fused.key:  # its thresholds are those of another network
            what = "absent" if metrics is None else f"describes the fused network {metrics.get('artifact_key')}"
            raise MissingArtifact(f"{cfg.path('output') / 'metrics' / 'fusion.json'}: {what}, not {fused.key} of the "
                                  f"current settings; run {_hint('fusion')} (it reuses its trained networks)")
        k = len(fused.info["folds"])
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "package": __version__,
            "labels": {"ids": list(L.LABEL_IDS), "names": L.names()},
            "blocks": blocks, "thresholds": [float(t) for t in metrics["thresholds"]],
            "decision": base.decision_of(metrics),
            "at_least_one": bool(metrics["at_least_one"]), "folds": k,
            "mixed_precision": bool(cfg.trainer.mixed_precision), "bad_images": cfg.data.bad_images,
            "workers": cfg.trainer.num_workers,
            "fusion": {"hidden": cfg.fusion.hidden, "dropout": cfg.fusion.dropout},
            "source": {"data": str(cfg.path("data")), "data_fingerprint": fingerprint, "output": str(cfg.path("output")),
                       "keys": {"fusion": fused.key}, "mean_f1_threshold_cv": metrics.get("mean_f1_threshold_cv"),
                       "val_mean_f1_tuned": metrics.get("val_mean_f1_tuned")},
        }
        out = cls(manifest, device)
        out.fusion_heads = [_head(_weights(f["run_dir"], models, "fusion"), cfg.fusion.hidden, cfg.fusion.dropout)
                            for f in fused.info["folds"]]
        if "image" in owners:
            image = require("image")
            ci = cfg.image
            extraction = str(image.info.get("extraction", {}).get("precision", "fp32"))
            precision = extraction.split()[0] if extraction.split()[0] in ("fp32", "bf16") else "fp32"  # a GPU's: fp32
            manifest["image"] = {"backbone": image.info["backbone"]["name"], "dim": image.info["backbone"]["dim"],
                                 "weights_used": image.info["backbone"]["weights_used"], "image_size": ci.image_size,
                                 "depth_features": bool(ci.depth_features), "hflip_average": bool(ci.hflip_average),
                                 "feature_dtype": ci.feature_dtype, "cpu_precision": precision,
                                 "channels_last": bool(ci.channels_last), "fuse_conv_bn": bool(ci.fuse_conv_bn),
                                 "feature_batch_size": ci.feature_batch_size, "head_input": ci.head_input,
                                 "head_hidden": ci.head_hidden, "head_dropout": ci.head_dropout}
            manifest["source"]["keys"]["image"] = image.key
            out.backbone = load_backbone(ci)  # as stage 01 builds it (an ensemble: each member at its side)
            if "image_probs" in blocks:
                kind, key = registry.block_location("image_probs", cfg, fingerprint)
                heads = store.require(kind, key, _hint("image"))
                out.image_heads = [_head(_weights(f["run_dir"], models, "image"), ci.head_hidden, ci.head_dropout)
                                   for f in heads.info["folds"]]
        if "caption" in owners:
            caption = require("caption")
            vocabulary = caption_network.load_vocabulary(store, caption.key)
            if vocabulary is None:
                raise MissingArtifact(f"{store.dir(caption_network.VOCABULARY, caption.key)}: the caption networks' "
                                      f"vocabulary was not kept; run {_hint('caption')} (it keeps it, reusing the "
                                      "trained networks)")
            c = cfg.caption
            manifest["caption"] = {"seq_len": c.seq_len, "hidden": c.hidden, "dropout": c.dropout,
                                   "batch_size": c.batch_size, "train_embeddings": bool(c.train_embeddings),
                                   "vectors": caption.info["vectors"]["name"], "text_version": text.TEXT_VERSION}
            manifest["source"]["keys"]["caption"] = caption.key
            out.vocabulary = vocabulary
            runs = caption.info.get("fold_runs") or caption.info["folds"]  # the name in artifacts made before 0.2
            out.caption_networks = [_caption_network(_weights(f["run_dir"], models, "caption"), manifest["caption"])
                                    for f in runs]
            rows = out.caption_networks[0].embedding.num_embeddings
            if rows != len(vocabulary):
                raise MissingArtifact(f"{store.dir(caption_network.VOCABULARY, caption.key)}: {len(vocabulary)} words for "
                                      f"embeddings of {rows} rows; delete it and run {_hint('caption')}")
        if "detector" in owners:
            detections = require("detector")
            weights = assets.detector_weights(cfg)
            d = cfg.detector
            manifest["detector"] = {"weights": weights.name, "identity": weights.identity, "loader": detections.info["loader"],
                                    **{key: d[key] for key in ("image_size", "conf", "iou", "max_det", "multi_label",
                                                               "batch_size", "threads", "channels_last")}}
            manifest["source"]["keys"]["detector"] = detections.key
            out.detector_file = weights.path
        if "text" in owners:
            kept = require("text")
            out.text_models = text_ngrams.load_models(store, kept.key)
            if out.text_models is None:
                raise MissingArtifact(f"{store.dir(text_ngrams.MODELS, kept.key)}: the n-gram fold models were not kept; "
                                      f"run {_hint('text')} (it keeps them, reproducing the kept probabilities)")
            manifest["text"] = {"folds": len(out.text_models.folds)}
            manifest["source"]["keys"]["text"] = kept.key
        for name, count in (("image head", len(out.image_heads)), ("caption", len(out.caption_networks)),
                            ("text", len(out.text_models.folds) if out.text_models else 0)):
            if count and count != k:
                raise PredictorError(f"{count} {name} fold models for {k} fused fold models: the artifacts were made "
                                     "with other folds")
        return out

    def _prepare(self) -> None:
        """Move the networks to the device and fix how the backbone runs: the extraction plan the image stage used
        (batch-norm folding, layout, batch size, and the precision its artifact records instead of timing again)."""
        for net in [*self.image_heads, *self.caption_networks, *self.fusion_heads]:
            net.to(self.device)
        if self.backbone is not None:
            m = self.manifest["image"]
            settings = {key: m[key] for key in ("image_size", "channels_last", "fuse_conv_bn", "feature_batch_size")}
            settings["cpu_precision"] = m["cpu_precision"]
            self._plan = prepare_inference(self.backbone, settings, self.device, self.manifest["mixed_precision"],
                                           depths=m["depth_features"], hflip=m["hflip_average"])
        if self.detector_file is not None and self.detector is None:
            from .networks.yolov5 import load_detector

            self.detector = load_detector(self.detector_file, self.device,
                                          channels_last=bool(self.manifest["detector"]["channels_last"]))

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
        """The fused network's decision rule (a bundle made before the rule was recorded: per-class thresholds)."""
        return base.decision_of(self.manifest)

    def _heads(self, heads: list[MLPHead], x: np.ndarray) -> np.ndarray:
        """Fold-averaged probabilities of MLP heads, batched as :func:`multilabel_fusion.networks.heads.train_on_features`."""
        precision = training_precision(self.device, self.manifest["mixed_precision"])
        return fold_mean([predict(h, _loader(x, None, 4096, False, 0), self.device, precision=precision) for h in heads])

    def _workers(self) -> int:
        return num_workers(self.manifest["workers"], self.device)

    def blocks(self, images: Sequence[str | Path], captions: Sequence[str]) -> dict[str, np.ndarray]:
        """Every block the fused network reads, one row per record, as its stage computes a test record's row."""
        wanted, out = set(self.manifest["blocks"]), {}
        paths = [Path(p) for p in images]
        if self.backbone is not None:
            m = self.manifest["image"]
            feats = np.empty((len(paths), m["dim"]), dtype=m["feature_dtype"])
            depths = (np.empty((len(paths), sum(self._plan.depth_dims())), dtype=m["feature_dtype"])
                      if self._plan.depths else None)
            extract(self._plan, paths, self._workers(), feats, "image features", on_bad=self.manifest["bad_images"],
                    depths_out=depths)
            out["image"] = np.asarray(feats, dtype=np.float32)
            if depths is not None:
                out["image_depths"] = np.asarray(depths, dtype=np.float32)
            if "image_probs" in wanted:
                out["image_probs"] = self._heads(self.image_heads, out["image" if m["head_input"] == "pooled" else
                                                                       "image_depths"])
        if self.caption_networks:
            c = self.manifest["caption"]
            tokens = text.clean_captions(captions, desc="cleaning captions" if len(captions) > 1000 else None)
            ids, lengths = self.vocabulary.encode(tokens, c["seq_len"])
            batches = Batches(ids, lengths, None, c["batch_size"])
            precision = training_precision(self.device, self.manifest["mixed_precision"])
            with cpu_threads(self.device):
                out["caption"] = fold_mean([extract_features(n, batches, self.device) for n in self.caption_networks])
                out["caption_probs"] = fold_mean([predict(n, batches, self.device, precision=precision)
                                                  for n in self.caption_networks])
        if self.detector is not None:
            d = self.manifest["detector"]
            previous = torch.get_num_threads()
            torch.set_num_threads(int(d["threads"]) if d.get("threads") else (os.cpu_count() or 1))
            try:
                run = detect_images(self.detector, paths, image_size=int(d["image_size"]), conf=float(d["conf"]),
                                    iou=float(d["iou"]), max_det=int(d["max_det"]), multi_label=bool(d["multi_label"]),
                                    batch_size=int(d["batch_size"]), workers=num_workers(self.manifest["workers"]),
                                    desc="detect", on_bad=self.manifest["bad_images"])
            finally:
                torch.set_num_threads(previous)
            out["detector"] = run.scores
            out["detector_boxes"] = box_features(run.boxes, run.box_class, self.detector.columns, len(paths))
        if self.text_models is not None:
            out["text"] = fold_mean(self.text_models.fold_probs(list(captions)))
        return {name: np.asarray(out[name], dtype=np.float32) for name in self.manifest["blocks"]}

    def predict(self, images: Sequence[str | Path], captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, 18], multi-hot labels [N, 18]) of the fused network for the records (photo, caption)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        blocks = self.blocks(images, captions)
        x = np.concatenate([blocks[name] for name in self.manifest["blocks"]], 1)
        probs = self._heads(self.fusion_heads, x)
        return probs, base.decide_as(self.manifest, probs)

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
        files: dict[str, tuple[str, bytes]] = {}  # zip name -> (part, bytes)

        def tensors(name: str, part: str, obj: Any) -> None:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            files[name] = (part, buffer.getvalue())

        k = len(self.fusion_heads)
        if self.backbone is not None:  # the whole module (whatever its architecture: one network or several)
            tensors("image/backbone.pt", f"image backbone ({self.manifest['image']['backbone']})",
                    copy.deepcopy(self.backbone).cpu())
            for i, head in enumerate(self.image_heads):
                tensors(f"image/head_{i}.pt", f"image heads ({k} folds)", head.state_dict())
        if self.caption_networks:
            states = [{n: t.cpu() for n, t in net.state_dict().items()} for net in self.caption_networks]
            shared = all(torch.equal(s["embedding.weight"], states[0]["embedding.weight"]) for s in states)
            files["caption/vocabulary.json"] = ("caption vocabulary and its word-vector rows",
                                                json.dumps(self.vocabulary.tokens).encode())
            if shared:  # frozen word vectors: one copy of the rows for every fold
                tensors("caption/embedding.pt", "caption vocabulary and its word-vector rows",
                        states[0]["embedding.weight"])
            for i, state in enumerate(states):
                tensors(f"caption/network_{i}.pt", f"caption networks ({k} folds)",
                        {n: t for n, t in state.items() if not (shared and n == "embedding.weight")})
        if self.detector_file is not None:
            files[f"detector/{self.manifest['detector']['weights']}"] = (
                f"detector weights ({self.manifest['detector']['weights']})", Path(self.detector_file).read_bytes())
        if self.text_models is not None:
            files["text/models.pkl"] = (f"n-gram vectorisers and logistic regressions ({k} folds)",
                                        self.text_models.to_bytes())
        for i, head in enumerate(self.fusion_heads):
            tensors(f"fusion/network_{i}.pt", f"fused networks ({k} folds)", head.state_dict())
        parts: dict[str, float] = {}
        for part, data in files.values():
            parts[part] = parts.get(part, 0) + len(data) / 2**20
        manifest = {**self.manifest, "parts_mb": {p: round(v, 2) for p, v in parts.items()},
                    "exported": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}
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
    def _from_bundle(cls, path: Path, device: torch.device) -> "Predictor":
        if not path.is_file():
            raise PredictorError(f"{path}: bundle not found (write one with --export)")
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise PredictorError(f"{path}: not a predictor bundle (not a zip file)") from None
        with archive:
            names = set(archive.namelist())
            if "manifest.json" not in names:
                raise PredictorError(f"{path}: not a predictor bundle (no manifest.json)")
            manifest = json.loads(archive.read("manifest.json"))
            if manifest.get("format") != BUNDLE_FORMAT:
                raise PredictorError(f"{path}: bundle format {manifest.get('format')}, this version reads {BUNDLE_FORMAT}")

            def tensors(name: str):
                return torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)

            out = cls(manifest, device)
            k = manifest["folds"]
            f = manifest["fusion"]
            out.fusion_heads = [_head(tensors(f"fusion/network_{i}.pt"), f["hidden"], f["dropout"]) for i in range(k)]
            if manifest.get("image"):
                m = manifest["image"]
                out.backbone = torch.load(io.BytesIO(archive.read("image/backbone.pt")), map_location="cpu",
                                          weights_only=False)  # a pickled module: load only bundles you trust
                out.image_heads = [_head(tensors(f"image/head_{i}.pt"), m["head_hidden"], m["head_dropout"])
                                   for i in range(k) if f"image/head_{i}.pt" in names]
            if manifest.get("caption"):
                out.vocabulary = text.Vocabulary(json.loads(archive.read("caption/vocabulary.json")))
                shared = tensors("caption/embedding.pt") if "caption/embedding.pt" in names else None
                for i in range(k):
                    state = tensors(f"caption/network_{i}.pt")
                    if shared is not None:
                        state["embedding.weight"] = shared
                    out.caption_networks.append(_caption_network(state, manifest["caption"]))
            if manifest.get("detector"):
                folder = tempfile.TemporaryDirectory(prefix="mlf-detector-")
                out._keep = folder
                out.detector_file = Path(folder.name) / manifest["detector"]["weights"]
                out.detector_file.write_bytes(archive.read(f"detector/{manifest['detector']['weights']}"))
            if manifest.get("text"):
                out.text_models = text_ngrams.TextModels.from_bytes(archive.read("text/models.pkl"))
        return out


# ----------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = C.add_arguments(argparse.ArgumentParser(
        prog="python -m multilabel_fusion.predict", description=__doc__.splitlines()[0],
        epilog="Settings (--set, --data, --output, --models) choose the artifacts exactly as for the stages; with "
               "--bundle they come from the bundle instead."))
    parser.add_argument("--bundle", help="predict from this bundle (written by --export) instead of the artifacts")
    parser.add_argument("--image", help="the photo of one record")
    parser.add_argument("--caption", help="the caption of that record")
    parser.add_argument("--csv", help="a CSV of records in the test.csv format (ImageID,Caption)")
    parser.add_argument("--images", help="the folder holding the --csv records' photos")
    parser.add_argument("--out", help="where --csv writes its labels (default: <csv name>_labels.csv here)")
    parser.add_argument("--export", metavar="FILE", help="write the self-contained bundle (a zip) to FILE")
    parser.add_argument("--all", action="store_true", help="show all 18 labels, not only the predicted ones")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: trainer.device; auto with --bundle)")
    args = parser.parse_args(argv)
    if bool(args.image) != bool(args.caption):
        parser.error("--image and --caption go together")
    if bool(args.csv) != bool(args.images):
        parser.error("--csv and --images go together")
    if not (args.image or args.csv or args.export):
        parser.error("nothing to do: give --image and --caption, --csv and --images, or --export FILE")
    cfg = None if args.bundle else C.from_args(args)
    with base.one_line_errors(PredictorError):
        with contextlib.redirect_stdout(sys.stderr):  # what loading says goes to stderr: stdout holds the answer
            predictor = Predictor.load(cfg, bundle=args.bundle, demo_mode=args.demo, device=args.device,
                                       warm_up=bool(args.image))  # a batch or an export pays no warm-up
        source = args.bundle or predictor.manifest["source"]["output"]
        print(f"predictor: blocks {', '.join(predictor.manifest['blocks'])} x {predictor.manifest['folds']} folds from "
              f"{source}; loaded in {predictor.load_seconds:.1f} s on {predictor.device}")
        if args.export:
            size = predictor.export(args.export)
            print(f"bundle {size['path']}: {size['total_mb']} MB "
                  f"({'within' if size['within_limit'] else 'OVER'} the {size['limit_mb']} MB limit; "
                  f"{size['uncompressed_mb']} MB unpacked)")
            for part, mb in size["parts_mb"].items():
                print(f"  {mb:8.2f} MB  {part}")
        if args.image:
            result = predictor.predict_one(args.image, args.caption)
            print(result.describe(every_label=args.all))
            print(f"predicted in {result.seconds * 1000:.0f} ms")
        if args.csv:
            started = time.perf_counter()
            out = Path(args.out or f"{Path(args.csv).stem}_labels.csv")
            predictor.predict_csv(args.csv, args.images, out)
            print(f"wrote {out} (validated: one row per record of {args.csv}) in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
