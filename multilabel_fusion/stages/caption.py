"""Stage 02: the caption network (network 2 of the three-network report: a Bi-LSTM over pretrained word vectors).

Caption -> cleaned lemmas (:mod:`multilabel_fusion.data.text`) -> first ``seq_len`` token ids -> word vectors -> one
bidirectional LSTM layer (``hidden`` units per direction) -> the caption feature, the concatenation of the forward
and backward final hidden states (2 x 50 = 100-d; padding is packed away, so the final states are those of each
caption's last real word) -> dropout -> linear layer to the 18 classes. Trained per fold with the shared trainer
(weighted BCE, Adam, StepLR, gradient clipping, early stopping on the selection part's mean-F1). Blocks:
``caption`` (the 100-d features) and ``caption_probs``, out of fold for every training record, averaged over the
fold networks for the test records. The vocabulary (the token of each embedding row) is kept beside them
(artifact ``caption_vocabulary``, same key), so a new caption is encoded exactly as the fold networks were trained.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import text
from ..io.artifacts import Artifact, MissingArtifact
from ..io.hashing import digest
from ..networks.caption_lstm import FEATURE_DESCRIPTION, Batches, CaptionBiLSTM, extract_features, make_optimizer
from ..networks.device import cpu_threads
from ..networks.precision import training_precision
from ..settings import common_settings
from ..training import trainer
from ..training.crossfit import cross_fit, fill_in_sample
from .base import BlockPredictor, NewRecords, Stage, best_weights, fold_mean, load_tensors, tensor_bytes
from .context import StageContext, Workspace
from .outputs import finish, records

log = logging.getLogger(__name__)

VOCABULARY = "caption_vocabulary"  # artifact kind of the vocabulary (same key as the caption artifact)
TOKENS = "caption_tokens"  # artifact kind of the cleaned captions (keyed by the data and the cleaning's version)


def cleaned_tokens(ws: Workspace) -> tuple[list[list[str]], list[list[str]]]:
    """Cleaned train and test captions, kept as an artifact: loading WordNet alone costs seconds per run."""
    key = digest({"tokens": text.TEXT_VERSION, "data": ws.fingerprint})
    found = ws.store.load(TOKENS, key)
    if found is None:
        train = text.clean_captions(ws.data.train["Caption"], desc="cleaning train captions")
        test = text.clean_captions(ws.data.test["Caption"], desc="cleaning test captions")
        # one string per part, captions on lines and tokens space-separated (tokens hold no whitespace)
        found = ws.store.save(TOKENS, key, {"text_version": text.TEXT_VERSION, "data": ws.fingerprint},
                              {part: np.array(["\n".join(" ".join(t) for t in tokens)])
                               for part, tokens in (("train", train), ("test", test))},
                              {"what": "cleaned caption tokens"})
    parts = [[line.split() for line in str(found[part][0]).split("\n")] for part in ("train", "test")]
    if len(parts[0]) != len(ws.data.train) or len(parts[1]) != len(ws.data.test):
        raise RuntimeError(f"{found.dir}: token artifact does not match the data; delete it and run again")
    return parts[0], parts[1]


def build_vocabulary(ws: Workspace, train_tokens, test_tokens):
    """The vocabulary of every cleaned caption word with a vector (``caption.vectors``), its embedding rows, and the
    vectors' asset (also what stage 07's caption LSTM reads)."""
    from ..io.assets import load_vectors

    vectors_asset = ws.assets.word_vectors(ws.settings.caption, ws.models_dir / "vectors")
    vocab, matrix = text.build_vocabulary(train_tokens + test_tokens, load_vectors(vectors_asset))
    return vocab, matrix, vectors_asset


def reader_spec(ws: Workspace, version: int) -> dict[str, Any]:
    """What shapes a stage that reads the captions as this one cleans them, with its word vectors, on top of the
    image features (stages 06 and 07): the vectors' identity, its own ``version``, the text-cleaning version, the
    split and the seed (the image features' key is among its inputs)."""
    vectors = ws.assets.word_vectors(ws.settings.caption, ws.models_dir / "vectors")
    return {"assets": {"vectors": {"name": vectors.name, "identity": vectors.identity}},
            "version": version, "text_version": text.TEXT_VERSION, "common": common_settings(ws.settings)}


def load_vocabulary(store, key: str) -> text.Vocabulary | None:
    """The kept vocabulary of the caption artifact ``key``, or None."""
    found = store.load(VOCABULARY, key)
    return None if found is None else text.Vocabulary([str(t) for t in found["tokens"]])


class CaptionNetwork(Stage):
    name = "caption"
    number = "02"
    title = "caption network"
    module = "caption_network"
    section = "caption"
    blocks = ("caption", "caption_probs")
    writes = "out-of-fold Bi-LSTM caption features and probabilities, caption-only submission"
    summary = "caption features + caption-only submission"
    about = ("A Bi-LSTM over pretrained word vectors (GloVe-twitter-100) reads each cleaned caption, one network per "
             "fold; its out-of-fold 100-d caption features and probabilities are kept in "
             "`output/artifacts/caption/<key>/` for the fused network, and its predictions give the caption-only "
             "submission `output/submission_caption.csv`.")

    def spec(self, ws: Workspace) -> dict[str, Any]:
        """Every caption setting, the identity of the word vectors, the text-cleaning version, split and seed."""
        vectors = ws.assets.word_vectors(ws.settings.caption, ws.models_dir / "vectors")
        return {"assets": {"vectors": {"name": vectors.name, "identity": vectors.identity}},
                "version": text.TEXT_VERSION, "common": common_settings(ws.settings)}

    def keep_vocabulary(self, ctx: StageContext, vocab: text.Vocabulary) -> None:
        ctx.store.save(VOCABULARY, ctx.key(), ctx.spec(), {"tokens": np.array(vocab.tokens, dtype=str)},
                       {"what": "the token of each row of the fold networks' embeddings"})

    def fit(self, ctx: StageContext) -> Artifact:
        return self._networks(ctx)[0]

    def _networks(self, ctx: StageContext) -> tuple[Artifact, str]:
        found = ctx.store.load("caption", ctx.key())
        if found is None:
            return train_and_extract(self, ctx), "computed"
        log.info(f"[caption] reusing the features {found.dir}")
        if ctx.store.load(VOCABULARY, ctx.key(), mmap=True) is None:  # made before the vocabulary was kept
            vocab, _, _ = build_vocabulary(ctx, *cleaned_tokens(ctx))
            if len(vocab) != found.info["vocabulary_size"]:
                raise ValueError(f"{found.dir}: the vocabulary built again has {len(vocab)} rows, the networks "
                                 f"{found.info['vocabulary_size']}; delete that folder and run stage 02 again")
            self.keep_vocabulary(ctx, vocab)
            log.info(f"[caption] kept the vocabulary of those networks ({len(vocab):,} rows)")
        return found, "reused"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Train (or reuse) the caption network, keep its features, write its submission and metrics."""
        found, state = self._networks(ctx)
        info = dict(found.info)
        history = pd.DataFrame(info.pop("history", []))
        extra = {**info, "vectors_used": info["vectors"]["name"], "artifact": str(found.dir), "features": state}
        history = history[history["fold"] == 0] if len(history) else history
        return finish(ctx, np.asarray(found["probs"])[ctx.eval_idx], found["test_probs"], history=history,
                      extra=extra)

    def predictor(self, ws: Workspace, blocks: Sequence[str]) -> "CaptionPredictor":
        caption = ws.require("caption")
        vocabulary = load_vocabulary(ws.store, caption.key)
        if vocabulary is None:
            raise MissingArtifact(f"{ws.store.dir(VOCABULARY, caption.key)}: the caption networks' vocabulary was not "
                                  f"kept; run {self.hint} (it keeps it, reusing the trained networks)")
        c = ws.settings.caption
        description = {"seq_len": c.seq_len, "hidden": c.hidden, "dropout": c.dropout, "batch_size": c.batch_size,
                       "train_embeddings": bool(c.train_embeddings), "vectors": caption.info["vectors"]["name"],
                       "text_version": text.TEXT_VERSION, "mixed_precision": bool(ws.settings.trainer.mixed_precision),
                       "key": caption.key}
        runs = caption.info.get("fold_runs") or caption.info["folds"]  # the name in artifacts made before 0.2
        networks = [_network(best_weights(f["run_dir"], ws.models_dir, self), description) for f in runs]
        rows = networks[0].embedding.num_embeddings
        if rows != len(vocabulary):
            raise MissingArtifact(f"{ws.store.dir(VOCABULARY, caption.key)}: {len(vocabulary)} words for embeddings of "
                                  f"{rows} rows; delete it and run {self.hint}")
        return CaptionPredictor(blocks, description, vocabulary, networks)


def train_and_extract(stage: CaptionNetwork, ctx: StageContext) -> Artifact:
    """Clean the captions, build the vocabulary, train (or continue) one Bi-LSTM per fold, and write the artifact:
    out-of-fold features and probabilities of every training record (each from the network that did not see
    it), and those of the test records averaged over the fold networks."""
    c, settings = ctx.settings.caption, ctx.settings
    t_text = time.time()
    train_tokens, test_tokens = cleaned_tokens(ctx)
    vocab, matrix, vectors_asset = build_vocabulary(ctx, train_tokens, test_tokens)  # only the corpus rows
    oov = text.oov_report(train_tokens, vocab)
    train_ids, train_len = vocab.encode(train_tokens, c.seq_len)
    test_ids, test_len = vocab.encode(test_tokens, c.seq_len)
    text_seconds = time.time() - t_text
    log.info(f"caption vocabulary: {len(vocab) - 2:,} words with vectors + <pad> + <oov>; "
             f"{oov['oov_words']} of the {oov['vocabulary_words']:,} training-caption words have no vector "
             f"({oov['oov_tokens']} occurrences) -> the learned <oov> vector")

    spec = ctx.spec()
    shaping = {**spec, "settings": {"caption": c.shaping(weights_only=True)}}
    precision = training_precision(ctx.device, settings.trainer.mixed_precision)
    all_train = Batches(train_ids, train_len, None, c.batch_size)
    test_batches = Batches(test_ids, test_len, None, c.batch_size)
    histories, in_sample = [], {}

    def fold(k, fit_idx, held_idx):
        """One Bi-LSTM trained on the fold's fit part: features and probabilities of its held-out rows and the test."""
        run_dir = ctx.run_dir("caption", {**shaping, "fold": [k, len(ctx.folds)]})
        torch.manual_seed(settings.trainer.seed + k)
        model = CaptionBiLSTM(matrix, c.hidden, c.dropout, train_embeddings=c.train_embeddings)
        targets = ctx.targets
        train_idx, select_idx = ctx.selection(k, fit_idx, held_idx)
        train_batches = Batches(train_ids[train_idx], train_len[train_idx], targets[train_idx], c.batch_size,
                                shuffle=True, seed=settings.trainer.seed + k)
        select_batches = Batches(train_ids[select_idx], train_len[select_idx], targets[select_idx], c.batch_size)
        optimizer = make_optimizer(model, c.lr, c.weight_decay)
        result = trainer.fit(
            model, train_batches, select_batches, targets[select_idx],
            loss_fn=trainer.bce_for(c.pos_weight, c.label1_weight, targets[train_idx]), optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=c.step_gamma),
            run_dir=run_dir, epochs=c.epochs, patience=c.patience, grad_clip=c.grad_clip, device=ctx.device,
            precision=precision, resume=ctx.resume, settings={**spec, "fold": k}, name=f"caption fold {k + 1}",
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
        cf = cross_fit(ctx.folds, len(ctx.data.train), fold, "caption")
    arrays = {**cf.held, **cf.test, "train_ids": ctx.data.train["ImageID"].to_numpy(str),
              "test_ids": ctx.data.test["ImageID"].to_numpy(str)}
    fill_in_sample(arrays, in_sample)
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
        "history": records(history),
    }
    stage.keep_vocabulary(ctx, vocab)
    return ctx.store.save("caption", ctx.key(), spec, arrays, info)


def _network(state: dict, description: dict[str, Any]) -> CaptionBiLSTM:
    net = CaptionBiLSTM(np.zeros(tuple(state["embedding.weight"].shape), np.float32), description["hidden"],
                        description["dropout"], train_embeddings=description["train_embeddings"])
    net.load_state_dict(state)
    return net.eval()


class CaptionPredictor(BlockPredictor):
    """Captions cleaned and encoded as stage 02 did (its kept vocabulary), through every fold network."""

    stage = "caption"
    part = "caption networks"  # what the size report and a bundle call the fold networks

    @staticmethod
    def network(state: dict, description: dict[str, Any]) -> torch.nn.Module:
        """One fold network from its weights (a bundle entry)."""
        return _network(state, description)

    def __init__(self, blocks: Sequence[str], description: dict[str, Any], vocabulary: text.Vocabulary,
                 networks: list[CaptionBiLSTM]):
        super().__init__(blocks)
        self.description, self.vocabulary, self.networks = description, vocabulary, networks

    @property
    def fold_networks(self) -> list[torch.nn.Module]:
        return list(self.networks)

    def encode(self, records: NewRecords) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and lengths of the records' captions, cleaned and encoded as the stage did."""
        captions = list(records.captions)
        tokens = text.clean_captions(captions, desc="cleaning captions" if len(captions) > 1000 else None)
        return self.vocabulary.encode(tokens, self.description["seq_len"])

    def transform(self, records: NewRecords, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = self.description
        ids, lengths = self.encode(records)
        batches = Batches(ids, lengths, None, c["batch_size"])
        precision = training_precision(self.device, c["mixed_precision"])
        out = {}
        with cpu_threads(self.device):
            if "caption" in self.blocks:
                out["caption"] = fold_mean([extract_features(n, batches, self.device) for n in self.networks])
            if "caption_probs" in self.blocks:
                out["caption_probs"] = fold_mean([trainer.predict(n, batches, self.device, precision=precision)
                                                  for n in self.networks])
        return out

    def export(self) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
        states = [{n: t.cpu() for n, t in net.state_dict().items()} for net in self.networks]
        shared = all(torch.equal(s["embedding.weight"], states[0]["embedding.weight"]) for s in states)
        words = "caption vocabulary and its word-vector rows"
        files = {"vocabulary.json": (words, json.dumps(self.vocabulary.tokens).encode())}
        if shared:  # frozen word vectors: one copy of the rows for every fold
            files["embedding.pt"] = (words, tensor_bytes(states[0]["embedding.weight"]))
        for i, state in enumerate(states):
            files[f"network_{i}.pt"] = (f"{self.part} ({len(states)} folds)",
                                        tensor_bytes({n: t for n, t in state.items()
                                                      if not (shared and n == "embedding.weight")}))
        return {**self.description, "networks": len(states)}, files

    @classmethod
    def from_bundle(cls, description: dict[str, Any], blocks: Sequence[str], read: Callable[[str], bytes],
                    names: set[str], device: torch.device) -> "CaptionPredictor":
        vocabulary = text.Vocabulary(json.loads(read("vocabulary.json")))
        shared = load_tensors(read("embedding.pt")) if "embedding.pt" in names else None
        networks = []
        for i in range(int(description["networks"])):
            state = load_tensors(read(f"network_{i}.pt"))
            if shared is not None:
                state["embedding.weight"] = shared
            networks.append(cls.network(state, description))
        return cls(blocks, description, vocabulary, networks)


CaptionNetwork.predictor_type = CaptionPredictor  # what reads its part of a bundle
