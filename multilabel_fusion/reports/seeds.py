"""docs/SEEDS.md: every system and experiment of the source documents, its published figure beside ours on the
competition data, and the command that reproduces ours.

    python3 -m multilabel_fusion.reports.seeds --data ../shared/comp5329           # run every row, write the page
    python3 -m multilabel_fusion.reports.seeds --data ../shared/comp5329 --only fusion-published
    python3 -m multilabel_fusion.reports.seeds --render                             # the page from docs/seeds.json
    python3 -m multilabel_fusion.reports.seeds --record image-finetuned metrics/image.json  # a GPU row run elsewhere

A row is one stage script with ``--set`` overrides and what to read off the metrics file it writes. Every row runs
in one output and models folder (``--output``, ``--models``), so features and finished trainings are computed once
and found by key: a row whose work is cached takes seconds. What each row measured is kept in ``docs/seeds.json``
(value, wall time, artifact key, machine), so the page can be rendered again without running anything, and a row
can be refreshed alone. Rows that need what these machines lack (a GPU, canonical downloads) say so and are not
run.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..io.atomic import write_json, write_text
from ..io.machine import cpu_name
from ..logs import console_logging
from ..settings import ROOT
from ..stages import registry as stage_registry

log = logging.getLogger(__name__)

DOCS = ROOT / "docs"


def headline(metrics: dict[str, Any]) -> float:
    """A stage's out-of-fold mean-F1 over samples, with its cross-fitted decision (the pipeline's honest figure)."""
    return metrics["mean_f1_threshold_cv"]


def at_half(metrics: dict[str, Any]) -> float:
    """The out-of-fold mean-F1 at threshold 0.5 (what a report without a tuned decision measures)."""
    return metrics["val_mean_f1_at_0.5"]


def decoder_f1(model: str, features: str = "image") -> Callable[[dict[str, Any]], str]:
    """The F1 (%) of the decoded label sets of one row of stage 05's comparison table (first fold), as the paper."""
    def read(metrics: dict[str, Any]) -> str:
        for row in metrics.get("table", []):
            if row.get("model") == model and row.get("features", features) == features:
                return f"{100 * row['f1']:.1f}"
        raise KeyError(f"no row {model!r} ({features}) in the label decoder's table")
    return read


def retrieval(direction: str) -> Callable[[dict[str, Any]], str]:
    """R@1 / R@5 / R@10 of stage 06 (1,000-pair protocol, held-out folds), as the papers report them."""
    def read(metrics: dict[str, Any]) -> str:
        r = metrics["retrieval"]["protocol_1k"]
        return " / ".join(f"{r[f'{direction}_r{k}']:.1f}" for k in (1, 5, 10))
    return read


@dataclass(frozen=True)
class Row:
    """One system or experiment of a source document."""

    id: str
    document: str
    system: str
    published: str
    stage: str | None = None  # the stage whose script runs it (None: cannot run here, see ``needs``)
    overrides: tuple[str, ...] = ()
    read: Callable[[dict[str, Any]], Any] = headline
    needs: str | None = None  # what it needs that these machines lack
    gpu: bool = False  # runs only where CUDA is (elsewhere its recorded figure is shown; see ``--record``)
    reading: str = ""  # one line on the difference
    against: str | None = None  # the row it is read against: the page gives the difference of the two figures

    def command(self) -> str:
        if self.stage is None:
            return ""
        script = stage_registry.default().get(self.stage).script
        sets = "".join(f" --set {_quoted(o)}" for o in self.overrides)
        return f"python3 {script} --data ../shared/comp5329{sets}"


def _quoted(override: str) -> str:
    return f'"{override}"' if any(c in override for c in " [],") else override


THREE = "Three-network report (ResNet50 + Bi-LSTM + fused MLP; validation 0.927, Kaggle test 0.877)"
RESNET_LSTM = "ResNet + LSTM report (YOLOv5 baselines; one network over CNN features and the caption)"
CNN_RNN = "CNN-RNN label decoders (MS-COCO; F1 of the decoded label sets, %)"
JOINT = "Two-branch image-caption embedding, triplet ranking (MS-COCO 1K; R@1 / R@5 / R@10, %)"
PUBLISHED_FUSED = "0.927 val, 0.877 Kaggle"
NOT_QUOTED = "in the report (not quoted to this project)"

ROWS: tuple[Row, ...] = (
    # ------------------------------------------------------------------ the three-network report
    Row("fusion-default", THREE, "fused MLP, this project's defaults (dropout 0.5, lr 1e-3, batch 256)",
        "-", "fusion",
        reading="the published figure is on its own validation split with a fine-tuned ResNet50; ours is "
                "out-of-fold over 10,000 records with frozen offline backbones"),
    Row("fusion-published", THREE, "fused MLP, the published settings (dropout 0.05, lr 0.02, batch 1000)",
        PUBLISHED_FUSED, "fusion", ("fusion.dropout=0.05", "fusion.lr=0.02", "fusion.batch_size=1000"),
        reading="why the defaults changed: on frozen features the published settings overfit sooner",
        against="fusion-default"),
    *(Row(f"fusion-dropout-{d}", THREE, f"fused MLP, dropout {d}", NOT_QUOTED, "fusion", (f"fusion.dropout={d}",),
          against="fusion-default") for d in (0.05, 0.2, 0.7)),
    *(Row(f"fusion-hidden-{h}", THREE, f"fused MLP, hidden size {h}", NOT_QUOTED, "fusion", (f"fusion.hidden={h}",),
          against="fusion-default") for h in (500, 1000, 4000)),
    *(Row(f"caption-seq-{n}", THREE, f"caption network (Bi-LSTM, network 2), sequence length {n}"
          + (" (published)" if n == 8 else ""),
          NOT_QUOTED, "caption", (f"caption.seq_len={n}",) if n != 8 else (),
          against="caption-seq-8" if n != 8 else None) for n in (4, 8, 16)),
    Row("caption-embedding", THREE, "caption network, embedding sizes of glove-twitter (25 / 50 / 100 / 200)",
        NOT_QUOTED, needs="the canonical glove-twitter vectors (gensim download: Colab)",
        reading="offline only GloVe 6B-50d exists here; run it in Colab with --set caption.vectors=glove-twitter-25"),
    Row("image-finetuned-resnet50", THREE, "image network: ResNet50 fine-tuned (network 1 as published)", NOT_QUOTED,
        needs="ResNet50's ImageNet weights (torchvision download: Colab) and a GPU (5 fine-tunings)",
        reading="the next rows fine-tune the offline EfficientNet-Lite0 instead"),
    Row("image-finetuned", THREE, "image network fine-tuned end to end, the published settings (Adam lr 1e-4, "
        "batch 128, 15 epochs, early stopping patience 3), EfficientNet-Lite0@320 (offline ImageNet)", NOT_QUOTED,
        "image", ("image.fine_tune=true", "image.offline_fallback=efficientnet_lite0@320"), gpu=True,
        against="image-frozen-lite0",
        reading="4 of 5 folds stopped at epoch 2 on the plateau where only 'person' is predicted"),
    Row("image-finetuned-15", THREE, "the same, all 15 epochs (no early stopping)", NOT_QUOTED, "image",
        ("image.fine_tune=true", "image.offline_fallback=efficientnet_lite0@320", "image.patience=15"), gpu=True,
        against="image-frozen-lite0",
        reading="still rising at epoch 15 on every fold: lr 1e-4 and ~2,000 photos a fold are too few steps; the "
                "frozen features + head stay ahead"),
    Row("image-frozen-lite0", THREE, "frozen EfficientNet-Lite0@320 + MLP head on the same records (reference of "
        "the two rows above)", "-", "image", ("image.offline_fallback=efficientnet_lite0@320",), gpu=True),
    Row("image-frozen", THREE, "image network: frozen offline backbones + MLP head (this project)", "-", "image"),
    Row("image-leaky", THREE, "image network with LeakyReLU", NOT_QUOTED,
        needs="a GPU (fine-tuning; an activation swap in a frozen pretrained CNN is not a meaningful experiment)"),
    Row("text-ngrams", THREE, "TF-IDF n-grams + logistic regression (this project's text block)", "-", "text"),
    # ------------------------------------------------------------------ the ResNet + LSTM report
    Row("detector-yolov5n", RESNET_LSTM, "YOLOv5 detection baseline, per-label max confidence (YOLOv5n, offline)",
        "s 0.766 / m 0.777 / l 0.787 / x 0.790", "detector", read=at_half,
        reading="ours at threshold 0.5 like the report; with the cross-fitted decision see RESULTS.md"),
    Row("concat-published", RESNET_LSTM, "one network: CNN features + LSTM over the caption, concatenated, 2 FC + "
        "batch norm, BCE with pos_weight, Adadelta (1 LSTM layer)", "0.633", "concat", read=at_half,
        reading="at threshold 0.5 as the report (pos_weight inflates probabilities: see the decided row below)"),
    Row("concat-published-decided", RESNET_LSTM, "the same network, with the pipeline's cross-fitted decision",
        "-", "concat", against="concat-published"),
    Row("concat-no-pos-weight", RESNET_LSTM, "the same without pos_weight", "0.847", "concat",
        ("concat.pos_weight=off",), read=at_half, against="concat-published"),
    *(Row(f"concat-layers-{n}", RESNET_LSTM, f"LSTM depth {n}, no pos_weight", published, "concat",
          ("concat.pos_weight=off", f"concat.layers={n}"), read=at_half, against="concat-no-pos-weight")
      for n, published in ((2, "0.810"), (4, "0.770"), (8, "0.630"))),
    Row("concat-adam", RESNET_LSTM, "the same network with Adam (lr 1e-3) instead of Adadelta, no pos_weight", "-",
        "concat", ("concat.pos_weight=off", "concat.optimizer=adam", "concat.lr=0.001"), read=at_half,
        against="concat-no-pos-weight"),
    Row("fusion-with-concat", RESNET_LSTM, "the fused network with the concatenation network's block added", "-",
        "fusion", ("fusion.blocks=[image_probs, caption_probs, detector, detector_boxes, text, concat_probs]",),
        against="fusion-default", reading="a block helps the stacker only with evidence the others lack"),
    Row("detector-yolov5-smlx", RESNET_LSTM, "YOLOv5 s / m / l / x", "0.766 / 0.777 / 0.787 / 0.790",
        needs="the canonical ultralytics checkpoints (download: Colab)"),
    # ------------------------------------------------------------------ the CNN-RNN paper
    *(Row(f"decoder-{re.sub('[^a-z0-9]+', '-', model.lower()).strip('-')}", CNN_RNN, name, published, "label_decoder",
          ("label_decoder.comparisons=true",), read=decoder_f1(model),
          reading="F1 x 100 of the predicted label sets on the first fold's 2,010 held-out images (stage 05's "
                  "comparison table, docs/RESULTS.md); published: MS-COCO, VGG16, 80 labels")
      for model, name, published in (
          ("joint", "image-label joint embedding (CNN-RNN)", "65.9"),
          ("joint+attention", "joint embedding + attention", "67.0"),
          ("init_hidden", "CNN as initialisation", "69.4"),
          ("seq2seq+attention", "seq2seq + attention", "69.4"),
          ("seq2seq", "seq2seq", "69.5"),
          ("seq2seq+shared", "seq2seq, encoder and decoder sharing weights (the paper's best)", "69.5"),
          ("BCE MLP head", "BCE baseline (our MLP head on the same features)", "63.3"),
          ("WARP MLP head", "WARP baseline (ranking loss, top-k or threshold chosen on the fit part)", "60.7"),
          ("softmax MLP head", "softmax baseline (cross-entropy on the normalised label vector)", "61.1"))),
    # ------------------------------------------------------------------ the joint embedding paper
    Row("joint-i2t", JOINT, "image -> caption, top1 negatives (published best), mean-vector captions",
        "10.7 / 35.5 / 51.3 (ResNet50 features)", "joint_embedding", ("joint_embedding.comparisons=true",),
        read=retrieval("i2t"), reading="one caption per image here against five on MS-COCO"),
    Row("joint-t2i", JOINT, "caption -> image, same network", "8.9 / 29.7 / 45.1 (ResNet50 features)",
        "joint_embedding", ("joint_embedding.comparisons=true",), read=retrieval("t2i")),
)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@dataclass
class Results:
    """What the rows measured (docs/seeds.json): row id -> value, wall time, artifact key, date, machine."""

    path: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Results":
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"] if path.is_file() else {}
        return cls(path, rows)

    def save(self) -> None:
        write_json(self.path, {"format": 1, "rows": self.rows})


def run_row(row: Row, data: Path, output: Path, models: Path) -> dict[str, Any]:
    """Run a row's command in the shared folders and read its figure off the metrics file it wrote."""
    script = ROOT / stage_registry.default().get(row.stage).script
    args = [sys.executable, str(script), "--data", str(data), "--output", str(output), "--models", str(models),
            "--resume"]  # a row cut short (a session ends) continues its training exactly where it stopped
    for override in row.overrides:
        args += ["--set", override]
    log.info(f"[seeds] {row.id}: {' '.join(args[1:])}")
    started = time.time()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise SystemExit(f"seeds: row {row.id} failed: {' | '.join(tail)}")
    metrics = json.loads((output / "metrics" / f"{row.stage}.json").read_text(encoding="utf-8"))
    value = row.read(metrics)
    return {"value": value, "wall_s": round(time.time() - started, 1), "artifact_key": metrics.get("artifact_key"),
            "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "command": row.command()}


def recorded(row: Row, metrics_path: Path) -> dict[str, Any]:
    """A row's result from the metrics file its command wrote on another machine (a GPU machine: its rows cannot
    run here), with that machine and the records it ran on."""
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"seeds: {metrics_path}: not a readable metrics file ({err})") from None
    if not isinstance(metrics, dict) or metrics.get("stage") != row.stage:
        stage = metrics.get("stage") if isinstance(metrics, dict) else None
        raise SystemExit(f"seeds: {metrics_path} is stage {stage!r}'s metrics, row {row.id} reads stage {row.stage!r}'s")
    machine = metrics.get("machine", {})
    device = machine.get("gpu") or machine.get("cpu", "?")
    try:
        return {"value": row.read(metrics), "wall_s": metrics["wall_seconds"],
                "artifact_key": metrics.get("artifact_key"),
                "date": time.strftime("%Y-%m-%d", time.localtime(metrics_path.stat().st_mtime)),
                "machine": f"{device}, {machine.get('cpu_count', '?')} CPU cores", "command": row.command(),
                "data": f"{metrics['n_eval']:,} records, {metrics['folds']} folds"}
    except KeyError as err:
        raise SystemExit(f"seeds: {metrics_path}: no {err} in the metrics file (row {row.id})") from None


def _against(row: Row, results: Results) -> str:
    """``+0.0012 vs <the other row>`` when both figures are measured numbers."""
    mine, other = results.rows.get(row.id), results.rows.get(row.against or "")
    if not (mine and other and isinstance(mine["value"], float) and isinstance(other["value"], float)):
        return ""
    return f"{mine['value'] - other['value']:+.4f} vs `{row.against}`"


def render(results: Results) -> str:
    """The page: one table per source document."""
    lines = ["# The source documents' systems on this data", "",
             "Generated by `python3 -m multilabel_fusion.reports.seeds --data ../shared/comp5329` (`make seeds`) from "
             "`docs/seeds.json`; do not edit. Ours: out-of-fold mean-F1 over samples on `../shared/comp5329` "
             "(10,000 labelled records, 5 folds, cross-fitted decision) unless the table says otherwise; offline "
             "weights (EfficientNet-Lite ensemble for ResNet50, GloVe 6B-50d for glove-twitter-100, YOLOv5n). "
             "The published figures are on each document's own data and split: compare the rows within a table "
             "more than across the two columns. A row's id refreshes it alone: `--only <row>`.", ""]
    documents = list(dict.fromkeys(r.document for r in ROWS))
    for document in documents:
        lines += [f"## {document}", "", "| row | system or experiment | published | ours | wall | command | reading |",
                  "|---|---|---|---|---|---|---|"]
        for row in (r for r in ROWS if r.document == document):
            got = results.rows.get(row.id)
            if row.needs:
                ours, wall = f"not run here: needs {row.needs}", ""
            elif got is None:
                ours, wall = "not measured yet" + (" (needs a GPU)" if row.gpu else ""), ""
            else:
                ours, wall = f"**{_format(got['value'])}**", f"{got['wall_s']:.0f} s"
                if got.get("data"):  # measured elsewhere than the page's default (a GPU machine, a slice)
                    ours += f" ({got['data']}; {got['machine']})"
            command = f"`{row.command()}`" if row.stage else ""
            reading = "; ".join(filter(None, [_against(row, results), row.reading]))
            lines.append(f"| `{row.id}` | {row.system} | {row.published} | {ours} | {wall} | {command} | {reading} |")
        lines.append("")
    machines = sorted({r["machine"] for r in results.rows.values() if r.get("machine")})
    dates = sorted({r["date"] for r in results.rows.values() if r.get("date")})
    if machines:
        lines += [f"Measured on {', '.join(machines)} ({dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''}). "
                  "A wall time is the row's own command in folders shared with the rows before it: features and "
                  "trainings another row made are reused, so the first row of a stage pays for them.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "comp5329"))
    parser.add_argument("--output", default=str(ROOT / "output" / "seeds"), help="shared output folder of the rows")
    parser.add_argument("--models", default=str(ROOT / "models" / "seeds"), help="shared models folder of the rows")
    parser.add_argument("--only", nargs="+", default=None, help="run only these rows (ids)")
    parser.add_argument("--render", action="store_true", help="only write the page from docs/seeds.json")
    parser.add_argument("--record", nargs=2, action="append", default=[], metavar=("ROW", "METRICS"),
                        help="record a row from the metrics file its command wrote on another machine (GPU rows)")
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args(argv)
    ids = {r.id for r in ROWS}
    unknown = sorted((set(args.only or ()) | {r for r, _ in args.record}) - ids)
    if unknown:
        raise SystemExit(f"seeds: unknown rows {', '.join(unknown)}; rows: {', '.join(sorted(ids))}")
    docs = Path(args.docs)
    results = Results.load(docs / "seeds.json")
    with console_logging():
        by_id = {r.id: r for r in ROWS}
        for row_id, metrics_path in args.record:
            results.rows[row_id] = recorded(by_id[row_id], Path(metrics_path))
            results.save()
        if not args.render and not args.record:
            import torch

            for row in ROWS:
                if row.stage is None or row.needs or (args.only and row.id not in args.only):
                    continue
                if row.gpu and not torch.cuda.is_available():
                    log.info(f"[seeds] {row.id}: needs a GPU; its recorded figure stays")
                    continue
                results.rows[row.id] = run_row(row, Path(args.data), Path(args.output), Path(args.models))
                results.save()  # a row at a time: an interrupted run keeps what it measured
                log.info(f"[seeds] {row.id}: {_format(results.rows[row.id]['value'])} "
                         f"({results.rows[row.id]['wall_s']:.0f} s)")
        write_text(docs / "SEEDS.md", render(results) + "\n")
    log.info(f"[seeds] wrote {docs / 'SEEDS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
