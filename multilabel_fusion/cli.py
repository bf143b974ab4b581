"""The command lines: the main job (``python -m multilabel_fusion``) and every stage script (``stages/*.py``).

Each parses the shared options (``--config``, ``--data``, ``--output``, ``--models``, ``--demo``, ``--set``,
``--resume``), validates the settings before anything runs, shows progress on the console and keeps the run's log
(:mod:`.logs`); input and set-up problems end in one line (``error: …``, exit status 1), never a traceback.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from . import pipeline
from .logs import console_logging, one_line_errors, run_log
from .settings import Settings, add_arguments, from_args
from .stages import registry as stage_registry
from .stages.context import demo_layout


def main(argv: list[str] | None = None) -> int:
    """The main job: every stage of ``pipeline.stages`` (and every stage they read) in order, ending in
    predictions.csv; the console output is also kept in ``<output>/logs/main-<time>.log``."""
    registry = stage_registry.default()
    parser = add_arguments(argparse.ArgumentParser(prog="python -m multilabel_fusion",
                                                   description=(main.__doc__ or "").splitlines()[0]))
    parser.add_argument("--stages", nargs="+", default=None, choices=registry.names,
                        help="stages to run (default: pipeline.stages); the stages they read run first")
    parser.add_argument("--resume", action="store_true", help="continue interrupted or extended training runs")
    args = parser.parse_args(argv)
    settings = from_args(args)
    demo_mode = True if args.demo else "auto"
    logged, _, _ = demo_layout(settings, demo_mode)  # a demo run keeps its log with its results
    with console_logging(), run_log(logged.path("output"), "main"), one_line_errors():
        pipeline.run_all(settings, demo_mode=demo_mode, stages=args.stages, resume=args.resume)
    return 0


def stage_main(name: str, argv: list[str] | None = None, extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
               run: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """The command line of the script ``stages/<number>_<module>.py`` of stage ``name``: first the (earlier) stages
    whose artifacts it reads and that are missing for the current settings, then the stage. ``extra_args`` adds a
    script's own options; ``run(settings, demo_mode=, resume=, args=)`` replaces the default run."""
    stage = stage_registry.default().get(name)
    parser = add_arguments(argparse.ArgumentParser(description=f"Stage {stage.label}: {stage.writes}."))
    parser.add_argument("--resume", action="store_true", help="continue an interrupted or extended training run")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    settings: Settings = from_args(args)
    logged, _, _ = demo_layout(settings, args.demo)
    with console_logging(), run_log(logged.path("output"), name), one_line_errors():
        if run is not None:
            return run(settings, demo_mode=args.demo, resume=args.resume, args=args)
        return pipeline.run_stage(name, settings, demo_mode=args.demo, resume=args.resume)
