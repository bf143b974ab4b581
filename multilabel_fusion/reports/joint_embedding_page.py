"""The results page of stage 06 (the joint embedding): retrieval on held-out folds, the strategy x encoder table,
the learning curve, the label scores and the fused network with and without its blocks, beside the published
figures, all from the stage's metrics file (its figures are drawn by the stage run).

    python stages/06_joint_embedding.py --data ../shared/comp5329 --set joint_embedding.comparisons=true \\
        --results-doc docs/RESULTS_joint_embedding.md [--fusion-metrics WITHOUT.json WITH.json=LABEL]
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import write_text
from ..stages.joint_embedding import EXAMPLE_QUERY
from .stage_results import add_page_arguments, cross_fitted, figure, fusion_rows, run_with_page

#: Published figures (MS-COCO, five captions per image, 1,000 test images): R@1/5/10 image->sentence, sentence->image.
PUBLISHED = [
    {"source": "two-branch network, VGG19 features, K = 1 (published)", "i2t": (30.5, 59.5, 72.5),
     "t2i": (21.8, 53.0, 69.2)},
    {"source": "two-branch network, ResNet50 features, K = 1 (published)", "i2t": (10.7, 35.5, 51.3),
     "t2i": (8.9, 29.7, 45.1)},
    {"source": "two-branch network, K = 10 (published)", "i2t": (2.9, 12.9, 20.9), "t2i": None},
    {"source": "VSE++ (Faghri et al., ResNet152, fine-tuned)", "i2t": (64.6, 90.0, 95.7), "t2i": (52.0, 84.3, 92.3)},
]
ONE_CAPTION_NOTE = ("One caption per image here against five on MS-COCO: an image->sentence query counts as found "
                    "only when its one caption is in the top K (on MS-COCO any of five will do), and each caption has "
                    "no near-duplicate captions of the same image to share the ranks with, so R@K is stricter.")


def _recalls(r: dict[str, Any] | None, direction: str) -> str:
    return " / ".join(f"{r[f'{direction}_r{k}']:.1f}" for k in (1, 5, 10)) if r else "–"


#: the figures the results page shows (names in ``metrics["figures"]``)
RESULT_FIGURES = ("recall_per_epoch", "comparison", "retrieval_text_query", "retrieval_image_query")


def results_markdown(metrics: dict[str, Any], fusion_runs: list[dict[str, Any]] | None = None,
                     figures: dict[str, str] | None = None, source: str | None = None) -> str:
    """The stage's results page, written from its metrics file and fused-network runs with and without its blocks (as
    :func:`..reports.stage_results.fusion_summary` gives them). ``figures``: figure name -> link (relative to the
    page); ``source``: the sentence saying how the page is regenerated."""
    ret = metrics["retrieval"]
    p1k, whole = ret["protocol_1k"], ret["whole_held_out"]
    source = source or ("Regenerate with `python3 stages/06_joint_embedding.py --data ... --set "
                        "joint_embedding.comparisons=true --results-doc docs/RESULTS_joint_embedding.md`.")
    machine = metrics.get("machine", {})
    where = (f"{machine.get('cpu')}, {machine.get('cpu_count')} cores"
             f"{', GPU ' + machine['gpu'] if machine.get('gpu') else ', no GPU'}")
    settings = metrics.get("settings") or {}
    lines = [
        "# Stage 06: image–caption joint embedding — results",
        "",
        f"Written from `output/metrics/joint_embedding.json` (data: `{metrics['data']}`, {metrics['n_eval']} training "
        f"records, {metrics['folds']} folds; caption encoder `{metrics['encoder']}`, strategy `{metrics['strategy']}`; "
        f"word vectors {metrics['vectors']['name']}; image features: {metrics['image_dim']}-d from stage 01; "
        f"machine: {where}). {source}",
        "",
        "## Retrieval on held-out folds",
        "",
        f"Each fold's network is measured on its held-out fold, never trained on (the epoch is chosen on "
        f"{metrics['retrieval']['per_fold'][0].get('n_selection', 'separate')} selection pairs of the fit part). "
        f"1K protocol: {ret['sets_1k']} disjoint sets of 1,000 image–caption pairs, mean over the sets; whole: all "
        f"~{int(whole['pairs'])} pairs of a held-out fold at once (mean over the folds). Target (the paper's best "
        "MS-COCO figures): 1K R@10 above 72.5 image→caption and 69.2 caption→image.",
        "",
        "| protocol | image→caption R@1 / 5 / 10 | medr | meanr | caption→image R@1 / 5 / 10 | medr | meanr |",
        "|---|---|---|---|---|---|---|",
        f"| 1K sets (this data, one caption per image) | {_recalls(p1k, 'i2t')} | {p1k['i2t_medr']:g} | "
        f"{p1k['i2t_meanr']:.1f} | {_recalls(p1k, 't2i')} | {p1k['t2i_medr']:g} | {p1k['t2i_meanr']:.1f} |",
        f"| whole held-out fold (~{int(whole['pairs'])} pairs) | {_recalls(whole, 'i2t')} | {whole['i2t_medr']:g} | "
        f"{whole['i2t_meanr']:.1f} | {_recalls(whole, 't2i')} | {whole['t2i_medr']:g} | {whole['t2i_meanr']:.1f} |",
        "",
        f"**One caption per image.** {ONE_CAPTION_NOTE}",
        "",
    ]
    lines += figure(figures, "recall_per_epoch", "recall per epoch")
    if metrics.get("comparison"):
        budget = (f"each run up to {settings['epochs']} epochs, patience {settings['patience']} on the selection "
                  "pairs' R-sum" if settings.get("epochs") else "")
        lines += ["## Strategies × caption encoders (first fold, 1K protocol on its held-out fold)", "",
                  f"Every other setting as the stage's ({budget}; Adam lr {settings.get('lr')}, batch "
                  f"{settings.get('batch_size')}, margin {settings.get('margin')}, λ {settings.get('reverse_weight')}). "
                  "R@K in percent; medr / meanr: median / mean rank of the match among 1,000 (one caption per image, "
                  "so stricter than MS-COCO's five: see above).", "",
                  "| encoder | negatives | image→caption R@1 / 5 / 10 | caption→image R@1 / 5 / 10 | R-sum | "
                  "medr i→c / c→i | meanr i→c / c→i | whole fold R@10 i→c / c→i | best epoch / run | s / epoch |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in metrics["comparison"]:
            p, w = row["protocol_1k"], row["whole"]
            lines.append(f"| {row['encoder']} | {row['label']} | {_recalls(p, 'i2t')} | {_recalls(p, 't2i')} | "
                         f"{p['rsum']:.1f} | {p['i2t_medr']:g} / {p['t2i_medr']:g} | "
                         f"{p['i2t_meanr']:.1f} / {p['t2i_meanr']:.1f} | {w['i2t_r10']:.1f} / "
                         f"{w['t2i_r10']:.1f} | {row['best_epoch']} / {row['epochs_run']} | "
                         f"{row['seconds_per_epoch']} |")
        lines.append("")
        lines += figure(figures, "comparison", "strategies x encoders")
    if metrics.get("learning_curve"):
        lines += [f"## Learning curve ({metrics['encoder']}, {metrics['strategy']}; first fold, 1K protocol)", "",
                  "| training pairs | image→caption R@1 / 5 / 10 | caption→image R@1 / 5 / 10 | R-sum | best epoch / run |",
                  "|---|---|---|---|---|"]
        for row in metrics["learning_curve"]:
            p = row["protocol_1k"]
            what = f"{row['training_pairs']:,}" + (" (fit part + the test records' pairs, unlabelled)" if row["test_pairs"]
                                                    else f" ({row['fraction']:.0%} of the fit part)")
            lines.append(f"| {what} | {_recalls(p, 'i2t')} | {_recalls(p, 't2i')} | {p['rsum']:.1f} | "
                         f"{row['best_epoch']} / {row['epochs_run']} |")
        lines.append("")
    lines += ["## Published figures (MS-COCO, five captions per image, 1K test images)", "",
              "| model | image→sentence R@1 / 5 / 10 | sentence→image R@1 / 5 / 10 |", "|---|---|---|"]
    for row in PUBLISHED:
        t2i = " / ".join(f"{v:.1f}" for v in row["t2i"]) if row["t2i"] else "–"
        lines.append(f"| {row['source']} | {' / '.join(f'{v:.1f}' for v in row['i2t'])} | {t2i} |")
    lines += ["", "## Label scores from the embedding (held-out, out-of-fold)", "",
              "| score | mean-F1, tuned per-class thresholds | mean-F1 at 0.5 | top-1 label is a true label |",
              "|---|---|---|---|"]
    for row in metrics["label_scores"]:
        lines.append(f"| {row['score']} | {row['mean_f1_tuned']:.4f} | {row['mean_f1_at_0.5']:.4f} | "
                     f"{row['top1_hit_rate']:.3f} |")
    lines += ["", f"The stage's submission (`{Path(metrics['submission']).name}`) uses the two neighbour votes: "
              f"held-out mean-F1 {metrics['val_mean_f1_tuned']:.4f} with tuned per-class thresholds"
              + (f", {metrics['mean_f1_threshold_cv']:.4f} with {cross_fitted(metrics)}" if
                 'mean_f1_threshold_cv' in metrics else "") + ".", ""]
    if fusion_runs:
        lines += ["## The fused network with and without the joint-embedding blocks", "",
                  f"The fused network, same settings otherwise; out-of-fold figures. `joint_embedding`: the "
                  f"{metrics['block']['dim']}-column block (zero-shot and neighbour label scores, agreement); "
                  "`joint_embedding_probs`: the 18 neighbour-vote probabilities.", ""]
        lines += fusion_rows(fusion_runs) + [""]
    examples = figure(figures, "retrieval_text_query", f"photos for {EXAMPLE_QUERY!r}") + \
        figure(figures, "retrieval_image_query", "captions for a held-out photo")
    if examples:
        lines += ["## Retrieval examples (`python3 -m multilabel_fusion.retrieve`)", ""] + examples
    timing = [f"{metrics['training_seconds']:.0f} s training the {metrics['folds']} fold networks"]
    if metrics.get("comparison"):
        timing.append(f"{sum(r['training_seconds'] for r in metrics['comparison']):.0f} s for the "
                      f"{len(metrics['comparison'])} compared runs")
    if metrics.get("learning_curve"):
        timing.append(f"{sum(r['training_seconds'] for r in metrics['learning_curve']):.0f} s for the "
                      f"{len(metrics['learning_curve'])} learning-curve runs")
    lines += ["## Wall times", "", f"{'; '.join(timing)} (training times of the runs when they trained; finished "
              f"runs are reused by key), on {where}. This stage run: {metrics.get('stage_seconds', 0):.0f} s (the "
              f"embedding {metrics.get('embedding')}).", ""]
    lines += ["## What limits it", "", closing_note(metrics), ""]
    return "\n".join(lines)


def _round2(x: float) -> float:
    """Two significant figures (an extrapolation is no more precise than that)."""
    return float(f"{x:.2g}")


def closing_note(metrics: dict[str, Any]) -> str:
    """What limits recall here, from the measurements: the target, the best compared run, the learning curve."""
    p = metrics["retrieval"]["protocol_1k"]
    target = {"i2t": 72.5, "t2i": 69.2}
    met = all(p[f"{d}_r10"] > t for d, t in target.items())
    parts = [f"Target: 1K R@10 above 72.5 (image->caption) and 69.2 (caption->image), the paper's best MS-COCO "
             f"figures. The stage's configuration ({metrics['encoder']}, {metrics['strategy']}) reaches "
             f"{p['i2t_r10']:.1f} and {p['t2i_r10']:.1f}: {'met' if met else 'not met'}."]
    if metrics.get("comparison"):
        best = max(metrics["comparison"], key=lambda r: r["protocol_1k"]["rsum"])
        b = best["protocol_1k"]
        same = next((r for r in metrics["comparison"] if (r["encoder"], r["strategy"]) == (metrics["encoder"],
                                                                                          metrics["strategy"])), None)
        parts.append(f"The best compared run ({best['encoder']}, {best['label']}) reaches {b['i2t_r10']:.1f} / "
                     f"{b['t2i_r10']:.1f} on the first fold"
                     + (f" (the stage's configuration there: {same['protocol_1k']['i2t_r10']:.1f} / "
                        f"{same['protocol_1k']['t2i_r10']:.1f})" if same else "")
                     + "; the paper's two-branch network on ResNet50 features reached 51.3 / 45.1 trained on MS-COCO "
                       "(five captions per image).")
    curve = metrics.get("learning_curve") or []
    if len(curve) >= 2:
        pts = [(r["training_pairs"], (r["protocol_1k"]["i2t_r10"] + r["protocol_1k"]["t2i_r10"]) / 2) for r in curve]
        x, y = np.log2([q[0] for q in pts]), np.array([q[1] for q in pts])
        slope = float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else 0.0
        listing = "; ".join(f"{n:,} pairs{' (with the test pairs)' if r['test_pairs'] else ''}: "
                            f"{r['protocol_1k']['i2t_r10']:.1f} / {r['protocol_1k']['t2i_r10']:.1f}"
                            for (n, _), r in zip(pts, curve))
        parts.append(f"More training pairs help: R@10 (image->caption / caption->image, first fold) with "
                     f"{listing}, about {slope:+.1f} points per doubling of the pairs.")
        if slope > 0:
            full = [q for q, r in zip(pts, curve) if r["fraction"] == 1.0 and not r["test_pairs"]][0]
            need = full[0] * 2 ** ((71.0 - full[1]) / slope)
            parts.append(f"A log-linear extrapolation of these few points (rough) puts an R@10 near 71 at about "
                         f"{_round2(need):,.0f} pairs (MS-COCO's training split has 113,287 images with five "
                         "captions each, about 566,000 pairs).")
    parts.append(f"Image features: {metrics['image_dim']}-d from stage 01 (on machines without internet the "
                 "offline EfficientNet-Lite fallback of image.backbone, not the published VGG19 / ResNet50); "
                 f"word vectors: {metrics['vectors']['name']}. {ONE_CAPTION_NOTE}")
    return " ".join(parts)


#: the options of stages/06_joint_embedding.py beyond the shared ones
arguments = partial(add_page_arguments, example="docs/RESULTS_joint_embedding.md")


def run(settings, demo_mode: bool | str = False, resume: bool = False, args=None) -> dict[str, Any]:
    """What stages/06_joint_embedding.py runs: the stage, its page beside its metrics file
    (``metrics/joint_embedding_results.md``), and with ``--results-doc`` the page there too."""
    metrics = run_with_page("joint_embedding", settings, demo_mode, resume, args)
    write_text(Path(metrics["config"]).parent / "joint_embedding_results.md", results_markdown(metrics))
    return metrics
