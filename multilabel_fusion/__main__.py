"""The main job: every stage in order (``pipeline.stages`` in config.yaml), ending in output/predictions.csv.

    python -m multilabel_fusion                          # input/ if it holds the data, else generated demo data
    python -m multilabel_fusion --data ../shared/comp5329
    python -m multilabel_fusion --stages image caption detector fusion --set "fusion.blocks=[image, caption, detector]"
"""

from __future__ import annotations

import argparse
import importlib
import time

from . import config as C
from . import pipeline

STAGE_MODULES = {"image": "image_network", "caption": "caption_network", "detector": "detector", "fusion": "fusion"}


def run_all(cfg: C.Config, demo_mode: bool | str = "auto", stages: list[str] | None = None,
            resume: bool = False) -> dict:
    """Run the stages in order; each reuses its caches, so a repeated run is quick."""
    stages = list(stages or cfg.pipeline.stages)
    unknown = [s for s in stages if s not in STAGE_MODULES]
    if unknown:
        raise SystemExit(f"error: unknown stage {unknown[0]!r}; choose from {list(STAGE_MODULES)}")
    data_dir, is_demo = pipeline.resolve_data_dir(cfg, demo_mode)
    cfg.paths["data"] = str(data_dir)
    started, results = time.time(), {}
    for stage in stages:
        print(f"\n===== {pipeline.STAGE_TITLES[stage]} =====")
        module = importlib.import_module(f"multilabel_fusion.{STAGE_MODULES[stage]}")
        results[stage] = module.run_stage(cfg, demo_mode=is_demo, resume=resume)
    print(f"\nAll stages done in {time.time() - started:.0f} s.")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = C.add_arguments(argparse.ArgumentParser(prog="python -m multilabel_fusion", description=__doc__.splitlines()[0]))
    parser.add_argument("--stages", nargs="+", default=None, help="stages to run (default: pipeline.stages)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted training runs")
    args = parser.parse_args(argv)
    cfg = C.from_args(args)
    try:
        run_all(cfg, demo_mode=True if args.demo else "auto", stages=args.stages, resume=args.resume)
    except (pipeline.D.DataError, pipeline.submission.SubmissionError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
