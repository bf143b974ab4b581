"""Stage 04: a fast text block — TF-IDF word and character n-grams with one logistic regression per label.

The captions name most of their photo's objects, so a linear model on n-grams is a strong, cheap reader of them
(the Bi-LSTM's complement: it sees every word, not the first eight lemmas). Trained per fold like every
trainable stage: each training record's probabilities come from the model that did not see it, the test
probabilities are averaged over the fold models. The TF-IDF vocabulary is fitted once on every caption (train
and test: no label is used). The probabilities are the block ``text`` of the fused network.

The fitted vectorisers and every fold's regressions are kept beside the probabilities (artifact ``text_models``,
same key), so a new caption is scored by exactly the models behind the block (:class:`TextPredictor`).
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..io.artifacts import Artifact, MissingArtifact
from ..io.progress import progress
from ..training.crossfit import cross_fit
from .base import BlockPredictor, NewRecords, Stage, fold_mean
from .context import StageContext, Workspace
from .outputs import finish

log = logging.getLogger(__name__)

VERSION = 1
MODELS = "text_models"  # artifact kind of the fitted vectorisers and fold models (same key as the text artifact)


def fit_vectorisers(captions: list[str], cfg_text) -> tuple[list, Any]:
    """TF-IDF vectorisers fitted on ``captions`` (word n-grams, and character n-grams within word boundaries), and
    the sparse rows of those captions as fitting gives them (a scipy CSR matrix)."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorisers = [TfidfVectorizer(ngram_range=tuple(cfg_text.word_ngrams), min_df=cfg_text.min_df, sublinear_tf=True,
                                   lowercase=True, strip_accents="unicode")]
    if cfg_text.char_ngrams:
        vectorisers.append(TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(cfg_text.char_ngrams),
                                           min_df=cfg_text.min_df, sublinear_tf=True, lowercase=True,
                                           strip_accents="unicode"))
    return vectorisers, hstack([v.fit_transform(captions) for v in vectorisers]).tocsr()


def vectorise(captions: list[str], cfg_text):
    """Sparse TF-IDF rows (a scipy CSR matrix) of ``captions``, the vectorisers fitted on them."""
    return fit_vectorisers(captions, cfg_text)[1]


def transform(captions: list[str], vectorisers: list):
    """Sparse TF-IDF rows (a scipy CSR matrix) of ``captions`` under fitted vectorisers; a caption's row does not
    depend on the others (it can differ from the fitted rows in the last bit of a float64)."""
    from scipy.sparse import hstack

    return hstack([v.transform(captions) for v in vectorisers]).tocsr()


def fit_models(x_fit, y_fit: np.ndarray, c: float) -> list:
    """One logistic regression per label on ``x_fit``; a label absent from (or everywhere in) the fit part is its
    constant 0 or 1 instead."""
    from sklearn.linear_model import LogisticRegression

    models: list = []
    for j in range(y_fit.shape[1]):
        if y_fit[:, j].min() == y_fit[:, j].max():
            models.append(float(y_fit[0, j]))
        else:
            models.append(LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x_fit, y_fit[:, j]))
    return models


def fit_predict(x_fit, y_fit: np.ndarray, x_pred: list, c: float) -> list[np.ndarray]:
    """One logistic regression per label on ``x_fit``; probabilities of each matrix in ``x_pred``."""
    models = fit_models(x_fit, y_fit, c)
    return [predict_models(models, m) for m in x_pred]


def predict_models(models: list, x) -> np.ndarray:
    """Probabilities (float32, one column per label) of the rows of ``x`` under one fold's models."""
    out = np.zeros((x.shape[0], len(models)), dtype=np.float32)
    for j, model in enumerate(models):
        out[:, j] = model if isinstance(model, float) else model.predict_proba(x)[:, 1]
    return out


@dataclass
class TextModels:
    """What scores a caption: the fitted vectorisers and each fold's per-label models."""

    vectorisers: list
    folds: list[list]

    def fold_probs(self, captions: list[str]) -> list[np.ndarray]:
        """Each fold's probabilities of ``captions`` (the stage averages them over the folds for test records)."""
        x = transform(captions, self.vectorisers)
        return [predict_models(models, x) for models in self.folds]

    def to_bytes(self) -> bytes:
        import sklearn

        return pickle.dumps({"vectorisers": self.vectorisers, "folds": self.folds, "sklearn": sklearn.__version__},
                            protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "TextModels":
        """Models kept by this project (a pickle: load only files you made or trust)."""
        import warnings

        with warnings.catch_warnings():  # another scikit-learn version: the models are plain linear ones
            warnings.filterwarnings("ignore", message=".*Trying to unpickle estimator.*")
            state = pickle.loads(blob)
        return cls(state["vectorisers"], state["folds"])


def load_models(store, key: str):
    """The kept vectorisers and fold models of the text artifact ``key``, or None."""
    found = store.load(MODELS, key)
    return None if found is None else TextModels.from_bytes(np.asarray(found["models"]).tobytes())


class TextNgrams(Stage):
    name = "text"
    number = "04"
    title = "text n-grams"
    module = "text_ngrams"
    section = "text"
    blocks = ("text",)
    writes = "out-of-fold TF-IDF + logistic-regression probabilities, text-only submission"
    summary = "TF-IDF n-grams + logistic regression, the out-of-fold `text` block"
    about = ("TF-IDF word and character n-grams of each caption with one logistic regression per label, trained per "
             "fold: out-of-fold probabilities for every training record (the fused network's `text` block) and the "
             "text-only submission `output/submission_text.csv`. Seconds on a CPU.")

    def spec(self, ws: Workspace) -> dict[str, Any]:
        # no epochs to choose: split.selection_fraction does not shape the n-gram models
        return {"version": VERSION, "common": {"split": ws.settings.split.shaping("folds")}}

    def fit(self, ctx: StageContext) -> Artifact:
        return self._probabilities(ctx)[0]

    def _probabilities(self, ctx: StageContext) -> tuple[Artifact, str]:
        """Out-of-fold TF-IDF + logistic-regression probabilities and the fold models behind them."""
        found = ctx.store.load("text", ctx.key())
        if found is not None and ctx.store.load(MODELS, ctx.key(), mmap=True) is not None:
            log.info(f"[text] reusing the out-of-fold probabilities {found.dir}")
            return found, "reused"
        started = time.time()
        train_captions, test_captions = ctx.data.train["Caption"].tolist(), ctx.data.test["Caption"].tolist()
        vectorisers, x = fit_vectorisers(train_captions + test_captions, ctx.settings.text)
        x_train = x[: len(train_captions)]  # the rows the models are fitted on
        x_test = transform(test_captions, vectorisers)  # as the predictor computes a new caption's row
        log.info(f"[text] {x_train.shape[1]:,} n-gram features from {len(train_captions) + len(test_captions):,} "
                 "captions" + ("" if found is None else f"; fitting the fold models again to keep them beside {found.dir}"))
        bar = progress(total=len(ctx.folds), desc="text folds", unit="fold")
        fold_models = []

        def fold(k, fit_idx, held_idx):
            models = fit_models(x_train[fit_idx], ctx.targets[fit_idx], ctx.settings.text.C)
            fold_models.append(models)
            bar.update()
            return {"probs": predict_models(models, x_train[held_idx])}, {"test_probs": predict_models(models, x_test)}, {}

        cf = cross_fit(ctx.folds, len(ctx.data.train), fold, "text")
        bar.close()
        if found is None:
            found = ctx.store.save("text", ctx.key(), ctx.spec(), {
                "probs": cf.held["probs"], "test_probs": cf.test["test_probs"],
                "train_ids": ctx.data.train["ImageID"].to_numpy(str), "test_ids": ctx.data.test["ImageID"].to_numpy(str)},
                {"features": int(x_train.shape[1]), "seconds": round(time.time() - started, 1)})
            state = "computed"
        else:  # an artifact made before the models were kept: they must reproduce its probabilities
            gap = max(float(np.abs(cf.held["probs"] - np.asarray(found["probs"]))[ctx.eval_idx].max()),
                      float(np.abs(cf.test["test_probs"] - np.asarray(found["test_probs"])).max()))
            if gap > 1e-6:
                raise ValueError(f"{found.dir}: fold models fitted again give probabilities up to {gap:.2g} away "
                                 f"from the kept ones; delete that folder and run {self.script} again")
            log.info(f"[text] the fold models reproduce the kept probabilities (largest difference {gap:.1g})")
            state = "reused"
        blob = TextModels(vectorisers, fold_models).to_bytes()
        ctx.store.save(MODELS, ctx.key(), ctx.spec(), {"models": np.frombuffer(blob, dtype=np.uint8)},
                       {"what": "fitted TF-IDF vectorisers and each fold's logistic regressions (pickle)",
                        "mb": round(len(blob) / 2**20, 1)})
        return found, state

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Out-of-fold TF-IDF + logistic-regression probabilities (an artifact), the text-only submission, metrics."""
        found, state = self._probabilities(ctx)
        if len(ctx.folds) == 1:
            log.info("[text] note: with split.folds: 1 the 'text' block has no row for the fit part; the fused "
                     "network needs split.folds > 1 to read it")
        t = ctx.settings.text
        extra = {"artifact": str(found.dir), "probabilities": state, **found.info,
                 "model": f"TF-IDF word {tuple(t.word_ngrams)} + char {tuple(t.char_ngrams or ())} n-grams, "
                          f"logistic regression per label (C={t.C})"}
        return finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], found["test_probs"], extra=extra)

    def block_arrays(self, ws: Workspace, block: str) -> tuple[np.ndarray, np.ndarray]:
        found = ws.require("text")
        return found["probs"], found["test_probs"]

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "TextPredictor":
        kept = ws.require("text")
        models = load_models(ws.store, kept.key)
        if models is None:
            raise MissingArtifact(f"{ws.store.dir(MODELS, kept.key)}: the n-gram fold models were not kept; "
                                  f"run {self.hint} (it keeps them, reproducing the kept probabilities)")
        return TextPredictor(blocks, {"folds": len(models.folds), "key": kept.key}, models)


class TextPredictor(BlockPredictor):
    """Captions through the fitted vectorisers and every fold's regressions, averaged over the folds."""

    stage = "text"

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], models: TextModels):
        super().__init__(blocks)
        self.description, self.models = description, models

    @property
    def folds(self) -> int | None:
        return len(self.models.folds)

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"text": fold_mean(self.models.fold_probs(list(records.captions)))}

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        k = len(self.models.folds)
        return dict(self.description), {"models.pkl": (f"n-gram vectorisers and logistic regressions ({k} folds)",
                                                       self.models.to_bytes())}

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "TextPredictor":
        return cls(blocks, description, TextModels.from_bytes(read("models.pkl")))


TextNgrams.predictor_type = TextPredictor  # what reads its part of a bundle
