"""Stage 06: the image–caption joint embedding (two-branch network, triplet ranking loss) and retrieval.

Each photo's cached CNN features (stage 01) and its caption (the caption stage's cleaning, the same word
vectors) are mapped into one space where a matching pair lies close (:mod:`multilabel_fusion.networks.joint_embedding`).
Per fold, one network is trained on the fold's fit part (minus ``selection_size`` pairs that choose the epoch) and
measured by retrieval on the held-out fold: R@1/5/10, median and mean rank in both directions, on 1,000-pair sets
(the 1K protocol, averaged) and on the whole held-out fold. A strategy × encoder table (first fold) compares the
negative-mining strategies and the two caption encoders.

What the fused network gets (out-of-fold rows; test rows averaged over the fold networks): block
``joint_embedding`` (73 columns: zero-shot label scores of the image and of the caption, i.e. similarity to the
embedded label prompts standardised per label; the labels of the ``knn`` fit-part captions nearest to the image
and of the ``knn`` fit-part images nearest to the caption; the similarity of the image to its own caption) and
block ``joint_embedding_probs`` (18 columns: the two neighbour votes averaged, the stage's submission). Only
derived scores are shared, not the embedding itself: each fold network has its own space, so raw embeddings from
different folds would not line up. The first fold's network embeds every train and test image and caption for
:mod:`multilabel_fusion.retrieve`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import assets, registry
from ..config import Config
from ..data import labels as L
from ..data import text
from ..engine import trainer
from ..engine.atomic import save_torch, write_text
from ..engine.precision import training_precision
from ..evaluation.metrics import mean_f1
from ..evaluation.thresholds import decide, tune_per_class
from ..networks import joint_embedding as J
from ..networks.caption_lstm import cpu_threads
from ..reports.stage_results import cross_fitted, figure, fusion_argument, fusion_rows, fusion_summary
from . import base

VERSION = 1  # bump when training or the block's columns change, so old artifacts are not reused
NOT_SHAPING = ("compare_strategies", "compare_encoders", "learning_curve", "retrieval_top")  # comparisons, display
RESULT_ONLY = ("epochs", "patience", "knn", "prompt")  # shape the artifact, not a network's weights
MODEL_FILE = "retrieval_model.pt"
BLOCK_PARTS = ("image_zero_shot", "caption_zero_shot", "image_to_captions_knn", "caption_to_images_knn")
EXAMPLE_QUERY = "a dog asleep on a couch"

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


def artifact_spec(cfg: Config) -> dict[str, Any]:
    """The joint_embedding settings (registry), the image features' key (inputs), the word vectors' identity, the
    text-cleaning version, the split and the seed."""
    vectors = assets.word_vectors(cfg.caption, cfg.path("models") / "vectors")
    return {"assets": {"vectors": {"name": vectors.name, "identity": vectors.identity}},
            "version": VERSION, "text_version": text.TEXT_VERSION, "common": registry.common_settings(cfg)}


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    """Everything the networks read: image features, token ids, the vocabulary and its vectors, the prompts."""

    image_train: np.ndarray
    image_test: np.ndarray
    ids_train: np.ndarray
    len_train: np.ndarray
    ids_test: np.ndarray
    len_test: np.ndarray
    vocab: text.Vocabulary
    matrix: np.ndarray
    prompt_ids: np.ndarray
    prompt_len: np.ndarray
    prompts: list[str]
    image_key: str
    vectors: assets.Asset
    oov: dict[str, Any]


def image_features(ctx: base.StageContext) -> tuple[np.ndarray, np.ndarray]:
    """The image stage's features of the current settings (``pooled`` or every stage's pooled output), rows checked."""
    block = ctx.require("image")
    for part in ("train", "test"):
        if not np.array_equal(block[f"{part}_ids"], getattr(ctx.data, part)["ImageID"].to_numpy(str)):
            raise ValueError(f"{block.dir}: its {part} ImageIDs differ from {ctx.data.root}; re-run stage 01")
    if ctx.cfg.joint_embedding.image_features == "depths":
        if "train_depths" not in block:
            raise ValueError("config: joint_embedding.image_features=depths needs image.depth_features=true")
        return np.asarray(block["train_depths"], np.float32), np.asarray(block["test_depths"], np.float32)
    return np.asarray(block["train"], np.float32), np.asarray(block["test"], np.float32)


def load_inputs(ctx: base.StageContext) -> Inputs:
    from .caption_network import cleaned_tokens

    je = ctx.cfg.joint_embedding
    image_train, image_test = image_features(ctx)
    train_tokens, test_tokens = cleaned_tokens(ctx)
    prompts = [je.prompt.format(name) for name in L.names()]
    prompt_tokens = text.clean_captions(prompts, desc=None)
    asset = assets.word_vectors(ctx.cfg.caption, ctx.models_dir / "vectors")
    vectors = assets.load_vectors(asset)
    vocab, matrix = text.build_vocabulary(train_tokens + test_tokens + prompt_tokens, vectors)
    del vectors
    ids_train, len_train = vocab.encode(train_tokens, je.seq_len)
    ids_test, len_test = vocab.encode(test_tokens, je.seq_len)
    prompt_ids, prompt_len = vocab.encode(prompt_tokens, je.seq_len)
    return Inputs(image_train, image_test, ids_train, len_train, ids_test, len_test, vocab, matrix, prompt_ids,
                  prompt_len, prompts, ctx.key("image"), asset, text.oov_report(train_tokens, vocab))


# ------------------------------------------------------------------------------------------------ training


def model_kwargs(je: Config, encoder: str) -> dict[str, Any]:
    return {"encoder": encoder, "embed_dim": je.embed_dim, "hidden": je.hidden, "layers": je.layers,
            "dropout": je.dropout, "rnn_hidden": je.rnn_hidden, "train_embeddings": je.train_embeddings}


def split_selection(ctx: base.StageContext, fold: int, fit_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, selection rows) of a fold's fit part: the selection pairs choose the epoch, never trained on."""
    n_sel = min(ctx.cfg.joint_embedding.selection_size, max(len(fit_idx) // 5, 2))
    rng = np.random.default_rng(ctx.cfg.split.seed + 1000 + fold)
    sel = np.sort(rng.choice(fit_idx, n_sel, replace=False))
    return np.setdiff1d(fit_idx, sel), sel


@dataclass
class Run:
    model: J.JointEmbedding
    result: trainer.FitResult
    run_dir: Path
    encoder: str
    strategy: str
    n_train: int
    n_selection: int

    @property
    def training_seconds(self) -> float:
        """Seconds the run's epochs took when trained (also for a reused run)."""
        return round(float(self.result.history["seconds"].sum()), 1) if len(self.result.history) else 0.0


def train_run(ctx: base.StageContext, inp: Inputs, fold: int, fit_idx: np.ndarray, *, encoder: str, strategy: str,
              resume: bool, fraction: float = 1.0, test_pairs: bool | None = None) -> Run:
    """Train (or reuse, or resume) one joint embedding on a fold's fit part with the shared trainer; the epoch is
    chosen by the R-sum of the fold's selection pairs. ``fraction`` < 1: a random share of the training pairs
    (the learning curve); ``test_pairs`` overrides ``train_on_test_pairs``."""
    je, cfg = ctx.cfg.joint_embedding, ctx.cfg
    train_rows, sel_rows = split_selection(ctx, fold, fit_idx)
    shaping = {k: v for k, v in je.to_dict().items() if k not in NOT_SHAPING + RESULT_ONLY}
    shaping.update(encoder=encoder, strategy=strategy)
    unread = (("margin", "reverse_weight") if strategy == "infonce" else ("temperature",)) + \
        (("rnn_hidden", "train_embeddings") if encoder == "mean" else ())
    for key in unread:  # settings this run does not read do not key it
        shaping.pop(key, None)
    feats, ids, lengths = inp.image_train[train_rows], inp.ids_train[train_rows], inp.len_train[train_rows]
    labels = ctx.targets[train_rows]
    test_pairs = je.train_on_test_pairs if test_pairs is None else test_pairs
    shaping["train_on_test_pairs"] = test_pairs
    if test_pairs:  # the test records' photo-caption pairs too: no labels, never evaluated
        feats, ids = np.concatenate([feats, inp.image_test]), np.concatenate([ids, inp.ids_test])
        lengths = np.concatenate([lengths, inp.len_test])
        labels = np.concatenate([labels, np.zeros((len(inp.image_test), labels.shape[1]), labels.dtype)])
    if fraction < 1:
        keep = np.sort(np.random.default_rng(ctx.cfg.split.seed + 2000 + fold).permutation(len(feats))
                       [: max(int(round(fraction * len(feats))), je.batch_size)])
        feats, ids, lengths, labels = feats[keep], ids[keep], lengths[keep], labels[keep]
        shaping["fraction"] = fraction
    settings = {"image": inp.image_key, "vectors": inp.vectors.identity, "text_version": text.TEXT_VERSION,
                "version": VERSION, "joint_embedding": shaping, "fold": [fold, len(ctx.folds)]}
    run_dir = ctx.run_dir("joint_embedding", settings)
    torch.manual_seed(cfg.trainer.seed + fold)
    model = J.JointEmbedding(inp.image_train.shape[1], inp.matrix, **model_kwargs(je, encoder))
    model.fit_standardisation(feats)
    batches = J.PairBatches(feats, ids, lengths, labels, je.batch_size, shuffle=True, seed=cfg.trainer.seed + fold,
                            drop_last=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=je.lr)
    scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=je.lr_decay_epoch, gamma=0.1)
                 if je.lr_decay_epoch else None)
    sel_img, sel_ids, sel_len = inp.image_train[sel_rows], inp.ids_train[sel_rows], inp.len_train[sel_rows]

    def score(m: J.JointEmbedding) -> dict[str, float]:
        img, txt = J.embed(m, sel_img, sel_ids, sel_len)
        report = J.recall_report(img @ txt.T)
        return {"score": report["rsum"], **report}

    result = trainer.fit(
        model, batches, None, None,
        loss_fn=J.TripletRankingLoss(strategy, je.margin, je.reverse_weight, je.temperature),
        optimizer=optimizer, scheduler=scheduler, run_dir=run_dir, epochs=je.epochs, patience=je.patience,
        device=ctx.device, precision=training_precision(ctx.device, cfg.trainer.mixed_precision), resume=resume,
        settings={**settings, "n_train": len(feats), "n_selection": len(sel_rows)},
        name=f"joint embedding {encoder}/{strategy} fold {fold + 1}", score_fn=score,
        score_name="selection R-sum")
    model.eval()
    return Run(model, result, run_dir, encoder, strategy, len(feats), len(sel_rows))


# ------------------------------------------------------------------------------------------------ measuring


def retrieval(img: np.ndarray, txt: np.ndarray, seed: int) -> dict[str, Any]:
    """1K protocol (disjoint 1,000-pair sets, averaged) and the whole set of pairs."""
    return {"protocol_1k": J.protocol_1k(img, txt, 1000, seed), "whole": {**J.recall_report(img @ txt.T),
                                                                          "pairs": int(len(img))}}


def knn_vote(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Per-label share of the ``k`` gallery rows most similar to each query (dot product), in chunks of queries."""
    k = min(k, len(gallery))
    out = np.empty((len(queries), labels.shape[1]), dtype=np.float32)
    for s in range(0, len(queries), chunk):
        sims = queries[s: s + chunk] @ gallery.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[s: s + chunk] = labels[top].mean(1)
    return out


@dataclass
class Scorer:
    """One fold network's label scores: against the fit part's embeddings (neighbours) and the label prompts."""

    fit_img: np.ndarray
    fit_txt: np.ndarray
    fit_labels: np.ndarray
    prompts: np.ndarray  # [18, D]
    k: int

    def __post_init__(self):
        zi, zt = self.fit_img @ self.prompts.T, self.fit_txt @ self.prompts.T  # standardised on the fit part: no labels
        self.img_stats = (zi.mean(0), zi.std(0) + 1e-6)
        self.txt_stats = (zt.mean(0), zt.std(0) + 1e-6)

    def __call__(self, img: np.ndarray, txt: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "image_zero_shot": (img @ self.prompts.T - self.img_stats[0]) / self.img_stats[1],
            "caption_zero_shot": (txt @ self.prompts.T - self.txt_stats[0]) / self.txt_stats[1],
            "image_to_captions_knn": knn_vote(img, self.fit_txt, self.fit_labels, self.k),
            "caption_to_images_knn": knn_vote(txt, self.fit_img, self.fit_labels, self.k),
            "agreement": (img * txt).sum(1, keepdims=True),
        }


def block_of(scores: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([scores[p] for p in BLOCK_PARTS] + [scores["agreement"]], 1).astype(np.float32)


def probabilities(scores: dict[str, np.ndarray]) -> np.ndarray:
    """The stage's per-label probabilities: the two neighbour votes, averaged."""
    return (scores["image_to_captions_knn"] + scores["caption_to_images_knn"]) / 2


def label_score_table(held: dict[str, np.ndarray], y: np.ndarray, ctx: base.StageContext) -> list[dict[str, Any]]:
    """Held-out mean-F1 of each label score alone (per-class thresholds tuned on the same rows, as every stage
    reports), and the label-free top-1 hit rate (is the best-scoring label one of the image's labels)."""
    rule, rounds = ctx.cfg.thresholds.at_least_one, ctx.cfg.thresholds.rounds
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731  standardised zero-shot scores -> (0, 1)
    candidates = {"image zero-shot (label prompts)": sigmoid(held["image_zero_shot"]),
                  "caption zero-shot (label prompts)": sigmoid(held["caption_zero_shot"]),
                  f"image -> {ctx.cfg.joint_embedding.knn} nearest captions' labels": held["image_to_captions_knn"],
                  f"caption -> {ctx.cfg.joint_embedding.knn} nearest images' labels": held["caption_to_images_knn"],
                  "both neighbour votes (the stage's submission)": probabilities(held)}
    rows = []
    for name, scores in candidates.items():
        _, tuned = tune_per_class(scores, y, rounds=rounds, at_least_one=rule)
        top = scores.argmax(1)
        rows.append({"score": name, "mean_f1_tuned": round(tuned, 4),
                     "mean_f1_at_0.5": round(mean_f1(y, decide(scores, 0.5, at_least_one=rule)), 4),
                     "top1_hit_rate": round(float(y[np.arange(len(y)), top].mean()), 4)})
    return rows


def mean_reports(reports: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each figure over folds (set counts and sizes are not figures: summed elsewhere)."""
    keys = [k for k in reports[0] if isinstance(reports[0][k], (int, float)) and k not in ("sets", "set_size")]
    return {k: round(float(np.mean([r[k] for r in reports])), 2) for k in keys}


# ------------------------------------------------------------------------------------------------ the stage


def compute(ctx: base.StageContext, inp: Inputs, resume: bool) -> Any:
    """One network per fold (the configured encoder and strategy): out-of-fold block and probabilities, test ones
    averaged over the folds, retrieval figures per fold, and the first fold's network for retrieval."""
    je, cfg = ctx.cfg.joint_embedding, ctx.cfg
    n_train = len(ctx.data.train)
    targets = ctx.targets.astype(np.float32)
    per_fold, histories, held_scores = [], [], {}
    test_block = test_probs = 0.0
    held_block = np.full((n_train, len(BLOCK_PARTS) * L.NUM_CLASSES + 1), np.nan, np.float32)
    held_probs = np.full((n_train, L.NUM_CLASSES), np.nan, np.float32)
    first: Run | None = None
    for k, (fit_idx, held_idx) in enumerate(ctx.folds):
        if len(ctx.folds) > 1:
            print(f"[joint_embedding] fold {k + 1}/{len(ctx.folds)}: {len(fit_idx)} fit, {len(held_idx)} held out")
        run = train_run(ctx, inp, k, fit_idx, encoder=je.encoder, strategy=je.strategy, resume=resume)
        first = first or run
        m = run.model
        fit_img, fit_txt = J.embed(m, inp.image_train[fit_idx], inp.ids_train[fit_idx], inp.len_train[fit_idx])
        prompts = J.embed(m, ids=inp.prompt_ids, lengths=inp.prompt_len)[1]
        scorer = Scorer(fit_img, fit_txt, targets[fit_idx], prompts, je.knn)
        h_img, h_txt = J.embed(m, inp.image_train[held_idx], inp.ids_train[held_idx], inp.len_train[held_idx])
        t_img, t_txt = J.embed(m, inp.image_test, inp.ids_test, inp.len_test)
        h_scores, t_scores = scorer(h_img, h_txt), scorer(t_img, t_txt)
        for name, values in h_scores.items():
            held_scores.setdefault(name, np.full((n_train, values.shape[1]), np.nan, np.float32))[held_idx] = values
        held_block[held_idx], held_probs[held_idx] = block_of(h_scores), probabilities(h_scores)
        test_block = test_block + block_of(t_scores) / len(ctx.folds)
        test_probs = test_probs + probabilities(t_scores) / len(ctx.folds)
        per_fold.append({"fold": k, "n_fit": len(fit_idx), "n_held": len(held_idx),
                         **retrieval(h_img, h_txt, cfg.split.seed), "best_epoch": run.result.best_epoch,
                         "epochs_run": int(len(run.result.history)), "training_seconds": run.training_seconds,
                         "n_train": run.n_train, "n_selection": run.n_selection,
                         "reused": run.result.reused, "run_dir": str(run.run_dir)})
        histories.append(run.result.history.assign(fold=k))
    eval_idx = ctx.eval_idx
    table = label_score_table({k: v[eval_idx] for k, v in held_scores.items()}, targets[eval_idx], ctx)
    # the first fold's network: every image and caption embedded once, for retrieval
    m = first.model
    g_train = J.embed(m, inp.image_train, inp.ids_train, inp.len_train)
    g_test = J.embed(m, inp.image_test, inp.ids_test, inp.len_test)
    arrays = {"train": held_block, "test": np.asarray(test_block, np.float32), "probs": held_probs,
              "test_probs": np.asarray(test_probs, np.float32),
              "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str),
              "gallery_train_images": g_train[0].astype(np.float16),
              "gallery_train_captions": g_train[1].astype(np.float16),
              "gallery_test_images": g_test[0].astype(np.float16),
              "gallery_test_captions": g_test[1].astype(np.float16),
              "vocab": np.array(inp.vocab.tokens)}
    history = pd.concat(histories, ignore_index=True)
    info = {
        "block": {"dim": int(held_block.shape[1]), "columns": [f"{p}:{n}" for p in BLOCK_PARTS for n in L.names()]
                  + ["agreement"], "out_of_fold": len(ctx.folds) > 1, "test": "mean over the fold networks"},
        "retrieval": {"protocol_1k": mean_reports([f["protocol_1k"] for f in per_fold]),
                      "whole_held_out": mean_reports([f["whole"] for f in per_fold]),
                      "sets_1k": int(sum(f["protocol_1k"]["sets"] for f in per_fold)), "per_fold": per_fold},
        "label_scores": table, "encoder": je.encoder, "strategy": je.strategy,
        "vectors": inp.vectors.record(), "oov": inp.oov, "image_key": inp.image_key,
        "image_dim": int(inp.image_train.shape[1]), "retrieval_model": {"fold": 0, "run_dir": str(first.run_dir)},
        "training_seconds": round(sum(f["training_seconds"] for f in per_fold), 1),
        "history": base._records(history),
    }
    key = ctx.key()
    with ctx.store.writer("joint_embedding", key, ctx.spec()) as w:
        for name, values in arrays.items():
            w.put(name, values)
        save_torch({"state": m.state_dict(), "image_dim": int(inp.image_train.shape[1]),
                    "vocab_rows": int(inp.matrix.shape[0]), "vector_dim": int(inp.matrix.shape[1]),
                    "kwargs": model_kwargs(je, je.encoder), "seq_len": je.seq_len,
                    "image_features": je.image_features}, w.folder / MODEL_FILE)
        w.info.update(info)
    return ctx.store.load("joint_embedding", key, mmap=True)


def _measured(ctx: base.StageContext, inp: Inputs, run: Run, held_idx: np.ndarray) -> dict[str, Any]:
    img, txt = J.embed(run.model, inp.image_train[held_idx], inp.ids_train[held_idx], inp.len_train[held_idx])
    return {"encoder": run.encoder, "strategy": run.strategy, "label": J.strategy_label(run.strategy),
            **retrieval(img, txt, ctx.cfg.split.seed), "training_pairs": run.n_train,
            "best_epoch": run.result.best_epoch, "epochs_run": int(len(run.result.history)),
            "training_seconds": run.training_seconds,
            "seconds_per_epoch": round(run.training_seconds / max(len(run.result.history), 1), 2),
            "reused": run.result.reused}


def compare(ctx: base.StageContext, inp: Inputs, resume: bool) -> tuple[list[dict[str, Any]], dict[str, pd.DataFrame]]:
    """The strategy × encoder table on the first fold: each pair trained (or reused) and measured on the held-out
    fold exactly as the stage's own network."""
    je = ctx.cfg.joint_embedding
    fit_idx, held_idx = ctx.folds[0]
    rows, histories = [], {}
    for encoder in je.compare_encoders:
        for strategy in je.compare_strategies:
            run = train_run(ctx, inp, 0, fit_idx, encoder=encoder, strategy=strategy, resume=resume)
            rows.append(_measured(ctx, inp, run, held_idx))
            histories[f"{encoder}/{strategy}"] = run.result.history
    return rows, histories


def learning_curve(ctx: base.StageContext, inp: Inputs, resume: bool) -> list[dict[str, Any]]:
    """The stage's configuration on the first fold trained on a share of its training pairs (``learning_curve``),
    on all of them, and on all of them plus the test records' pairs (unlabelled, never evaluated): how recall grows
    with the number of pairs."""
    je = ctx.cfg.joint_embedding
    fit_idx, held_idx = ctx.folds[0]
    rows = []
    points = [(f, False) for f in sorted(set(je.learning_curve))] + [(1.0, False), (1.0, True)]
    for fraction, test_pairs in points:
        run = train_run(ctx, inp, 0, fit_idx, encoder=je.encoder, strategy=je.strategy, resume=resume,
                        fraction=fraction, test_pairs=test_pairs)
        rows.append({"fraction": fraction, "test_pairs": test_pairs, **_measured(ctx, inp, run, held_idx)})
    return rows


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
                 "EfficientNet-Lite0 offline fallback, not the published VGG19 / ResNet50); word vectors: "
                 f"{metrics['vectors']['name']}. {ONE_CAPTION_NOTE}")
    return " ".join(parts)


def recall_figure(history: pd.DataFrame, compared: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    """Selection-pair recall per epoch: the stage's network (first fold), and R@10 of every compared run."""
    import matplotlib.pyplot as plt

    from ..reports.figures import _save

    fig, axes = plt.subplots(1, 3 if compared else 1, figsize=(16 if compared else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for direction, style in (("i2t", "-"), ("t2i", "--")):
        for k, colour in zip((1, 5, 10), ("tab:blue", "tab:orange", "tab:green")):
            ax.plot(history["epoch"], history[f"{direction}_r{k}"], style, color=colour, label=f"{direction} R@{k}")
    ax.set(xlabel="epoch", ylabel="recall (%)", title=f"{title}\n(selection pairs, first fold)", ylim=(0, 100))
    ax.legend(fontsize=7, ncol=2)
    if compared:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        strategies = list(dict.fromkeys(name.split("/")[1] for name in compared))
        for i, direction in enumerate(("i2t", "t2i")):
            ax = axes[0, i + 1]
            for name, h in compared.items():
                encoder, strategy = name.split("/")
                ax.plot(h["epoch"], h[f"{direction}_r10"], "-" if encoder == "gru" else ":",
                        color=colours[strategies.index(strategy) % len(colours)], label=name)
            ax.set(xlabel="epoch", ylabel="R@10 (%)", ylim=(0, 100),
                   title=f"{'image -> caption' if direction == 'i2t' else 'caption -> image'} R@10 per epoch\n"
                         "(encoder/strategy; dotted: mean vectors, solid: GRU)")
            ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def comparison_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """1K-protocol R@10 of every compared run (strategy x encoder, first fold) in both directions, with the
    target lines (the paper's best MS-COCO figures)."""
    import matplotlib.pyplot as plt

    from ..reports.figures import _save

    names = [f"{r['encoder']} / {r['strategy']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.62 * len(rows) + 2), 4))
    for shift, direction, colour, target, what in ((-0.2, "i2t", "tab:blue", 72.5, "image -> caption"),
                                                   (0.2, "t2i", "tab:orange", 69.2, "caption -> image")):
        values = [r["protocol_1k"][f"{direction}_r10"] for r in rows]
        ax.bar(x + shift, values, 0.4, color=colour, label=f"{what} R@10")
        ax.axhline(target, color=colour, ls="--", lw=1, label=f"target {what} ({target})")
        for xi, v in zip(x + shift, values):
            ax.text(xi, v + 0.8, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="R@10 (%), 1K protocol", ylim=(0, 100),
           title="Mining strategies x caption encoders (first fold, held-out 1K sets; one caption per image)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return _save(fig, path)


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    """Train (or reuse) the joint embedding per fold, compare strategies × encoders, write the block, the
    retrieval figures, the submission and the metrics."""
    from .. import retrieve

    ctx = base.prepare(cfg, "joint_embedding", demo_mode)
    je = cfg.joint_embedding
    t0 = time.time()
    found = ctx.store.load("joint_embedding", ctx.key(), mmap=True)
    inp = None
    with cpu_threads(ctx.device):  # one thread: measured 4-10x faster per batch than two on a busy 2-core CPU
        if found is None:
            inp = load_inputs(ctx)
            found = compute(ctx, inp, resume)
            state = "computed"
        else:
            print(f"[joint_embedding] reusing {found.dir}")
            state = "reused"
        comparison, compared, curve = [], {}, []
        if je.compare_strategies and je.compare_encoders:
            inp = inp or load_inputs(ctx)
            comparison, compared = compare(ctx, inp, resume)
        if je.learning_curve:
            inp = inp or load_inputs(ctx)
            curve = learning_curve(ctx, inp, resume)
    info = dict(found.info)
    history = pd.DataFrame(info.pop("history", []))
    history = history[history["fold"] == 0] if len(history) else history
    figures_dir = ctx.output_dir / "figures"
    figures = {"recall_per_epoch": recall_figure(history, compared, figures_dir / "joint_embedding_recall.png",
                                                 f"joint embedding ({je.encoder}, {je.strategy})")}
    if comparison:
        figures["comparison"] = comparison_figure(comparison, figures_dir / "joint_embedding_comparison.png")
    finder = retrieve.Retriever(ctx, found)
    _, figures["retrieval_text_query"] = finder.by_text(EXAMPLE_QUERY,
                                                        out=figures_dir / "joint_embedding_text_query.png")
    held = ctx.val_idx[0]
    _, figures["retrieval_image_query"] = finder.by_image(
        ctx.data.image_paths("train")[held], features=np.asarray(image_features(ctx)[0][held]),
        out=figures_dir / "joint_embedding_image_query.png")
    extra = {**info, "artifact": str(found.dir), "embedding": state, "comparison": comparison, "learning_curve": curve,
             "published": PUBLISHED, "one_caption_note": ONE_CAPTION_NOTE, "settings": je.to_dict(),
             "stage_seconds": round(time.time() - t0, 1),
             "history": base._records(history.drop(columns=["val_mean_f1", "val_loss"], errors="ignore"))}
    extra["closing_note"] = closing_note({**extra, "retrieval": info["retrieval"]})
    metrics = base.finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], np.asarray(found["test_probs"]),
                          extra=extra, extra_figures=figures)
    r = metrics["retrieval"]["protocol_1k"]
    print(f"[joint_embedding] 1K protocol ({metrics['retrieval']['sets_1k']} sets): image->caption R@1/5/10 "
          f"{r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f}, caption->image "
          f"{r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f}")
    write_text(ctx.output_dir / "metrics" / "joint_embedding_results.md", results_markdown(metrics))
    return metrics


# ------------------------------------------------------------------------------------------------ the report


def _recalls(r: dict[str, Any] | None, direction: str) -> str:
    return " / ".join(f"{r[f'{direction}_r{k}']:.1f}" for k in (1, 5, 10)) if r else "–"


#: the figures the results page shows (names in ``metrics["figures"]``)
RESULT_FIGURES = ("recall_per_epoch", "comparison", "retrieval_text_query", "retrieval_image_query")


def results_markdown(metrics: dict[str, Any], fusion_runs: list[dict[str, Any]] | None = None,
                     figures: dict[str, str] | None = None, source: str | None = None) -> str:
    """The stage's results page, written from its metrics file and stage-03 runs with and without its blocks (as
    :func:`..reports.stage_results.fusion_summary` gives them). ``figures``: figure name -> link (relative to the
    page); ``source``: the sentence saying how the page is regenerated."""
    ret = metrics["retrieval"]
    p1k, whole = ret["protocol_1k"], ret["whole_held_out"]
    source = source or ("Regenerate with `python3 stages/06_joint_embedding.py --data ... --results-doc "
                        "docs/RESULTS_joint_embedding.md`.")
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
    for row in metrics["published"]:
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
                  f"Stage 03, same settings otherwise; out-of-fold figures. `joint_embedding`: the "
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
    if metrics.get("closing_note"):
        lines += ["## What limits it", "", metrics["closing_note"], ""]
    return "\n".join(lines)


def extra_args(parser) -> None:
    """Options of ``stages/06_joint_embedding.py`` beyond the shared ones."""
    parser.add_argument("--results-doc", type=Path, help="also write the results document here "
                        "(docs/RESULTS_joint_embedding.md)")
    parser.add_argument("--fusion-metrics", nargs="*", default=[], metavar="FUSION_JSON[=LABEL]",
                        help="fusion.json files (e.g. with and without the joint_embedding block) for that document")


def run_cli(cfg: Config, demo_mode: bool | str, resume: bool, args) -> dict[str, Any]:
    """The stage, then (``--results-doc``) the results document from its metrics."""
    import json

    from ..__main__ import run_stage as with_inputs

    metrics = with_inputs("joint_embedding", cfg, demo_mode=demo_mode, resume=resume)  # stage 01 first where missing
    if args.results_doc:
        fusion_runs = [fusion_summary(json.loads(path.read_text()), label)
                       for path, label in map(fusion_argument, args.fusion_metrics)]
        doc = Path(args.results_doc)
        links = {name: os.path.relpath(path, doc.resolve().parent) for name, path in metrics["figures"].items()}
        write_text(doc, results_markdown(metrics, fusion_runs, links))
        print(f"[joint_embedding] wrote {args.results_doc}")
    return metrics
