"""Check the out-of-fold estimates on labelled records the pipeline never sees.

    python -m multilabel_fusion.reports.holdout_check --data ../shared/comp5329            # 20 % held out
    python -m multilabel_fusion.reports.holdout_check --data ../shared/comp5329 --set trainer.seed=1
    python -m multilabel_fusion.reports.holdout_check --data ../shared/comp5329 --seed 2026 7 11 12 13   # 5 draws

A seeded, multi-label-stratified share of the labelled records is set aside as a pseudo test set: its labels are
hidden (written only to ``answers.csv``), its photos and captions become ``test.csv``. The main job runs on the
rest exactly as it runs on the competition (same command, same configuration, every stage cross-fitted), and every
submission it writes is scored against the hidden labels. Beside each score stands the figure the stage itself
reported from the records it trained on (``mean_f1_threshold_cv``, out-of-fold with a cross-fitted decision): if
the pipeline is honest, the two agree within the sampling error of the held-out records (shown too).

Everything is written under ``--workdir`` (default ``output/holdout``): the derived competition folder
(``data/``, its images a link to the original ones), the run's ``output/`` and ``models/``, and ``holdout.json``,
``holdout.md`` and ``holdout.png`` (estimate against held-out score per stage). A second run reuses the
main job's artifacts by key, as the main job does. What depends on each photo alone (frozen image features,
detections) is taken from the artifacts a main job on ``--data`` left in ``--reuse-from`` (default ``output/``),
rows picked by photo, when they exist under the same settings: a new draw then extracts and detects nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import settings as S
from ..data import folds as F
from ..data import labels as L
from ..data import reader as D
from ..evaluation import figures, submission
from ..evaluation.metrics import sample_f1
from ..io.assets import AssetUnavailable
from ..io.atomic import write_json, write_text
from ..logs import console_logging
from ..stages import registry as stage_registry
from ..stages.context import Workspace

log = logging.getLogger(__name__)

def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    """A well-formed CSV (RFC 4180: inner quotes doubled), which the reader reads exactly like the raw format."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def draw(data: D.CompetitionData, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) rows of ``data``'s labelled records, sorted: a seeded, multi-label-stratified draw."""
    kept, held = F.split_indices(data.train_targets, share, seed)
    return np.sort(kept), np.sort(held)


def make_holdout(data_dir: str | Path, folder: str | Path, share: float, seed: int) -> dict[str, Any]:
    """Write ``folder/train.csv`` (the kept records), ``folder/test.csv`` (the held-out records without labels),
    ``folder/answers.csv`` (their labels) and link ``folder/data`` to the images; returns what was held out."""
    if not 0 < share < 1:
        raise ValueError(f"--share {share}: must be between 0 and 1")
    data_dir, folder = Path(data_dir).resolve(), Path(folder)
    data = D.load(data_dir)
    kept, held = draw(data, share, seed)
    train, folder_data = data.train, folder / "data"
    folder.mkdir(parents=True, exist_ok=True)

    def labels(row: int) -> str:
        return " ".join(map(str, train["Labels"].iloc[row]))

    write_text(folder / "train.csv", _csv_text(D.TRAIN_HEADER, [
        [train["ImageID"].iloc[i], labels(i), train["Caption"].iloc[i]] for i in kept]))
    write_text(folder / "test.csv", _csv_text(D.TEST_HEADER, [
        [train["ImageID"].iloc[i], train["Caption"].iloc[i]] for i in held]))
    write_text(folder / "answers.csv", _csv_text(["ImageID", "Labels"], [
        [train["ImageID"].iloc[i], labels(i)] for i in held]))
    if folder_data.is_symlink() and folder_data.resolve() != data.image_dir.resolve():
        folder_data.unlink()
    if not folder_data.exists():
        os.symlink(data.image_dir.resolve(), folder_data, target_is_directory=True)
    return {"source": str(data_dir), "records": len(train), "kept": int(len(kept)), "held_out": int(len(held)),
            "share": share, "seed": seed}


def reuse_frozen_artifacts(data_dir: str | Path, source_output: str | Path, workdir: Path, share: float, seed: int,
                           overrides: list[str]) -> dict[str, str]:
    """Artifacts that depend on each photo alone (frozen image features, detections) are built for the derived
    folder from those the main job made for ``data_dir`` in ``source_output`` under the same settings, when they
    exist: a draw then costs the training only, not the extraction and detection of every photo again. Returns
    stage -> the artifact the rows came from."""
    registry = stage_registry.default()
    source_ws = Workspace(S.load(overrides=overrides, data=Path(data_dir).resolve(),
                                 output=Path(source_output).resolve()), registry)
    derived_ws = Workspace(S.load(overrides=overrides, data=workdir / "data", output=workdir / "output"), registry)
    kept, held = draw(source_ws.data, share, seed)
    reused = {}
    for name in registry.order(list(derived_ws.settings.pipeline.stages), derived_ws.settings):
        stage = registry.get(name)
        try:
            key, source_key = derived_ws.key(name), source_ws.key(name)
        except AssetUnavailable:  # the main job skips (or stops at) that stage and says why
            continue
        if derived_ws.store.load(name, key, mmap=True) is not None:
            continue
        found = source_ws.store.load(name, source_key, mmap=True)
        arrays = None if found is None else stage.rows_for(derived_ws.settings, found, {"train": ("train", kept),
                                                                                         "test": ("train", held)})
        if arrays is None:
            continue
        for part in ("train", "test"):
            if not np.array_equal(arrays[f"{part}_ids"], getattr(derived_ws.data, part)["ImageID"].to_numpy(str)):
                raise ValueError(f"{found.dir}: its rows are not the photos of {workdir / 'data'} ({part})")
        derived_ws.store.save(name, key, derived_ws.spec(name), arrays, {**found.info, "rows_from": str(found.dir)})
        reused[name] = str(found.dir)
    return reused


def read_answers(path: str | Path) -> tuple[list[str], np.ndarray]:
    """ImageIDs and multi-hot labels of ``answers.csv``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    return [r[0] for r in rows], L.encode([[int(x) for x in r[1].split()] for r in rows])


def score_submission(path: str | Path, image_ids: list[str], truth: np.ndarray) -> dict[str, float]:
    """Mean F1 of a submission against the hidden labels, with the standard error of that mean over the images.

    The submission is checked as one for Kaggle (:func:`submission.validate_text`: a missing, repeated or foreign
    ImageID is a :class:`submission.SubmissionError` naming the file and line).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    submission.validate_text(text, image_ids, source=str(path))
    rows = dict(line.split(",", 1) for line in text.splitlines()[1:])
    predicted = L.encode([[int(x) for x in rows[image_id].strip('"').split()] for image_id in image_ids])
    per_image = sample_f1(truth, predicted)
    return {"mean_f1": float(per_image.mean()), "standard_error": float(per_image.std(ddof=1) / np.sqrt(len(per_image)))}


def score_run(output: str | Path, answers: str | Path) -> list[dict[str, Any]]:
    """Every submission the run wrote, scored on the held-out records, beside the stage's own estimate."""
    output = Path(output)
    image_ids, truth = read_answers(answers)
    rows = []
    for stage in stage_registry.default().names:  # the registry's order: the fused predictions last
        metrics_path = output / "metrics" / f"{stage}.json"
        if not metrics_path.is_file():
            continue
        metrics = json.loads(metrics_path.read_text())
        submission_path = Path(metrics["submission"])  # where the stage wrote its submission
        scored = score_submission(submission_path, image_ids, truth)
        estimate = metrics.get("mean_f1_threshold_cv")
        rows.append({"stage": stage, "estimate": estimate, "estimate_tuned": metrics.get("val_mean_f1_tuned"),
                     "held_out": round(scored["mean_f1"], 4), "standard_error": round(scored["standard_error"], 4),
                     "difference": None if estimate is None else round(scored["mean_f1"] - estimate, 4),
                     "epoch_selection": metrics.get("epoch_selection"), "submission": str(submission_path)})
    return rows


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [f"Held out: {info['held_out']:,} of {info['records']:,} labelled records of `{info['source']}` "
             f"(stratified, seed {info['seed']}); the main job ran on the other {info['kept']:,} "
             f"({info.get('wall_s', '?')} s).", "",
             "| stage | out-of-fold estimate (cross-fitted decision) | held-out records | held-out − estimate "
             "| ± standard error |", "|---|---|---|---|---|"]
    for r in rows:
        estimate = "" if r["estimate"] is None else f"{r['estimate']:.4f}"
        difference = "" if r["difference"] is None else f"{r['difference']:+.4f}"
        lines.append(f"| {r['stage']} | {estimate} | {r['held_out']:.4f} | {difference} | {r['standard_error']:.4f} |")
    return "\n".join(lines) + "\n"


def summarise(draws: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, over several draws (each ``{"holdout": info, "stages": rows}``): the mean of held-out − estimate
    and its standard error over the draws (a single draw's sampling error shows in the spread between them)."""
    out = []
    for stage in [r["stage"] for r in draws[0]["stages"]]:
        diffs = [r["difference"] for d in draws for r in d["stages"] if r["stage"] == stage and r["difference"] is not None]
        if not diffs:
            continue
        se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
        out.append({"stage": stage, "draws": len(diffs), "mean_difference": round(float(np.mean(diffs)), 4),
                    "standard_error": None if se is None else round(se, 4),
                    "differences": diffs, "min": min(diffs), "max": max(diffs)})
    return out


def draws_markdown(draws: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    seeds = [d["holdout"]["seed"] for d in draws]
    sizes = ", ".join(f"{d['holdout']['held_out']:,}" for d in draws)
    lines = [f"{len(draws)} draws of the held-out records (seeds {', '.join(map(str, seeds))}; {sizes} records held "
             "out, the main job on the rest of each). Held-out score − out-of-fold estimate, per draw:",
             "", "| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (± SE over draws) |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for row in summary:
        se = "" if row["standard_error"] is None else f" (± {row['standard_error']:.4f})"
        lines.append(f"| {row['stage']} | " + " | ".join(f"{x:+.4f}" for x in row["differences"])
                     + f" | {row['mean_difference']:+.4f}{se} |")
    return "\n".join(lines) + "\n"


def run_draw(args: argparse.Namespace, workdir: Path, seed: int) -> dict[str, Any] | int:
    """One draw in ``workdir``: hold out, run the main job on the rest, score; its results, or an exit status."""
    try:
        info = make_holdout(args.data, workdir / "data", args.share, seed)
        if args.reuse_from != "none":
            source_output = args.reuse_from or S.load(overrides=args.overrides).path("output")
            reused = reuse_frozen_artifacts(args.data, source_output, workdir, args.share, seed, args.overrides)
            for stage, folder in reused.items():
                log.info(f"[holdout] {stage}: the rows of the held-out draw taken from {folder} (nothing to compute again)")
            info["reused"] = reused
    except (D.DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info(f"[holdout] {info['held_out']:,} of {info['records']:,} records held out (labels hidden in "
             f"{workdir / 'data' / 'answers.csv'}); main job on the other {info['kept']:,}")
    command = [sys.executable, "-m", "multilabel_fusion", "--data", str(workdir / "data"),
               "--output", str(workdir / "output"), "--models", str(workdir / "models")]
    command += [a for s in args.overrides for a in ("--set", s)]
    started = time.time()
    if subprocess.run(command).returncode != 0:
        print(f"error: the main job failed: {' '.join(command)}", file=sys.stderr)
        return 1
    info["wall_s"] = round(time.time() - started, 1)
    info["overrides"] = args.overrides
    try:
        rows = score_run(workdir / "output", workdir / "data" / "answers.csv")
    except ValueError as err:  # a submission Kaggle would refuse: named with its file and line
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_json(workdir / "holdout.json", {"holdout": info, "stages": rows})
    text = markdown(rows, info)
    write_text(workdir / "holdout.md", text)
    figures.estimate_vs_held_out(rows, workdir / "holdout.png")
    print("\n" + text + f"\n-> {workdir / 'holdout.json'}, {workdir / 'holdout.md'}, {workdir / 'holdout.png'}")
    return {"holdout": info, "stages": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multilabel_fusion.reports.holdout_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a labelled competition folder (train.csv, data/)")
    parser.add_argument("--workdir", default="output/holdout", help="where everything is written")
    parser.add_argument("--share", type=float, default=0.2, help="share of the labelled records held out")
    parser.add_argument("--seed", type=int, nargs="+", default=[2026],
                        help="seed of the held-out draw (not split.seed); several: one draw each, in "
                             "WORKDIR/seed_<seed>/, and their summary in WORKDIR/draws.md and draws.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to the main job (repeatable)")
    parser.add_argument("--reuse-from", default=None, metavar="OUTPUT",
                        help="output folder of a main job on --data whose frozen image features and detections the "
                             "draw reuses when they exist under the same settings (default: paths.output of "
                             "config.yaml; 'none': extract and detect again)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()  # the main job reads relative paths from the repository root
    if len(set(args.seed)) < len(args.seed):
        parser.error(f"--seed {' '.join(map(str, args.seed))}: a seed given twice")
    with console_logging():
        return _draws(args, workdir)


def _draws(args: argparse.Namespace, workdir: Path) -> int:
    if len(args.seed) == 1:
        result = run_draw(args, workdir, args.seed[0])
        return result if isinstance(result, int) else 0
    draws = []
    for seed in args.seed:
        result = run_draw(args, workdir / f"seed_{seed}", seed)
        if isinstance(result, int):
            return result
        draws.append(result)
    summary = summarise(draws)
    write_json(workdir / "draws.json", {"draws": draws, "summary": summary})
    text = draws_markdown(draws, summary)
    write_text(workdir / "draws.md", text)
    print("\n" + text + f"\n-> {workdir / 'draws.json'}, {workdir / 'draws.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
