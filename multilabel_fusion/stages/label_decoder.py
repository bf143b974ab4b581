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
* With ``label_decoder.comparisons: true``, the paper's table (``label_decoder.compare``): every decoder trained on
  the first fold, beside BCE heads and ranking-loss heads (WARP, softmax: ``ranking_baselines``, their labels by a
  top-k or threshold rule chosen on the fit part's selection rows) on the same features and the same split;
  precision, recall and F1 of each sample's decoded label set (no threshold), averaged over the samples; for every
  row F1 by the images' number of true labels and per class (the paper's figures 7-8); and the learning curve
  (``data_sizes``). In ``metrics/label_decoder.json`` (``table``, ``table_split``, ``data_sizes``); the page with the
  published figures beside is :mod:`multilabel_fusion.reports.label_decoder_page`.

Every network is trained by the one trainer (run folders keyed by the settings, exact resume); the decoder's
sequence loss comes in through its ``batch_loss`` hook, model selection (mean-F1 of the decoded sets) through
``score_fn``. :class:`LabelDecoderPredictor` decodes new records with the fold networks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import labels as L
from ..evaluation import figures as plots
from ..evaluation.metrics import f1_by_label_count, label_count_groups, per_class, sample_f1
from ..evaluation.thresholds import (apply_ranking_rule, choose_ranking_rule, decide, describe_ranking_rule,
                                     tune_per_class)
from ..io.artifacts import Artifact
from ..io.assets import load_vectors
from ..networks.device import cpu_threads
from ..networks.label_decoder import (PAD, FeatureBatches, Variant, batch_loss, decode, frequency_rank,
                                      label_embedding_init, mean_loss, sample_prf)
from ..networks.label_decoder import LabelDecoder as DecoderNetwork
from ..networks.precision import training_precision
from ..settings import Settings, common_settings
from ..training import ranking as ranking_losses
from ..training import trainer
from ..training.crossfit import cross_fit, fill_in_sample
from ..training.heads import HeadSettings, feature_loader, train_head
from .base import BlockPredictor, NewRecords, Stage, best_weights, fold_mean, load_tensors, tensor_bytes
from .context import StageContext, Workspace
from .outputs import finish, records

log = logging.getLogger(__name__)

VERSION = 1  # bump when the decoders' code changes what a trained run means


class LabelDecoder(Stage):
    name = "label_decoder"
    number = "05"
    title = "label decoder"
    module = "label_decoder"
    section = "label_decoder"
    blocks = ("label_decoder",)
    writes = "out-of-fold per-label scores of a recurrent label decoder, decoder submission, decoders vs BCE table"
    summary = "recurrent label decoders (CNN-RNN, seq2seq with attention) + their block"
    about = ("Recurrent label decoders (CNN-RNN joint embedding, CNN as initialisation, CNN sequence to sequence, with "
             "or without attention; order-free training; image and caption) predict each image's labels one at a time "
             "by beam search, trained per fold on the cached features of stages 01 and 02 (minutes on a CPU). The "
             "chosen decoder's per-label scores give `output/submission_label_decoder.csv` and a block the fused "
             "network can stack. With `label_decoder.comparisons=true` they are also measured against BCE heads on the "
             "same features (the paper's table, with the published figures beside).")

    def reads(self, settings: Settings, registry) -> tuple[str, ...]:
        return ("image", "caption")

    def spec(self, ws: Workspace) -> dict[str, Any]:
        """The word vectors' identity when the label embeddings start from them, the split and the trainer's seed."""
        spec: dict[str, Any] = {"version": VERSION, "common": common_settings(ws.settings)}
        if Variant.parse(ws.settings.label_decoder.variant).embeddings == "word_vectors":
            vectors = ws.assets.word_vectors(ws.settings.caption, ws.models_dir / "vectors")
            spec["assets"] = {"vectors": {"name": vectors.name, "identity": vectors.identity}}
        return spec

    # ------------------------------------------------------------------------------------------- the work
    def fit(self, ctx: StageContext) -> Artifact:
        """The chosen decoder cross-fitted (its per-label scores: the block), found by key or trained."""
        ld = ctx.settings.label_decoder
        with cpu_threads(ctx.device, ld.threads or torch.get_num_threads()):
            return self._block(ctx)[0]

    def _block(self, ctx: StageContext, decoders: "Decoders | None" = None) -> tuple[Artifact, str]:
        """The artifact and whether it was computed now (``decoders``: the features already loaded)."""
        def computed() -> Artifact:
            ld = ctx.settings.label_decoder
            ready = decoders or Decoders(ctx, load_features(ctx, Variant.parse(ld.variant).caption))
            t0 = time.time()
            arrays, folds, history, decode_seconds = cross_fit_decoder(ctx, ready)
            arrays.update(train_ids=ctx.data.train["ImageID"].to_numpy(str),
                          test_ids=ctx.data.test["ImageID"].to_numpy(str))
            info = {"variant": Variant.parse(ld.variant).name, "folds": folds, "history": records(history),
                    "what": "per label: its highest probability over the best beam's steps (train: out of fold; "
                            "test: mean over the fold networks); *_sets: the decoded sets (test: fraction of folds)",
                    "cross_fit_seconds": round(time.time() - t0, 1), "decode_seconds": round(decode_seconds, 1)}
            return ctx.store.save("label_decoder", ctx.key(), ctx.spec(), arrays, info)

        return self.found_or_computed(ctx, "the decoder's block", computed)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """The cross-fitted decoder (artifact: the block), then with ``comparisons`` the table on the first fold
        beside BCE heads on the same features and the learning curve; submission, metrics and figures."""
        ld = ctx.settings.label_decoder
        names = [ld.variant] + ([ld.curve_variant, *ld.compare] if ld.comparisons else [])
        need_caption = any(Variant.parse(n).caption for n in names) or (
            ld.comparisons and (ld.bce_baseline or bool(ld.ranking_baselines)))
        feats = load_features(ctx, need_caption)
        decoders = Decoders(ctx, feats)
        table: list[dict[str, Any]] = []
        sizes: list[dict[str, Any]] = []
        breakdown: dict[str, Any] = {}
        with cpu_threads(ctx.device, ld.threads or torch.get_num_threads()):
            found, state = self._block(ctx, decoders)
            t_table = time.time()
            if ld.comparisons:
                table = compare_decoders(ctx, decoders) + head_baselines(ctx, feats)
                paired_gaps(table, ctx.targets[ctx.folds[0][1]])
                breakdown = breakdowns(table, ctx.targets[ctx.folds[0][1]])
                sizes = data_size_curve(ctx, decoders, table) if ld.bce_baseline and ld.data_sizes else []
            table_seconds = time.time() - t_table
        info = found.info
        decoded = sample_prf(ctx.y_eval, np.asarray(found["train_sets"])[ctx.eval_idx])
        history = pd.DataFrame(info.get("history", []))
        history0 = history[history["fold"] == 0] if len(history) else history
        out = ctx.output_dir / "figures"
        figures = {}
        if table:
            figures["comparison"] = plots.decoder_comparison(table, out / "label_decoder_comparison.png")
        if len(history0):
            figures["training_curves"] = plots.decoder_curves(history0, out / "label_decoder_training.png",
                                                              f"decoder {info['variant']} (fold 1)")
        if table:
            figures["breakdown"] = plots.decoder_breakdown(table, breakdown, out / "label_decoder_breakdown.png")
        if sizes:
            figures["data_sizes"] = plots.decoder_data_sizes(sizes, out / "label_decoder_data_sizes.png")
        image = ctx.require("image")
        held = ctx.folds[0][1]
        extra = {
            "variant": info["variant"], "artifact": str(found.dir), "block": state,
            "settings": ld.to_dict(), "vectors": decoders.vectors_record,
            "features": {"backbone": image.info.get("backbone", {}).get("name"),
                         "pooled_dim": int(feats.image[0].shape[1]), "depth_dims": feats.depth_dims,
                         "caption_block": feats.caption_block,
                         "caption_dim": None if feats.caption is None else int(feats.caption[0].shape[1]),
                         "keys": feats.keys, "notes": feats.notes},
            "cross_fit": {"decoded": {k: round(v, 4) for k, v in decoded.items()}, "folds": info["folds"],
                          "train_seconds": round(sum(f["train_seconds"] for f in info["folds"]), 1),
                          "decode_seconds": info.get("decode_seconds")},
            "table": table, "table_split": {"fold": 0, "n_fit": int(len(ctx.folds[0][0])), "n_held": int(len(held)),
                                            "labels_per_image": round(float(ctx.targets[held].sum(1).mean()), 3),
                                            **breakdown},
            "table_seconds": round(table_seconds, 1), "data_sizes": sizes, "decoder_history": records(history0),
            "label_order": [L.names()[i] for i in np.argsort(frequency_rank(ctx.targets[ctx.folds[0][0]]))],
        }
        return finish(ctx, np.asarray(found["train"])[ctx.eval_idx], np.asarray(found["test"]), extra=extra,
                      extra_figures=figures)

    # ------------------------------------------------------------------------------------------- new records
    def predictor_needs(self, settings: Settings, blocks: Sequence[str]) -> tuple[str, ...]:
        """The pooled image features; the depths when the decoder reads them (the pooled features stand in
        without multi-depth features, as in the stage); the caption block for ``+caption``."""
        return _needs(Variant.parse(settings.label_decoder.variant), bool(settings.image.depth_features),
                      settings.label_decoder.caption_block)

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "LabelDecoderPredictor":
        art = ws.require("label_decoder")
        ld = ws.settings.label_decoder
        folds = art.info["folds"]
        v = Variant.parse(ld.variant)
        depth_dims = [int(d) for d in folds[0]["depth_dims"]]
        states = [best_weights(f["run_dir"], ws.models_dir, self) for f in folds]
        description = {"variant": v.name, "rep_dim": int(states[0]["rep_mean"].shape[0]), "depth_dims": depth_dims,
                       "depth_features": bool(ws.settings.image.depth_features), "caption_block": ld.caption_block,
                       "embed": ld.embed, "hidden": ld.hidden, "proj_dropout": ld.proj_dropout,
                       "lstm_dropout": ld.lstm_dropout, "beam": ld.beam, "max_labels": ld.max_labels,
                       "threads": ld.threads, "networks": len(states), "key": art.key}
        return LabelDecoderPredictor(blocks, description, [_network(s, description) for s in states])


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


def load_features(ctx: StageContext, caption: bool) -> Features:
    """Pooled image features, the multi-depth features of the same forward pass (``train_depths``, widths in
    ``info['depth_dims']``) and, when asked, the caption block ``label_decoder.caption_block`` (out of fold).
    Without multi-depth features the encoder reads one depth, the pooled features, and the metrics say so."""
    image = ctx.require("image")
    ctx.check_rows(image, ctx.registry.get("image"))
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
    cap, block = None, ctx.settings.label_decoder.caption_block
    if caption:
        train, test, keys[block] = ctx.block_arrays(block)
        cap = (train, test)
    return Features(pooled, depths, [int(d) for d in dims], cap, keys, notes, block)


def decoder_inputs(v: Variant, image: np.ndarray, depths: np.ndarray, depth_dims: list[int],
                   caption: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(rep, depths, depth widths) of one decoder for some records.

    ``rep`` is the image representation I (pooled features; ``+caption``: pooled image and caption features side
    by side); the depths are the encoder's sequence (``+caption``: the caption features are its last element),
    zero-width for a decoder that reads none.
    """
    rep, dep, dims = image, depths, list(depth_dims)
    if v.caption:
        rep, dep = np.concatenate([rep, caption], 1), np.concatenate([dep, caption], 1)
        dims.append(caption.shape[1])
    if not v.uses_depths:
        dep, dims = np.zeros((len(rep), 0), dtype=np.float32), []
    return rep, dep, dims


def variant_inputs(feats: Features, v: Variant):
    """(rep train, rep test, depths train, depths test, depth widths) of one decoder (:func:`decoder_inputs`)."""
    parts = [decoder_inputs(v, feats.image[i], feats.depths[i], feats.depth_dims,
                            None if feats.caption is None else feats.caption[i]) for i in (0, 1)]
    return parts[0][0], parts[1][0], parts[0][1], parts[1][1], parts[0][2]


# ----------------------------------------------------------------------------------------------- training


class Decoders:
    """Trains (or reuses) decoders on the stage's folds; holds the features and word vectors once."""

    def __init__(self, ctx: StageContext, feats: Features):
        self.ctx, self.feats = ctx, feats
        self.ld = ctx.settings.label_decoder
        self.precision = training_precision(ctx.device, ctx.settings.trainer.mixed_precision)
        self._vectors = None
        self.vectors_record: dict[str, Any] | None = None

    def vectors(self):
        if self._vectors is None:
            asset = self.ctx.assets.word_vectors(self.ctx.settings.caption, self.ctx.models_dir / "vectors")
            self._vectors = (asset, load_vectors(asset))
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
        shaping: dict[str, Any] = {"variant": v.name, **ld.shaping(weights_only=True), "inputs": inputs,
                                   "depth_dims": dims, "version": VERSION, "fold": [k, len(ctx.folds)], **(tag or {})}
        embedding, embedding_info = None, {"init": "xavier"}
        if v.embeddings == "word_vectors":
            asset, vectors = self.vectors()
            shaping["vectors"] = asset.identity
            embedding, embedding_info = label_embedding_init(vectors, ld.embed, ctx.settings.trainer.seed + k)
            embedding_info = {"init": f"word vectors {asset.name}", **embedding_info}
        run_dir = ctx.run_dir("label_decoder", shaping)
        seed = ctx.settings.trainer.seed + k
        torch.manual_seed(seed)
        model = DecoderNetwork(v, rep_tr.shape[1], dims, embed=ld.embed, hidden=ld.hidden,
                               proj_dropout=ld.proj_dropout, lstm_dropout=ld.lstm_dropout,
                               rank=frequency_rank(y[fit_idx]), embedding_init=embedding)
        model.fit_standardisation(rep_tr[fit_idx], dep_tr[fit_idx])
        train_batches = FeatureBatches(rep_tr[fit_idx], dep_tr[fit_idx], y[fit_idx], ld.batch_size, shuffle=True,
                                       seed=seed)
        select_batches = FeatureBatches(rep_tr[select_idx], dep_tr[select_idx], y[select_idx], 1024)
        device = ctx.device

        def score(m: DecoderNetwork) -> dict[str, float]:
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
            resume=ctx.resume, settings={**shaping, "embedding": embedding_info},
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


def cross_fit_decoder(ctx: StageContext, decoders: Decoders):
    """The chosen decoder trained per fold: out-of-fold scores and decoded sets of every training record, test
    scores and set votes averaged over the fold networks (one split: the fit rows get the in-sample ones)."""
    ld = ctx.settings.label_decoder
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

    cf = cross_fit(ctx.folds, len(ctx.data.train), fold, "label_decoder")
    arrays = {**cf.held, **cf.test}
    fill_in_sample(arrays, in_sample)
    return arrays, cf.folds, pd.concat(histories, ignore_index=True), float(np.sum(decode_seconds))


# ----------------------------------------------------------------------------------------------- the table


def _scores_f1(ctx: StageContext, probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """P/R/F1 at 0.5 and F1 with per-class thresholds tuned on the same rows (optimistic: for comparison only)."""
    rule = ctx.settings.thresholds.at_least_one
    at_half = sample_prf(y, decide(probs, 0.5, at_least_one=rule))
    _, tuned = tune_per_class(probs, y, rounds=ctx.settings.thresholds.rounds, at_least_one=rule)
    return {"scores_f1_at_0.5": round(at_half["f1"], 4), "scores_f1_tuned": round(tuned, 4)}


def paired_gaps(table: list[dict[str, Any]], y: np.ndarray) -> None:
    """Each decoder's and ranking head's F1 minus the BCE MLP head's on the same features, with the standard error of
    that difference paired over the held-out images ``y`` (the scale noise alone gives a gap)."""
    per_image = [sample_f1(y, r["_sets"]) for r in table]
    reference = {r["features"]: f for r, f in zip(table, per_image) if r["kind"] == "bce" and r["model"] == "BCE MLP head"}
    for r, f in zip(table, per_image):
        other = reference.get(r["features"])
        if other is not None and r["kind"] != "bce":
            diff = f - other
            r["gap_vs_bce_mlp"] = round(float(diff.mean()), 4)
            r["gap_se"] = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4)


def breakdowns(table: list[dict[str, Any]], y: np.ndarray) -> dict[str, Any]:
    """The paper's figures 7 and 8 for every row: mean-F1 of the held-out images grouped by their number of true labels
    (``f1_by_label_count``) and per-class F1 (``per_class_f1``, label order) of its held-out sets, which are then
    dropped from the rows. Returns the groups' sizes and the classes' supports."""
    for r in table:
        sets = r.pop("_sets")
        r["f1_by_label_count"] = f1_by_label_count(y, sets)
        r["per_class_f1"] = per_class(y, sets)["f1"]
    return {"images_by_label_count": {name: int(rows.sum()) for name, rows in label_count_groups(y)},
            "class_names": L.names(), "class_support": per_class(y, y)["support"]}


def compare_decoders(ctx: StageContext, decoders: Decoders) -> list[dict[str, Any]]:
    """Every decoder of ``compare`` (and the chosen one) on the first fold: P/R/F1 of the decoded sets."""
    ld = ctx.settings.label_decoder
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
        what = decoders.feats.caption_name if trained["variant"].caption else "image"
        rows.append({**_set_row(ctx, name, "decoder", what, got["sets"], got["scores"], y),
                     "best_epoch": r.best_epoch, "epochs_run": int(len(r.history)),
                     "train_seconds": trained["train_seconds"], "decode_seconds": round(seconds, 2),
                     "parameters": trained["parameters"], "chosen": name == Variant.parse(ld.variant).name,
                     "run_dir": str(trained["run_dir"])})
    return rows


def _set_row(ctx: StageContext, model: str, kind: str, what: str, sets: np.ndarray, scores: np.ndarray,
             y: np.ndarray) -> dict[str, Any]:
    """What every row of the table says of its held-out label sets (kept as ``_sets`` for the paired gaps and the
    breakdowns) and per-label scores."""
    prf = sample_prf(y, sets)
    return {"_sets": sets, "model": model, "kind": kind, "features": what,
            "precision": round(prf["precision"], 4), "recall": round(prf["recall"], 4), "f1": round(prf["f1"], 4),
            **_scores_f1(ctx, scores, y), "labels_per_image": round(float(sets.sum(1).mean()), 3)}


def _head_row(ctx: StageContext, title: str, what: str, hidden: int, features: tuple[np.ndarray, np.ndarray],
              keys: dict[str, str], fit_idx: np.ndarray, held_idx: np.ndarray,
              tag: dict[str, Any] | None = None, loss: str = "bce") -> dict[str, Any]:
    """One head (the image stage's head settings, ``hidden=0``: linear) trained on ``fit_idx`` (less its selection
    rows, which choose the epoch), scored on ``held_idx``, as a table row. ``bce``: the weighted BCE, its labels at
    0.5 (at least the top label). ``warp`` / ``softmax`` (:mod:`..training.ranking`): its labels by the rule of
    ``label_decoder.ranking_rule`` chosen on the selection rows (which also choose the epoch by that rule's F1)."""
    ci, ld = ctx.settings.image, ctx.settings.label_decoder
    y = ctx.targets[held_idx]
    hs = HeadSettings(hidden, ci.head_dropout, ci.head_lr, ci.head_batch_size, ci.head_epochs, ci.head_patience,
                      ci.label1_weight)
    settings = {"features": keys, "hidden": hidden, **(tag or {}),
                **{k: ci[k] for k in ("head_dropout", "head_lr", "head_batch_size", "label1_weight")}}
    network, ranking = "label_decoder_bce", {}
    if loss != "bce":  # the BCE heads' run folders stay as they were; a ranking head's says its loss and rule
        network = "label_decoder_ranking"
        settings = {**{k: v for k, v in settings.items() if k != "label1_weight"}, "loss": loss,
                    "rule": ld.ranking_rule, **({"margin": ld.warp_margin} if loss == "warp" else {})}
        ranking = {"loss_fn": ranking_losses.LOSSES[loss](ld.warp_margin), "activation": ranking_losses.SCORES[loss],
                   "score_fn": lambda scores, truth: choose_ranking_rule(scores, truth, ld.ranking_rule)["f1"]}
    run_dir = ctx.run_dir(network, {**settings, "fold": [0, len(ctx.folds)]})
    fit_rows, select_rows = ctx.selection(0, fit_idx, held_idx)
    precision = training_precision(ctx.device, ctx.settings.trainer.mixed_precision)
    model, result, held, _ = train_head(
        features[0], features[1], ctx.targets, hs, fit_idx=fit_rows, select_idx=select_rows, held_idx=held_idx,
        run_dir=run_dir, name=f"{title} ({what})", settings=settings, device=ctx.device, precision=precision,
        seed=ctx.settings.trainer.seed, resume=ctx.resume, **ranking)
    extra: dict[str, Any] = {}
    if loss == "bce":
        pred = decide(held, 0.5, at_least_one=ctx.settings.thresholds.at_least_one)
    else:  # the rule is chosen on the selection rows' scores, never on the held-out rows
        loader = feature_loader(features[0][select_rows], None, 4096, False, 0)
        chosen = choose_ranking_rule(trainer.predict(model, loader, ctx.device, precision=precision,
                                                     activation=ranking["activation"]),
                                     ctx.targets[select_rows], ld.ranking_rule)
        pred = apply_ranking_rule(held, chosen)
        extra = {"rule": describe_ranking_rule(chosen), "rule_selection_f1": round(chosen["f1"], 4)}
    return {**_set_row(ctx, title, loss, what, pred, held, y), **extra,
            "best_epoch": result.best_epoch, "epochs_run": int(len(result.history)),
            "train_seconds": round(float(result.history["seconds"].sum()), 1) if len(result.history) else 0.0,
            "decode_seconds": None, "parameters": sum(p.numel() for p in model.parameters()),
            "chosen": False, "run_dir": str(run_dir)}


#: a ranking head's name in the table
RANKING_TITLES = {"warp": "WARP MLP head", "softmax": "softmax MLP head"}


def head_baselines(ctx: StageContext, feats: Features) -> list[dict[str, Any]]:
    """Heads on the same features and the same split (first fold): with ``bce_baseline`` BCE heads (the project's MLP
    head, image stage settings, on the pooled image features; a linear head on them; the MLP head on image +
    caption), then the MLP head with each ranking loss of ``label_decoder.ranking_baselines`` on the same features
    (the paper's WARP and softmax rows)."""
    ci, ld = ctx.settings.image, ctx.settings.label_decoder
    fit_idx, held_idx = ctx.folds[0]
    image_key = {"image": feats.keys["image"]}
    inputs = [("image", feats.image, image_key)]
    if feats.caption is not None:
        inputs.append((feats.caption_name, _with_caption(feats), feats.keys))
    rows = []
    if ld.bce_baseline:
        rows += [_head_row(ctx, "BCE MLP head", "image", ci.head_hidden, feats.image, image_key, fit_idx, held_idx),
                 _head_row(ctx, "BCE linear head", "image", 0, feats.image, image_key, fit_idx, held_idx)]
        rows += [_head_row(ctx, "BCE MLP head", what, ci.head_hidden, x, keys, fit_idx, held_idx)
                 for what, x, keys in inputs[1:]]
    rows += [_head_row(ctx, RANKING_TITLES[loss], what, ci.head_hidden, x, keys, fit_idx, held_idx, loss=loss)
             for loss in ld.ranking_baselines for what, x, keys in inputs]
    return rows


def _with_caption(feats: Features) -> tuple[np.ndarray, np.ndarray]:
    """Pooled image and caption features side by side (train, test)."""
    return tuple(np.concatenate([a, b], 1) for a, b in zip(feats.image, feats.caption))


def data_size_curve(ctx: StageContext, decoders: Decoders, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``label_decoder.curve_variant`` and the BCE MLP head on the same features trained on nested random subsets
    of the first fold's fit part (``label_decoder.data_sizes``), scored on the same held-out rows: how the gap moves
    with more training data (the paper had ~82,000 training images, this copy 8,000 per fold)."""
    ld, ci = ctx.settings.label_decoder, ctx.settings.image
    fit_idx, held_idx = ctx.folds[0]
    order = np.random.default_rng(ctx.settings.split.seed).permutation(fit_idx)
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
            features, keys = _with_caption(feats), feats.keys
        bce = _head_row(ctx, "BCE MLP head", what, ci.head_hidden, features, keys, subset, held_idx, tag={"n_fit": n})
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


# ----------------------------------------------------------------------------------------------- new records


def _needs(v: Variant, depth_features: bool, caption_block: str) -> tuple[str, ...]:
    depths = ("image_depths",) if v.uses_depths and depth_features else ()
    return ("image", *depths, *((caption_block,) if v.caption else ()))


def _network(state: dict, description: dict[str, Any]) -> DecoderNetwork:
    """A fold's decoder from its weights (the standardisation and the label order are buffers among them)."""
    v = Variant.parse(description["variant"])
    net = DecoderNetwork(v, description["rep_dim"], description["depth_dims"], embed=description["embed"],
                         hidden=description["hidden"], proj_dropout=description["proj_dropout"],
                         lstm_dropout=description["lstm_dropout"])
    net.load_state_dict(state)
    return net.eval()


class LabelDecoderPredictor(BlockPredictor):
    """The fold decoders on a new record's image features (and caption block), decoded by beam search as the
    stage decoded its test records; the block is each label's score averaged over the folds."""

    stage = "label_decoder"

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], networks: list[DecoderNetwork]):
        super().__init__(blocks)
        self.description, self.networks = description, networks
        self.variant = Variant.parse(description["variant"])
        self.needs = _needs(self.variant, description["depth_features"], description["caption_block"])

    @property
    def fold_networks(self) -> list[torch.nn.Module]:
        return list(self.networks)

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = self.description
        image = np.asarray(given["image"], dtype=np.float32)
        depths = np.asarray(given["image_depths"], dtype=np.float32) if "image_depths" in self.needs else image
        caption = np.asarray(given[d["caption_block"]], dtype=np.float32) if self.variant.caption else None
        rep, dep, _ = decoder_inputs(self.variant, image, depths, [], caption)
        with cpu_threads(self.device, d["threads"] or torch.get_num_threads()):
            scores = [decode(net, rep, dep, d["beam"], max_labels=d["max_labels"], device=self.device)["scores"]
                      for net in self.networks]
        return {"label_decoder": fold_mean(scores)}

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        part = f"label decoders ({len(self.networks)} folds)"
        return dict(self.description), {f"network_{i}.pt": (part, tensor_bytes({n: t.cpu() for n, t in
                                                                                net.state_dict().items()}))
                                        for i, net in enumerate(self.networks)}

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "LabelDecoderPredictor":
        return cls(blocks, description, [_network(load_tensors(read(f"network_{i}.pt")), description)
                                         for i in range(int(description["networks"]))])


LabelDecoder.predictor_type = LabelDecoderPredictor  # what rebuilds it from a bundle (defined after the stage)
