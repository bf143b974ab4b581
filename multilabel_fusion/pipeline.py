"""What every stage shares: locating the data, the one split, and finishing a stage.

A stage = ``ctx = prepare(cfg)`` → compute validation and test probabilities → ``finish(ctx, ...)``,
which tunes the thresholds on the validation part, writes the stage's validated submission,
its metrics file and its figures. Stage-specific work lives in the network modules.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as D
from . import demo, reports, submission
from .atomic import atomic_path, write_json
from .config import Config
from .metrics import mean_f1, per_class
from .thresholds import decide, tune_global, tune_per_class
from .trainer import select_device, seed_everything

STAGE_TITLES = {"image": "01 image network", "caption": "02 caption network",
                "fusion": "03 fused network", "detector": "04 YOLO detector"}


@dataclass
class StageContext:
    cfg: Config
    data: D.CompetitionData
    train_idx: np.ndarray
    val_idx: np.ndarray
    targets: np.ndarray
    device: torch.device
    demo: bool
    started: float = field(default_factory=time.time)

    @property
    def output_dir(self) -> Path:
        return self.cfg.path("output")

    @property
    def models_dir(self) -> Path:
        return self.cfg.path("models")

    @property
    def y_val(self) -> np.ndarray:
        return self.targets[self.val_idx]

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint()

    def run_settings(self, section: str) -> dict[str, Any]:
        """A section's settings plus the data and split they were applied to (keys checkpoints and caches)."""
        return {"section": section, **self.cfg[section].to_dict(), "split": self.cfg.split.to_dict(),
                "seed": self.cfg.trainer.seed, "data": self.fingerprint}


def resolve_data_dir(cfg: Config, demo_mode: bool | str = False) -> tuple[Path, bool]:
    """The competition folder to use; ``demo_mode='auto'`` uses generated demo data when none is found."""
    data_dir = cfg.path("data")
    has_data = (data_dir / "train.csv").is_file() and (data_dir / "test.csv").is_file()
    if demo_mode is True or (demo_mode == "auto" and not has_data):
        demo_dir = cfg.path("output") / "demo_data"
        if demo_mode == "auto":
            print(f"No competition data in {data_dir}: running on generated demo data in {demo_dir}.\n"
                  f"  (Put the Kaggle files in input/ or pass --data PATH to run on the real data.)")
        demo.ensure(demo_dir)
        return demo_dir, True
    return data_dir, False


_LOADED: dict[tuple, tuple] = {}


def _load_and_split(data_dir: Path, val_fraction: float, seed: int):
    """Read, check and split once per process (stages run in one process share it); re-read if a file changed."""
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (data_dir / "train.csv", data_dir / "test.csv"))
    key = (str(data_dir.resolve()), stamp, val_fraction, seed)
    if key not in _LOADED:
        data = D.load(data_dir)
        targets = data.train_targets
        _LOADED.clear()
        _LOADED[key] = (data, targets, *D.split_indices(targets, val_fraction, seed))
    return _LOADED[key]


def prepare(cfg: Config, demo_mode: bool | str = False) -> StageContext:
    """Load and check the data, make the shared split, pick the device, seed everything."""
    data_dir, is_demo = resolve_data_dir(cfg, demo_mode)
    cfg.paths["data"] = str(data_dir)
    data, targets, train_idx, val_idx = _load_and_split(data_dir, cfg.split.val_fraction, cfg.split.seed)
    seed_everything(cfg.trainer.seed)
    device = select_device(cfg.trainer.device)
    print(f"data: {data_dir} ({len(data.train)} train records: {len(train_idx)} fit / {len(val_idx)} validation; "
          f"{len(data.test)} test) | device: {device}")
    return StageContext(cfg, data, train_idx, val_idx, targets, device, is_demo)


def evaluate(ctx: StageContext, val_probs: np.ndarray) -> dict[str, Any]:
    """Validation figures at 0.5, with a tuned global threshold and with tuned per-class thresholds."""
    y = ctx.y_val
    at_least_one = ctx.cfg.thresholds.at_least_one
    t_global, f1_global = tune_global(val_probs, y)
    t_class, f1_class = tune_per_class(val_probs, y, rounds=ctx.cfg.thresholds.rounds)
    tuned_pred = decide(val_probs, t_class, at_least_one=at_least_one)
    return {
        "val_mean_f1_at_0.5": round(mean_f1(y, decide(val_probs, 0.5, at_least_one=at_least_one)), 4),
        "val_mean_f1_global_threshold": round(f1_global, 4),
        "global_threshold": t_global,
        "val_mean_f1_tuned": round(f1_class, 4),
        "thresholds": [round(float(t), 2) for t in t_class],
        "per_class": per_class(y, tuned_pred),
    }


def cpu_name() -> str:
    """The CPU's model name (timings are only comparable on the same one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import os

    return {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def finish(ctx: StageContext, stage: str, val_probs: np.ndarray, test_probs: np.ndarray, *,
           history=None, extra: dict[str, Any] | None = None, submission_path: Path | None = None,
           extra_figures: dict[str, Path] | None = None) -> dict[str, Any]:
    """Tune thresholds, write the stage's submission, probabilities, metrics file and figures.

    ``extra_figures`` (name → path of a figure the stage made itself) are recorded in ``metrics["figures"]``
    with the stage's own, so readers (notebooks, the benchmark) find every figure there.
    """
    out = ctx.output_dir
    metrics = {"stage": stage, "title": STAGE_TITLES.get(stage, stage), "data": str(ctx.data.root),
               "demo_data": ctx.demo, "n_fit": len(ctx.train_idx), "n_val": len(ctx.val_idx)}
    metrics.update(evaluate(ctx, val_probs))
    test_pred = decide(test_probs, np.asarray(metrics["thresholds"]), at_least_one=ctx.cfg.thresholds.at_least_one)
    sub_path = submission_path or out / f"submission_{stage}.csv"
    submission.write(sub_path, ctx.data.test["ImageID"].tolist(), test_pred)
    with atomic_path(out / "probabilities" / f"{stage}.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, val=val_probs.astype(np.float32), test=test_probs.astype(np.float32),
                            val_idx=ctx.val_idx, test_ids=ctx.data.test["ImageID"].to_numpy(str))
    figures = {}
    if history is not None and len(history):
        figures["training_curves"] = str(reports.training_curves(
            history, out / "figures" / f"{stage}_training.png", STAGE_TITLES.get(stage, stage)))
    figures["per_class_f1"] = str(reports.per_class_f1(
        {stage: metrics["per_class"]["f1"]}, out / "figures" / f"{stage}_per_class_f1.png",
        f"{STAGE_TITLES.get(stage, stage)}: per-class validation F1"))
    figures.update({name: str(path) for name, path in (extra_figures or {}).items()})
    metrics.update({"submission": str(sub_path), "figures": figures, "history": _records(history),
                    "machine": machine_info(), "wall_seconds": round(time.time() - ctx.started, 1)})
    metrics.update(extra or {})
    write_json(out / "metrics" / f"{stage}.json", metrics)
    print(f"[{stage}] validation mean-F1: {metrics['val_mean_f1_at_0.5']:.4f} at 0.5, "
          f"{metrics['val_mean_f1_tuned']:.4f} with per-class thresholds -> {sub_path}")
    return metrics


def _records(history) -> list[dict]:
    return [] if history is None else json.loads(history.to_json(orient="records"))


def load_metrics(output_dir: Path, stage: str) -> dict[str, Any] | None:
    path = Path(output_dir) / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stage_cli(description: str, run, argv: list[str] | None = None, extra_args=None) -> dict[str, Any]:
    """The command line every ``stages/*.py`` script shares: config, paths, --demo, --set, --resume."""
    import argparse

    from . import config as C

    parser = C.add_arguments(argparse.ArgumentParser(description=description))
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training run from last.pt")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    cfg = C.from_args(args)
    try:
        return run(cfg, demo_mode=args.demo, resume=args.resume, args=args)
    except (D.DataError, submission.SubmissionError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
