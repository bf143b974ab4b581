"""The results page of stage 05 (the label decoders): the paper's table on this data beside the published figures,
the learning curve, the chosen decoder per fold and the fused network with and without its block, all from the
stage's metrics file (its figures are drawn by the stage run).

    python stages/05_label_decoder.py --data ../shared/comp5329 --set label_decoder.comparisons=true \\
        --results-doc docs/RESULTS_label_decoder.md [--fusion-metrics WITHOUT.json WITH.json=LABEL]
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .stage_results import add_page_arguments, cross_fitted, figure, fusion_rows, run_with_page

#: The paper's table (MS-COCO, VGG16 features, LSTM 512, label embeddings 100): P / R / F1 averaged over samples.
#: WARP and softmax: F1 only (the figures it quotes for those baselines, top-k labels).
PUBLISHED = [
    {"model": "WARP", "precision": None, "recall": None, "f1": 60.7},
    {"model": "softmax", "precision": None, "recall": None, "f1": 61.1},
    {"model": "BCE", "precision": 61.7, "recall": 65.0, "f1": 63.3},
    {"model": "joint embedding", "precision": 66.6, "recall": 65.3, "f1": 65.9},
    {"model": "joint embedding + attention", "precision": 69.5, "recall": 64.7, "f1": 67.0},
    {"model": "CNN as initialisation", "precision": 71.5, "recall": 67.4, "f1": 69.4},
    {"model": "seq2seq + attention", "precision": 70.9, "recall": 68.0, "f1": 69.4},
    {"model": "seq2seq", "precision": 71.1, "recall": 68.0, "f1": 69.5},
]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


#: the figures the results page shows (names in ``metrics["figures"]``)
RESULT_FIGURES = ("comparison", "breakdown", "data_sizes", "training_curves")


def results_markdown(metrics: dict[str, Any], fusion_runs: list[dict[str, Any]] | None = None,
                     figures: dict[str, str] | None = None, source: str | None = None) -> str:
    """The stage's results page, written from its metrics file and fused-network runs with and without its block (as
    :func:`..reports.stage_results.fusion_summary` gives them). ``figures``: figure name -> link (relative to the
    page); ``source``: the sentence saying how the page is regenerated."""
    rows = metrics["table"]
    fold = metrics["table_split"]
    source = source or (f"Written by `python3 stages/05_label_decoder.py --data {metrics['data']} --set "
                        "label_decoder.comparisons=true --results-doc docs/RESULTS_label_decoder.md` from "
                        "`output/metrics/label_decoder.json`; never edited by hand.")
    machine = metrics["machine"]
    out = [
        "# Stage 05: recurrent label decoders on this data",
        "",
        source,
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores{', GPU ' + machine['gpu'] if machine.get('gpu') else ', no GPU'}), torch "
        f"{machine['torch']}. Features: {metrics['features']['backbone']} pooled "
        f"({metrics['features']['pooled_dim']}-d) and pooled at {len(metrics['features']['depth_dims'])} depths "
        f"({'+'.join(map(str, metrics['features']['depth_dims']))}) from the same forward pass; caption block "
        f"`{metrics['features'].get('caption_block')}` ({metrics['features'].get('caption_dim')}-d, stage 02, out of "
        "fold). "
        + (" ".join(metrics["features"]["notes"]) + " " if metrics["features"]["notes"] else "")
        + f"Split: the first of {metrics['folds']} folds ({fold['n_fit']} fit / {fold['n_held']} held out), the same for "
          f"every row. Decoding: beam width {metrics['settings']['beam']}, END never first, no label twice. Training: "
          f"Adam lr {metrics['settings']['lr']}, batch {metrics['settings']['batch_size']}, weight decay "
          f"{metrics['settings']['weight_decay']}, up to {metrics['settings']['epochs']} epochs with patience "
          f"{metrics['settings']['patience']}, best epoch by the held-out mean-F1 of the decoded sets.",
        "",
        "## The paper's table, on this data",
        "",
        "P / R / F1: precision, recall and F1 of each held-out image's predicted label set, averaged over the images "
        "(F1 = the competition's mean F1). A decoder's set is its best beam (no threshold); a BCE head's set is its "
        "labels at probability >= 0.5 (and at least the top label). *Tuned*: F1 of the decoder's per-label scores "
        "(or the head's probabilities) with per-class thresholds tuned on the same held-out rows (optimistic for all "
        "rows alike; for comparison only). *vs BCE MLP*: F1 minus the BCE MLP head's on the same features, with the "
        "standard error paired over the held-out images. Times: training on the machine above, all epochs run.",
        "",
        "| model | features | P | R | F1 | vs BCE MLP (± s.e.) | F1 of scores @0.5 | tuned | labels/image | "
        "best epoch / run | train s | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = " **(chosen)**" if r.get("chosen") else ""
        gap = f"{100 * r['gap_vs_bce_mlp']:+.1f} ± {100 * r['gap_se']:.1f}" if "gap_se" in r else ""
        out.append(f"| {r['model']}{star} | {r['features']} | {_pct(r['precision'])} | {_pct(r['recall'])} | "
                   f"**{_pct(r['f1'])}** | {gap} | {_pct(r['scores_f1_at_0.5'])} | {_pct(r['scores_f1_tuned'])} | "
                   f"{r['labels_per_image']} | {r['best_epoch']} / {r['epochs_run']} | {r['train_seconds']} | "
                   f"{r['parameters']:,} |")
    if not rows:
        out += ["", "Not trained in this run (`label_decoder.comparisons: false`)."]
    truth = metrics["table_split"]["labels_per_image"]
    out += ["", f"True labels per held-out image: {truth}.", ""]
    ranked = [r for r in rows if r.get("rule")]
    if ranked:
        out += ["Ranking heads (WARP, softmax: an MLP head with the image stage's settings, trained with that loss): "
                "their labels by a rule chosen on the fit part's selection rows, never on the held-out rows "
                f"(`label_decoder.ranking_rule: {metrics['settings'].get('ranking_rule', 'auto')}`): "
                + "; ".join(f"{r['model']} ({r['features']}): {r['rule']} (selection F1 "
                            f"{_pct(r['rule_selection_f1'])})" for r in ranked) + ".", ""]
    out += figure(figures, "comparison", "decoders vs BCE heads")
    out += ["Published (MS-COCO, VGG16 features, 80 labels, ~82,000 training images):", "",
            "| model | P | R | F1 |", "|---|---|---|---|"]
    out += [f"| {r['model']} | {_published(r['precision'])} | {_published(r['recall'])} | {r['f1']} |"
            for r in PUBLISHED]
    out += [""] + breakdown_section(metrics, figures)
    out += ["## Reading", ""]
    note = closing_note(metrics)
    if note:
        out += [note, ""]
    if metrics.get("data_sizes"):
        out += ["### Does the gap move with more training data?", "",
                f"`{metrics['settings']['curve_variant']}` and the BCE MLP head on the same features, on nested "
                "random subsets of the first fold's fit part, "
                "scored on the same held-out rows (the paper trained on ~82,000 MS-COCO images; each fold here has "
                f"{fold['n_fit']:,}).", "",
                "| fit records | decoder F1 | BCE MLP F1 @0.5 | gap (points) | best epochs (decoder / BCE) |",
                "|---|---|---|---|---|"]
        out += [f"| {r['n_fit']:,} | {_pct(r['decoder_f1'])} | {_pct(r['bce_f1'])} | {100 * r['gap']:+.1f} | "
                f"{r['decoder_best_epoch']} / {r['bce_best_epoch']} |" for r in metrics["data_sizes"]]
        out.append("")
        out += figure(figures, "data_sizes", "decoder vs BCE by training-set size")
    chosen = metrics["cross_fit"]
    out += ["## The chosen decoder, per fold (the feature block and the submission)", "",
            f"`{metrics['variant']}` trained on each of the {metrics['folds']} folds: out-of-fold decoded sets "
            f"P/R/F1 {_pct(chosen['decoded']['precision'])} / {_pct(chosen['decoded']['recall'])} / "
            f"{_pct(chosen['decoded']['f1'])}; its per-label scores give mean-F1 {metrics['val_mean_f1_at_0.5']:.4f} "
            f"at 0.5 and {metrics['val_mean_f1_tuned']:.4f} with per-class thresholds"
            + (f" ({metrics['mean_f1_threshold_cv']:.4f} with {cross_fitted(metrics)})" if "mean_f1_threshold_cv" in metrics
               else "") + f"; training {chosen['train_seconds']} s over the folds, decoding {chosen['decode_seconds']} s.",
            ""]
    out += figure(figures, "training_curves", "training curves of the chosen decoder")
    if fusion_runs:
        out += ["## The fused network with and without the decoder's block", "",
                "The fused network (`fusion.blocks`), same settings otherwise; out-of-fold figures.", ""]
        out += fusion_rows(fusion_runs) + [""]
    table_train = sum(r["train_seconds"] for r in rows)
    out += ["## Wall times", "",
            f"Training the {len(rows)} rows of the table: {table_train:,.0f} s in all (times of the runs when they "
            f"trained; finished runs are reused by key); the chosen decoder over the {metrics['folds']} folds: "
            f"{chosen['train_seconds']:,.0f} s. This stage run: {metrics['wall_seconds']:,.0f} s (its block "
            f"{metrics['block']}, the table's rows {metrics.get('table_seconds', 0):,.0f} s).", ""]
    return "\n".join(out)


def _published(x: float | None) -> str:
    return "" if x is None else str(x)


def breakdown_section(metrics: dict[str, Any], figures: dict[str, str] | None) -> list[str]:
    """The paper's figures 7 and 8 on this data: every row's held-out F1 by the images' number of true labels, and
    per-class F1 of the chosen and best decoders beside the MLP heads (nothing for a metrics file made before)."""
    rows = [r for r in metrics["table"] if r.get("f1_by_label_count")]
    split = metrics["table_split"]
    if not rows or "images_by_label_count" not in split:
        return []
    groups = list(split["images_by_label_count"])
    out = ["### F1 by number of labels per image and per class", "",
           "The paper's figures 7 and 8: mean F1 of the held-out images grouped by their number of true labels "
           "(images in brackets), and each class's F1, from the same held-out sets as the table.", "",
           "| model | features | " + " | ".join(f"{g} ({split['images_by_label_count'][g]:,})" for g in groups)
           + " | all |", "|---|---|" + "---|" * (len(groups) + 1)]
    out += [f"| {r['model']} | {r['features']} | "
            + " | ".join(_pct(r["f1_by_label_count"][g]) for g in groups) + f" | {_pct(r['f1'])} |" for r in rows]
    decoders = [r for r in rows if r["kind"] == "decoder"]
    shown = [r for r in decoders if r.get("chosen")]
    if decoders:
        best = max(decoders, key=lambda r: r["f1"])
        shown += [best] if best not in shown else []
    shown += [r for r in rows if r["kind"] != "decoder" and r["features"] == "image" and "linear" not in r["model"]]
    names, support = split.get("class_names"), split.get("class_support")
    if shown and names and support:
        out += ["", "| class (held-out images) | " + " | ".join(r["model"] for r in shown) + " |",
                "|---|" + "---|" * len(shown)]
        order = sorted(range(len(names)), key=lambda i: -support[i])
        out += [f"| {names[i]} ({support[i]:,}) | " + " | ".join(_pct(r["per_class_f1"][i]) for r in shown) + " |"
                for i in order]
    out.append("")
    out += figure(figures, "breakdown", "F1 by labels per image and per class")
    return out


def closing_note(metrics: dict[str, Any]) -> str:
    """What the table says, in one paragraph computed from it (so it never contradicts the numbers)."""
    rows = metrics["table"]
    dec = [r for r in rows if r["kind"] == "decoder" and r["features"] == "image"]
    bce = [r for r in rows if r["kind"] == "bce" and r["features"] == "image"]
    if not dec or not bce:
        return ""
    best, base_row = max(dec, key=lambda r: r["f1"]), max(bce, key=lambda r: r["f1"])
    gap = 100 * (best["f1"] - base_row["f1"])
    tuned_gap = 100 * (best["scores_f1_tuned"] - base_row["scores_f1_tuned"])
    verdict = f"beats the best BCE head at 0.5 ({base_row['model']}) by {gap:.1f}" if gap > 0 else \
        f"trails the best BCE head at 0.5 ({base_row['model']}) by {-gap:.1f}"
    note = (f"The best decoder on the image features ({best['model']}) {verdict} F1 points on the decoded sets "
            f"(published on MS-COCO: +6.2); with thresholds tuned on the same rows the gap is {tuned_gap:+.1f}.")
    spread = [r["f1"] for r in dec]
    note += f" The {len(dec)} image-only decoders span {100 * min(spread):.1f}-{100 * max(spread):.1f}"
    if "gap_se" in best:
        note += (f"; the best one's gap to the BCE MLP head is {100 * best['gap_vs_bce_mlp']:+.1f} ± "
                 f"{100 * best['gap_se']:.1f} points (standard error paired over the "
                 f"{metrics['table_split']['n_held']:,} held-out images)")
    note += "."
    linear = [r for r in bce if r["model"] == "BCE linear head"]
    if linear:
        beaten = sum(r["f1"] > linear[0]["f1"] for r in dec)
        note += (f" Against a linear BCE head on the same features (F1 {100 * linear[0]['f1']:.1f}), {beaten} of the "
                 f"{len(dec)} decoders win, the best by {100 * (best['f1'] - linear[0]['f1']):+.1f}; the BCE head "
                 f"with one hidden layer gains {100 * (base_row['f1'] - linear[0]['f1']):+.1f} over it: the gain over "
                 "a weak BCE baseline is real, over a strong one it is gone.")
    sizes = metrics.get("data_sizes") or []
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        note += (" Gap by training-set size (first fold, same held-out rows): "
                 + ", ".join(f"{r['n_fit']:,}: {100 * r['gap']:+.1f}" for r in sizes)
                 + f"; from {first['n_fit']:,} to {last['n_fit']:,} fit records ({last['n_fit'] / first['n_fit']:.0f}x) "
                 f"it moves {100 * (last['gap'] - first['gap']):+.1f} points")
        if len(sizes) > 2:
            prev = sizes[-2]
            note += f" ({100 * (last['gap'] - prev['gap']):+.1f} over the last {last['n_fit'] / prev['n_fit']:.1f}x)"
        note += "."
    ranked = {r["kind"]: r for r in rows if r.get("rule") and r["features"] == "image"}
    if ranked:
        mlp = next((r for r in bce if r["model"] == "BCE MLP head"), base_row)
        note += (" The same MLP head trained with a ranking loss: "
                 + ", ".join(f"{'WARP' if k == 'warp' else k} {100 * r['f1']:.1f} ({r['rule']})"
                             for k, r in ranked.items())
                 + f", against {100 * mlp['f1']:.1f} with BCE (published on MS-COCO: WARP 60.7, softmax 61.1, BCE "
                 "63.3).")
    truth = metrics.get("table_split", {}).get("labels_per_image")
    if truth:
        note += (f" Held-out images carry {truth} labels on average (of 18), so a decoded sequence is mostly one or "
                 "two steps and there is little co-occurrence for the recurrence to exploit.")
    return note


#: the options of stages/05_label_decoder.py beyond the shared ones
arguments = partial(add_page_arguments, example="docs/RESULTS_label_decoder.md")
#: what stages/05_label_decoder.py runs: the stage, then with --results-doc this page
run = partial(run_with_page, "label_decoder")
