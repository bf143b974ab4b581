"""Regenerate ``docs/RESULTS.md`` from real runs: every stage cold (empty caches) and warm, then seeds.

    python -m multilabel_fusion.reports.bench --data ../shared/comp5329      # (make bench)

Each stage runs as its own process (``python -m multilabel_fusion --stages X``) so that its wall time and
peak memory are measured alone. Everything in the document comes from the metrics files those runs
write, except the published reference figures, which are marked as such with their source.

The sections of the comparison stages (05 label decoders, 06 joint embedding) are rendered from their snapshots in
``docs/stage_results/`` (:mod:`.stage_results`); to take a new stage run into them, and refresh only them, without
re-running the benchmark:

    python -m multilabel_fusion.reports.bench --stage-sections \\
        --stage label_decoder OUT/metrics/label_decoder.json [FUSION_WITHOUT.json FUSION_WITH.json[=LABEL] ...] \\
        --stage joint_embedding OUT/metrics/joint_embedding.json [FUSION_*.json ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..data import labels as L
from ..evaluation import figures as reports
from ..io.atomic import write_text
from ..settings import ROOT
from ..settings import load as load_settings
from ..stages import registry as stage_registry
from ..logs import console_logging
from . import stage_results

log = logging.getLogger(__name__)

PUBLISHED = [
    ("Three-network report (ResNet50 + Bi-LSTM + fused MLP)", "validation 0.927, Kaggle test 0.877",
     "COMP5329 2022 assignment 2 report, as quoted in this project's issue #6/#8"),
    ("ResNet50 + Bi-LSTM report", "0.847", "COMP5329 assignment 2 report, as quoted in issue #8"),
    ("YOLOv5 s / m / l / x detection baselines", "0.766 / 0.777 / 0.787 / 0.790",
     "same ResNet50 + Bi-LSTM report, as quoted in issue #5/#8"),
    ("Best public solutions of this competition", "about 0.90 on Kaggle", "public leaderboard, as quoted in issue #8"),
]
#: What a run without a GPU says of the GPU (Colab) path, so that no reader takes a CPU figure for it.
GPU_UNMEASURED = ("GPU (Colab) timings: unmeasured. No GPU was available when these figures were made; the notebooks' "
                  "GPU path (JPEG decoding on the GPU, mixed precision, batch 128) has been tested only on the CPU")
PACKAGES = ["torch", "torchvision", "numpy", "pandas", "scikit-learn", "nltk", "gensim", "ultralytics",
            "albumentations", "iterative-stratification"]


def _run(args: list[str], log: Path) -> dict[str, float]:
    """Run one process; its wall time and peak resident memory (from wait4, so only that process tree)."""
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench: {' '.join(args)} failed with exit code {code}; see {log}")
    return {"wall_s": round(time.time() - start, 1), "peak_mb": round(usage.ru_maxrss / 1024, 0)}


def _metrics(output: Path, stage: str) -> dict[str, Any]:
    return json.loads((output / "metrics" / f"{stage}.json").read_text())


IMAGE_BACKBONES = ("efficientnet_lite0", "resnet50", "vgg16")
def block_ablations(default: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Fused runs compared with the ``default`` blocks, each changing one thing of it: name -> (blocks, extra
    settings). Derived from the default, so the rows follow it when it changes; a row equal to it is left out."""
    def swap(old: str, new: str) -> list[str]:
        return [new if b == old else b for b in default]

    def without(*names: str) -> list[str]:
        return [b for b in default if b not in names]

    rows = {
        "image features instead of image_probs": (swap("image_probs", "image"), []),
        "+ image features": (["image", *default], []),
        "image_depths instead of image_probs": (swap("image_probs", "image_depths"), []),
        "image head on image_depths": (default, ["image.head_input=depths"]),
        "without detector (all its blocks)": (without("detector", "detector_boxes", "detector_zoom"), []),
        "without detector_boxes": (without("detector_boxes"), []),
        "without text": (without("text"), []),
        "without caption_probs": (without("caption_probs"), []),
        "caption features instead of caption_probs": (swap("caption_probs", "caption"), []),
    }
    if "detector_zoom" in default:  # the second pass not run at all: its cost saved too
        rows["without detector_zoom (no second pass)"] = (without("detector_zoom"), ["detector.zoom_size=null"])
    return {name: (blocks, extra) for name, (blocks, extra) in rows.items() if extra or blocks != default}


#: The K=1 reference set.
K1_BLOCKS = ["image", "caption", "detector"]  # with one split only features blocks can be stacked


def _blocks(blocks: list[str]) -> list[str]:
    return ["--set", "fusion.blocks=[" + ", ".join(blocks) + "]"]


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("held_out", "val_mean_f1_at_0.5", "val_mean_f1_tuned", "mean_f1_threshold_cv", "fold_mean_f1_tuned",
            "fold_spread", "blocks", "blocks_left_out", "wall_seconds")
    return {k: m.get(k) for k in keys}


def run(data: Path, workdir: Path, seeds: int, with_detector: bool, sets: list[str],
        image_bench: int | str = 512, ablations: bool = True) -> dict[str, Any]:
    """Every stage cold then warm (each its own process), the fused network's block ablations, K=1 beside K,
    the main job warm, the extraction benchmark and the fused network's spread over seeds."""
    output, models = workdir / "output", workdir / "models"
    if workdir.exists():
        shutil.rmtree(workdir)  # cold: nothing cached
    workdir.mkdir(parents=True)
    log_file = workdir / "bench.log"
    base = [sys.executable, "-m", "multilabel_fusion", "--data", str(data), "--output", str(output),
            "--models", str(models)] + [a for s in sets for a in ("--set", s)]
    final = stage_registry.default().final().name
    stages = [s for s in stage_registry.default().names if s != final and s in _default_stages()
              and (with_detector or s != "detector")]
    default_blocks = [b for b in _default_blocks() if with_detector or not b.startswith("detector")]
    results: dict[str, Any] = {"stages": {}, "log": str(log_file), "default_blocks": default_blocks}
    for stage in stages:
        log.info(f"[bench] {stage}: cold")
        cold = _run(base + ["--stages", stage], log_file)
        log.info(f"[bench] {stage}: warm")
        warm = _run(base + ["--stages", stage], log_file)
        results["stages"][stage] = {"cold": cold, "warm": warm, "metrics": _metrics(output, stage)}
    log.info("[bench] fusion: cold / warm")
    cold = _run(base + ["--stages", "fusion"] + _blocks(default_blocks), log_file)
    warm = _run(base + ["--stages", "fusion"] + _blocks(default_blocks), log_file)
    results["stages"]["fusion"] = {"cold": cold, "warm": warm, "metrics": _metrics(output, "fusion")}
    results["main_job_cold_s"] = round(sum(r["cold"]["wall_s"] for r in results["stages"].values()), 1)
    results["main_job_warm"] = _run(base + _blocks(default_blocks), log_file)
    results["ablations"] = {}
    for name, (blocks, extra) in (block_ablations(default_blocks).items() if ablations else []):
        log.info(f"[bench] fusion {name}")
        timing = _run(base + ["--stages", "fusion"] + _blocks(blocks) + [a for s in extra for a in ("--set", s)], log_file)
        results["ablations"][name] = {**_summary(_metrics(output, "fusion")), "run": timing, "settings": extra}
    log.info("[bench] one split (split.folds=1)")
    k1 = {}
    for stage in stages:
        _run(base + ["--stages", stage, "--set", "split.folds=1"], log_file)
        k1[stage] = _summary(_metrics(output, stage))
    _run(base + ["--stages", "fusion", "--set", "split.folds=1"] + _blocks(
        [b for b in K1_BLOCKS if with_detector or b != "detector"]), log_file)
    k1["fusion"] = _summary(_metrics(output, "fusion"))
    results["k1"] = k1
    log.info("[bench] image feature extraction vs bare forward")
    _run([sys.executable, "stages/01_image_network.py", "--data", str(data), "--output", str(output),
          "--models", str(models), "--bench", str(image_bench), "--backbones", *IMAGE_BACKBONES]
         + [a for s in sets for a in ("--set", s)], log_file)
    results["image_benchmark"] = json.loads((output / "metrics" / "image_benchmark.json").read_text())
    spread = []
    for seed in range(seeds):
        _run(base + ["--stages", "fusion", "--set", f"trainer.seed={seed}"] + _blocks(default_blocks), log_file)
        m = _metrics(output, "fusion")
        spread.append({"seed": seed, "tuned": m["val_mean_f1_tuned"], "at_0.5": m["val_mean_f1_at_0.5"],
                       "threshold_cv": m.get("mean_f1_threshold_cv")})
    results["seeds"] = spread
    # the last fusion run must leave the default's metrics file behind
    _run(base + ["--stages", "fusion"] + _blocks(default_blocks), log_file)
    return results


def _default_stages() -> list[str]:
    return list(load_settings().pipeline.stages)


def _default_blocks() -> list[str]:
    return list(load_settings().fusion.blocks)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                        text=True).strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _throughput(name: str, m: dict[str, Any]) -> str:
    if name == "image" and m.get("extraction"):
        e = m["extraction"]
        return f"extraction {e['images_per_s']} img/s ({e['images']} images in {e['seconds']} s)"
    if name == "detector":
        d = m.get("detection") or m.get("speed") or {}
        if "images_per_s" in d:
            return f"detection {d['images_per_s']} img/s ({d.get('images', '?')} images in {d.get('seconds', '?')} s)"
    if name == "caption" and m.get("timings", {}).get("seconds_per_epoch") is not None:
        t = m["timings"]
        return f"training {t['seconds_per_epoch']} s/epoch, {t['epochs_run']} epochs"
    return ""


def _weights(name: str, m: dict[str, Any]) -> str:
    if isinstance(m.get("vectors"), dict):
        return f"{m['vectors']['name']} ({m['vectors']['source']})"
    if m.get("weights_used"):
        return str(m["weights_used"])
    if name.startswith("fusion"):
        return "blocks: " + ", ".join(f"{k} ({v['dim']})" for k, v in m.get("blocks", {}).items())
    return ""


def _size(m: dict[str, Any]) -> str:
    if "model_size" in m:
        return f"{m['model_size']['total_mb']} (whole predictor)"
    return str(m.get("model_size_mb", ""))


def render(results: dict[str, Any], data: Path, docs: Path) -> str:
    stages = results["stages"]
    import torch

    machine = (f"{os.cpu_count()} CPU cores, "
               + (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"))
    lines = [
        "# Results",
        "",
        f"Generated by `python -m multilabel_fusion.reports.bench --data {data}` (`make bench`) on {time.strftime('%Y-%m-%d')}"
        f" at commit {_commit()}. Do not edit by hand: re-run the command.",
        "",
        f"- Data: `{data}` ({stages['fusion']['metrics']['n_eval']} labelled records of train.csv, "
        f"{stages['fusion']['metrics']['held_out']}: every figure below is on predictions of records the model "
        f"making them never trained on; the same folds for every stage)",
        f"- Machine: {machine}",
        *([] if torch.cuda.is_available() else [f"- {GPU_UNMEASURED}"]),
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
        "",
        "## Out-of-fold mean-F1 per stage (K folds) and with one split (K=1)",
        "",
        "*F1 cross-fitted decision* is the figure to quote: the decision of each fold's records (per-class "
        "thresholds or the expected-F1 sets, `thresholds.decision`, and the 18 thresholds) was chosen on the other "
        "folds' records. *F1 tuned* is per-class thresholds tuned on all out-of-fold records. "
        "Epochs are chosen on a part of each fold's fit records set aside for it (`split.selection_fraction`), never on "
        "the held-out records. "
        "*K=1* is the old single validation split (its learned blocks of the fit part are in-sample).",
        "",
        "| stage | F1 @ 0.5 | F1 tuned | F1 cross-fitted decision | fold spread | K=1: F1 tuned (validation) | wall cold (s) | wall warm (s) | peak memory (MB) | throughput | model size (MB) | weights / vectors used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    k1 = results.get("k1", {})
    for name, r in stages.items():
        m = r["metrics"]
        one = k1.get(name, {}).get("val_mean_f1_tuned")
        lines.append(
            f"| {name} | {m['val_mean_f1_at_0.5']:.4f} | {m['val_mean_f1_tuned']:.4f} | "
            f"{m.get('mean_f1_threshold_cv', float('nan')):.4f} | {m.get('fold_spread', '')} | "
            f"{'' if one is None else f'{one:.4f}'} | {r['cold']['wall_s']} | {r['warm']['wall_s']} | "
            f"{max(r['cold']['peak_mb'], r['warm']['peak_mb']):.0f} | {_throughput(name, m)} | {_size(m)} | "
            f"{_weights(name, m)} |")
    if "main_job_warm" in results:
        lines += ["", f"Main job with K={stages['fusion']['metrics']['folds']} on this machine: cold (sum of the "
                      f"stages above, from empty caches) {results['main_job_cold_s']} s, warm (everything found by "
                      f"key) {results['main_job_warm']['wall_s']} s."]
    ablations = results.get("ablations", {})
    if ablations:
        fused = stages["fusion"]["metrics"]
        lines += ["", "## What each block of the fused network brings (out-of-fold)", "",
                  f"Default blocks: `{', '.join(results['default_blocks'])}`. Each row changes one thing.", "",
                  "| fused network | blocks | F1 @ 0.5 | F1 tuned | F1 cross-fitted decision | vs default (cross-fitted) |",
                  "|---|---|---|---|---|---|",
                  f"| default | {', '.join(fused['blocks'])} | {fused['val_mean_f1_at_0.5']:.4f} | "
                  f"{fused['val_mean_f1_tuned']:.4f} | {fused['mean_f1_threshold_cv']:.4f} | |"]
        for name, a in ablations.items():
            delta = a["mean_f1_threshold_cv"] - fused["mean_f1_threshold_cv"]
            shown = ", ".join(a["blocks"]) + "".join(f" (`{x}`)" for x in a.get("settings", []))
            lines.append(f"| {name} | {shown} | {a['val_mean_f1_at_0.5']:.4f} | "
                         f"{a['val_mean_f1_tuned']:.4f} | {a['mean_f1_threshold_cv']:.4f} | {delta:+.4f} |")
        if "fusion" in k1:
            f1 = k1["fusion"]
            lines.append(f"| K=1 (one split, validation figure) | {', '.join(f1['blocks'])} | "
                         f"{f1['val_mean_f1_at_0.5']:.4f} | {f1['val_mean_f1_tuned']:.4f} | | |")
    bench = results.get("image_benchmark", {})
    if bench:
        lines += ["", "## Image feature extraction throughput", "",
                  "Each backbone with each inference engine on the same machine in one run (OpenVINO where installed); "
                  "the last column is OpenVINO's speed-up over torch, full extraction / bare forward.", "",
                  "| backbone | engine | weights | device | precision | batch | images | extraction (s) "
                  "| full extraction (img/s) | bare forward (img/s) | ratio (target 0.90) "
                  "| est. time for 20,000 images (s) | OpenVINO / torch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in bench.values():
            speedup = b.get("openvino_over_torch") or {}
            shown = (f"{speedup['full_extraction_images_per_s']}x / {speedup['bare_forward_images_per_s']}x"
                     if speedup else "")
            lines.append(f"| {b['backbone']} | {b.get('backend', 'torch')} | {b['weights_used']} | {b['device']} | "
                         f"{b.get('precision', '')} | {b.get('batch_size', '')} | {b['images']} | "
                         f"{b.get('extraction_seconds', '')} | {b['full_extraction_images_per_s']} | "
                         f"{b['bare_forward_images_per_s']} | {b['ratio']} | {b['estimated_seconds_for_20000_images']} "
                         f"| {shown} |")
    seeds = results.get("seeds", [])
    if seeds:
        tuned = [s["tuned"] for s in seeds]
        lines += ["", "## Run-to-run spread of the fused network", "",
                  "Fused network retrained from scratch for each row (the folds stay fixed; `trainer.seed` varies):", "",
                  "| trainer seed | F1 @ 0.5 | F1 tuned | F1 cross-fitted decision |", "|---|---|---|---|"]
        lines += [f"| {s['seed']} | {s['at_0.5']:.4f} | {s['tuned']:.4f} | {s['threshold_cv']} |" for s in seeds]
        lines += ["", f"Over the seeds: {min(tuned):.4f} – {max(tuned):.4f} (spread {max(tuned) - min(tuned):.4f}, "
                      f"std {np.std(tuned):.4f})."]
    # per-class table and figure
    per_class = {name: r["metrics"]["per_class"]["f1"] for name, r in stages.items()}
    figure = reports.per_class_f1(per_class, docs / "figures" / "per_class_f1.png",
                                  "Per-class out-of-fold F1 (tuned thresholds)")
    lines += ["", "## Per-class out-of-fold F1 (tuned thresholds)", "",
              f"![per-class F1](figures/{figure.name})", "",
              "| label | " + " | ".join(per_class) + " |", "|---" * (len(per_class) + 1) + "|"]
    for i, (label, name) in enumerate(zip(L.LABEL_IDS, L.names())):
        lines.append(f"| {label} {name} | " + " | ".join(f"{v[i]:.3f}" for v in per_class.values()) + " |")
    lines += ["", "## Published reference figures (typed in, not measured here)", "",
              "| solution | mean-F1 | source |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in PUBLISHED]
    lines += ["", "Their models (ImageNet ResNet50, GloVe-twitter-100, YOLOv5 s–x) were trained on all 30,000 "
              "training records; the figures above come from the weights and vectors that could be had on the "
              "benchmark machine (the stages record which in the table) and the data in `" + str(data) + "`.", ""]
    extra = stage_results.sections(docs)  # stages 05 and 06, from their snapshots (not run by the benchmark)
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multilabel_fusion.reports.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "comp5329"))
    parser.add_argument("--workdir", default=str(ROOT / "output" / "bench"), help="cold-cache folder (wiped)")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where RESULTS.md and its figures go")
    parser.add_argument("--seeds", type=int, default=3, help="trainer seeds for the spread of the fused network")
    parser.add_argument("--no-detector", action="store_true", help="skip stage 03, the detector (slow on a CPU)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the fused network's block ablations")
    parser.add_argument("--image-bench", default="512", metavar="N|all",
                        help="images per backbone in the extraction benchmark (all: the whole data set)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every stage (e.g. smaller settings for a quick run)")
    parser.add_argument("--stage-sections", action="store_true",
                        help="only refresh the sections of stages 05 and 06 in RESULTS.md from their snapshots "
                             "(updated first from --stage), without running the benchmark")
    parser.add_argument("--stage", dest="stage_runs", action="append", nargs="+", default=[],
                        metavar="STAGE METRICS [FUSION_METRICS[=LABEL]]",
                        help="with --stage-sections: a stage (label_decoder | joint_embedding), its metrics file and "
                             "the metrics files of fused runs (stage 09) without / with its block (the first: the "
                             "reference), each optionally =LABEL saying what tells it apart")
    args = parser.parse_args(argv)
    if args.stage_runs and not args.stage_sections:
        parser.error("--stage goes with --stage-sections")
    for stage, *paths in args.stage_runs:
        if not paths:
            parser.error(f"--stage {stage}: give its metrics file")
    with console_logging():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    data, docs = Path(args.data).resolve(), Path(args.docs)
    if args.stage_sections:
        for stage, *paths in args.stage_runs:
            try:
                saved = stage_results.snapshot(docs, stage, Path(paths[0]), paths[1:])
            except (OSError, ValueError) as err:
                raise SystemExit(f"error: {err}") from None
            log.info(f"[bench] {stage}: snapshot {saved}")
        try:
            page = stage_results.refresh(docs)
        except FileNotFoundError as err:
            raise SystemExit(f"error: {err}") from None
        log.info(f"[bench] refreshed the stage sections of {page}")
        return 0
    results = run(data, Path(args.workdir), args.seeds, not args.no_detector, args.sets, args.image_bench,
                  not args.no_ablations)
    text = render(results, data, docs)
    write_text(docs / "RESULTS.md", text)
    write_text(docs / "results.json", json.dumps(results, indent=1, default=str))
    log.info(f"[bench] wrote {docs / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
