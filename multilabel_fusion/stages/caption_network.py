"""Stage 02: the caption network (published: Bi-LSTM over pretrained word vectors).

Caption -> cleaned lemmas (:mod:`multilabel_fusion.data.text`) -> first ``seq_len`` token ids -> word vectors -> one
bidirectional LSTM layer (``hidden`` units per direction) -> the caption feature, which is the
concatenation of the forward and backward final hidden states (2 x 50 = 100-d; padding is
packed away, so the final states are those of each caption's last real word) -> dropout ->
linear layer to the 18 classes. Trained with the shared trainer (weighted BCE, Adam, StepLR,
gradient clipping, early stopping on validation mean-F1). The 100-d features of every train
and test record are an artifact (keyed by every caption setting, the vectors' identity, the split and
the seed) that the fused network (stage 03) reads. The vocabulary (the token of each embedding row) is kept beside it
(artifact ``caption_vocabulary``, same key), so a new caption is encoded exactly as the fold networks were trained.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import assets, registry
from ..config import Config
from ..data import text
from ..engine import trainer
from ..engine.precision import training_precision
from ..networks.caption_lstm import (FEATURE_DESCRIPTION, Batches, CaptionBiLSTM, cpu_threads, extract_features,
                                     make_optimizer)
from . import base

HOW_LONG = ("epochs", "patience")  # caption settings that only say how long to train
VOCABULARY = "caption_vocabulary"  # artifact kind of the vocabulary (same key as the caption artifact)


def artifact_spec(cfg: Config) -> dict[str, Any]:
    """Every caption setting, the identity of the word vectors, the text-cleaning version, split and seed."""
    vectors = assets.word_vectors(cfg.caption, cfg.path("models") / "vectors")
    return {"assets": {"vectors": {"name": vectors.name, "identity": vectors.identity}},
            "version": text.TEXT_VERSION, "common": registry.common_settings(cfg)}


def cleaned_tokens(ctx: base.StageContext) -> tuple[list[list[str]], list[list[str]]]:
    """Cleaned train and test captions, kept as an artifact: loading WordNet alone costs seconds per run."""
    key = registry.digest({"tokens": text.TEXT_VERSION, "data": ctx.fingerprint})
    found = ctx.store.load("caption_tokens", key)
    if found is None:
        train = text.clean_captions(ctx.data.train["Caption"], desc="cleaning train captions")
        test = text.clean_captions(ctx.data.test["Caption"], desc="cleaning test captions")
        # one string per part, captions on lines and tokens space-separated (tokens hold no whitespace)
        found = ctx.store.save("caption_tokens", key, {"text_version": text.TEXT_VERSION, "data": ctx.fingerprint},
                               {part: np.array(["\n".join(" ".join(t) for t in tokens)])
                                for part, tokens in (("train", train), ("test", test))},
                               {"what": "cleaned caption tokens"})
    parts = [[line.split() for line in str(found[part][0]).split("\n")] for part in ("train", "test")]
    if len(parts[0]) != len(ctx.data.train) or len(parts[1]) != len(ctx.data.test):
        raise RuntimeError(f"{found.dir}: token artifact does not match the data; delete it and run again")
    return parts[0], parts[1]


def build_vocabulary(ctx: base.StageContext, train_tokens, test_tokens):
    """The vocabulary of every cleaned caption word with a vector, its embedding rows, and the vectors' asset."""
    vectors_asset = assets.word_vectors(ctx.cfg.caption, ctx.models_dir / "vectors")
    vocab, matrix = text.build_vocabulary(train_tokens + test_tokens, assets.load_vectors(vectors_asset))
    return vocab, matrix, vectors_asset


def keep_vocabulary(ctx: base.StageContext, vocab: text.Vocabulary) -> None:
    ctx.store.save(VOCABULARY, ctx.key(), ctx.spec(), {"tokens": np.array(vocab.tokens, dtype=str)},
                   {"what": "the token of each row of the fold networks' embeddings"})


def load_vocabulary(store, key: str) -> text.Vocabulary | None:
    """The kept vocabulary of the caption artifact ``key``, or None."""
    found = store.load(VOCABULARY, key)
    return None if found is None else text.Vocabulary([str(t) for t in found["tokens"]])


def train_and_extract(ctx: base.StageContext, resume: bool) -> dict[str, Any]:
    """Clean the captions, build the vocabulary, train (or continue) one Bi-LSTM per fold, and write the artifact:
    out-of-fold features and probabilities of every training record (each from the network that did not see
    it), and those of the test records averaged over the fold networks."""
    c, cfg = ctx.cfg.caption, ctx.cfg
    t_text = time.time()
    train_tokens, test_tokens = cleaned_tokens(ctx)
    vocab, matrix, vectors_asset = build_vocabulary(ctx, train_tokens, test_tokens)  # only the corpus rows are kept
    oov = text.oov_report(train_tokens, vocab)
    train_ids, train_len = vocab.encode(train_tokens, c.seq_len)
    test_ids, test_len = vocab.encode(test_tokens, c.seq_len)
    text_seconds = time.time() - t_text
    print(f"caption vocabulary: {len(vocab) - 2:,} words with vectors + <pad> + <oov>; "
          f"{oov['oov_words']} of the {oov['vocabulary_words']:,} training-caption words have no vector "
          f"({oov['oov_tokens']} occurrences) -> the learned <oov> vector")

    spec = ctx.spec()
    shaping = {**spec, "settings": {"caption": {k: v for k, v in spec["settings"]["caption"].items()
                                                if k not in HOW_LONG}}}
    precision = training_precision(ctx.device, cfg.trainer.mixed_precision)
    all_train = Batches(train_ids, train_len, None, c.batch_size)
    test_batches = Batches(test_ids, test_len, None, c.batch_size)
    histories, in_sample = [], {}

    def fold(k, fit_idx, held_idx):
        """One Bi-LSTM trained on the fold's fit part: features and probabilities of its held-out rows and the test."""
        run_dir = ctx.run_dir("caption", {**shaping, "fold": [k, len(ctx.folds)]})
        torch.manual_seed(cfg.trainer.seed + k)
        model = CaptionBiLSTM(matrix, c.hidden, c.dropout, train_embeddings=c.train_embeddings)
        targets = ctx.targets
        train_idx, select_idx = ctx.selection(k, fit_idx, held_idx)
        train_batches = Batches(train_ids[train_idx], train_len[train_idx], targets[train_idx], c.batch_size,
                                shuffle=True, seed=cfg.trainer.seed + k)
        select_batches = Batches(train_ids[select_idx], train_len[select_idx], targets[select_idx], c.batch_size)
        optimizer = make_optimizer(model, c.lr, c.weight_decay)
        result = trainer.fit(
            model, train_batches, select_batches, targets[select_idx],
            loss_fn=trainer.weighted_bce(c.label1_weight), optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=c.step_gamma),
            run_dir=run_dir, epochs=c.epochs, patience=c.patience, grad_clip=c.grad_clip, device=ctx.device,
            precision=precision, resume=resume, settings={**spec, "fold": k}, name=f"caption fold {k + 1}",
        )
        histories.append(result.history.assign(fold=k))
        held_only = Batches(train_ids[held_idx], train_len[held_idx], None, c.batch_size)
        if len(ctx.folds) == 1:  # one split: the fit rows get the (in-sample) features of the one network
            in_sample["train"] = extract_features(model, all_train, ctx.device)
            in_sample["probs"] = trainer.predict(model, all_train, ctx.device, precision=precision)
        return ({"train": extract_features(model, held_only, ctx.device),
                 "probs": trainer.predict(model, held_only, ctx.device, precision=precision)},
                {"test": extract_features(model, test_batches, ctx.device),
                 "test_probs": trainer.predict(model, test_batches, ctx.device, precision=precision)},
                {"best_epoch": result.best_epoch, "run_dir": str(run_dir), "reused": result.reused,
                 "checkpoint_mb": round((run_dir / "best.pt").stat().st_size / 2**20, 2),
                 "feature_dim": model.feature_dim,
                 "parameters_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    t_train = time.time()
    with cpu_threads(ctx.device):
        cf = base.cross_fit(ctx, fold)
    arrays = {**cf.held, **cf.test, "train_ids": ctx.data.train["ImageID"].to_numpy(str),
              "test_ids": ctx.data.test["ImageID"].to_numpy(str)}
    if in_sample:
        for name, values in in_sample.items():
            missing = np.isnan(arrays[name]).any(1)
            arrays[name][missing] = values[missing]
    history = pd.concat(histories, ignore_index=True)
    epoch_seconds = history["seconds"] if len(history) else []
    info = {
        "feature": {"dim": cf.folds[0]["feature_dim"], "what": FEATURE_DESCRIPTION,
                    "out_of_fold": len(ctx.folds) > 1, "test": "mean over the fold networks"},
        "vectors": vectors_asset.record(),
        "oov": {**oov, "handling": "every word without a pretrained vector maps to one shared <oov> row, a "
                                   "learned vector (trained even when the word vectors are frozen); an empty "
                                   "caption is one <oov> token; padding is packed away (zero row, never read)"},
        "vocabulary_size": len(vocab),
        "text_preprocessing": "casefold; punctuation and digits -> spaces; wordpunct_tokenize; NLTK English stop "
                              f"words removed; WordNet lemmas (noun); first {c.seq_len} tokens",
        "train_embeddings": bool(c.train_embeddings),
        "parameters_trainable": cf.folds[0]["parameters_trainable"],
        "fold_runs": cf.folds,
        "timings": {
            "seconds_per_epoch": round(float(np.mean(epoch_seconds)), 3) if len(history) else None,
            "training_seconds": round(float(np.sum(epoch_seconds)), 1),
            "epochs_run": int(len(history)),  # over all folds
            "best_epochs": [f["best_epoch"] for f in cf.folds],
            "cross_fit_seconds": round(time.time() - t_train, 1),
            "text_and_vectors_seconds": round(text_seconds, 2),
        },
        "training_reused": all(f["reused"] for f in cf.folds),
        "run_dir": cf.folds[0]["run_dir"],
        "checkpoint_mb": cf.folds[0]["checkpoint_mb"],
        "history": base._records(history),
    }
    keep_vocabulary(ctx, vocab)
    return ctx.store.save("caption", ctx.key(), spec, arrays, info)


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    """Train (or reuse) the caption network, keep its features, write its submission and metrics."""
    ctx = base.prepare(cfg, "caption", demo_mode)
    found = ctx.store.load("caption", ctx.key())
    if found is None:
        found = train_and_extract(ctx, resume)
        state = "computed"
    else:
        print(f"[caption] reusing the features {found.dir}")
        state = "reused"
        if ctx.store.load(VOCABULARY, ctx.key(), mmap=True) is None:  # made before the vocabulary was kept
            vocab, _, _ = build_vocabulary(ctx, *cleaned_tokens(ctx))
            if len(vocab) != found.info["vocabulary_size"]:
                raise ValueError(f"{found.dir}: the vocabulary built again has {len(vocab)} rows, the networks "
                                 f"{found.info['vocabulary_size']}; delete that folder and run stage 02 again")
            keep_vocabulary(ctx, vocab)
            print(f"[caption] kept the vocabulary of those networks ({len(vocab):,} rows)")
    info = dict(found.info)
    history = pd.DataFrame(info.pop("history", []))
    extra = {**info, "vectors_used": info["vectors"]["name"], "artifact": str(found.dir), "features": state}
    history = history[history["fold"] == 0] if len(history) else history
    return base.finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], found["test_probs"], history=history,
                       extra=extra)
