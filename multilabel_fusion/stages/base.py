"""What every stage shares: locating the data, the one split, artifact keys, and finishing a stage.

A stage = ``ctx = prepare(cfg, name)`` → find its artifact by key or compute it → validation and test
probabilities → ``finish(ctx, ...)``, which tunes the thresholds on the validation part (with the same
at-least-one rule the written predictions use), writes the stage's validated submission, its metrics file,
its figures and the resolved configuration beside them. Stage-specific work lives in the stage modules.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import assets, registry
from ..config import Config, ConfigError
from ..data import demo
from ..data import reader as D
from ..data.images import find_bad_images
from ..engine.artifacts import ArtifactStore, MissingArtifact
from ..engine.atomic import atomic_path, write_json, write_text
from ..engine.trainer import ResumeRequired, select_device, seed_everything
from ..evaluation import submission
from ..evaluation.metrics import mean_f1, per_class
from ..evaluation.thresholds import decide, tune_global, tune_per_class
from ..reports import figures as reports

#: Errors that are the user's input or setup, not a bug: one line on the console, no traceback.
USER_ERRORS = (D.DataError, submission.SubmissionError, MissingArtifact, assets.AssetUnavailable, ResumeRequired,
               ConfigError)


@dataclass
class StageContext:
    cfg: Config
    stage: registry.Stage
    data: D.CompetitionData
    train_idx: np.ndarray
    val_idx: np.ndarray
    targets: np.ndarray
    device: torch.device
    demo: bool
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def output_dir(self) -> Path:
        return self.cfg.path("output")

    @property
    def models_dir(self) -> Path:
        return self.cfg.path("models")

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.output_dir)

    @property
    def y_val(self) -> np.ndarray:
        return self.targets[self.val_idx]

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint()

    def spec(self, name: str | None = None) -> dict[str, Any]:
        """The spec of a stage's artifact under the current settings (default: this stage's)."""
        return registry.artifact_spec(name or self.stage.name, self.cfg, self.fingerprint)

    def key(self, name: str | None = None) -> str:
        return registry.digest(self.spec(name))

    def require(self, name: str):
        """Exactly the artifact of stage ``name`` for the current settings, or a one-line error naming its script."""
        stage = registry.get(name)
        return self.store.require(name, self.key(name), f"{stage.script} (stage {stage.label})")

    def run_dir(self, network: str, settings: dict[str, Any]) -> Path:
        """The checkpoint folder of one training run, keyed by the settings that shape its weights.

        ``settings`` must leave out how long to train (epochs, patience): raising them continues the same run
        (``--resume``) instead of starting another; no run ever writes into another run's folder.
        """
        key = registry.digest({"network": network, "data": self.fingerprint, **registry.common_settings(self.cfg),
                               **settings})
        folder = self.models_dir / network / key
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "config.yaml", self.cfg.dump_yaml())
        return folder

    def bad_images(self, part: str | None = None) -> list[str]:
        """Images that cannot be read: an error naming the first (``data.bad_images: error``), or the list to
        record in the metrics file (``replace``: grey images stand in for them)."""
        parts = [part] if part else ["train", "test"]
        bad = []
        for p in parts:
            bad += find_bad_images(self.data.image_paths(p), desc=f"checking {p} images")
        if not bad:
            return []
        listed = [f"{path}: {why}" for path, why in bad]
        if self.cfg.data.bad_images == "error":
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise D.DataError(f"{listed[0]}{more}; fix or remove the file, or set data.bad_images=replace")
        print(f"[{self.stage.name}] {len(bad)} unreadable images replaced by grey (data.bad_images=replace): "
              + "; ".join(listed[:3]) + (" ..." if len(bad) > 3 else ""))
        return listed


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


def prepare(cfg: Config, stage: str, demo_mode: bool | str = False) -> StageContext:
    """Load and check the data, make the shared split, pick the device, seed everything, warn about thin classes."""
    registry.check_names(cfg)
    data_dir, is_demo = resolve_data_dir(cfg, demo_mode)
    cfg.paths["data"] = str(data_dir)
    data, targets, train_idx, val_idx = _load_and_split(data_dir, cfg.split.val_fraction, cfg.split.seed)
    seed_everything(cfg.trainer.seed)
    device = select_device(cfg.trainer.device)
    print(f"data: {data_dir} ({len(data.train)} train records: {len(train_idx)} fit / {len(val_idx)} validation; "
          f"{len(data.test)} test) | device: {device}")
    warnings = D.class_warnings(targets, val_idx, cfg.data.min_class_examples)
    for warning in warnings:
        print(f"WARNING: {data_dir / 'train.csv'}: {warning}")
    return StageContext(cfg, registry.get(stage), data, train_idx, val_idx, targets, device, is_demo, warnings)


def evaluate(ctx: StageContext, val_probs: np.ndarray) -> dict[str, Any]:
    """Validation figures at 0.5, with a tuned global threshold and with tuned per-class thresholds.

    Every figure is the F1 of predictions made with ``thresholds.at_least_one`` as set, exactly as written.
    """
    y = ctx.y_val
    rule = ctx.cfg.thresholds.at_least_one
    t_global, f1_global = tune_global(val_probs, y, at_least_one=rule)
    t_class, f1_class = tune_per_class(val_probs, y, rounds=ctx.cfg.thresholds.rounds, at_least_one=rule)
    tuned_pred = decide(val_probs, t_class, at_least_one=rule)
    return {
        "val_mean_f1_at_0.5": round(mean_f1(y, decide(val_probs, 0.5, at_least_one=rule)), 4),
        "val_mean_f1_global_threshold": round(f1_global, 4),
        "global_threshold": t_global,
        "val_mean_f1_tuned": round(f1_class, 4),
        "thresholds": [round(float(t), 2) for t in t_class],
        "at_least_one": bool(rule),
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
    return {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def finish(ctx: StageContext, val_probs: np.ndarray, test_probs: np.ndarray, *,
           history=None, extra: dict[str, Any] | None = None, submission_path: Path | None = None,
           extra_figures: dict[str, Path] | None = None) -> dict[str, Any]:
    """Tune thresholds, write the stage's submission, metrics file (with its artifact key), figures and config.

    ``extra_figures`` (name → path of a figure the stage made itself) are recorded in ``metrics["figures"]``
    with the stage's own, so readers (notebooks, the benchmark) find every figure there.
    """
    out, stage = ctx.output_dir, ctx.stage.name
    title = ctx.stage.label
    metrics = {"stage": stage, "title": title, "data": str(ctx.data.root), "demo_data": ctx.demo,
               "artifact_key": ctx.key(), "n_fit": len(ctx.train_idx), "n_val": len(ctx.val_idx),
               "warnings": list(ctx.warnings)}
    metrics.update(evaluate(ctx, val_probs))
    test_pred = decide(test_probs, np.asarray(metrics["thresholds"]), at_least_one=ctx.cfg.thresholds.at_least_one)
    sub_path = submission_path or out / f"submission_{stage}.csv"
    submission.write(sub_path, ctx.data.test["ImageID"].tolist(), test_pred,
                     allow_empty=not ctx.cfg.thresholds.at_least_one)
    with atomic_path(out / "probabilities" / f"{stage}.npz") as tmp, open(tmp, "wb") as f:  # for notebooks
        np.savez_compressed(f, val=val_probs.astype(np.float32), test=test_probs.astype(np.float32),
                            val_idx=ctx.val_idx, test_ids=ctx.data.test["ImageID"].to_numpy(str),
                            artifact_key=np.array(metrics["artifact_key"]))
    figures = {}
    if history is not None and len(history):
        figures["training_curves"] = str(reports.training_curves(
            history, out / "figures" / f"{stage}_training.png", title))
    figures["per_class_f1"] = str(reports.per_class_f1(
        {stage: metrics["per_class"]["f1"]}, out / "figures" / f"{stage}_per_class_f1.png",
        f"{title}: per-class validation F1"))
    figures.update({name: str(path) for name, path in (extra_figures or {}).items()})
    config_path = write_text(out / "metrics" / f"{stage}.config.yaml", ctx.cfg.dump_yaml())
    metrics.update({"submission": str(sub_path), "config": str(config_path), "figures": figures,
                    "history": _records(history), "machine": machine_info(),
                    "wall_seconds": round(time.time() - ctx.started, 1)})
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


def stage_cli(name: str, argv: list[str] | None = None, extra_args=None, run=None) -> dict[str, Any]:
    """The command line every ``stages/*.py`` script shares: config, paths, --demo, --set, --resume.

    Input and set-up problems end in one line (``error: …``, exit status 1), never a traceback.
    """
    import argparse

    from .. import config as C

    stage = registry.get(name)
    parser = C.add_arguments(argparse.ArgumentParser(description=f"Stage {stage.label}: {stage.writes}."))
    parser.add_argument("--resume", action="store_true", help="continue an interrupted or extended training run")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    cfg = C.from_args(args)
    try:
        if run is not None:
            return run(cfg, demo_mode=args.demo, resume=args.resume, args=args)
        return stage.run(cfg, demo_mode=args.demo, resume=args.resume)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:  # a setting the stage refused (e.g. a block name)
        if str(err).startswith("config:"):
            raise SystemExit(f"error: {err}") from None
        raise
