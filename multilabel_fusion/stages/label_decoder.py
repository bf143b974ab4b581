"""Stage 05: recurrent label decoders — the label set predicted one label at a time, on cached features.

The published CNN-RNN ideas (image–label joint embedding, CNN as initialisation, CNN sequence to sequence, with
and without attention; :mod:`multilabel_fusion.networks.label_decoder`) trained on the image stage's cached
features — pooled, and pooled at several depths of the backbone from the same forward pass — never on the
images again. Two additions: order-free training (``+pla`` / ``+mla``) and the caption features beside the
image (``+caption``).

* ``label_decoder.variant`` is trained per fold (``split.folds``): its per-label scores (each label's highest
  probability over the best beam's steps) are out of fold for every training record, averaged over the fold
  networks for the test records, and kept as the artifact — the fused network's block ``label_decoder`` — and
  thresholded into ``output/submission_label_decoder.csv``.
* ``label_decoder.compare`` (the paper's table): every decoder trained on the first fold, beside BCE heads on
  the same features and the same split, with the published MS-COCO figures; precision, recall and F1 of each
  sample's decoded label set (no threshold), averaged over the samples. In ``metrics/label_decoder.json``
  (``table``) and, with ``--results-doc``, a markdown page.

Every network is trained by the one trainer (run folders keyed by the settings, exact resume); the decoder's
sequence loss comes in through its ``batch_loss`` hook, model selection (mean-F1 of the decoded sets) through
``score_fn``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import assets, registry
from ..config import Config
from ..data import labels as L
from ..engine import trainer
from ..engine.atomic import write_text
from ..engine.precision import training_precision
from ..evaluation.metrics import sample_f1
from ..evaluation.thresholds import decide, tune_per_class
from ..networks.caption_lstm import cpu_threads
from ..reports.stage_results import cross_fitted, figure, fusion_argument, fusion_rows, fusion_summary
from ..networks.heads import HeadSettings, train_on_features
from ..networks.label_decoder import (PAD, FeatureBatches, LabelDecoder, Variant, batch_loss, decode,
                                      frequency_rank, label_embedding_init, mean_loss, sample_prf)
from . import base

VERSION = 1  # bump when the decoders' code changes what a trained run means
HOW_LONG = ("epochs", "patience")
#: settings that shape a decoder's weights (besides the variant, its inputs and the fold)
WEIGHT_KEYS = ("embed", "hidden", "proj_dropout", "lstm_dropout", "lr", "batch_size", "weight_decay", "grad_clip")

#: The paper's table (MS-COCO, VGG16 features, LSTM 512, label embeddings 100): P / R / F1 averaged over samples.
PUBLISHED = [
    {"model": "BCE", "precision": 61.7, "recall": 65.0, "f1": 63.3},
    {"model": "joint embedding", "precision": 66.6, "recall": 65.3, "f1": 65.9},
    {"model": "joint embedding + attention", "precision": 69.5, "recall": 64.7, "f1": 67.0},
    {"model": "CNN as initialisation", "precision": 71.5, "recall": 67.4, "f1": 69.4},
    {"model": "seq2seq + attention", "precision": 70.9, "recall": 68.0, "f1": 69.4},
    {"model": "seq2seq", "precision": 71.1, "recall": 68.0, "f1": 69.5},
]


def artifact_spec(cfg: Config) -> dict[str, Any]:
    """The decoder's settings (registry), the word vectors' identity when its label embeddings start from them,
    the split and the trainer's seed."""
    spec: dict[str, Any] = {"version": VERSION, "common": registry.common_settings(cfg)}
    if Variant.parse(cfg.label_decoder.variant).embeddings == "word_vectors":
        vectors = assets.word_vectors(cfg.caption, cfg.path("models") / "vectors")
        spec["assets"] = {"vectors": {"name": vectors.name, "identity": vectors.identity}}
    return spec


# ----------------------------------------------------------------------------------------------- features


@dataclass
class Features:
    """The cached blocks the decoders read (float32), and how the encoder's depths were had."""

    image: tuple[np.ndarray, np.ndarray]
    depths: tuple[np.ndarray, np.ndarray]
    depth_dims: list[int]
    caption: tuple[np.ndarray, np.ndarray] | None
    keys: dict[str, str]
    notes: list[str] = field(default_factory=list)
    caption_block: str = "caption_probs"

    @property
    def caption_name(self) -> str:
        return f"image + {self.caption_block}"


def _checked(ctx: base.StageContext, name: str):
    art = ctx.require(name)
    for part in ("train", "test"):
        if f"{part}_ids" in art and not np.array_equal(art[f"{part}_ids"], getattr(ctx.data, part)["ImageID"].to_numpy(str)):
            raise ValueError(f"{art.dir}: its {part} ImageIDs differ from {ctx.data.root}; re-run {registry.get(name).script}")
    return art


def load_features(ctx: base.StageContext, caption: bool) -> Features:
    """Pooled image features, the multi-depth features of the same forward pass (``train_depths``, widths in
    ``info['depth_dims']``) and, when asked, the caption block ``label_decoder.caption_block`` (out of fold).
    Without multi-depth features the encoder reads one depth, the pooled features, and the metrics say so."""
    image = _checked(ctx, "image")
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    pooled = (f32(image["train"]), f32(image["test"]))
    keys, notes = {"image": image.key}, []
    dims = image.info.get("depth_dims") or []
    if "train_depths" in image and dims:
        depths = (f32(image["train_depths"]), f32(image["test_depths"]))
    else:
        depths, dims = pooled, [pooled[0].shape[1]]
        notes.append("the image artifact has no multi-depth features (image.depth_features off): the seq2seq "
                     "encoder and the attention read one depth, the pooled features")
    cap, block = None, ctx.cfg.label_decoder.caption_block
    if caption:
        train, test, keys[block] = base.block_arrays(ctx, block)
        cap = (f32(train), f32(test))
    return Features(pooled, depths, [int(d) for d in dims], cap, keys, notes, block)


def variant_inputs(feats: Features, v: Variant):
    """(rep train, rep test, depths train, depths test, depth widths) of one decoder.

    ``rep`` is the image representation I (pooled features; ``+caption``: pooled image and caption features side
    by side); the depths are the encoder's sequence (``+caption``: the caption features are its last element),
    zero-width for a decoder that reads none.
    """
    rep = list(feats.image)
    dep, dims = list(feats.depths), list(feats.depth_dims)
    if v.caption:
        rep = [np.concatenate([r, c], 1) for r, c in zip(rep, feats.caption)]
        dep = [np.concatenate([d, c], 1) for d, c in zip(dep, feats.caption)]
        dims.append(feats.caption[0].shape[1])
    if not v.uses_depths:
        dep, dims = [np.zeros((len(r), 0), dtype=np.float32) for r in rep], []
    return rep[0], rep[1], dep[0], dep[1], dims


# ----------------------------------------------------------------------------------------------- training


class Decoders:
    """Trains (or reuses) decoders on the stage's folds; holds the features and word vectors once."""

    def __init__(self, ctx: base.StageContext, feats: Features, resume: bool):
        self.ctx, self.feats, self.resume = ctx, feats, resume
        self.ld = ctx.cfg.label_decoder
        self.precision = training_precision(ctx.device, ctx.cfg.trainer.mixed_precision)
        self._vectors = None
        self.vectors_record: dict[str, Any] | None = None

    def vectors(self):
        if self._vectors is None:
            asset = assets.word_vectors(self.ctx.cfg.caption, self.ctx.models_dir / "vectors")
            self._vectors = (asset, assets.load_vectors(asset))
            self.vectors_record = asset.record()
        return self._vectors

    def train(self, variant: str, k: int, fit_idx: np.ndarray, held_idx: np.ndarray,
              tag: dict[str, Any] | None = None) -> dict[str, Any]:
        """One decoder on one fold (``tag``: what else tells this run apart, e.g. a subset of the fit part): the
        model, its FitResult, the inputs it reads and what it is."""
        ctx, ld = self.ctx, self.ld
        v = Variant.parse(variant)
        rep_tr, rep_te, dep_tr, dep_te, dims = variant_inputs(self.feats, v)
        y = ctx.targets
        fit_idx, select_idx = ctx.selection(k, fit_idx, held_idx)  # trained on / choosing the epoch
        inputs = {"image": self.feats.keys["image"]}
        if v.caption:
            inputs["caption"] = self.feats.keys[self.feats.caption_block]
        shaping: dict[str, Any] = {"variant": v.name, **{key: ld[key] for key in WEIGHT_KEYS}, "inputs": inputs,
                                   "depth_dims": dims, "version": VERSION, "fold": [k, len(ctx.folds)], **(tag or {})}
        embedding, embedding_info = None, {"init": "xavier"}
        if v.embeddings == "word_vectors":
            asset, vectors = self.vectors()
            shaping["vectors"] = asset.identity
            embedding, embedding_info = label_embedding_init(vectors, ld.embed, ctx.cfg.trainer.seed + k)
            embedding_info = {"init": f"word vectors {asset.name}", **embedding_info}
        run_dir = ctx.run_dir("label_decoder", shaping)
        seed = ctx.cfg.trainer.seed + k
        torch.manual_seed(seed)
        model = LabelDecoder(v, rep_tr.shape[1], dims, embed=ld.embed, hidden=ld.hidden, proj_dropout=ld.proj_dropout,
                             lstm_dropout=ld.lstm_dropout, rank=frequency_rank(y[fit_idx]), embedding_init=embedding)
        model.fit_standardisation(rep_tr[fit_idx], dep_tr[fit_idx])
        train_batches = FeatureBatches(rep_tr[fit_idx], dep_tr[fit_idx], y[fit_idx], ld.batch_size, shuffle=True,
                                       seed=seed)
        select_batches = FeatureBatches(rep_tr[select_idx], dep_tr[select_idx], y[select_idx], 1024)
        device = ctx.device

        def score(m: LabelDecoder) -> dict[str, float]:
            """Mean-F1 of the decoded label sets of the selection rows (what the paper selects on)."""
            got = decode(m, rep_tr[select_idx], dep_tr[select_idx], ld.beam, max_labels=ld.max_labels, device=device)
            prf = sample_prf(y[select_idx], got["sets"])
            return {"score": prf["f1"], "val_loss": mean_loss(m, select_batches, device),
                    "val_precision": prf["precision"], "val_recall": prf["recall"]}

        optimizer = torch.optim.Adam(model.parameters(), lr=ld.lr, weight_decay=ld.weight_decay)
        result = trainer.fit(
            model, train_batches, select_batches, y[select_idx],
            loss_fn=nn.CrossEntropyLoss(ignore_index=PAD),  # documentation only: the loss is LabelDecoder.loss
            batch_loss=batch_loss, score_fn=score, optimizer=optimizer, run_dir=run_dir, epochs=ld.epochs,
            patience=ld.patience, grad_clip=ld.grad_clip, device=device, precision=self.precision,
            resume=self.resume, settings={**shaping, "embedding": embedding_info},
            name=f"decoder {v.name} fold {k + 1}")
        history = result.history
        return {"model": model, "result": result, "variant": v, "run_dir": run_dir, "embedding": embedding_info,
                "rep": (rep_tr, rep_te), "depths": (dep_tr, dep_te), "depth_dims": dims,
                "train_seconds": round(float(history["seconds"].sum()), 1) if len(history) else 0.0,
                "parameters": sum(p.numel() for p in model.parameters())}

    def decode(self, trained: dict[str, Any], rows: np.ndarray | None, part: str = "train") -> dict[str, np.ndarray]:
        rep, dep = trained["rep"][part == "test"], trained["depths"][part == "test"]
        if rows is not None:
            rep, dep = rep[rows], dep[rows]
        return decode(trained["model"], rep, dep, self.ld.beam, max_labels=self.ld.max_labels, device=self.ctx.device)


def cross_fit_decoder(ctx: base.StageContext, decoders: Decoders):
    """The chosen decoder trained per fold: out-of-fold scores and decoded sets of every training record, test
    scores and set votes averaged over the fold networks (one split: the fit rows get the in-sample ones)."""
    ld = ctx.cfg.label_decoder
    histories, in_sample, decode_seconds = [], {}, []

    def fold(k, fit_idx, held_idx):
        trained = decoders.train(ld.variant, k, fit_idx, held_idx)
        t0 = time.time()
        held, test = decoders.decode(trained, held_idx), decoders.decode(trained, None, "test")
        decode_seconds.append(time.time() - t0)
        if len(ctx.folds) == 1:
            every = decoders.decode(trained, None)
            in_sample.update(train=every["scores"], train_sets=every["sets"].astype(np.float32))
        r = trained["result"]
        histories.append(r.history.assign(fold=k))
        return ({"train": held["scores"], "train_sets": held["sets"].astype(np.float32)},
                {"test": test["scores"], "test_sets": test["sets"].astype(np.float32)},
                {"best_epoch": r.best_epoch, "best_val_mean_f1": round(r.best_score, 4), "reused": r.reused,
                 "run_dir": str(trained["run_dir"]), "train_seconds": trained["train_seconds"],
                 "parameters": trained["parameters"], "embedding": trained["embedding"],
                 "depth_dims": trained["depth_dims"]})

    cf = base.cross_fit(ctx, fold)
    arrays = {**cf.held, **cf.test}
    for name, values in in_sample.items():
        missing = np.isnan(arrays[name]).any(1)
        arrays[name][missing] = values[missing]
    import pandas as pd

    return arrays, cf.folds, pd.concat(histories, ignore_index=True), float(np.sum(decode_seconds))


# ----------------------------------------------------------------------------------------------- the table


def _scores_f1(ctx: base.StageContext, probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """P/R/F1 at 0.5 and F1 with per-class thresholds tuned on the same rows (optimistic: for comparison only)."""
    rule = ctx.cfg.thresholds.at_least_one
    at_half = sample_prf(y, decide(probs, 0.5, at_least_one=rule))
    _, tuned = tune_per_class(probs, y, rounds=ctx.cfg.thresholds.rounds, at_least_one=rule)
    return {"scores_f1_at_0.5": round(at_half["f1"], 4), "scores_f1_tuned": round(tuned, 4)}


def paired_gaps(table: list[dict[str, Any]]) -> None:
    """Each row's F1 minus the BCE MLP head's on the same features, with the standard error of that difference
    paired over the held-out images (the scale noise alone gives a gap); the per-image F1s are then dropped."""
    reference = {r["features"]: r["_per_image"] for r in table if r["kind"] == "bce" and r["model"] == "BCE MLP head"}
    for r in table:
        other = reference.get(r["features"])
        if other is not None and r["kind"] == "decoder":
            diff = r["_per_image"] - other
            r["gap_vs_bce_mlp"] = round(float(diff.mean()), 4)
            r["gap_se"] = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4)
    for r in table:
        r.pop("_per_image", None)


def compare_decoders(ctx: base.StageContext, decoders: Decoders) -> list[dict[str, Any]]:
    """Every decoder of ``compare`` (and the chosen one) on the first fold: P/R/F1 of the decoded sets."""
    ld = ctx.cfg.label_decoder
    fit_idx, held_idx = ctx.folds[0]
    y = ctx.targets[held_idx]
    rows = []
    names = list(dict.fromkeys([Variant.parse(n).name for n in [ld.variant, *ld.compare]]))
    for name in names:
        trained = decoders.train(name, 0, fit_idx, held_idx)
        t0 = time.time()
        got = decoders.decode(trained, held_idx)
        seconds = time.time() - t0
        r = trained["result"]
        prf = sample_prf(y, got["sets"])
        what = decoders.feats.caption_name if trained["variant"].caption else "image"
        rows.append({"_per_image": sample_f1(y, got["sets"]), "model": name, "kind": "decoder", "features": what, "precision": round(prf["precision"], 4), "recall": round(prf["recall"], 4),
                     "f1": round(prf["f1"], 4), **_scores_f1(ctx, got["scores"], y),
                     "labels_per_image": round(float(got["sets"].sum(1).mean()), 3),
                     "best_epoch": r.best_epoch, "epochs_run": int(len(r.history)), "train_seconds": trained["train_seconds"],
                     "decode_seconds": round(seconds, 2), "parameters": trained["parameters"],
                     "chosen": name == Variant.parse(ld.variant).name, "run_dir": str(trained["run_dir"])})
    return rows


def _bce_row(ctx: base.StageContext, title: str, what: str, hidden: int, features: tuple[np.ndarray, np.ndarray],
             keys: dict[str, str], fit_idx: np.ndarray, held_idx: np.ndarray, resume: bool,
             tag: dict[str, Any] | None = None) -> dict[str, Any]:
    """One BCE head (the image stage's head settings, ``hidden=0``: linear) trained on ``fit_idx`` (less its
    selection rows, which choose the epoch), scored on ``held_idx``: P/R/F1 of its labels at 0.5 (at least the top label), as a table row."""
    ci = ctx.cfg.image
    y = ctx.targets[held_idx]
    rule = ctx.cfg.thresholds.at_least_one
    hs = HeadSettings(hidden, ci.head_dropout, ci.head_lr, ci.head_batch_size, ci.head_epochs, ci.head_patience,
                      ci.label1_weight)
    settings = {"features": keys, "hidden": hidden, **(tag or {}),
                **{k: ci[k] for k in ("head_dropout", "head_lr", "head_batch_size", "label1_weight")}}
    run_dir = ctx.run_dir("label_decoder_bce", {**settings, "fold": [0, len(ctx.folds)]})
    model, result, held, _ = train_on_features(ctx, features[0], features[1], hs, fold=0, fit_idx=fit_idx,
                                               held_idx=held_idx, run_dir=run_dir, name=f"{title} ({what})",
                                               settings=settings, resume=resume)
    pred = decide(held, 0.5, at_least_one=rule)
    prf = sample_prf(y, pred)
    return {"_per_image": sample_f1(y, pred), "model": title, "kind": "bce", "features": what,
            "precision": round(prf["precision"], 4), "recall": round(prf["recall"], 4), "f1": round(prf["f1"], 4),
            **_scores_f1(ctx, held, y), "labels_per_image": round(float(pred.sum(1).mean()), 3),
            "best_epoch": result.best_epoch, "epochs_run": int(len(result.history)),
            "train_seconds": round(float(result.history["seconds"].sum()), 1) if len(result.history) else 0.0,
            "decode_seconds": None, "parameters": sum(p.numel() for p in model.parameters()),
            "chosen": False, "run_dir": str(run_dir)}


def bce_baselines(ctx: base.StageContext, feats: Features, resume: bool) -> list[dict[str, Any]]:
    """BCE heads on the same features and the same split (first fold): the project's MLP head (image stage
    settings) on the pooled image features, a linear head on them, and the MLP head on image + caption."""
    ci = ctx.cfg.image
    fit_idx, held_idx = ctx.folds[0]
    image_key = {"image": feats.keys["image"]}
    rows = [_bce_row(ctx, "BCE MLP head", "image", ci.head_hidden, feats.image, image_key, fit_idx, held_idx, resume),
            _bce_row(ctx, "BCE linear head", "image", 0, feats.image, image_key, fit_idx, held_idx, resume)]
    if feats.caption is not None:
        both = tuple(np.concatenate([a, b], 1) for a, b in zip(feats.image, feats.caption))
        rows.append(_bce_row(ctx, "BCE MLP head", feats.caption_name, ci.head_hidden, both, feats.keys, fit_idx,
                             held_idx, resume))
    return rows


def data_size_curve(ctx: base.StageContext, decoders: "Decoders", table: list[dict[str, Any]],
                    resume: bool) -> list[dict[str, Any]]:
    """``label_decoder.curve_variant`` and the BCE MLP head on the same features trained on nested random subsets
    of the first fold's fit part (``label_decoder.data_sizes``), scored on the same held-out rows: how the gap moves
    with more training data (the paper had ~82,000 training images, this copy 8,000 per fold)."""
    ld, ci = ctx.cfg.label_decoder, ctx.cfg.image
    fit_idx, held_idx = ctx.folds[0]
    order = np.random.default_rng(ctx.cfg.split.seed).permutation(fit_idx)
    chosen = Variant.parse(ld.curve_variant)
    feats = decoders.feats
    rows = []
    for n in sorted({int(n) for n in ld.data_sizes if int(n) < len(fit_idx)}):
        subset = np.sort(order[:n])
        trained = decoders.train(chosen.name, 0, subset, held_idx, tag={"n_fit": n})
        prf = sample_prf(ctx.targets[held_idx], decoders.decode(trained, held_idx)["sets"])
        what = feats.caption_name if chosen.caption else "image"
        features, keys = feats.image, {"image": feats.keys["image"]}
        if chosen.caption:
            features, keys = tuple(np.concatenate([a, b], 1) for a, b in zip(feats.image, feats.caption)), feats.keys
        bce = _bce_row(ctx, "BCE MLP head", what, ci.head_hidden, features, keys, subset, held_idx, resume,
                       tag={"n_fit": n})
        rows.append({"n_fit": n, "decoder": chosen.name, "decoder_f1": round(prf["f1"], 4), "bce_f1": bce["f1"],
                     "decoder_best_epoch": trained["result"].best_epoch, "bce_best_epoch": bce["best_epoch"]})
    full_dec = next((r for r in table if r["kind"] == "decoder" and r["model"] == chosen.name), None)
    if full_dec is None:  # the curve's decoder is not in the table: train it on the whole fit part too
        trained = decoders.train(chosen.name, 0, fit_idx, held_idx)
        prf = sample_prf(ctx.targets[held_idx], decoders.decode(trained, held_idx)["sets"])
        full_dec = {"features": feats.caption_name if chosen.caption else "image", "f1": round(prf["f1"], 4),
                    "best_epoch": trained["result"].best_epoch}
    full_bce = next((r for r in table if r["kind"] == "bce" and r["model"] == "BCE MLP head"
                     and r["features"] == full_dec["features"]), None)
    if full_bce is not None:
        rows.append({"n_fit": int(len(fit_idx)), "decoder": chosen.name, "decoder_f1": full_dec["f1"],
                     "bce_f1": full_bce["f1"], "decoder_best_epoch": full_dec["best_epoch"],
                     "bce_best_epoch": full_bce["best_epoch"]})
    for r in rows:
        r["gap"] = round(r["decoder_f1"] - r["bce_f1"], 4)
    return rows


# ----------------------------------------------------------------------------------------------- figures, doc


def comparison_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Horizontal bars: mean-F1 of each decoder's decoded sets and of each BCE head at 0.5 (first fold)."""
    import matplotlib.pyplot as plt

    from ..reports.figures import _save

    labels = [f"{r['model']} ({r['features']})" if r["kind"] == "bce" or r["features"] != "image" else r["model"]
              for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    colors = ["tab:gray" if r["kind"] == "bce" else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [r["f1"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(r["f1"] + 0.002, i, f"{r['f1']:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    low = min(r["f1"] for r in rows)
    ax.set(xlim=(max(0.0, low - 0.05), 1.0), xlabel="mean F1 over samples (decoded sets; BCE heads at 0.5)",
           title="Label decoders vs BCE heads on the same features (first fold)")
    return _save(fig, path)


def curves_figure(history, path: Path, title: str) -> Path:
    """Sequence loss (train, held out) and mean-F1 of the decoded sets per epoch."""
    import matplotlib.pyplot as plt

    from ..reports.figures import _save

    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(history["epoch"], history["train_loss"], label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], label="held out")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy per label token", title=f"{title}: loss")
    ax_loss.legend()
    for column, label in (("val_mean_f1", "F1"), ("val_precision", "precision"), ("val_recall", "recall")):
        if column in history:
            ax_f1.plot(history["epoch"], history[column], label=label)
    ax_f1.set(xlabel="epoch", ylabel="mean over samples (decoded sets)", title=f"{title}: held out")
    ax_f1.legend()
    return _save(fig, path)


def data_size_figure(sizes: list[dict[str, Any]], path: Path) -> Path:
    """Mean-F1 of the learning curve's decoder and of the BCE MLP head against the number of fit records (log
    scale), and their gap."""
    import matplotlib.pyplot as plt

    from ..reports.figures import _save

    n = [r["n_fit"] for r in sizes]
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax.plot(n, [r["decoder_f1"] for r in sizes], "o-", label=f"decoder {sizes[0]['decoder']} (decoded sets)")
    ax.plot(n, [r["bce_f1"] for r in sizes], "s-", color="tab:gray", label="BCE MLP head (at 0.5)")
    ax.set(xscale="log", xlabel="fit records (first fold, nested subsets)", ylabel="held-out mean F1",
           title="Decoder vs BCE head by training-set size")
    ax.set_xticks(n, [f"{x:,}" for x in n])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax_gap.bar(range(len(n)), [100 * r["gap"] for r in sizes], color=["tab:red" if r["gap"] < 0 else "tab:green"
                                                                      for r in sizes])
    ax_gap.axhline(0, color="black", lw=0.8)
    ax_gap.set_xticks(range(len(n)), [f"{x:,}" for x in n])
    ax_gap.set(xlabel="fit records", ylabel="decoder - BCE (F1 points)", title="The gap")
    return _save(fig, path)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


#: the figures the results page shows (names in ``metrics["figures"]``)
RESULT_FIGURES = ("comparison", "data_sizes", "training_curves")


def results_markdown(metrics: dict[str, Any], fusion_runs: list[dict[str, Any]] | None = None,
                     figures: dict[str, str] | None = None, source: str | None = None) -> str:
    """The stage's results page, written from its metrics file and stage-03 runs with and without its block (as
    :func:`..reports.stage_results.fusion_summary` gives them). ``figures``: figure name -> link (relative to the
    page); ``source``: the sentence saying how the page is regenerated."""
    rows = metrics["table"]
    fold = metrics["table_split"]
    source = source or (f"Written by `python3 stages/05_label_decoder.py --data {metrics['data']} --results-doc "
                        "docs/RESULTS_label_decoder.md` from `output/metrics/label_decoder.json`; never edited by hand.")
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
    truth = metrics["table_split"]["labels_per_image"]
    out += ["", f"True labels per held-out image: {truth}.", ""]
    out += figure(figures, "comparison", "decoders vs BCE heads")
    out += ["Published (MS-COCO, VGG16 features, 80 labels, ~82,000 training images):", "",
            "| model | P | R | F1 |", "|---|---|---|---|"]
    out += [f"| {r['model']} | {r['precision']} | {r['recall']} | {r['f1']} |" for r in PUBLISHED]
    out += ["", "## Reading", ""]
    if metrics.get("closing_note"):
        out += [metrics["closing_note"], ""]
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
                "Stage 03 (`fusion.blocks`), same settings otherwise; out-of-fold figures.", ""]
        out += fusion_rows(fusion_runs) + [""]
    table_train = sum(r["train_seconds"] for r in rows)
    out += ["## Wall times", "",
            f"Training the {len(rows)} rows of the table: {table_train:,.0f} s in all (times of the runs when they "
            f"trained; finished runs are reused by key); the chosen decoder over the {metrics['folds']} folds: "
            f"{chosen['train_seconds']:,.0f} s. This stage run: {metrics['wall_seconds']:,.0f} s (its block "
            f"{metrics['block']}, the table's rows {metrics.get('table_seconds', 0):,.0f} s).", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- the stage


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    """Cross-fit the chosen decoder (artifact: the block), train the comparison on the first fold, beside BCE heads
    on the same features; submission, metrics (with the table) and figures."""
    ctx = base.prepare(cfg, "label_decoder", demo_mode)
    ld = cfg.label_decoder
    names = [ld.variant, ld.curve_variant, *ld.compare]
    need_caption = any(Variant.parse(n).caption for n in names) or ld.bce_baseline
    feats = load_features(ctx, need_caption)
    decoders = Decoders(ctx, feats, resume)
    import pandas as pd

    with cpu_threads(ctx.device, ld.threads or torch.get_num_threads()):
        found = ctx.store.load("label_decoder", ctx.key())
        if found is None:
            t0 = time.time()
            arrays, folds, history, decode_seconds = cross_fit_decoder(ctx, decoders)
            arrays.update(train_ids=ctx.data.train["ImageID"].to_numpy(str), test_ids=ctx.data.test["ImageID"].to_numpy(str))
            info = {"variant": Variant.parse(ld.variant).name, "folds": folds, "history": base._records(history),
                    "what": "per label: its highest probability over the best beam's steps (train: out of fold; "
                            "test: mean over the fold networks); *_sets: the decoded sets (test: fraction of folds)",
                    "cross_fit_seconds": round(time.time() - t0, 1), "decode_seconds": round(decode_seconds, 1)}
            found = ctx.store.save("label_decoder", ctx.key(), ctx.spec(), arrays, info)
            state = "computed"
        else:
            print(f"[label_decoder] reusing the decoder's block {found.dir}")
            state = "reused"
        t_table = time.time()
        table = compare_decoders(ctx, decoders)
        if ld.bce_baseline:
            table += bce_baselines(ctx, feats, resume)
        table_seconds = time.time() - t_table
        paired_gaps(table)
        sizes = data_size_curve(ctx, decoders, table, resume) if ld.bce_baseline and ld.data_sizes else []
    info = found.info
    y_eval = ctx.y_eval
    decoded = sample_prf(y_eval, np.asarray(found["train_sets"])[ctx.eval_idx])
    history = pd.DataFrame(info.get("history", []))
    history0 = history[history["fold"] == 0] if len(history) else history
    out = ctx.output_dir
    figures = {"comparison": comparison_figure(table, out / "figures" / "label_decoder_comparison.png")}
    if len(history0):
        figures["training_curves"] = curves_figure(history0, out / "figures" / "label_decoder_training.png",
                                                   f"decoder {info['variant']} (fold 1)")
    if sizes:
        figures["data_sizes"] = data_size_figure(sizes, out / "figures" / "label_decoder_data_sizes.png")
    image = ctx.require("image")
    held = ctx.folds[0][1]
    extra = {
        "variant": info["variant"], "artifact": str(found.dir), "block": state,
        "settings": {k: ld[k] for k in ld}, "vectors": decoders.vectors_record,
        "features": {"backbone": image.info.get("backbone", {}).get("name"), "pooled_dim": int(feats.image[0].shape[1]),
                     "depth_dims": feats.depth_dims, "caption_block": feats.caption_block,
                     "caption_dim": None if feats.caption is None
                     else int(feats.caption[0].shape[1]), "keys": feats.keys, "notes": feats.notes},
        "cross_fit": {"decoded": {k: round(v, 4) for k, v in decoded.items()}, "folds": info["folds"],
                      "train_seconds": round(sum(f["train_seconds"] for f in info["folds"]), 1),
                      "decode_seconds": info.get("decode_seconds")},
        "table": table, "table_split": {"fold": 0, "n_fit": int(len(ctx.folds[0][0])), "n_held": int(len(held)),
                                        "labels_per_image": round(float(ctx.targets[held].sum(1).mean()), 3)},
        "table_seconds": round(table_seconds, 1), "published": PUBLISHED, "data_sizes": sizes,
        "decoder_history": base._records(history0),
        "label_order": [L.names()[i] for i in np.argsort(frequency_rank(ctx.targets[ctx.folds[0][0]]))],
    }
    extra["closing_note"] = closing_note(extra)
    return base.finish(ctx, np.asarray(found["train"])[ctx.eval_idx], np.asarray(found["test"]), extra=extra,
                       extra_figures=figures)


def closing_note(extra: dict[str, Any]) -> str:
    """What the table says, in one paragraph computed from it (so it never contradicts the numbers)."""
    rows = extra["table"]
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
                 f"{extra['table_split']['n_held']:,} held-out images)")
    note += "."
    linear = [r for r in bce if r["model"] == "BCE linear head"]
    if linear:
        beaten = sum(r["f1"] > linear[0]["f1"] for r in dec)
        note += (f" Against a linear BCE head on the same features (F1 {100 * linear[0]['f1']:.1f}), {beaten} of the "
                 f"{len(dec)} decoders win, the best by {100 * (best['f1'] - linear[0]['f1']):+.1f}; the BCE head "
                 f"with one hidden layer gains {100 * (base_row['f1'] - linear[0]['f1']):+.1f} over it: the gain over "
                 "a weak BCE baseline is real, over a strong one it is gone.")
    sizes = extra.get("data_sizes") or []
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
    truth = extra.get("table_split", {}).get("labels_per_image")
    if truth:
        note += (f" Held-out images carry {truth} labels on average (of 18), so a decoded sequence is mostly one or "
                 "two steps and there is little co-occurrence for the recurrence to exploit.")
    return note


# ----------------------------------------------------------------------------------------------- command line


def cli_arguments(parser) -> None:
    parser.add_argument("--results-doc", type=Path, default=None,
                        help="also write the markdown results page (e.g. docs/RESULTS_label_decoder.md)")
    parser.add_argument("--fusion-metrics", nargs="*", default=[], metavar="FUSION_JSON[=LABEL]",
                        help="metrics files of stage 03 runs (with and without the block) for the page")


def run_cli(cfg: Config, demo_mode: bool | str = False, resume: bool = False, args=None) -> dict[str, Any]:
    from ..__main__ import run_stage as with_inputs

    metrics = with_inputs("label_decoder", cfg, demo_mode=demo_mode, resume=resume)  # stages 01, 02 first where missing
    if args is not None and args.results_doc is not None:
        fusion = [fusion_summary(json.loads(path.read_text()), label)
                  for path, label in map(fusion_argument, args.fusion_metrics)]
        doc = Path(args.results_doc)
        links = {name: os.path.relpath(path, doc.resolve().parent) for name, path in metrics["figures"].items()}
        path = write_text(doc, results_markdown(metrics, fusion, links))
        print(f"[label_decoder] wrote {path}")
    return metrics
