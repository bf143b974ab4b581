"""Results pages of the comparison stages (05 label decoders, 06 joint embedding) and their sections in
docs/RESULTS.md.

A stage's page is rendered by its page module (:data:`PAGES`: ``results_markdown`` and ``RESULT_FIGURES``) from the
stage's metrics file and the summaries of fused-network runs with and without its block: with ``--results-doc`` by
the stage's script (:func:`run_with_page`), or as a section of docs/RESULTS.md from a snapshot kept in
``docs/stage_results/<stage>.json``, whose figures are copied to ``docs/figures/``. In docs/RESULTS.md a section lies
between two marker lines, so that it can be refreshed alone (``python3 -m multilabel_fusion.reports.bench
--stage-sections``) and survives ``make bench``, which renders the sections again from the snapshots.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from ..io.atomic import write_text

log = logging.getLogger(__name__)

#: the stages with a results page, in the order of the document, and the module of each page
PAGES = {"label_decoder": "label_decoder_page", "joint_embedding": "joint_embedding_page"}
STAGES = tuple(PAGES)
SNAPSHOTS = "stage_results"
BEGIN = "<!-- section {stage}: rendered from docs/stage_results/{stage}.json, do not edit -->"
END = "<!-- end of section {stage} -->"


def fusion_summary(m: dict[str, Any], label: str | None = None) -> dict[str, Any]:
    """What a results page reads of a stage-03 metrics file (a fused run with or without a block); ``label``: what
    else tells the run apart (e.g. which decoder made the block)."""
    return {"blocks": list(m.get("blocks", {})), "artifact_key": m.get("artifact_key"), "label": label,
            "block_artifacts": {b: v.get("artifact_key") for b, v in (m.get("blocks") or {}).items()},
            **{k: m.get(k) for k in ("val_mean_f1_at_0.5", "val_mean_f1_tuned", "mean_f1_threshold_cv",
                                     "wall_seconds", "decision")}}


def cross_fitted(m: dict[str, Any]) -> str:
    """What ``mean_f1_threshold_cv`` of metrics ``m`` was scored with: a metrics file made before
    ``thresholds.decision`` existed (no ``decision`` key) had per-class thresholds only."""
    return "a cross-fitted decision" if m.get("decision") else "cross-fitted thresholds"


def fusion_argument(text: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH=LABEL`` (a fused run's metrics file, and what tells it apart in the table)."""
    path, sep, label = text.partition("=")
    if sep and Path(path).is_file():
        return Path(path), label.strip() or None
    return Path(text), None


def fusion_rows(fusion_runs: list[dict[str, Any]]) -> list[str]:
    """Fused runs (:func:`fusion_summary`) as a markdown table, each against the first row (cross-fitted)."""
    rule = "decision" if all(m.get("decision") for m in fusion_runs) else "thresholds"
    out = [f"| fusion.blocks | F1 @ 0.5 | F1 tuned | F1 cross-fitted {rule} | vs first row (cross-fitted) | wall s |",
           "|---|---|---|---|---|---|"]
    ref = fusion_runs[0].get("mean_f1_threshold_cv")
    for i, m in enumerate(fusion_runs):
        cv = m.get("mean_f1_threshold_cv")
        delta = f"{cv - ref:+.4f}" if i and cv is not None and ref is not None else ""
        what = ", ".join(m["blocks"]) + (f" ({m['label']})" if m.get("label") else "")
        out.append(f"| {what} | {m['val_mean_f1_at_0.5']:.4f} | {m['val_mean_f1_tuned']:.4f} | "
                   f"{'–' if cv is None else f'{cv:.4f}'} | {delta} | {m.get('wall_seconds') or ''} |")
    return out


def figure(figures: dict[str, str] | None, name: str, alt: str) -> list[str]:
    """A markdown image line (and a blank one) when ``figures`` links ``name``; nothing otherwise."""
    return [f"![{alt}]({figures[name]})", ""] if figures and figures.get(name) else []


def page(stage: str) -> ModuleType:
    """The page module of ``stage`` (``results_markdown``, ``RESULT_FIGURES``)."""
    return importlib.import_module(f"{__package__}.{PAGES[stage]}")


# ------------------------------------------------------------------------------------------------ a stage's script


def add_page_arguments(parser, example: str) -> None:
    """The options of a stage script that writes its results page (``example``: where it usually goes)."""
    parser.add_argument("--results-doc", type=Path, default=None,
                        help=f"also write the markdown results page (e.g. {example})")
    parser.add_argument("--fusion-metrics", nargs="*", default=[], metavar="FUSION_JSON[=LABEL]",
                        help="metrics files of fused-network runs (with and without the stage's blocks) for the page")


def write_page(metrics: dict[str, Any], doc: Path, fusion_args: list[str],
               render: Callable[..., str]) -> Path:
    """The stage's results page at ``doc`` (figures linked relative to it), with the fused runs ``fusion_args``
    (``PATH`` or ``PATH=LABEL``)."""
    fusion = [fusion_summary(json.loads(path.read_text()), label) for path, label in map(fusion_argument, fusion_args)]
    links = {name: os.path.relpath(path, Path(doc).resolve().parent) for name, path in metrics["figures"].items()}
    path = write_text(doc, render(metrics, fusion, links))
    log.info(f"[{metrics['stage']}] wrote {path}")
    return path


def run_with_page(stage: str, settings, demo_mode: bool | str = False, resume: bool = False,
                  args=None) -> dict[str, Any]:
    """What a stage script runs: the stage (after the stages it reads, where missing), then with ``--results-doc``
    its results page."""
    from .. import pipeline

    metrics = pipeline.run_stage(stage, settings, demo_mode=demo_mode, resume=resume)
    if args is not None and args.results_doc is not None:
        write_page(metrics, Path(args.results_doc), args.fusion_metrics, page(stage).results_markdown)
    return metrics


# ------------------------------------------------------------------------------------------------ snapshots


def snapshot(docs: Path, stage: str, metrics_path: Path, fusion_args: list[str]) -> Path:
    """Keep a stage's metrics file and its fused runs (``PATH`` or ``PATH=LABEL``, the first one the reference) in
    ``docs/stage_results/<stage>.json``, the figures its page shows (the stage's ``RESULT_FIGURES``) copied to
    ``docs/figures/`` (links relative to docs/)."""
    fusion_paths, labels = zip(*[fusion_argument(str(a)) for a in fusion_args]) if fusion_args else ((), ())
    if stage not in STAGES:
        raise ValueError(f"--stage: {stage!r} has no results section (one of {', '.join(STAGES)})")
    for path in [metrics_path, *fusion_paths]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--stage {stage}: no file {path}")
    metrics = json.loads(Path(metrics_path).read_text())
    if metrics.get("stage") != stage:
        raise ValueError(f"--stage {stage}: {metrics_path} is the metrics file of {metrics.get('stage')!r}")
    fusion = []
    for path, label in zip(fusion_paths, labels):
        m = json.loads(Path(path).read_text())
        if m.get("stage") != "fusion":
            raise ValueError(f"--stage {stage}: {path} is not a stage-03 (fusion) metrics file")
        fusion.append(fusion_summary(m, label))
    shown = getattr(page(stage), "RESULT_FIGURES", None)
    links = {}
    for name, path in (metrics.get("figures") or {}).items():
        if Path(path).is_file() and (shown is None or name in shown):
            target = docs / "figures" / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            links[name] = f"figures/{target.name}"
    record = {"stage": stage, "metrics_file": str(metrics_path), "fusion_files": [str(p) for p in fusion_paths],
              "figures": links, "fusion_runs": fusion, "metrics": metrics}
    return write_text(docs / SNAPSHOTS / f"{stage}.json", json.dumps(record, indent=1, default=str) + "\n")


def section(docs: Path, stage: str) -> str | None:
    """The stage's section (between its markers) from its snapshot; None without one. Headings one level down
    (the page's own title becomes a ``##`` section of RESULTS.md)."""
    path = docs / SNAPSHOTS / f"{stage}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    how = ("Refresh this section alone from a stage run with `python3 -m multilabel_fusion.reports.bench "
           f"--stage-sections --stage {stage} OUTPUT/metrics/{stage}.json [FUSION_METRICS.json[=LABEL] ...]` "
           f"(snapshot: `docs/{SNAPSHOTS}/{stage}.json`, from `{record['metrics_file']}`).")
    text = page(stage).results_markdown(record["metrics"], record["fusion_runs"] or None,
                                        figures=record["figures"], source=how)
    text = re.sub(r"(?m)^(#+) ", r"#\1 ", text).strip("\n")
    return "\n".join([BEGIN.format(stage=stage), text, END.format(stage=stage)])


def sections(docs: Path) -> str:
    """Every stage section that has a snapshot, one after the other ('' when none has)."""
    return "\n\n".join(s for s in (section(docs, stage) for stage in STAGES) if s)


def refresh(docs: Path) -> Path:
    """Replace the stage sections of docs/RESULTS.md by fresh renderings of their snapshots; a section not yet
    in the document is added at its end. Nothing else of the document changes."""
    page = docs / "RESULTS.md"
    if not page.is_file():
        raise FileNotFoundError(f"{page}: no results page to refresh; run make bench first")
    text = page.read_text()
    for stage in STAGES:
        fresh = section(docs, stage)
        if fresh is None:
            continue
        pattern = re.compile(re.escape(BEGIN.format(stage=stage)) + r".*?" + re.escape(END.format(stage=stage)),
                             re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: fresh, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + fresh + "\n"
    return write_text(page, text)
