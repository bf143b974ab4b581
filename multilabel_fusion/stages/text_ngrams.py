"""Stage 07: a fast text block — TF-IDF word and character n-grams with one logistic regression per label.

The captions name most of their photo's objects, so a linear model on n-grams is a strong, cheap reader of them
(the Bi-LSTM's complement: it sees every word, not the first eight lemmas). Trained per fold like every
trainable stage: each training record's probabilities come from the model that did not see it, the test
probabilities are averaged over the fold models. The TF-IDF vocabulary is fitted once on every caption (train
and test: no label is used). The probabilities are the block ``text`` of the fused network.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import Config
from . import base

VERSION = 1


def artifact_spec(cfg: Config) -> dict[str, Any]:
    return {"version": VERSION, "common": {"split": cfg.split.to_dict()}}


def vectorise(captions: list[str], cfg_text):
    """Sparse TF-IDF rows (a scipy CSR matrix): word n-grams and character n-grams (within word boundaries)."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    words = TfidfVectorizer(ngram_range=tuple(cfg_text.word_ngrams), min_df=cfg_text.min_df, sublinear_tf=True,
                            lowercase=True, strip_accents="unicode")
    parts = [words.fit_transform(captions)]
    if cfg_text.char_ngrams:
        chars = TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(cfg_text.char_ngrams), min_df=cfg_text.min_df,
                                sublinear_tf=True, lowercase=True, strip_accents="unicode")
        parts.append(chars.fit_transform(captions))
    return hstack(parts).tocsr()


def fit_predict(x_fit, y_fit: np.ndarray, x_pred: list, c: float) -> list[np.ndarray]:
    """One logistic regression per label on ``x_fit``; probabilities of each matrix in ``x_pred``."""
    from sklearn.linear_model import LogisticRegression

    out = [np.zeros((m.shape[0], y_fit.shape[1]), dtype=np.float32) for m in x_pred]
    for j in range(y_fit.shape[1]):
        if y_fit[:, j].min() == y_fit[:, j].max():  # a label absent from (or everywhere in) the fit part
            for o in out:
                o[:, j] = float(y_fit[0, j])
            continue
        model = LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x_fit, y_fit[:, j])
        for o, m in zip(out, x_pred):
            o[:, j] = model.predict_proba(m)[:, 1]
    return out


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False) -> dict[str, Any]:
    """Out-of-fold TF-IDF + logistic-regression probabilities (an artifact), the text-only submission, metrics."""
    ctx = base.prepare(cfg, "text", demo_mode)
    found = ctx.store.load("text", ctx.key())
    if found is None:
        started = time.time()
        captions = ctx.data.train["Caption"].tolist() + ctx.data.test["Caption"].tolist()
        x = vectorise(captions, cfg.text)
        x_train, x_test = x[: len(ctx.data.train)], x[len(ctx.data.train):]
        print(f"[text] {x.shape[1]:,} n-gram features from {len(captions):,} captions")
        bar = tqdm(total=len(ctx.folds), desc="text folds", unit="fold")

        def fold(k, fit_idx, held_idx):
            held, test = fit_predict(x_train[fit_idx], ctx.targets[fit_idx], [x_train[held_idx], x_test],
                                     cfg.text.C)
            bar.update()
            return {"probs": held}, {"test_probs": test}, {}

        cf = base.cross_fit(ctx, fold)
        bar.close()
        found = ctx.store.save("text", ctx.key(), ctx.spec(), {
            "probs": cf.held["probs"], "test_probs": cf.test["test_probs"],
            "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str)},
            {"features": int(x.shape[1]), "seconds": round(time.time() - started, 1)})
        state = "computed"
    else:
        print(f"[text] reusing the out-of-fold probabilities {found.dir}")
        state = "reused"
    if len(ctx.folds) == 1:
        print("[text] note: with split.folds: 1 the 'text' block has no row for the fit part; the fused network "
              "needs split.folds > 1 to read it")
    extra = {"artifact": str(found.dir), "probabilities": state, **found.info,
             "model": f"TF-IDF word {tuple(cfg.text.word_ngrams)} + char {tuple(cfg.text.char_ngrams or ())} n-grams, "
                      f"logistic regression per label (C={cfg.text.C})"}
    return base.finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], found["test_probs"], extra=extra)


def block_arrays(ctx: base.StageContext, name: str) -> tuple[np.ndarray, np.ndarray]:
    found = ctx.require("text")
    return found["probs"], found["test_probs"]

