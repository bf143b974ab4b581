"""What every stage shares: locating the data, the one split, artifact keys, and finishing a stage.

A stage = ``ctx = prepare(cfg, name)`` → find its artifact by key or compute it → validation and test
probabilities → ``finish(ctx, ...)``, which tunes the thresholds on the validation part (with the same
at-least-one rule the written predictions use), writes the stage's validated submission, its metrics file,
its figures and the resolved configuration beside them. Stage-specific work lives in the stage modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import sys
import threading
import time
import traceback
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
from ..evaluation.thresholds import apply_rule, cross_fitted_decision, decide, tune_global
from ..reports import figures as reports

#: Errors that are the user's input or setup, not a bug: one line on the console, no traceback.
USER_ERRORS = (D.DataError, submission.SubmissionError, MissingArtifact, assets.AssetUnavailable, ResumeRequired,
               ConfigError)


@dataclass
class StageContext:
    cfg: Config
    stage: registry.Stage
    data: D.CompetitionData
    folds: list[tuple[np.ndarray, np.ndarray]]  # (fit, held-out) record indices; held-out parts cover all (K > 1)
    targets: np.ndarray
    device: torch.device
    demo: bool
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

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
        return np.sort(np.concatenate([held for _, held in self.folds]))

    @property
    def y_eval(self) -> np.ndarray:
        return self.targets[self.eval_idx]

    @property
    def estimate(self) -> str:
        k = len(self.folds)
        return f"out-of-fold ({k} folds)" if k > 1 else "validation split"

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

    def selection(self, k: int, fit_idx: np.ndarray, held_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows to train on, rows that choose the epoch) for fold ``k``: ``split.selection_fraction`` of the fit
        part chooses, so the held-out rows stay unseen by every choice; with 0, the held-out rows choose."""
        fraction = float(self.cfg.split.selection_fraction)
        if fraction == 0:
            return fit_idx, held_idx
        return D.selection_split(self.targets, fit_idx, fraction, self.cfg.split.seed + 1 + k)

    @property
    def selection_note(self) -> str:
        """How the epochs were chosen, for the console and the metrics files."""
        fraction = float(self.cfg.split.selection_fraction)
        if fraction == 0:
            return "epochs chosen on the held-out rows themselves (split.selection_fraction: 0; optimistic)"
        return f"epochs chosen on {fraction:.0%} of each fit part, never trained on; held-out rows only scored"

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
            bad += find_bad_images(self.data.image_paths(p),
                                   desc=f"checking {p} images" if sys.stderr.isatty() else None)
        if not bad:
            return []
        listed = [f"{path}: {why}" for path, why in bad]
        if self.cfg.data.bad_images == "error":
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise D.DataError(f"{listed[0]}{more}; fix or remove the file, or set data.bad_images=replace")
        print(f"[{self.stage.name}] {len(bad)} unreadable images replaced by grey (data.bad_images=replace): "
              + "; ".join(listed[:3]) + (" ..." if len(bad) > 3 else ""))
        return listed


def block_arrays(ctx: StageContext, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, test rows, key) of feature block ``name`` for the current settings, rows checked against the
    data. A stage says how its blocks are read (``block_arrays(ctx, name)`` in its module); by default block
    ``<stage>`` is its artifact's ``train``/``test`` arrays and ``<stage>_probs`` its out-of-fold ``probs``."""
    owner = registry.block_owner(name)
    module = owner.load()
    if hasattr(module, "block_arrays"):
        train, test = module.block_arrays(ctx, name)
    else:
        art = ctx.require(owner.name)
        for part in ("train", "test"):
            if f"{part}_ids" in art and not np.array_equal(art[f"{part}_ids"],
                                                          getattr(ctx.data, part)["ImageID"].to_numpy(str)):
                raise ValueError(f"{art.dir}: its {part} ImageIDs differ from {ctx.data.root}; re-run {owner.script}")
        train, test = (art["train"], art["test"]) if name == owner.name else (art["probs"], art["test_probs"])
    train, test = np.asarray(train, dtype=np.float32), np.asarray(test, dtype=np.float32)
    if np.isnan(train).any():
        raise ValueError(f"block {name!r} has no out-of-fold row for some training records (made with other folds?); "
                         f"re-run {owner.script}")
    return train, test, registry.block_key(name, ctx.cfg, ctx.fingerprint)


def replaced_images(cfg: Config) -> list[str] | None:
    """With ``data.bad_images: replace``, the names of the images a grey one stands in for (part of the key of
    every artifact made from the images: a repaired file is read again, never served from the old artifact)."""
    if cfg.data.bad_images != "replace":
        return None
    folder = cfg.path("data") / "data"
    return sorted(p.name for p, _ in find_bad_images(sorted(folder.glob("*")))) if folder.is_dir() else []


#: A demo run writes under ``<output>/demo/`` (its generated data in ``<output>/demo/input/``) and ``<models>/demo/``:
#: results made from real data are never overwritten by demo rows.
DEMO_FOLDER = "demo"
_DEMO_NOTES: dict[str, str] = {}  # output folder -> what to say once when the demo data is first used there


def _in_demo_folders(cfg: Config) -> bool:
    output = cfg.path("output")
    return output.name == DEMO_FOLDER and cfg.path("data") == output / "input"


def use_demo_layout(cfg: Config, demo_mode: bool | str = False) -> bool:
    """Whether this run uses generated demo data (``demo_mode=True``, or ``'auto'`` without competition files in
    ``paths.data``); if so ``cfg.paths`` now point at the demo folders. Idempotent, prints nothing."""
    if _in_demo_folders(cfg):
        return True
    data_dir = cfg.path("data")
    has_data = (data_dir / "train.csv").is_file() and (data_dir / "test.csv").is_file()
    if not (demo_mode is True or (demo_mode == "auto" and not has_data)):
        return False
    output, models = cfg.path("output") / DEMO_FOLDER, cfg.path("models") / DEMO_FOLDER
    why = f"No competition data in {data_dir}" if demo_mode == "auto" else "Demo run (--demo)"
    _DEMO_NOTES[str(output)] = (
        f"{why}: running on generated demo data in {output / 'input'}.\n"
        f"  Demo results go to {output}/ and checkpoints to {models}/ (never over results from real data).\n"
        f"  (Put the Kaggle files in input/ or pass --data PATH to run on the real data.)")
    cfg.paths.update(output=str(output), models=str(models), data=str(output / "input"))
    return True


def resolve_data_dir(cfg: Config, demo_mode: bool | str = False) -> tuple[Path, bool]:
    """The competition folder to use; ``demo_mode='auto'`` uses generated demo data when none is found.

    A demo run writes under its own folders (:data:`DEMO_FOLDER`), set here in ``cfg.paths``, and says so once.
    """
    if not use_demo_layout(cfg, demo_mode):
        data_dir = cfg.path("data")
        if not ((data_dir / "train.csv").is_file() and (data_dir / "test.csv").is_file()):
            raise D.DataError(f"{data_dir}: no competition data here (train.csv and test.csv); put the Kaggle files "
                              "there, pass --data PATH, or run on generated demo data with --demo")
        return data_dir, False
    note = _DEMO_NOTES.pop(str(cfg.path("output")), None)
    if note:
        print(note)
    return demo.ensure(cfg.path("data")), True


_LOADED: dict[tuple, tuple] = {}


def _load_and_split(data_dir: Path, folds: int, val_fraction: float, seed: int):
    """Read, check and fold once per process (stages run in one process share it); re-read if a file changed."""
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (data_dir / "train.csv", data_dir / "test.csv"))
    key = (str(data_dir.resolve()), stamp, folds, val_fraction, seed)
    if key not in _LOADED:
        data = D.load(data_dir)
        targets = data.train_targets
        _LOADED.clear()
        _LOADED[key] = (data, targets, D.fold_indices(targets, folds, val_fraction, seed))
    return _LOADED[key]


def prepare(cfg: Config, stage: str, demo_mode: bool | str = False) -> StageContext:
    """Load and check the data, make the shared split, pick the device, seed everything, warn about thin classes."""
    registry.check_names(cfg)
    data_dir, is_demo = resolve_data_dir(cfg, demo_mode)
    cfg.paths["data"] = str(data_dir)
    data, targets, folds = _load_and_split(data_dir, cfg.split.folds, cfg.split.val_fraction, cfg.split.seed)
    seed_everything(cfg.trainer.seed)
    device = select_device(cfg.trainer.device)
    layout = (f"{len(folds)} folds of ~{len(folds[0][1])} held-out records" if len(folds) > 1
              else f"{len(folds[0][0])} fit / {len(folds[0][1])} validation")
    print(f"data: {data_dir} ({len(data.train)} train records: {layout}; {len(data.test)} test) | device: {device}")
    warnings = D.class_warnings(targets, folds[0][1], cfg.data.min_class_examples)
    for warning in warnings:
        print(f"WARNING: {data_dir / 'train.csv'}: {warning}")
    return StageContext(cfg, registry.get(stage), data, folds, targets, device, is_demo, warnings)


@dataclass
class CrossFit:
    """Out-of-fold arrays (one row per training record, NaN where no fold held it out) and fold-averaged test arrays."""

    held: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    folds: list[dict[str, Any]]


def cross_fit(ctx: StageContext, train_fold) -> CrossFit:
    """``train_fold(k, fit_idx, held_idx)`` → ``(held arrays, test arrays, info)`` for each fold; the held-out rows
    are put in place (every record's row comes from the one model that did not train on it) and the test arrays
    averaged over the fold models."""
    n, k_total = len(ctx.data.train), len(ctx.folds)
    held: dict[str, np.ndarray] = {}
    test: dict[str, np.ndarray] = {}
    infos = []
    for k, (fit_idx, held_idx) in enumerate(ctx.folds):
        if k_total > 1:
            print(f"[{ctx.stage.name}] fold {k + 1}/{k_total}: {len(fit_idx)} fit, {len(held_idx)} held out")
        h, t, info = train_fold(k, fit_idx, held_idx)
        for name, rows in h.items():
            held.setdefault(name, np.full((n,) + rows.shape[1:], np.nan, dtype=np.float32))[held_idx] = rows
        for name, rows in t.items():
            test[name] = test.get(name, 0) + np.asarray(rows, dtype=np.float32) / k_total
        infos.append({"fold": k, "n_fit": len(fit_idx), "n_held": len(held_idx), **info})
    return CrossFit(held, test, infos)


def evaluate(ctx: StageContext, held_probs: np.ndarray) -> dict[str, Any]:
    """Held-out figures (out-of-fold with K folds) at 0.5, with a tuned global threshold, with tuned per-class
    thresholds, with the expected-F1 sets, per fold, and with a decision that is itself cross-fitted.

    ``held_probs`` has one row per ``ctx.eval_idx``. Every figure is the F1 of predictions made with
    ``thresholds.at_least_one`` as set, exactly as written. The submission's rule (``thresholds.decision``) and
    thresholds are chosen on all held-out rows; ``mean_f1_threshold_cv`` chooses them on the other folds' rows for
    each fold instead, so that not even the 18 thresholds (or the choice of rule) have seen the rows they are scored
    on: the figure to quote. ``fold_mean_f1_tuned``, ``per_class`` and the figures use the submission's decision.
    """
    y = ctx.y_eval
    rule, rounds = ctx.cfg.thresholds.at_least_one, ctx.cfg.thresholds.rounds
    t_global, f1_global = tune_global(held_probs, y, at_least_one=rule)
    position = {int(i): r for r, i in enumerate(ctx.eval_idx)}
    groups = [np.array([position[int(i)] for i in held]) for _, held in ctx.folds]
    decision = cross_fitted_decision(held_probs, y, groups, ctx.cfg.thresholds.decision, rounds=rounds,
                                     at_least_one=rule)
    t_class, chosen_pred = decision.thresholds, decision.chosen
    fold_scores = [round(mean_f1(y[rows], chosen_pred[rows]), 4) for rows in groups]
    out = {
        "held_out": ctx.estimate,
        "epoch_selection": ctx.selection_note,
        "folds": len(ctx.folds),
        "n_eval": int(len(y)),
        "val_mean_f1_at_0.5": round(mean_f1(y, decide(held_probs, 0.5, at_least_one=rule)), 4),
        "val_mean_f1_global_threshold": round(f1_global, 4),
        "global_threshold": t_global,
        "val_mean_f1_tuned": round(decision.f1_tuned, 4),
        "val_mean_f1_expected_f1": round(decision.f1_expected, 4),
        "decision": decision.rule,
        "decision_setting": ctx.cfg.thresholds.decision,
        "fold_mean_f1_tuned": fold_scores,
        "fold_spread": round(float(np.max(fold_scores) - np.min(fold_scores)), 4),
        "thresholds": [round(float(t), 2) for t in t_class],
        "at_least_one": bool(rule),
        "per_class": per_class(y, chosen_pred),
    }
    if len(ctx.folds) > 1:
        out["mean_f1_threshold_cv"] = round(mean_f1(y, decision.predictions), 4)
        out["mean_f1_per_class_cv"] = round(decision.f1_per_class_cv, 4)
        out["fold_decisions"] = decision.fold_rules
    return out


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


def finish(ctx: StageContext, held_probs: np.ndarray, test_probs: np.ndarray, *,
           history=None, extra: dict[str, Any] | None = None, submission_path: Path | None = None,
           extra_figures: dict[str, Path] | None = None) -> dict[str, Any]:
    """Tune thresholds, write the stage's submission, metrics file (with its artifact key), figures and config.

    ``held_probs``: one row per ``ctx.eval_idx`` (out-of-fold with K folds); ``test_probs``: one per test record.

    ``extra_figures`` (name → path of a figure the stage made itself) are recorded in ``metrics["figures"]``
    with the stage's own, so readers (notebooks, the benchmark) find every figure there.
    """
    out, stage = ctx.output_dir, ctx.stage.name
    title = ctx.stage.label
    metrics = {"stage": stage, "title": title, "data": str(ctx.data.root), "demo_data": ctx.demo,
               "artifact_key": ctx.key(), "n_fit": len(ctx.train_idx), "n_val": len(ctx.val_idx),
               "warnings": list(ctx.warnings)}
    metrics.update(evaluate(ctx, held_probs))
    test_pred = decide_as(metrics, test_probs)
    sub_path = submission_path or out / f"submission_{stage}.csv"
    submission.write(sub_path, ctx.data.test["ImageID"].tolist(), test_pred,
                     allow_empty=not ctx.cfg.thresholds.at_least_one)
    with atomic_path(out / "probabilities" / f"{stage}.npz") as tmp, open(tmp, "wb") as f:  # for notebooks
        np.savez_compressed(f, val=held_probs.astype(np.float32), test=test_probs.astype(np.float32),
                            val_idx=ctx.eval_idx, test_ids=ctx.data.test["ImageID"].to_numpy(str),
                            artifact_key=np.array(metrics["artifact_key"]))
    figures = {}
    if history is not None and len(history):
        figures["training_curves"] = str(reports.training_curves(
            history, out / "figures" / f"{stage}_training.png", title))
    if len(ctx.folds) > 1:
        figures["fold_scores"] = str(reports.fold_scores(
            metrics["fold_mean_f1_tuned"], metrics.get("mean_f1_threshold_cv"), out / "figures" / f"{stage}_folds.png",
            f"{title}: mean-F1 per fold"))
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
    cv = (f", {metrics['mean_f1_threshold_cv']:.4f} with a cross-fitted decision (folds "
          f"{min(metrics['fold_mean_f1_tuned']):.4f}-{max(metrics['fold_mean_f1_tuned']):.4f})"
          if "mean_f1_threshold_cv" in metrics else "")
    print(f"[{stage}] {ctx.estimate} mean-F1: {metrics['val_mean_f1_at_0.5']:.4f} at 0.5, "
          f"{metrics['val_mean_f1_tuned']:.4f} with per-class thresholds, {metrics['val_mean_f1_expected_f1']:.4f} "
          f"with expected-F1 sets{cv}; submission by {metrics['decision'].replace('_', '-')} -> {sub_path}")
    return metrics


def decision_of(metrics: dict[str, Any]) -> str:
    """The decision rule a metrics file (or a predictor's manifest) records; one made before the rule was recorded
    used per-class thresholds."""
    return metrics.get("decision", "per_class")


def decide_as(metrics: dict[str, Any], probs: np.ndarray) -> np.ndarray:
    """Labels of ``probs`` exactly as the stage of ``metrics`` wrote its submission (its rule and thresholds); also
    reads a predictor's manifest, which records the same three keys."""
    return apply_rule(probs, decision_of(metrics), np.asarray(metrics["thresholds"]),
                      at_least_one=metrics["at_least_one"])


def _records(history) -> list[dict]:
    return [] if history is None else json.loads(history.to_json(orient="records"))


def load_metrics(output_dir: Path, stage: str) -> dict[str, Any] | None:
    path = Path(output_dir) / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


@contextlib.contextmanager
def one_line_errors(*more: type[Exception]):
    """Input and set-up problems (:data:`USER_ERRORS`, and ``more`` of a command's own) end the command with one line
    (``error: …``, exit status 1), never a traceback."""
    try:
        yield
    except (*USER_ERRORS, *more) as err:
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:  # a setting refused after loading (e.g. a block name)
        if str(err).startswith("config:"):
            raise SystemExit(f"error: {err}") from None
        raise


# ----------------------------------------------------------------------------------------------- console logs

#: Seconds between two in-place progress-bar updates kept in a log (the console still shows every one).
LOG_BAR_INTERVAL = 5.0
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal control sequences (nested bars move the cursor)
_BREAKS = re.compile(r"(\r|\n)")


class _LogLines:
    """One console stream as its log keeps it: whole lines; the in-place updates of a progress bar (text ended by
    a carriage return rather than a newline) at most every :data:`LOG_BAR_INTERVAL` seconds, its last state always."""

    def __init__(self, file, lock: threading.Lock, clock=time.monotonic):
        self.file, self.lock, self.clock, self.pending, self.last_update = file, lock, clock, "", -math.inf

    def write(self, text: str) -> None:
        with self.lock:
            for part in _BREAKS.split(text):
                if part == "\n":
                    self.file.write(self.pending.rstrip() + "\n")
                    self.pending = ""
                elif part == "\r":
                    now = self.clock()
                    if self.pending.strip() and now - self.last_update >= LOG_BAR_INTERVAL:
                        self.file.write(self.pending.rstrip() + "\n")
                        self.last_update = now
                    self.pending = ""
                else:
                    self.pending += _CONTROL.sub("", part)

    def close(self) -> None:
        if self.pending.strip():
            self.write("\n")


class _Tee:
    """A console stream that also feeds a log; to everything else (``isatty``, ``fileno``, ...) it is the console."""

    def __init__(self, console, log: _LogLines):
        self._console, self._log = console, log

    def write(self, text: str) -> int:
        written = self._console.write(text)
        self._log.write(text)
        return written

    def flush(self) -> None:
        self._console.flush()
        self._log.file.flush()

    def __getattr__(self, name: str):
        return getattr(self._console, name)


def log_path(output_dir: Path, name: str) -> Path:
    """``<output>/logs/<name>-<date>-<time>.log``, a new file for every run."""
    folder = Path(output_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{name}-{stamp}.log", 1
    while path.exists():
        n += 1
        path = folder / f"{name}-{stamp}-{n}.log"
    return path


@contextlib.contextmanager
def console_log(output_dir: Path, name: str):
    """Everything this run prints (stdout and stderr) also goes to ``<output>/logs/<name>-<time>.log``; the console
    is unchanged. The log ends with how the run ended: an ``error: …`` line, a traceback, or the exit status."""
    path = log_path(output_dir, name)
    lock = threading.Lock()
    with open(path, "w", encoding="utf-8", buffering=1) as file:
        file.write(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n# started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                   f" in {Path.cwd()}\n")
        out, err = _LogLines(file, lock), _LogLines(file, lock)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(saved[0], out), _Tee(saved[1], err)
        status = "finished"
        try:
            yield path
        except SystemExit as stop:
            status = f"exit status {stop.code}" if not isinstance(stop.code, str) else stop.code
            raise
        except BaseException as exc:
            status = "".join(traceback.format_exception(exc)).rstrip()
            raise
        finally:
            sys.stdout, sys.stderr = saved
            out.close()
            err.close()
            file.write(f"# {status} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")


# ----------------------------------------------------------------------------------------------- stage scripts


def stage_cli(name: str, argv: list[str] | None = None, extra_args=None, run=None) -> dict[str, Any]:
    """The command line every ``stages/*.py`` script shares: config, paths, --demo, --set, --resume.

    A stage that reads other stages' artifacts first runs those whose artifact for the current settings is
    missing, as the main job and the notebooks do (:func:`multilabel_fusion.__main__.run_stage`). Input and set-up
    problems end in one line (``error: …``, exit status 1), never a traceback. The console output is also kept in
    ``<output>/logs/<stage>-<time>.log``.
    """
    import argparse

    from .. import config as C
    from ..__main__ import run_stage

    stage = registry.get(name)
    parser = C.add_arguments(argparse.ArgumentParser(description=f"Stage {stage.label}: {stage.writes}."))
    parser.add_argument("--resume", action="store_true", help="continue an interrupted or extended training run")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    cfg = C.from_args(args)
    use_demo_layout(cfg, args.demo)
    with console_log(cfg.path("output"), name), one_line_errors():
        if run is not None:
            return run(cfg, demo_mode=args.demo, resume=args.resume, args=args)
        return run_stage(name, cfg, demo_mode=args.demo, resume=args.resume)
