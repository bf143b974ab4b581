"""Stage 02: the caption network (published: Bi-LSTM over pretrained word vectors).

Caption -> cleaned lemmas (:mod:`.text`) -> first ``seq_len`` token ids -> word vectors -> one
bidirectional LSTM layer (``hidden`` units per direction) -> the caption feature, which is the
concatenation of the forward and backward final hidden states (2 x 50 = 100-d; padding is
packed away, so the final states are those of each caption's last real word) -> dropout ->
linear layer to the 18 classes. Trained with the shared trainer (weighted BCE, Adam, StepLR,
gradient clipping, early stopping on validation mean-F1). The 100-d features of every train
and test record are cached for the fused network (stage 03).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm.auto import tqdm

from . import labels as L
from . import pipeline, text, trainer
from .cache import FeatureCache
from .config import Config

FEATURE_DESCRIPTION = ("concatenated final hidden states of the forward and backward LSTM "
                       "(packed sequences: the state after each caption's last real word)")


class CaptionBiLSTM(nn.Module):
    """Word vectors -> Bi-LSTM -> [forward; backward] final hidden state -> dropout -> 18 logits.

    Row ``text.PAD`` of the embedding is zero and never read (sequences are packed); every token
    without a pretrained vector (row ``text.OOV``) gets one learned vector, ``oov_vector``, which is
    trained even when the pretrained vectors are frozen.
    """

    def __init__(self, embeddings: np.ndarray | torch.Tensor, hidden: int = 50, dropout: float = 0.1,
                 num_classes: int = L.NUM_CLASSES, train_embeddings: bool = False):
        super().__init__()
        embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if embeddings.ndim != 2 or len(embeddings) <= text.OOV:
            raise ValueError(f"embeddings must be a [vocabulary >= 2, dim] matrix, got {tuple(embeddings.shape)}")
        self.embedding = nn.Embedding.from_pretrained(embeddings, freeze=not train_embeddings, padding_idx=text.PAD)
        self.oov_vector = nn.Parameter(torch.zeros(embeddings.shape[1]))
        self.lstm = nn.LSTM(embeddings.shape[1], hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    @property
    def feature_dim(self) -> int:
        return 2 * self.lstm.hidden_size

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, seq_len] token ids and [B] lengths (>= 1) -> [B, 2 * hidden] caption features."""
        vectors = self.embedding(ids)
        vectors = torch.where((ids == text.OOV).unsqueeze(-1), self.oov_vector.to(vectors.dtype), vectors)
        packed = pack_padded_sequence(vectors, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        return torch.cat([hidden[-2], hidden[-1]], dim=1)  # last layer's forward and backward states

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(ids, lengths)))


class Batches:
    """Mini-batches ``((ids, lengths), targets)`` sliced from whole tensors.

    The data is a few MB of integers, so slicing tensors beats a DataLoader's per-item collate;
    with ``shuffle`` the order is reshuffled every epoch from a seeded generator.
    """

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, targets: np.ndarray | None, batch_size: int,
                 *, shuffle: bool = False, seed: int = 0):
        if len(ids) != len(lengths) or (targets is not None and len(targets) != len(ids)):
            raise ValueError(f"ids ({len(ids)}), lengths ({len(lengths)}) and targets "
                             f"({None if targets is None else len(targets)}) must have one row per caption")
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        # test captions have no labels: zeros keep the (inputs, targets) shape every loader shares
        self.targets = torch.zeros(len(ids), L.NUM_CLASSES) if targets is None else torch.as_tensor(targets).float()
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        order = torch.randperm(len(self.ids), generator=self.generator) if self.shuffle else torch.arange(len(self.ids))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield (self.ids[rows], self.lengths[rows]), self.targets[rows]


@torch.no_grad()
def extract_features(model: CaptionBiLSTM, batches: Batches, device: torch.device, desc: str | None = None) -> np.ndarray:
    """The caption feature of every row of ``batches``, in order, as float32 [N, 2 * hidden]."""
    model.eval().to(device)
    out = [model.features(ids.to(device), lengths).float().cpu().numpy()
           for (ids, lengths), _ in tqdm(batches, desc=desc, leave=False, disable=desc is None)]
    return np.concatenate(out) if out else np.zeros((0, model.feature_dim), dtype=np.float32)


def make_optimizer(model: CaptionBiLSTM, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam; weight decay on the network but not on the word vectors (trainable or not), because
    decaying pretrained vectors towards zero only destroys what they know."""
    vectors = [p for n, p in model.named_parameters() if n == "embedding.weight" and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if n != "embedding.weight" and p.requires_grad]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=lr)


def weights_digest(model: nn.Module) -> str:
    """Short hash of the trained weights: a feature cache is reused only for the very same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int = 1):
    """One intra-op thread for this small network on CPU, restored afterwards.

    Batches of 250 x 8 x 50 gain nothing from parallel kernels (measured on 2 cores: 0.67 s per
    epoch with one thread, 0.77 s with two), while threads waiting on cores that another CPU job
    holds stretched 0.5 s epochs to 15-35 s. On a GPU this changes nothing.
    """
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_config(c: Config) -> None:
    """Fail early with a clear message instead of deep inside torch."""
    problems = []
    for key in ("seq_len", "hidden", "batch_size", "epochs", "patience"):
        if not isinstance(c[key], int) or c[key] < 1:
            problems.append(f"caption.{key} must be a positive integer, got {c[key]!r}")
    if not 0 <= float(c.dropout) < 1:
        problems.append(f"caption.dropout must be in [0, 1), got {c.dropout!r}")
    if float(c.lr) <= 0:
        problems.append(f"caption.lr must be positive, got {c.lr!r}")
    if problems:
        raise ValueError("; ".join(problems))


def cleaned_tokens(ctx: pipeline.StageContext) -> tuple[list[list[str]], list[list[str]]]:
    """Cleaned train and test captions, cached: loading WordNet alone costs seconds per run."""
    cache = FeatureCache(ctx.output_dir, "caption_tokens", {"text_version": text.TEXT_VERSION}, ctx.fingerprint)
    found = cache.load()
    if found is None:
        train = text.clean_captions(ctx.data.train["Caption"], desc="cleaning train captions")
        test = text.clean_captions(ctx.data.test["Caption"], desc="cleaning test captions")
        # one string per part, captions on lines and tokens space-separated (tokens hold no whitespace)
        found = cache.save({part: np.array(["\n".join(" ".join(t) for t in tokens)])
                            for part, tokens in (("train", train), ("test", test))},
                           {"what": "cleaned caption tokens", "text_version": text.TEXT_VERSION})
    parts = [[line.split() for line in str(found[part][0]).split("\n")] for part in ("train", "test")]
    if len(parts[0]) != len(ctx.data.train) or len(parts[1]) != len(ctx.data.test):
        raise RuntimeError(f"{cache.dir}: token cache does not match the data; delete it and run again")
    return parts[0], parts[1]


def run_stage(cfg: Config, demo_mode: bool | str = False, resume: bool = False, args=None) -> dict[str, Any]:
    """Train (or reuse) the caption network, cache its features, write its submission and metrics."""
    c = cfg.caption
    check_config(c)
    ctx = pipeline.prepare(cfg, demo_mode)

    t_text = time.time()
    train_tokens, test_tokens = cleaned_tokens(ctx)
    vectors, vectors_info = text.resolve_vectors(c, ctx.models_dir / "vectors")
    vocab, matrix = text.build_vocabulary(train_tokens + test_tokens, vectors)
    del vectors  # only the corpus rows are kept
    oov = text.oov_report(train_tokens, vocab)
    train_ids, train_len = vocab.encode(train_tokens, c.seq_len)
    test_ids, test_len = vocab.encode(test_tokens, c.seq_len)
    text_seconds = time.time() - t_text
    print(f"caption vocabulary: {len(vocab) - 2:,} words with vectors + <pad> + <oov>; "
          f"{oov['oov_words']} of the {oov['vocabulary_words']:,} training-caption words have no vector "
          f"({oov['oov_tokens']} occurrences) -> the learned <oov> vector")

    settings = {**ctx.run_settings("caption"), "text_version": text.TEXT_VERSION,
                "vectors_used": {k: vectors_info[k] for k in ("name", "words", "dim")}, "vocabulary": len(vocab)}
    torch.manual_seed(cfg.trainer.seed)
    model = CaptionBiLSTM(matrix, c.hidden, c.dropout, train_embeddings=c.train_embeddings)
    fit_idx, val_idx, targets = ctx.train_idx, ctx.val_idx, ctx.targets
    train_batches = Batches(train_ids[fit_idx], train_len[fit_idx], targets[fit_idx], c.batch_size,
                            shuffle=True, seed=cfg.trainer.seed)
    val_batches = Batches(train_ids[val_idx], train_len[val_idx], targets[val_idx], c.batch_size)
    optimizer = make_optimizer(model, c.lr, c.weight_decay)
    amp = cfg.trainer.mixed_precision
    test_batches = Batches(test_ids, test_len, None, c.batch_size)
    with cpu_threads(ctx.device):
        result = trainer.fit(
            model, train_batches, val_batches, ctx.y_val,
            loss_fn=trainer.weighted_bce(c.label1_weight), optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=c.step_gamma),
            checkpoint_dir=ctx.models_dir / "caption", epochs=c.epochs, patience=c.patience,
            grad_clip=c.grad_clip, device=ctx.device, mixed_precision=amp,
            resume=resume, settings=settings, name="caption",
        )
        val_probs = trainer.predict(model, val_batches, ctx.device, amp=amp)
        test_probs = trainer.predict(model, test_batches, ctx.device, amp=amp)

        t_features = time.time()
        cache = FeatureCache(ctx.output_dir, "caption", {**settings, "weights": weights_digest(model)},
                             ctx.fingerprint)
        cached = cache.load()
        if cached is None:
            all_train = Batches(train_ids, train_len, None, c.batch_size)
            cache.save({
                "train": extract_features(model, all_train, ctx.device, desc="caption features (train)"),
                "test": extract_features(model, test_batches, ctx.device, desc="caption features (test)"),
                "train_ids": ctx.data.train["ImageID"].to_numpy(str),
                "test_ids": ctx.data.test["ImageID"].to_numpy(str),
            }, {"feature": FEATURE_DESCRIPTION, "dim": model.feature_dim, "vectors": vectors_info, "oov": oov,
                "seq_len": c.seq_len})
            print(f"caption features cached in {cache.dir}")
        else:
            print(f"caption features reused from {cache.dir}")
        feature_seconds = time.time() - t_features

    history = result.history
    epoch_seconds = history["seconds"] if len(history) else []
    extra = {
        "vectors": vectors_info,
        "oov": {**oov, "handling": "every word without a pretrained vector maps to one shared <oov> row, a "
                                   "learned vector (trained even when the word vectors are frozen); an empty "
                                   "caption is one <oov> token; padding is packed away (zero row, never read)"},
        "vocabulary_size": len(vocab),
        "text_preprocessing": "casefold; punctuation and digits -> spaces; wordpunct_tokenize; NLTK English stop "
                              f"words removed; WordNet lemmas (noun); first {c.seq_len} tokens",
        "feature": {"dim": model.feature_dim, "what": FEATURE_DESCRIPTION},
        "train_embeddings": bool(c.train_embeddings),
        "parameters_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "timings": {
            "seconds_per_epoch": round(float(np.mean(epoch_seconds)), 3) if len(history) else None,
            "training_seconds": round(float(np.sum(epoch_seconds)), 1),
            "epochs_run": int(len(history)),
            "best_epoch": int(result.best_epoch),
            "text_and_vectors_seconds": round(text_seconds, 2),
            "feature_seconds": round(feature_seconds, 2),
        },
        "training_reused": bool(result.reused),
        "feature_cache": {"status": "computed" if cached is None else "reused", "key": cache.key,
                          "dir": str(cache.dir)},
    }
    return pipeline.finish(ctx, "caption", val_probs, test_probs, history=history, extra=extra)
