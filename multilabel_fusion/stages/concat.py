"""Stage 07: the ResNet + LSTM report's best model, one network trained end to end (the concatenation network).

Each photo's frozen CNN features (the image stage's cached pooled features) and an LSTM over its caption (the caption
stage's cleaning and word vectors, ``caption.vectors``) are concatenated and read by two fully connected layers
with batch norm (:class:`multilabel_fusion.networks.concat.ConcatLSTM`), trained with ``BCEWithLogits`` and, as
published, ``pos_weight`` = negatives / positives per label (``concat.pos_weight``; counted on the rows each fold
trains on), optimiser Adadelta. The report measures 0.847 mean-F1 without ``pos_weight`` and 0.633 with it, and
1 / 2 / 4 / 8 LSTM layers at 0.831 / 0.810 / 0.770 / 0.630 (``concat.layers``).

Cross-fitted like every trained stage: one network per fold, trained on the fold's fit part less its selection
share (which chooses the epoch), so every training record's probabilities come from the network that never saw it;
the test records' are the mean over the fold networks. Block ``concat_probs`` (for the fused network, opt-in in
``fusion.blocks``), ``output/submission_concat.csv``, and a predictor for new records, which encodes their captions
with the vocabulary kept in the artifact and reads the image stage's features.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import text
from ..io.artifacts import Artifact
from ..networks.concat import ConcatLSTM, make_optimizer
from ..networks.device import cpu_threads, model_size_mb
from ..networks.joint_embedding import PairBatches
from ..networks.precision import training_precision
from ..settings import Settings
from ..training import trainer
from ..training.crossfit import cross_fit, fill_in_sample
from .base import NewRecords, Stage, best_weights, fold_mean
from .caption import CaptionPredictor, build_vocabulary, cleaned_tokens, reader_spec
from .context import StageContext, Workspace
from .outputs import finish, records

log = logging.getLogger(__name__)

VERSION = 1  # bump when the network or its training changes, so old artifacts are not reused


def _image_features(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """The image stage's pooled features of the current settings (float32), rows checked."""
    image = ws.require("image")
    ws.check_rows(image, ws.registry.get("image"))
    return np.asarray(image["train"], np.float32), np.asarray(image["test"], np.float32)


def network_kwargs(c) -> dict[str, Any]:
    """The :class:`ConcatLSTM` keyword arguments of a ``concat`` section (or a predictor's description)."""
    return {k: c[k] for k in ("hidden", "layers", "bidirectional", "fc_hidden", "dropout", "train_embeddings")}


class ConcatNetwork(Stage):
    name = "concat"
    number = "07"
    title = "concatenation network"
    module = "concat_network"
    section = "concat"
    blocks = ("concat_probs",)
    writes = "out-of-fold probabilities of one CNN-features + caption-LSTM network, its submission"
    summary = "the ResNet + LSTM report's one network + its submission"
    about = ("The ResNet + LSTM report's best model: the photo's frozen CNN features (stage 01's cache) and an LSTM over "
             "its caption (stage 02's cleaning and word vectors) concatenated, two fully connected layers with batch "
             "norm, trained end to end with BCE and `pos_weight` (negatives / positives per label) and Adadelta, one "
             "network per fold. Its out-of-fold probabilities are the block `concat_probs` (add it to `fusion.blocks` "
             "to stack it) and give the submission `output/submission_concat.csv`; `concat.layers` is the report's "
             "LSTM-depth experiment (1 / 2 / 4 / 8 layers: 0.831 / 0.810 / 0.770 / 0.630).")

    def reads(self, settings: Settings, registry) -> tuple[str, ...]:
        return ("image",)

    def spec(self, ws: Workspace) -> dict[str, Any]:
        return reader_spec(ws, VERSION)

    def fit(self, ctx: StageContext) -> Artifact:
        return self._networks(ctx)[0]

    def _networks(self, ctx: StageContext) -> tuple[Artifact, str]:
        def trained() -> Artifact:
            with cpu_threads(ctx.device):
                return train(ctx)

        return self.found_or_computed(ctx, "the networks' probabilities", trained)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Train (or reuse) the network per fold; its submission and metrics."""
        found, state = self._networks(ctx)
        info = dict(found.info)
        history = pd.DataFrame(info.pop("history", []))
        history = history[history["fold"] == 0] if len(history) else history
        extra = {**info, "vectors_used": info["vectors"]["name"], "artifact": str(found.dir), "probabilities": state}
        return finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], np.asarray(found["test_probs"]),
                      history=history, extra=extra)

    def predictor_needs(self, settings: Settings, blocks: Sequence[str]) -> tuple[str, ...]:
        return ("image",)

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "ConcatPredictor":
        art = ws.require("concat")
        ws.check_rows(art, self)
        c = ws.settings.concat
        description = {**network_kwargs(c), "seq_len": c.seq_len, "batch_size": c.batch_size,
                       "image_dim": int(art.info["image_dim"]), "vectors": art.info["vectors"]["name"],
                       "text_version": text.TEXT_VERSION, "mixed_precision": bool(ws.settings.trainer.mixed_precision),
                       "key": art.key}
        vocabulary = text.Vocabulary([str(t) for t in art["vocab"]])
        networks = [ConcatPredictor.network(best_weights(f["run_dir"], ws.models_dir, self), description)
                    for f in art.info["fold_runs"]]
        return ConcatPredictor(blocks, description, vocabulary, networks)


def train(ctx: StageContext) -> Artifact:
    """One network per fold on its fit part (less the selection share, which chooses the epoch): out-of-fold
    probabilities of every training record, test probabilities averaged over the fold networks."""
    c, settings = ctx.settings.concat, ctx.settings
    image_train, image_test = _image_features(ctx)
    train_tokens, test_tokens = cleaned_tokens(ctx)
    vocab, matrix, vectors = build_vocabulary(ctx, train_tokens, test_tokens)
    ids, lengths = vocab.encode(train_tokens, c.seq_len)
    test_ids, test_lengths = vocab.encode(test_tokens, c.seq_len)
    targets = ctx.targets
    spec = ctx.spec()
    run_settings = {"image": ctx.key("image"), "vectors": vectors.identity, "text_version": text.TEXT_VERSION,
                    "version": VERSION, "concat": c.shaping(weights_only=True)}
    precision = training_precision(ctx.device, settings.trainer.mixed_precision)

    def rows(idx: np.ndarray | None, labels: bool = False, **kwargs) -> PairBatches:
        if idx is None:  # the test records
            return PairBatches(image_test, test_ids, test_lengths, None, c.batch_size)
        return PairBatches(image_train[idx], ids[idx], lengths[idx], targets[idx] if labels else None, c.batch_size,
                           **kwargs)

    histories, in_sample = [], {}

    def fold(k, fit_idx, held_idx):
        run_dir = ctx.run_dir("concat", {**run_settings, "fold": [k, len(ctx.folds)]})
        train_idx, select_idx = ctx.selection(k, fit_idx, held_idx)
        torch.manual_seed(settings.trainer.seed + k)
        model = ConcatLSTM(image_train.shape[1], matrix, **network_kwargs(c))
        model.fit_standardisation(image_train[train_idx])
        optimizer = make_optimizer(model, c.optimizer, c.lr, c.weight_decay)
        result = trainer.fit(
            model, rows(train_idx, True, shuffle=True, seed=settings.trainer.seed + k, drop_last=True),
            rows(select_idx, True), targets[select_idx],
            loss_fn=trainer.bce_for(c.pos_weight, 1.0, targets[train_idx]), optimizer=optimizer,
            run_dir=run_dir, epochs=c.epochs, patience=c.patience, grad_clip=c.grad_clip, device=ctx.device,
            precision=precision, resume=ctx.resume, settings={**spec, "fold": k}, name=f"concat fold {k + 1}")
        histories.append(result.history.assign(fold=k))
        if len(ctx.folds) == 1:  # one split: the fit rows get the one network's (in-sample) probabilities
            in_sample["probs"] = trainer.predict(model, rows(np.arange(len(targets))), ctx.device, precision=precision)
        return ({"probs": trainer.predict(model, rows(held_idx), ctx.device, precision=precision)},
                {"test_probs": trainer.predict(model, rows(None), ctx.device, precision=precision)},
                {"best_epoch": result.best_epoch, "run_dir": str(run_dir), "reused": result.reused,
                 "seconds": round(result.seconds, 1), "n_train": len(train_idx), "n_selection": len(select_idx),
                 "network_mb": model_size_mb(model),
                 "parameters_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    cf = cross_fit(ctx.folds, len(ctx.data.train), fold, "concat")
    arrays = {"probs": cf.held["probs"], "test_probs": cf.test["test_probs"], "vocab": np.array(vocab.tokens, dtype=str),
              "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str)}
    fill_in_sample(arrays, in_sample)
    history = pd.concat(histories, ignore_index=True)
    info = {"image_dim": int(image_train.shape[1]), "vectors": vectors.record(), "vocabulary_size": len(vocab),
            "oov": text.oov_report(train_tokens, vocab), "fold_runs": cf.folds,
            "best_epochs": [f["best_epoch"] for f in cf.folds],
            "training_seconds": round(float(history["seconds"].sum()), 1) if len(history) else 0.0,
            "training_reused": all(f["reused"] for f in cf.folds), "run_dir": cf.folds[0]["run_dir"],
            "parameters_trainable": cf.folds[0]["parameters_trainable"], "history": records(history)}
    return ctx.store.save("concat", ctx.key(), spec, arrays, info)


class ConcatPredictor(CaptionPredictor):
    """The image stage's features of new records (``needs``) and their captions, cleaned and encoded with the kept
    vocabulary, through every fold network, averaged as the stage averaged its test rows."""

    stage = "concat"
    part = "concatenation networks"
    needs = ("image",)

    @staticmethod
    def network(state: dict, description: dict[str, Any]) -> ConcatLSTM:
        net = ConcatLSTM(description["image_dim"], np.zeros(tuple(state["embedding.weight"].shape), np.float32),
                         **network_kwargs(description))
        net.load_state_dict(state)
        return net.eval()

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, lengths = self.encode(records)
        batches = PairBatches(given["image"], ids, lengths, None, self.description["batch_size"])
        precision = training_precision(self.device, self.description["mixed_precision"])
        with cpu_threads(self.device):
            return {"concat_probs": fold_mean([trainer.predict(n, batches, self.device, precision=precision)
                                               for n in self.networks])}


ConcatNetwork.predictor_type = ConcatPredictor  # what reads its part of a bundle
