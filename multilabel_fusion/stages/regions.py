"""Stage 08: where, not only what — a class-specific attention head on the image backbone's spatial map.

The image stage pools each photo into one vector, and small objects in the background (a car down the street, a
bench, a traffic light) are averaged away. This stage keeps one member of the image backbone (``regions.member``;
EfficientNet-Lite0 at 320 px offline: a 10 x 10 x 1280 map) before its pooling, caches the map of every photo as
float16 (``artifacts/region_maps/<key>/``, keyed by the backbone, its weights' identity, the side and the photos'
content), and trains per fold a class-specific residual attention head
(:class:`multilabel_fusion.networks.region_attention.RegionAttentionHead`): each class's mean score over the
locations plus ``lam`` times its attention-pooled score. Cross-fitted like every trained stage; block
``regions_probs`` (opt-in in ``fusion.blocks``), ``output/submission_regions.csv`` and a predictor for new photos.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..evaluation.region_examples import attention_examples
from ..features.maps import MapExtractor
from ..io.artifacts import Artifact
from ..io.hashing import digest
from ..networks.backbones import Backbone, build_backbone
from ..networks.device import cpu_threads, model_size_mb, num_workers
from ..networks.region_attention import MirrorAveraged, RegionAttentionHead, mirrored
from ..networks.precision import training_precision
from ..training import trainer
from ..training.crossfit import cross_fit, fill_in_sample
from .base import (BlockPredictor, NewRecords, Stage, best_weights, fold_mean, load_module, load_tensors,
                   module_bytes, tensor_bytes)
from .context import StageContext, Workspace
from .outputs import finish, records

log = logging.getLogger(__name__)

MAPS_VERSION = 1  # bump when how a map is computed changes, so old maps are not reused
VERSION = 1  # bump when the head or its training changes
MAPS_KIND = "region_maps"


def member_weights(ws: Workspace):
    """The weights of the image backbone's member that gives the maps (the backbone itself when it is one)."""
    weights = ws.assets.backbone_weights(ws.settings.image)
    members = weights.extra.get("members") or [weights]
    index = ws.settings.regions.member
    if index >= len(members):
        raise ValueError(f"config: regions.member {index}: the image backbone {weights.name} has {len(members)} "
                         f"member(s) (0..{len(members) - 1})")
    return members[index]


def member_backbone(ws: Workspace) -> Backbone:
    ci = ws.settings.image
    return build_backbone(member_weights(ws), ci.image_size, ci.eval_transform)


class MapBatches:
    """Mini-batches ``(maps, labels)`` of float16 maps held in memory; with ``shuffle`` the order and, with
    ``mirror``, which batches are mirrored come from a seeded ``torch.Generator`` at ``.generator`` (the trainer
    restores it on resume)."""

    def __init__(self, maps: np.ndarray, labels: np.ndarray | None, batch_size: int, side: int, *,
                 shuffle: bool = False, mirror: bool = False, seed: int = 0):
        self.maps = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float16))
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.batch_size, self.side, self.shuffle, self.mirror = int(batch_size), int(side), shuffle, mirror
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.maps) / self.batch_size)

    def __iter__(self) -> Iterator:
        n = len(self.maps)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            rows = order[start: start + self.batch_size]
            maps = self.maps[rows]
            if self.mirror and bool(torch.rand(1, generator=self.generator) < 0.5):
                maps = mirrored(maps, self.side)
            yield (maps,) if self.labels is None else (maps, self.labels[rows])


class RegionAttention(Stage):
    name = "regions"
    number = "08"
    title = "region attention"
    module = "region_attention"
    section = "regions"
    reads_images = True
    blocks = ("regions_probs",)
    writes = "spatial maps of every photo (float16), out-of-fold probabilities of a class-attention head, its submission"
    summary = "a class-attention head on the backbone's spatial map + its submission"
    about = ("Small objects in the background are averaged away when a photo is pooled into one vector. This stage "
             "keeps the image backbone's spatial map (EfficientNet-Lite0 at 320 px: 10 x 10 locations of 1280 "
             "channels, cached as float16) and trains, per fold, a class-specific residual attention head: each "
             "class's mean score over the locations plus an attention-pooled score of its own, so a class seen at "
             "one location still counts. Its out-of-fold probabilities are the block `regions_probs` (add it to "
             "`fusion.blocks`) and give `output/submission_regions.csv`.")

    # ------------------------------------------------------------------------------------------- keys
    def maps_spec(self, ws: Workspace) -> dict[str, Any]:
        """What a photo's map depends on: the member backbone, its weights, its side and the photos' content."""
        weights = member_weights(ws)
        return {"version": MAPS_VERSION, "backbone": {"name": weights.name, "identity": weights.identity},
                "image_size": ws.settings.image.image_size, "eval_transform": ws.settings.image.eval_transform,
                "bad_images": {"policy": ws.settings.data.bad_images, "replaced": ws.replaced_images()},
                "data": ws.fingerprint, "images": ws.images_fingerprint}

    def spec(self, ws: Workspace) -> dict[str, Any]:
        return {"maps": digest(self.maps_spec(ws)), "version": VERSION}

    # ------------------------------------------------------------------------------------------- the work
    def maps(self, ctx: StageContext) -> tuple[Artifact, str]:
        """Every photo's map, found by key or extracted (atomic: an interrupted run leaves nothing usable)."""
        spec = self.maps_spec(ctx)
        key = digest(spec)
        return self.found_or_computed(ctx, "the maps", lambda: extract_maps(ctx, spec, key), kind=MAPS_KIND, key=key,
                                      mmap=True)

    def fit(self, ctx: StageContext) -> Artifact:
        return self._heads(ctx)[0]

    def _heads(self, ctx: StageContext) -> tuple[Artifact, str]:
        def trained() -> Artifact:
            maps, _ = self.maps(ctx)
            with cpu_threads(ctx.device):
                return train(ctx, maps)

        return self.found_or_computed(ctx, "the heads' probabilities", trained)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        found, state = self._heads(ctx)
        maps = ctx.store.load(MAPS_KIND, self.spec(ctx)["maps"], mmap=True)  # None: deleted to free the disk
        info = dict(found.info)
        history = pd.DataFrame(info.pop("history", []))
        history = history[history["fold"] == 0] if len(history) else history
        extra = {**info, "maps": {"artifact": str(maps.dir), **maps.info} if maps is not None else {"artifact": None},
                 "artifact": str(found.dir),
                 "probabilities": state}
        figures = {}
        if maps is not None and len(ctx.folds) > 1:  # where the fold heads look, on photos they never saw
            heads = self.fold_heads(ctx, found, self.head_description(ctx.settings, found))
            fold_of = np.zeros(len(ctx.targets), dtype=int)
            for k, (_, held_idx) in enumerate(ctx.folds):
                fold_of[held_idx] = k
            figures["attention_examples"] = attention_examples(
                heads, fold_of, maps["train"], np.asarray(found["probs"]), ctx.targets, ctx.data.image_paths("train"),
                ctx.output_dir / "figures" / "regions_attention_examples.png")
        return finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], np.asarray(found["test_probs"]),
                      history=history, extra=extra, extra_figures=figures)

    @staticmethod
    def head_description(settings, art: Artifact) -> dict[str, Any]:
        """What rebuilds a fold head of ``art``: the head's settings, the maps' channels and side, mirroring."""
        r = settings.regions
        return {**head_kwargs(r), "side": int(art.info["side"]), "channels": int(art.info["channels"]),
                "mirror": bool(r.mirror)}

    def fold_heads(self, ws: Workspace, art: Artifact, description: dict[str, Any]) -> list[torch.nn.Module]:
        """The fold heads behind ``art`` with their best weights (eval mode), in fold order."""
        return [RegionPredictor.head(best_weights(f["run_dir"], ws.models_dir, self), description)
                for f in art.info["fold_runs"]]

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "RegionPredictor":
        art = ws.require("regions")
        ws.check_rows(art, self)
        settings = ws.settings
        description = {**self.head_description(settings, art),
                       "extraction_batch_size": settings.regions.extraction_batch_size,
                       "cpu_backend": settings.image.cpu_backend, "workers": settings.trainer.num_workers,
                       "bad_images": settings.data.bad_images, "mixed_precision": bool(settings.trainer.mixed_precision),
                       "key": art.key}
        return RegionPredictor(blocks, description, member_backbone(ws), self.fold_heads(ws, art, description))


def extract_maps(ctx: StageContext, spec: dict[str, Any], key: str) -> Artifact:
    """Every train and test photo's map with the member backbone, straight into the artifact's files."""
    settings, backbone = ctx.settings, member_backbone(ctx)
    extractor = MapExtractor(backbone, ctx.device, cpu_backend=settings.image.cpu_backend,
                             batch_size=settings.regions.extraction_batch_size,
                             engine_cache=settings.trainer.engine_cache,
                             mixed_precision=settings.trainer.mixed_precision)
    channels, h, w = extractor.shape
    workers = num_workers(settings.trainer.num_workers, ctx.device)
    ctx.bad_images()  # the one-line error naming an unreadable photo, before anything is written
    with ctx.store.writer(MAPS_KIND, key, spec) as writer:
        timings = []
        for part in ("train", "test"):
            paths = ctx.data.image_paths(part)
            out = writer.array(part, (len(paths), channels, h * w), np.float16)
            timings.append(extractor(paths, out, workers=workers, on_bad=settings.data.bad_images,
                                     desc=f"{part} maps"))
        writer.put("train_ids", ctx.data.train["ImageID"].to_numpy(str))
        writer.put("test_ids", ctx.data.test["ImageID"].to_numpy(str))
        n, seconds = sum(t["images"] for t in timings), sum(t["seconds"] for t in timings)
        writer.info.update({"backbone": backbone.name, "weights_used": backbone.weights_used, "side": h,
                            "extraction": {**extractor.choices, "images": n, "seconds": round(seconds, 1),
                                           "images_per_s": round(n / max(seconds, 1e-9), 1)}})
    return ctx.store.load(MAPS_KIND, key, mmap=True)


def head_kwargs(r) -> dict[str, Any]:
    """The :class:`RegionAttentionHead` keyword arguments of a ``regions`` section (or a predictor's description)."""
    return {"hidden": r["hidden"], "lam": r["lam"], "temperatures": tuple(r["temperatures"])}


def train(ctx: StageContext, maps: Artifact) -> Artifact:
    """One head per fold on its fit part (less the selection share, which chooses the epoch): out-of-fold
    probabilities of every training record, test probabilities averaged over the fold heads."""
    r, settings = ctx.settings.regions, ctx.settings
    ctx.check_rows(maps, ctx.stage)
    side = int(maps.info["side"])
    log.info(f"[regions] reading the maps into memory ({maps['train'].nbytes / 2**30:.1f} GB of training photos)")
    train_maps, test_maps = np.array(maps["train"]), np.array(maps["test"])  # in memory: rows are drawn at random
    targets, spec = ctx.targets, ctx.spec()
    run_settings = {"maps": spec["maps"], "version": VERSION, "regions": r.shaping(weights_only=True)}
    precision = training_precision(ctx.device, settings.trainer.mixed_precision)
    histories, in_sample = [], {}

    def batches(rows: np.ndarray | None, labels: bool = False, **kwargs) -> MapBatches:
        source = test_maps if rows is None else train_maps[rows]
        return MapBatches(source, targets[rows] if labels else None, r.batch_size, side, **kwargs)

    def fold(k, fit_idx, held_idx):
        run_dir = ctx.run_dir("regions", {**run_settings, "fold": [k, len(ctx.folds)]})
        train_idx, select_idx = ctx.selection(k, fit_idx, held_idx)
        torch.manual_seed(settings.trainer.seed + k)
        head = RegionAttentionHead(train_maps.shape[1], **head_kwargs(r))
        sample = np.random.default_rng(settings.trainer.seed + k).permutation(train_idx)[:2000]
        head.fit_standardisation(train_maps[np.sort(sample)])
        model = MirrorAveraged(head, side) if r.mirror else head
        optimizer = torch.optim.Adam(head.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=2, factor=0.5)
        result = trainer.fit(
            model, batches(train_idx, True, shuffle=True, mirror=r.mirror, seed=settings.trainer.seed + k),
            batches(select_idx), targets[select_idx], loss_fn=trainer.bce_for(r.pos_weight, 1.0, targets[train_idx]),
            optimizer=optimizer, scheduler=scheduler, scheduler_uses_metric=True, run_dir=run_dir, epochs=r.epochs,
            patience=r.patience, device=ctx.device, precision=precision, resume=ctx.resume,
            settings={**spec, "fold": k}, name=f"regions fold {k + 1}")
        histories.append(result.history.assign(fold=k))
        if len(ctx.folds) == 1:
            in_sample["probs"] = trainer.predict(model, batches(np.arange(len(targets))), ctx.device,
                                                 precision=precision)
        return ({"probs": trainer.predict(model, batches(held_idx), ctx.device, precision=precision)},
                {"test_probs": trainer.predict(model, batches(None), ctx.device, precision=precision)},
                {"best_epoch": result.best_epoch, "run_dir": str(run_dir), "reused": result.reused,
                 "seconds": round(result.seconds, 1), "n_train": len(train_idx), "n_selection": len(select_idx),
                 "head_mb": model_size_mb(head)})

    cf = cross_fit(ctx.folds, len(targets), fold, "regions")
    arrays = {"probs": cf.held["probs"], "test_probs": cf.test["test_probs"],
              "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str)}
    fill_in_sample(arrays, in_sample)
    history = pd.concat(histories, ignore_index=True)
    info = {"side": side, "channels": int(train_maps.shape[1]), "backbone": maps.info.get("backbone"),
            "fold_runs": cf.folds, "best_epochs": [f["best_epoch"] for f in cf.folds],
            "training_seconds": round(float(history["seconds"].sum()), 1) if len(history) else 0.0,
            "training_reused": all(f["reused"] for f in cf.folds), "run_dir": cf.folds[0]["run_dir"],
            "history": records(history)}
    return ctx.store.save("regions", ctx.key(), spec, arrays, info)


class RegionPredictor(BlockPredictor):
    """The member backbone's maps of new photos (computed as the stage computed them), through every fold head,
    averaged as the stage averaged its test rows."""

    stage = "regions"

    @staticmethod
    def head(state: dict, description: dict[str, Any]) -> torch.nn.Module:
        head = RegionAttentionHead(description["channels"], **head_kwargs(description))
        model = MirrorAveraged(head, description["side"]) if description["mirror"] else head
        model.load_state_dict(state)
        return model.eval()

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], backbone: Backbone,
                 heads: list[torch.nn.Module]):
        super().__init__(blocks)
        self.description, self.backbone, self.heads = description, backbone, heads
        self._extractor: MapExtractor | None = None

    @property
    def fold_networks(self) -> list[torch.nn.Module]:
        return list(self.heads)

    def to(self, device: torch.device) -> "RegionPredictor":
        super().to(device)
        self._extractor = None
        return self

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = self.description
        if self._extractor is None:
            self._extractor = MapExtractor(self.backbone, self.device, cpu_backend=d["cpu_backend"],
                                           batch_size=d["extraction_batch_size"],
                                           mixed_precision=d["mixed_precision"])
        channels, h, w = self._extractor.shape
        maps = np.empty((len(records), channels, h * w), np.float16)
        self._extractor(list(records.images), maps, workers=num_workers(d["workers"], self.device),
                        on_bad=d["bad_images"], desc="maps")
        precision = training_precision(self.device, d["mixed_precision"])
        batches = MapBatches(maps, None, 256, d["side"])
        with cpu_threads(self.device):
            return {"regions_probs": fold_mean([trainer.predict(n, batches, self.device, precision=precision)
                                                for n in self.heads])}

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        files = {"backbone.pt": ("region maps' backbone", module_bytes(self.backbone))}
        for i, head in enumerate(self.heads):
            files[f"head_{i}.pt"] = (f"region attention heads ({len(self.heads)} folds)",
                                     tensor_bytes(head.state_dict()))
        return {**self.description, "temperatures": list(self.description["temperatures"]),
                "heads": len(self.heads)}, files

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "RegionPredictor":
        backbone = load_module(read("backbone.pt"))
        heads = [cls.head(load_tensors(read(f"head_{i}.pt")), description)
                 for i in range(int(description["heads"]))]
        return cls(blocks, description, backbone, heads)


RegionAttention.predictor_type = RegionPredictor  # what reads its part of a bundle
