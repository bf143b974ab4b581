"""The main job: every stage of ``pipeline.stages`` (and every stage they read) in order, ending in predictions.csv.

    python -m multilabel_fusion                          # input/ if it holds the data, else generated demo data
    python -m multilabel_fusion --data ../shared/comp5329
    python -m multilabel_fusion --stages fusion          # runs exactly the stages whose artifacts fusion reads, first

A stage whose pretrained asset cannot be had (the detector without COCO weights) is skipped, loudly; the fused
network then goes on without its block and says so. Without competition data (or with ``--demo``) everything is
written under ``output/demo/`` and ``models/demo/``. The console output is also kept in
``output/logs/main-<time>.log``.
"""

from __future__ import annotations

import argparse
import time

from . import assets
from . import config as C
from . import registry
from .data import reader as D
from .engine.artifacts import ArtifactStore
from .stages import base


def run_all(cfg: C.Config, demo_mode: bool | str = "auto", stages: list[str] | None = None,
            resume: bool = False) -> dict:
    """Run the stages in dependency order; each finds its artifact by key, so a repeated run is quick."""
    registry.check_names(cfg)
    asked = list(stages or cfg.pipeline.stages)
    for name in asked:
        registry.get(name)
    data_dir, is_demo = base.resolve_data_dir(cfg, demo_mode)
    cfg.paths["data"] = str(data_dir)
    started, results, skipped = time.time(), {}, {}
    store, fingerprint = ArtifactStore(cfg.path("output")), None
    for name in registry.order(asked, cfg):
        stage = registry.get(name)
        print(f"\n===== {stage.label} =====")
        if stage.optional_asset:
            try:
                stage.load().artifact_spec(cfg)
            except assets.AssetUnavailable as err:
                skipped[name] = str(err)
                print(f"[{name}] SKIPPED: no {stage.optional_asset} can be had here ({err}).\n"
                      f"[{name}] The other stages go on; the fused network leaves out the '{name}' block.")
                continue
        if name not in asked:  # only read by an asked stage: run it only when what is read of it is missing
            fingerprint = fingerprint or D.load(data_dir, check_images=False).fingerprint()
            wanted = [registry.block_location(b, cfg, fingerprint) for b in _blocks_read(cfg, asked)
                      if registry.block_owner(b).name == name] or [(name, registry.artifact_key(name, cfg, fingerprint))]
            if all(store.load(kind, key, mmap=True) is not None for kind, key in wanted):
                print(f"[{name}] what is read of it exists for the current settings: not re-run")
                continue
        results[name] = stage.run(cfg, demo_mode=is_demo, resume=resume)
    print(f"\nAll stages done in {time.time() - started:.0f} s."
          + (f" Skipped: {', '.join(skipped)} (missing assets)." if skipped else ""))
    results["skipped"] = skipped
    return results


def run_stage(name: str, cfg: C.Config, demo_mode: bool | str = False, resume: bool = False) -> dict:
    """Stage ``name`` as its script and its notebook run it: first the stages whose artifacts it reads, those missing
    for the current settings (the registry says which: ``reads``, ``reads_blocks``), then the stage; its metrics."""
    stage = registry.get(name)
    if not stage.reads(cfg):
        return stage.run(cfg, demo_mode=demo_mode, resume=resume)
    return run_all(cfg, demo_mode=demo_mode, stages=[name], resume=resume)[name]


def _blocks_read(cfg: C.Config, stages: list[str]) -> list[str]:
    return [b for s in stages for b in registry.get(s).reads_blocks(cfg)]


def main(argv: list[str] | None = None) -> int:
    parser = C.add_arguments(argparse.ArgumentParser(prog="python -m multilabel_fusion", description=__doc__.splitlines()[0]))
    parser.add_argument("--stages", nargs="+", default=None, choices=list(registry.STAGES),
                        help="stages to run (default: pipeline.stages); the stages they read run first")
    parser.add_argument("--resume", action="store_true", help="continue interrupted or extended training runs")
    args = parser.parse_args(argv)
    cfg = C.from_args(args)
    demo_mode = True if args.demo else "auto"
    base.use_demo_layout(cfg, demo_mode)
    with base.console_log(cfg.path("output"), "main"), base.one_line_errors():
        run_all(cfg, demo_mode=demo_mode, stages=args.stages, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
