"""Stage 06: the image–caption joint embedding (two-branch network, triplet ranking loss) and retrieval.

Each photo's cached CNN features (stage 01) and its caption (the caption stage's cleaning, the same word
vectors) are mapped into one space where a matching pair lies close (:mod:`multilabel_fusion.networks.joint_embedding`).
Per fold, one network is trained on the fold's fit part (minus ``selection_size`` pairs that choose the epoch) and
measured by retrieval on the held-out fold: R@1/5/10, median and mean rank in both directions, on 1,000-pair sets
(the 1K protocol, averaged) and on the whole held-out fold. With ``joint_embedding.comparisons: true``, a strategy ×
encoder table (first fold) compares the negative-mining strategies and the two caption encoders, and a learning
curve trains the stage's configuration on shares of its pairs.

What the fused network gets (out-of-fold rows; test rows averaged over the fold networks): block
``joint_embedding`` (73 columns: zero-shot label scores of the image and of the caption, i.e. similarity to the
embedded label prompts standardised per label; the labels of the ``knn`` fit-part captions nearest to the image
and of the ``knn`` fit-part images nearest to the caption; the similarity of the image to its own caption) and
block ``joint_embedding_probs`` (18 columns: the two neighbour votes averaged, the stage's submission). Only
derived scores are shared, not the embedding itself: each fold network has its own space, so raw embeddings from
different folds would not line up. The first fold's network embeds every train and test image and caption for
retrieval (:class:`.joint_embedding_search.Retriever`, ``python -m multilabel_fusion.retrieve``); :class:`JointEmbeddingPredictor` computes
both blocks for new records.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import labels as L
from ..data import text
from ..evaluation import figures as plots
from ..evaluation.metrics import mean_f1
from ..evaluation.thresholds import decide, tune_per_class
from ..io.artifacts import Artifact
from ..io.assets import Asset, load_vectors
from ..io.atomic import save_torch
from ..networks import joint_embedding as J
from ..networks.device import cpu_threads
from ..networks.precision import training_precision
from ..settings import Settings
from ..training import trainer
from .base import BlockPredictor, NewRecords, Stage, best_weights, fold_mean, load_tensors, tensor_bytes
from .caption import cleaned_tokens, reader_spec
from .context import StageContext, Workspace
from .joint_embedding_search import MODEL_FILE, Retriever, _image_block, image_features
from .outputs import finish, records

log = logging.getLogger(__name__)

VERSION = 1  # bump when training or the block's columns change, so old artifacts are not reused
BLOCK_PARTS = ("image_zero_shot", "caption_zero_shot", "image_to_captions_knn", "caption_to_images_knn")
EXAMPLE_QUERY = "a dog asleep on a couch"

#: What the stage's notebook shows after its results: a search by sentence and by photo.
RETRIEVE_CELL = '''\
from IPython.display import Image as ShowImage

from multilabel_fusion.retrieve import Retriever

retriever = Retriever.open(cfg, IS_DEMO)
QUERY = "a dog asleep on a couch"  # any sentence
hits, picture = retriever.by_text(QUERY, top=8)
for hit in hits:
    print(hit.describe())
display(ShowImage(filename=str(picture)))
PHOTO = sorted((data_dir / "data").glob("*.jpg"))[0]  # or the path of any photo
hits, picture = retriever.by_image(PHOTO, top=8)
display(ShowImage(filename=str(picture)))
'''


class JointEmbedding(Stage):
    name = "joint_embedding"
    number = "06"
    title = "joint embedding"
    module = "joint_embedding"
    section = "joint_embedding"
    blocks = ("joint_embedding", "joint_embedding_probs")
    writes = "image-caption joint embedding, retrieval, zero-shot and neighbour label scores"
    summary = "image-caption joint embedding, retrieval of photos and captions + its blocks"
    about = ("A two-branch network maps each photo's CNN features and its caption into one space where a matching pair "
             "lies close (bi-directional triplet ranking loss, negatives mined in the mini-batch), one network per "
             "fold, measured by retrieval: R@1/5/10 in both directions on 1,000-pair sets of the held-out folds. It "
             "gives the fused network the `joint_embedding` blocks (zero-shot and nearest-neighbour label scores) and "
             "a submission, and lets you search the data: `python3 -m multilabel_fusion.retrieve --text \"a dog asleep "
             "on a couch\"` or `--image PATH`. With `joint_embedding.comparisons=true` it also trains the table of "
             "mining strategies x caption encoders.")
    notebook_cells = (("## Search the data\nType a sentence to find the photos that match it, or give a photo (a file "
                       "of the data or any other) to find the captions that match it, as "
                       "`python3 -m multilabel_fusion.retrieve --text ...` / `--image PATH` does.", RETRIEVE_CELL),)

    def reads(self, settings: Settings, registry) -> tuple[str, ...]:
        return ("image",)

    def spec(self, ws: Workspace) -> dict[str, Any]:
        return reader_spec(ws, VERSION)

    # ------------------------------------------------------------------------------------------- the work
    def fit(self, ctx: StageContext) -> Artifact:
        """One network per fold: the blocks, retrieval measured per fold, the first fold's network for retrieval."""
        with cpu_threads(ctx.device):  # one thread: measured 4-10x faster per batch than two on a busy 2-core CPU
            return self._embedding(ctx)[0]

    def _embedding(self, ctx: StageContext) -> tuple[Artifact, str, "Inputs | None"]:
        """The artifact, whether it was computed now, and the inputs if they were loaded for it."""
        found = ctx.store.load("joint_embedding", ctx.key(), mmap=True)
        if found is not None:
            log.info(f"[joint_embedding] reusing {found.dir}")
            return found, "reused", None
        inp = load_inputs(ctx)
        return compute(ctx, inp), "computed", inp

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Train (or reuse) the joint embedding per fold, with ``comparisons`` the strategy × encoder table and the
        learning curve; the block, the retrieval figures, the submission and the metrics."""
        je = ctx.settings.joint_embedding
        t0 = time.time()
        comparison, compared, curve = [], {}, []
        with cpu_threads(ctx.device):
            found, state, inp = self._embedding(ctx)
            if je.comparisons and je.compare_strategies and je.compare_encoders:
                inp = inp or load_inputs(ctx)
                comparison, compared = compare(ctx, inp)
            if je.comparisons and je.learning_curve:
                inp = inp or load_inputs(ctx)
                curve = learning_curve(ctx, inp)
        info = dict(found.info)
        history = pd.DataFrame(info.pop("history", []))
        history = history[history["fold"] == 0] if len(history) else history
        figures_dir = ctx.output_dir / "figures"
        figures = {"recall_per_epoch": plots.retrieval_recall(history, compared,
                                                              figures_dir / "joint_embedding_recall.png",
                                                              f"joint embedding ({je.encoder}, {je.strategy})")}
        if comparison:
            figures["comparison"] = plots.retrieval_comparison(comparison,
                                                               figures_dir / "joint_embedding_comparison.png")
        finder = Retriever(ctx, found)
        _, figures["retrieval_text_query"] = finder.by_text(EXAMPLE_QUERY,
                                                            out=figures_dir / "joint_embedding_text_query.png")
        held = ctx.val_idx[0]
        _, figures["retrieval_image_query"] = finder.by_image(
            ctx.data.image_paths("train")[held], features=np.asarray(image_features(ctx)[0][held]),
            out=figures_dir / "joint_embedding_image_query.png")
        extra = {**info, "artifact": str(found.dir), "embedding": state, "comparison": comparison,
                 "learning_curve": curve, "settings": je.to_dict(), "stage_seconds": round(time.time() - t0, 1),
                 "history": records(history.drop(columns=["val_mean_f1", "val_loss"], errors="ignore"))}
        metrics = finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], np.asarray(found["test_probs"]),
                         extra=extra, extra_figures=figures)
        r = metrics["retrieval"]["protocol_1k"]
        log.info(f"[joint_embedding] 1K protocol ({metrics['retrieval']['sets_1k']} sets): image->caption R@1/5/10 "
                 f"{r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f}, caption->image "
                 f"{r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f}")
        return metrics

    # ------------------------------------------------------------------------------------------- new records
    def predictor_needs(self, settings: Settings, blocks: Sequence[str]) -> tuple[str, ...]:
        """The image features the networks read (pooled, or every backbone stage's: ``image_features``)."""
        return (_image_block(settings.joint_embedding.image_features),)

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "JointEmbeddingPredictor":
        art = ws.require("joint_embedding")
        ws.check_rows(art, self)
        je = ws.settings.joint_embedding
        image = ws.require("image")
        ws.check_rows(image, ws.registry.get("image"))
        part = "train" if je.image_features == "pooled" else "train_depths"
        vocab = text.Vocabulary([str(t) for t in art["vocab"]])
        ids, lengths = vocab.encode(cleaned_tokens(ws)[0], je.seq_len)
        prompt_ids, prompt_len = vocab.encode(prompt_words(je), je.seq_len)
        states = [best_weights(f["run_dir"], ws.models_dir, self) for f in art.info["retrieval"]["per_fold"]]
        matrix = _text_rows(states[0], je.encoder)
        description = {"image_dim": int(art.info["image_dim"]), "vocab_rows": int(matrix.shape[0]),
                       "vector_dim": int(matrix.shape[1]), "kwargs": model_kwargs(je, je.encoder),
                       "seq_len": je.seq_len, "image_features": je.image_features, "knn": je.knn,
                       "networks": len(states), "key": art.key}
        gallery = {"image": torch.from_numpy(np.array(image[part])), "ids": torch.from_numpy(ids.astype(np.int32)),
                   "lengths": torch.from_numpy(lengths.astype(np.int32)),
                   "labels": torch.from_numpy(ws.targets.astype(np.uint8)),
                   "prompt_ids": torch.from_numpy(prompt_ids.astype(np.int32)),
                   "prompt_lengths": torch.from_numpy(prompt_len.astype(np.int32)),
                   **{f"fit_{k}": torch.from_numpy(np.asarray(fit, dtype=np.int64))
                      for k, (fit, _) in enumerate(ws.folds)}}
        return JointEmbeddingPredictor(blocks, description, [_network(s, description) for s in states], vocab, gallery)


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
    vectors: Asset
    oov: dict[str, Any]


def prompt_words(je) -> list[list[str]]:
    """The cleaned words of the zero-shot label prompts (``joint_embedding.prompt`` of each label name)."""
    return text.clean_captions([je.prompt.format(name) for name in L.names()], desc=None)


def load_inputs(ctx: StageContext) -> Inputs:
    je = ctx.settings.joint_embedding
    image_train, image_test = image_features(ctx)
    train_tokens, test_tokens = cleaned_tokens(ctx)
    prompts = prompt_words(je)
    asset = ctx.assets.word_vectors(ctx.settings.caption, ctx.models_dir / "vectors")
    vectors = load_vectors(asset)
    vocab, matrix = text.build_vocabulary(train_tokens + test_tokens + prompts, vectors)
    del vectors
    ids_train, len_train = vocab.encode(train_tokens, je.seq_len)
    ids_test, len_test = vocab.encode(test_tokens, je.seq_len)
    prompt_ids, prompt_len = vocab.encode(prompts, je.seq_len)
    return Inputs(image_train, image_test, ids_train, len_train, ids_test, len_test, vocab, matrix, prompt_ids,
                  prompt_len, [je.prompt.format(name) for name in L.names()], ctx.key("image"), asset,
                  text.oov_report(train_tokens, vocab))


# ------------------------------------------------------------------------------------------------ training


def model_kwargs(je, encoder: str) -> dict[str, Any]:
    return {"encoder": encoder, "embed_dim": je.embed_dim, "hidden": je.hidden, "layers": je.layers,
            "dropout": je.dropout, "rnn_hidden": je.rnn_hidden, "train_embeddings": je.train_embeddings}


def split_selection(ctx: StageContext, fold: int, fit_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, selection rows) of a fold's fit part: the selection pairs choose the epoch, never trained on."""
    n_sel = min(ctx.settings.joint_embedding.selection_size, max(len(fit_idx) // 5, 2))
    rng = np.random.default_rng(ctx.settings.split.seed + 1000 + fold)
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


def train_run(ctx: StageContext, inp: Inputs, fold: int, fit_idx: np.ndarray, *, encoder: str, strategy: str,
              fraction: float = 1.0, test_pairs: bool | None = None) -> Run:
    """Train (or reuse, or resume) one joint embedding on a fold's fit part with the shared trainer; the epoch is
    chosen by the R-sum of the fold's selection pairs. ``fraction`` < 1: a random share of the training pairs
    (the learning curve); ``test_pairs`` overrides ``train_on_test_pairs``."""
    je, settings = ctx.settings.joint_embedding, ctx.settings
    train_rows, sel_rows = split_selection(ctx, fold, fit_idx)
    shaping = je.shaping(weights_only=True)
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
        keep = np.sort(np.random.default_rng(settings.split.seed + 2000 + fold).permutation(len(feats))
                       [: max(int(round(fraction * len(feats))), je.batch_size)])
        feats, ids, lengths, labels = feats[keep], ids[keep], lengths[keep], labels[keep]
        shaping["fraction"] = fraction
    run_settings = {"image": inp.image_key, "vectors": inp.vectors.identity, "text_version": text.TEXT_VERSION,
                    "version": VERSION, "joint_embedding": shaping, "fold": [fold, len(ctx.folds)]}
    run_dir = ctx.run_dir("joint_embedding", run_settings)
    torch.manual_seed(settings.trainer.seed + fold)
    model = J.JointEmbedding(inp.image_train.shape[1], inp.matrix, **model_kwargs(je, encoder))
    model.fit_standardisation(feats)
    batches = J.PairBatches(feats, ids, lengths, labels, je.batch_size, shuffle=True,
                            seed=settings.trainer.seed + fold, drop_last=True)
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
        device=ctx.device, precision=training_precision(ctx.device, settings.trainer.mixed_precision),
        resume=ctx.resume, settings={**run_settings, "n_train": len(feats), "n_selection": len(sel_rows)},
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

    @classmethod
    def of(cls, model: J.JointEmbedding, image: np.ndarray, ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
           prompt_ids: np.ndarray, prompt_len: np.ndarray, k: int) -> "Scorer":
        """The scorer of a fold network: its fit part's records (``image``, ``ids``, ``lengths``, ``labels``)
        and the label prompts embedded by it."""
        fit_img, fit_txt = J.embed(model, image, ids, lengths)
        return cls(fit_img, fit_txt, labels, J.embed(model, ids=prompt_ids, lengths=prompt_len)[1], k)

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


def label_score_table(held: dict[str, np.ndarray], y: np.ndarray, ctx: StageContext) -> list[dict[str, Any]]:
    """Held-out mean-F1 of each label score alone (per-class thresholds tuned on the same rows, as every stage
    reports), and the label-free top-1 hit rate (is the best-scoring label one of the image's labels)."""
    rule, rounds = ctx.settings.thresholds.at_least_one, ctx.settings.thresholds.rounds
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731  standardised zero-shot scores -> (0, 1)
    knn = ctx.settings.joint_embedding.knn
    candidates = {"image zero-shot (label prompts)": sigmoid(held["image_zero_shot"]),
                  "caption zero-shot (label prompts)": sigmoid(held["caption_zero_shot"]),
                  f"image -> {knn} nearest captions' labels": held["image_to_captions_knn"],
                  f"caption -> {knn} nearest images' labels": held["caption_to_images_knn"],
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


# ------------------------------------------------------------------------------------------------ the artifact


def compute(ctx: StageContext, inp: Inputs) -> Artifact:
    """One network per fold (the configured encoder and strategy): out-of-fold block and probabilities, test ones
    averaged over the folds, retrieval figures per fold, and the first fold's network for retrieval."""
    je, settings = ctx.settings.joint_embedding, ctx.settings
    n_train = len(ctx.data.train)
    targets = ctx.targets.astype(np.float32)
    per_fold, histories, held_scores = [], [], {}
    test_block = test_probs = 0.0
    held_block = np.full((n_train, len(BLOCK_PARTS) * L.NUM_CLASSES + 1), np.nan, np.float32)
    held_probs = np.full((n_train, L.NUM_CLASSES), np.nan, np.float32)
    first: Run | None = None
    for k, (fit_idx, held_idx) in enumerate(ctx.folds):
        if len(ctx.folds) > 1:
            log.info(f"[joint_embedding] fold {k + 1}/{len(ctx.folds)}: {len(fit_idx)} fit, {len(held_idx)} held out")
        run = train_run(ctx, inp, k, fit_idx, encoder=je.encoder, strategy=je.strategy)
        first = first or run
        m = run.model
        scorer = Scorer.of(m, inp.image_train[fit_idx], inp.ids_train[fit_idx], inp.len_train[fit_idx],
                           targets[fit_idx], inp.prompt_ids, inp.prompt_len, je.knn)
        h_img, h_txt = J.embed(m, inp.image_train[held_idx], inp.ids_train[held_idx], inp.len_train[held_idx])
        t_img, t_txt = J.embed(m, inp.image_test, inp.ids_test, inp.len_test)
        h_scores, t_scores = scorer(h_img, h_txt), scorer(t_img, t_txt)
        for name, values in h_scores.items():
            held_scores.setdefault(name, np.full((n_train, values.shape[1]), np.nan, np.float32))[held_idx] = values
        held_block[held_idx], held_probs[held_idx] = block_of(h_scores), probabilities(h_scores)
        test_block = test_block + block_of(t_scores) / len(ctx.folds)
        test_probs = test_probs + probabilities(t_scores) / len(ctx.folds)
        per_fold.append({"fold": k, "n_fit": len(fit_idx), "n_held": len(held_idx),
                         **retrieval(h_img, h_txt, settings.split.seed), "best_epoch": run.result.best_epoch,
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
        "history": records(history),
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


# ------------------------------------------------------------------------------------------------ comparisons


def _measured(ctx: StageContext, inp: Inputs, run: Run, held_idx: np.ndarray) -> dict[str, Any]:
    img, txt = J.embed(run.model, inp.image_train[held_idx], inp.ids_train[held_idx], inp.len_train[held_idx])
    return {"encoder": run.encoder, "strategy": run.strategy, "label": J.strategy_label(run.strategy),
            **retrieval(img, txt, ctx.settings.split.seed), "training_pairs": run.n_train,
            "best_epoch": run.result.best_epoch, "epochs_run": int(len(run.result.history)),
            "training_seconds": run.training_seconds,
            "seconds_per_epoch": round(run.training_seconds / max(len(run.result.history), 1), 2),
            "reused": run.result.reused}


def compare(ctx: StageContext, inp: Inputs) -> tuple[list[dict[str, Any]], dict[str, pd.DataFrame]]:
    """The strategy × encoder table on the first fold: each pair trained (or reused) and measured on the held-out
    fold exactly as the stage's own network."""
    je = ctx.settings.joint_embedding
    fit_idx, held_idx = ctx.folds[0]
    rows, histories = [], {}
    for encoder in je.compare_encoders:
        for strategy in je.compare_strategies:
            run = train_run(ctx, inp, 0, fit_idx, encoder=encoder, strategy=strategy)
            rows.append(_measured(ctx, inp, run, held_idx))
            histories[f"{encoder}/{strategy}"] = run.result.history
    return rows, histories


def learning_curve(ctx: StageContext, inp: Inputs) -> list[dict[str, Any]]:
    """The stage's configuration on the first fold trained on a share of its training pairs (``learning_curve``),
    on all of them, and on all of them plus the test records' pairs (unlabelled, never evaluated): how recall grows
    with the number of pairs."""
    je = ctx.settings.joint_embedding
    fit_idx, held_idx = ctx.folds[0]
    rows = []
    points = [(f, False) for f in sorted(set(je.learning_curve))] + [(1.0, False), (1.0, True)]
    for fraction, test_pairs in points:
        run = train_run(ctx, inp, 0, fit_idx, encoder=je.encoder, strategy=je.strategy, fraction=fraction,
                        test_pairs=test_pairs)
        rows.append({"fraction": fraction, "test_pairs": test_pairs, **_measured(ctx, inp, run, held_idx)})
    return rows


# ------------------------------------------------------------------------------------------------ new records


def _text_rows(state: dict, encoder: str) -> torch.Tensor:
    """The word-vector rows of a network's caption encoder (their shape rebuilds the network)."""
    return state["text_encoder.vectors" if encoder == "mean" else "text_encoder.embedding.weight"]


def _network(state: dict, description: dict[str, Any]) -> J.JointEmbedding:
    net = J.JointEmbedding(description["image_dim"], np.zeros((description["vocab_rows"], description["vector_dim"]),
                                                               np.float32), **description["kwargs"])
    net.load_state_dict(state)
    return net.eval()


class JointEmbeddingPredictor(BlockPredictor):
    """The fold networks, each with the label scorer the stage built for it, on a new record's image features and
    caption; both blocks are averaged over the folds as the stage averaged its test rows.

    A fold's neighbour votes and the standardisation of its zero-shot scores need that fold's fit part embedded by
    its network. The predictor keeps what the stage embedded — every training record's image features (float16, as
    the image artifact stores them), caption token ids and labels, and each fold's fit rows — and embeds each fold's
    fit part again when it is loaded: the same inputs through the same network in the same batches give the stage's
    own embeddings, so a test record gets exactly its block rows. Keeping the embeddings instead would take K x 2
    fit parts x ``embed_dim`` floats (about 160 MB at the real data's size, against about 50 MB of float16 image
    features), and rounding them to float16 would move the neighbour votes.
    """

    stage = "joint_embedding"

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], networks: list[J.JointEmbedding],
                 vocabulary: text.Vocabulary, gallery: dict[str, torch.Tensor]):
        super().__init__(blocks)
        self.description, self.networks, self.vocabulary, self.gallery = description, networks, vocabulary, gallery
        self.needs = (_image_block(description["image_features"]),)
        self._scorers: list[Scorer] | None = None

    @property
    def fold_networks(self) -> list[torch.nn.Module]:
        return list(self.networks)

    def to(self, device: torch.device) -> "JointEmbeddingPredictor":
        super().to(device)
        self._scorers = None  # embedded again on the new device
        return self

    def scorers(self) -> list[Scorer]:
        """Each fold network's scorer: its fit part and the label prompts, embedded as the stage embedded them."""
        if self._scorers is None:
            g = {name: t.numpy() for name, t in self.gallery.items()}
            labels = g["labels"].astype(np.float32)
            ids, lengths = g["ids"].astype(np.int64), g["lengths"].astype(np.int64)
            prompt_ids, prompt_len = g["prompt_ids"].astype(np.int64), g["prompt_lengths"].astype(np.int64)
            with cpu_threads(self.device):
                self._scorers = [Scorer.of(net, g["image"][fit].astype(np.float32), ids[fit], lengths[fit], labels[fit],
                                           prompt_ids, prompt_len, self.description["knn"])
                                 for net, fit in ((n, g[f"fit_{k}"]) for k, n in enumerate(self.networks))]
        return self._scorers

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = list(records.captions)
        tokens = text.clean_captions(captions, desc="cleaning captions" if len(captions) > 1000 else None)
        ids, lengths = self.vocabulary.encode(tokens, self.description["seq_len"])
        features = np.asarray(given[self.needs[0]], dtype=np.float32)
        blocks, probs = [], []
        for net, scorer in zip(self.networks, self.scorers()):
            with cpu_threads(self.device):
                scores = scorer(*J.embed(net, features, ids, lengths))
            blocks.append(block_of(scores))
            probs.append(probabilities(scores))
        out = {"joint_embedding": fold_mean(blocks), "joint_embedding_probs": fold_mean(probs)}
        return {b: out[b] for b in self.blocks}

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        states = [{n: t.cpu() for n, t in net.state_dict().items()} for net in self.networks]
        shared = [n for n in states[0] if all(torch.equal(s[n], states[0][n]) for s in states[1:])] \
            if len(states) > 1 else []
        networks = f"joint embedding networks ({len(states)} folds)"
        files = {"vocabulary.json": ("joint embedding vocabulary", json.dumps(self.vocabulary.tokens).encode()),
                 "gallery.pt": ("joint embedding: the training records (image features, caption ids, labels, folds)",
                                tensor_bytes(self.gallery)),
                 "shared.pt": (networks, tensor_bytes({n: states[0][n] for n in shared}))}
        for i, state in enumerate(states):  # what every fold holds alike (frozen word vectors) is kept once
            files[f"network_{i}.pt"] = (networks, tensor_bytes({n: t for n, t in state.items() if n not in shared}))
        return dict(self.description), files

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "JointEmbeddingPredictor":
        shared = load_tensors(read("shared.pt"))
        networks = [_network({**shared, **load_tensors(read(f"network_{i}.pt"))}, description)
                    for i in range(int(description["networks"]))]
        return cls(blocks, description, networks, text.Vocabulary(json.loads(read("vocabulary.json"))),
                   load_tensors(read("gallery.pt")))


JointEmbedding.predictor_type = JointEmbeddingPredictor  # what rebuilds it from a bundle (defined after the stage)
