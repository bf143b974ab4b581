"""The main job: the stages of ``pipeline.stages`` (and every stage they read) in the registry's order, ending in
``output/predictions.csv``.

    from multilabel_fusion import pipeline, settings
    pipeline.run_all(settings.load(data="../shared/comp5329"))
    pipeline.run_stage("caption", settings.load(data="../shared/comp5329"))   # what stages/02_caption_network.py does

A stage finds its artifact by key, so a repeated run is quick. A stage whose pretrained asset cannot be had (the
detector without COCO weights) is skipped, loudly; the fused network then goes on without its blocks and says so.
Without competition data (or with ``demo_mode=True``) everything is written under ``output/demo/`` and
``models/demo/``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .io.assets import AssetUnavailable
from .io.locks import folder_lock
from .io.mirror import Mirror, mirrored
from .io.mirror import sync as sync_mirror
from .settings import ConfigError, Settings
from .stages import registry as stage_registry
from .stages.context import Workspace, resolve_data
from .stages.registry import Registry

log = logging.getLogger(__name__)


def workspace(settings: Settings, demo_mode: bool | str = False, *, resume: bool = False,
              registry: Registry | None = None) -> Workspace:
    """The workspace of a run: the data resolved (demo data made where asked for), the registry checked."""
    registry = registry or stage_registry.default()
    registry.check_names(settings)
    settings, is_demo = resolve_data(settings, demo_mode)
    ws = Workspace(settings, registry, demo=is_demo, resume=resume)
    ws.folds  # read, checked and folded now: bad data is an error before any stage runs  # noqa: B018
    return ws


def run_all(settings: Settings, demo_mode: bool | str = "auto", stages: list[str] | None = None,
            resume: bool = False, registry: Registry | None = None) -> dict[str, Any]:
    """Run the stages in dependency order; each finds its artifact by key. Returns each stage's metrics (and
    ``skipped``: the stages left out for a missing asset, with why)."""
    registry = registry or stage_registry.default()
    registry.check_names(settings)
    asked = list(stages or settings.pipeline.stages)
    for name in asked:
        registry.get(name)
    with mirrored(mirror_of(settings)):  # a new machine first gets back what an earlier one finished
        ws = workspace(settings, demo_mode, resume=resume, registry=registry)
        with folder_lock(ws.output_dir), folder_lock(ws.models_dir):  # one writer per folder
            return _run_stages(ws, asked)


def mirror_of(settings: Settings) -> Mirror | None:
    """The copy of ``output/`` and ``models/`` kept in ``paths.mirror`` (Colab: on Google Drive), if any."""
    if not settings.paths.mirror:
        return None
    root = settings.path("mirror").resolve()
    folders = {"output": settings.path("output"), "models": settings.path("models")}
    if root.exists() and not root.is_dir():
        raise ConfigError(f"config: paths.mirror={root} is a file, not a folder")
    for name, folder in folders.items():
        folder = folder.resolve()
        if root == folder or folder in root.parents or root in folder.parents:
            raise ConfigError(f"config: paths.mirror={root} and paths.{name}={folder} overlap; the mirror must be "
                              "another folder (Colab: on Google Drive)")
    return Mirror(root, folders)


def _run_stages(ws: Workspace, asked: list[str]) -> dict[str, Any]:
    registry = ws.registry
    started, results, skipped = time.time(), {}, {}
    read = [b for s in asked for b in registry.get(s).reads_blocks(ws.settings)]
    for name in registry.order(asked, ws.settings):
        stage = registry.get(name)
        log.info(f"\n===== {stage.label} =====")
        if stage.optional_asset:
            try:
                stage.spec(ws)
            except AssetUnavailable as err:
                skipped[name] = str(err)
                log.warning(f"[{name}] SKIPPED: no {stage.optional_asset} can be had here ({err}).\n"
                            f"[{name}] The other stages go on; the fused network leaves out the '{name}' block.")
                continue
        if name not in asked:  # only read by an asked stage: run it only when what is read of it is missing
            wanted = [ws.block_location(b) for b in read if registry.block_owner(b).name == name] \
                or [(name, ws.key(name))]
            if all(ws.store.load(kind, key, mmap=True) is not None for kind, key in wanted):
                log.info(f"[{name}] what is read of it exists for the current settings: not re-run")
                continue
        results[name] = stage.run(ws.context(name))
        sync_mirror()  # the finished stage outlives this machine
    log.info(f"\nAll stages done in {time.time() - started:.0f} s."
             + (f" Skipped: {', '.join(skipped)} (missing assets)." if skipped else ""))
    results["skipped"] = skipped
    return results


def run_stage(name: str, settings: Settings, demo_mode: bool | str = False, resume: bool = False,
              registry: Registry | None = None) -> dict[str, Any]:
    """Stage ``name`` as its script and its notebook run it: first the (earlier) stages whose artifacts it reads,
    those missing for the current settings, then the stage; its metrics."""
    registry = registry or stage_registry.default()
    results = run_all(settings, demo_mode=demo_mode, stages=[name], resume=resume, registry=registry)
    if name in results["skipped"]:  # the main job goes on without it; asked for on its own, it cannot run
        raise AssetUnavailable(results["skipped"][name])
    return results[name]
