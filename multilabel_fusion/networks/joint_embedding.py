"""The image–caption joint embedding: two branches, a bi-directional triplet ranking loss, retrieval metrics.

Published design (two-branch network): each modality goes through a few fully connected layers with ReLU
and dropout between them, batch normalisation right after the last layer (no ReLU), then L2 normalisation,
so the similarity of an image and a caption is the dot product of their embeddings. Images enter as the
image stage's cached CNN features, captions as the mean of their words' vectors (published) or through a
bidirectional GRU over the same vectors (the published "do better" direction; VSE++ uses a GRU).

Loss (``d = 1 - similarity``, anchors in rows)::

    L = mean over picked (image i, caption n) of max(0, m + d(x_i, y_i) - d(x_i, y_n))
      + λ · mean over picked (caption i, image n) of max(0, m + d(x_i, y_i) - d(x_n, y_i))

with the negatives of each anchor mined online in the mini-batch (:data:`STRATEGIES`): every violating
negative (hard and semi-hard), hard only, semi-hard only, the K hardest per anchor (``top<K>``), or the
VSE++ objective (the one hardest negative per query, summed, both directions weighted 1).
"""

from __future__ import annotations

import math
import re
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from ..data import labels as L
from ..data import text

#: Negative-mining strategies; ``top<K>`` (``top1``, ``top10`` …) keeps the K hardest negatives per anchor.
#: ``infonce`` is not a triplet loss: a softmax over every in-batch candidate (CLIP-style), for comparison.
STRATEGIES = ("all", "hard", "semi_hard", "vsepp", "infonce")
_TOPK = re.compile(r"top([1-9][0-9]*)")
ENCODERS = ("mean", "gru")


def check_strategy(name: str) -> str:
    if name in STRATEGIES or _TOPK.fullmatch(name):
        return name
    raise ValueError(f"unknown negative-mining strategy {name!r}: choose {', '.join(STRATEGIES)} or top<K> "
                     "(top1, top10)")


def strategy_label(name: str) -> str:
    """How a strategy is named in tables: the paper's words."""
    m = _TOPK.fullmatch(name)
    if m:
        return f"{m.group(1)} hardest (K = {m.group(1)})"
    return {"all": "hard + semi-hard", "hard": "hard only", "semi_hard": "semi-hard only",
            "vsepp": "VSE++ (max violation)", "infonce": "softmax over all (InfoNCE; not a triplet loss)"}[name]


# -------------------------------------------------------------------------------------------------- loss


def pick_negatives(sims: torch.Tensor, strategy: str, margin: float) -> torch.Tensor:
    """Which negatives each anchor (row) keeps: a boolean [A, A] mask, never on the diagonal (the positives).

    ``sims[a, n]``: similarity of anchor ``a`` to candidate ``n`` of the other modality; ``sims[a, a]`` is
    its positive. With ``d = 1 - s``: a *hard* negative is closer than the positive (``s_n > s_p``); a
    *semi-hard* one is farther but within the margin (``s_p - m < s_n <= s_p``); the rest cost nothing.
    """
    check_strategy(strategy)
    n = sims.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=sims.device)
    pos = sims.diagonal().unsqueeze(1)
    hard = (sims > pos) & off
    semi = (sims <= pos) & (sims > pos - margin) & off
    if strategy == "infonce":
        return off  # every in-batch candidate, weighted by the softmax
    if strategy == "all":
        return hard | semi
    if strategy == "hard":
        return hard
    if strategy == "semi_hard":
        return semi
    k = 1 if strategy == "vsepp" else int(_TOPK.fullmatch(strategy).group(1))
    k = min(k, n - 1)
    if k <= 0:
        return torch.zeros_like(off)
    violation = (margin - pos + sims).masked_fill(~off, -math.inf)
    top = violation.topk(k, dim=1).indices
    mask = torch.zeros_like(off).scatter_(1, top, True)
    return mask & (violation > 0)  # a picked negative that does not violate the margin costs nothing anyway


def direction_loss(sims: torch.Tensor, strategy: str, margin: float, temperature: float = 0.05) -> torch.Tensor:
    """One direction of the ranking loss, anchors in rows: the mean over the picked non-zero hinge terms
    (VSE++: the sum over anchors of each one's largest violation; InfoNCE: cross-entropy of the softmax over
    each row at ``temperature``, the positive being the diagonal)."""
    if strategy == "infonce":
        return F.cross_entropy(sims / temperature, torch.arange(len(sims), device=sims.device))
    mask = pick_negatives(sims, strategy, margin)
    hinge = (margin - sims.diagonal().unsqueeze(1) + sims).clamp(min=0) * mask
    if strategy == "vsepp":
        return hinge.max(1).values.sum()
    count = (hinge > 0).sum()
    return hinge.sum() / count.clamp(min=1)


def ranking_loss(img: torch.Tensor, txt: torch.Tensor, strategy: str, margin: float,
                 reverse_weight: float, temperature: float = 0.05) -> torch.Tensor:
    """Image-anchored term + ``reverse_weight`` × caption-anchored term (VSE++ and InfoNCE: both weighted 1)."""
    sims = img @ txt.t()  # [images, captions]
    weight = 1.0 if strategy in ("vsepp", "infonce") else reverse_weight
    return (direction_loss(sims, strategy, margin, temperature)
            + weight * direction_loss(sims.t(), strategy, margin, temperature))


class TripletRankingLoss(nn.Module):
    """The trainer's ``loss_fn(outputs, targets)``: ``outputs`` are stacked embeddings [B, 2, D] (image,
    caption); ``targets`` (the labels) only count the batch."""

    def __init__(self, strategy: str = "top1", margin: float = 0.1, reverse_weight: float = 0.1,
                 temperature: float = 0.05):
        super().__init__()
        self.strategy, self.margin, self.reverse_weight = check_strategy(strategy), margin, reverse_weight
        self.temperature = temperature

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return ranking_loss(outputs[:, 0], outputs[:, 1], self.strategy, self.margin, self.reverse_weight,
                            self.temperature)


# ------------------------------------------------------------------------------------------------ network


def branch(in_dim: int, hidden: int, out_dim: int, layers: int, dropout: float) -> nn.Sequential:
    """``layers`` fully connected layers, ReLU + dropout between them, batch norm after the last (no ReLU)."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    parts: list[nn.Module] = []
    for i in range(layers):
        parts.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            parts += [nn.ReLU(), nn.Dropout(dropout)]
    parts.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*parts)


class MeanVectors(nn.Module):
    """Caption = mean of its words' (frozen) vectors; padding and words without a vector are left out."""

    def __init__(self, embeddings: np.ndarray):
        super().__init__()
        self.register_buffer("vectors", torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))
        self.dim = self.vectors.shape[1]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        known = (ids > text.OOV).unsqueeze(-1).float()  # PAD = 0 and OOV = 1 carry no vector
        return (self.vectors[ids] * known).sum(1) / known.sum(1).clamp(min=1)


class GRUEncoder(nn.Module):
    """Word vectors (pretrained, optionally fine-tuned; one learned vector for every word without one) →
    bidirectional GRU → [forward; backward] final states (packed: the state after the last real word)."""

    def __init__(self, embeddings: np.ndarray, hidden: int, train_embeddings: bool = True):
        super().__init__()
        matrix = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        self.embedding = nn.Embedding.from_pretrained(matrix, freeze=not train_embeddings, padding_idx=text.PAD)
        self.oov_vector = nn.Parameter(torch.zeros(matrix.shape[1]))
        self.gru = nn.GRU(matrix.shape[1], hidden, batch_first=True, bidirectional=True)
        self.dim = 2 * hidden

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        vectors = self.embedding(ids)
        vectors = torch.where((ids == text.OOV).unsqueeze(-1), self.oov_vector.to(vectors.dtype), vectors)
        packed = pack_padded_sequence(vectors, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, hidden = self.gru(packed)
        return torch.cat([hidden[-2], hidden[-1]], dim=1)


class JointEmbedding(nn.Module):
    """Image features + caption token ids → L2-normalised embeddings in one space (dot product = similarity).

    Image features are standardised with statistics of the training part (buffers, so a checkpoint alone
    embeds raw features). ``forward`` returns both embeddings stacked ([B, 2, D]) for the shared trainer.
    """

    def __init__(self, image_dim: int, embeddings: np.ndarray, *, encoder: str = "mean", embed_dim: int = 512,
                 hidden: int = 2048, layers: int = 2, dropout: float = 0.5, rnn_hidden: int = 512,
                 train_embeddings: bool = True):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown caption encoder {encoder!r}: choose {', '.join(ENCODERS)}")
        self.encoder_name = encoder
        self.register_buffer("mean", torch.zeros(image_dim))
        self.register_buffer("std", torch.ones(image_dim))
        self.text_encoder = (MeanVectors(embeddings) if encoder == "mean"
                             else GRUEncoder(embeddings, rnn_hidden, train_embeddings))
        self.image_branch = branch(image_dim, hidden, embed_dim, layers, dropout)
        self.text_branch = branch(self.text_encoder.dim, hidden, embed_dim, layers, dropout)
        self.embed_dim = embed_dim

    def fit_standardisation(self, features: np.ndarray) -> None:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_branch((features.float() - self.mean) / self.std), dim=1)

    def embed_captions(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_branch(self.text_encoder(ids, lengths)), dim=1)

    def forward(self, features: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.embed_images(features), self.embed_captions(ids, lengths)], dim=1)


class PairBatches:
    """Mini-batches ``((image features, token ids, lengths), labels)`` sliced from whole tensors.

    The cached features fit in memory, so slicing beats a DataLoader's per-item collate; with ``shuffle``
    the order comes from a seeded ``torch.Generator`` at ``.generator`` (the trainer restores it on resume).
    ``drop_last`` keeps every training batch full: a batch of one has no negatives and breaks batch norm.
    """

    def __init__(self, features: np.ndarray, ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray | None,
                 batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        if not len(features) == len(ids) == len(lengths):
            raise ValueError(f"features ({len(features)}), ids ({len(ids)}) and lengths ({len(lengths)}) differ")
        self.features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.labels = (torch.zeros(len(ids), L.NUM_CLASSES) if labels is None
                       else torch.as_tensor(np.asarray(labels, dtype=np.float32)))
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.ids)
        return n // self.batch_size if self.drop_last and n >= self.batch_size else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator:
        n = len(self.ids)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        stop = len(self) * self.batch_size if self.drop_last and n >= self.batch_size else n
        for start in range(0, stop, self.batch_size):
            rows = order[start: start + self.batch_size]
            yield (self.features[rows], self.ids[rows], self.lengths[rows]), self.labels[rows]


@torch.no_grad()
def embed(model: JointEmbedding, features: np.ndarray | None = None, ids: np.ndarray | None = None,
          lengths: np.ndarray | None = None, batch_size: int = 2048) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Embeddings (float32) of images (``features``) and/or captions (``ids`` + ``lengths``), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    empty = [np.zeros((0, model.embed_dim), np.float32)]
    img = txt = None
    if features is not None:
        img = np.concatenate([model.embed_images(torch.as_tensor(np.asarray(features[s: s + batch_size], np.float32))
                                                 .to(device)).cpu().numpy()
                              for s in range(0, len(features), batch_size)] or empty)
    if ids is not None:
        txt = np.concatenate([model.embed_captions(torch.as_tensor(ids[s: s + batch_size]).to(device),
                                                   torch.as_tensor(lengths[s: s + batch_size])).cpu().numpy()
                              for s in range(0, len(ids), batch_size)] or empty)
    return img, txt


# ------------------------------------------------------------------------------------------------ metrics


def ranks(sims: np.ndarray) -> np.ndarray:
    """1-based rank of each query's own match (``sims[q, q]``) among all candidates of row ``q``.

    Ties count against the query (a candidate as similar as the match ranks before it): never optimistic.
    """
    sims = np.asarray(sims, dtype=np.float64)
    own = np.diagonal(sims)[:, None]
    return (sims >= own).sum(1)  # the match itself counts once: rank 1 when nothing is as similar


def recall_report(sims: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K (percent), median and mean rank in both directions of an [images, captions] similarity matrix
    whose diagonal holds the matching pairs (one caption per image), and ``rsum`` (the sum of the R@K)."""
    out: dict[str, float] = {}
    for direction, matrix in (("i2t", sims), ("t2i", np.asarray(sims).T)):
        r = ranks(matrix)
        for k in ks:
            out[f"{direction}_r{k}"] = round(float((r <= k).mean() * 100), 2)
        out[f"{direction}_medr"] = float(np.median(r))
        out[f"{direction}_meanr"] = round(float(r.mean()), 1)
    out["rsum"] = round(sum(v for k, v in out.items() if re.fullmatch(r"(i2t|t2i)_r\d+", k)), 2)
    return out


def chunks(n: int, size: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Disjoint sets of ``size`` rows (shuffled with ``seed``) for the 1K protocol; fewer rows than ``size``:
    one set of all of them. Rows left over after the last full set are not used."""
    order = np.random.default_rng(seed).permutation(n)
    if n <= size:
        return [np.sort(order)]
    return [np.sort(order[i * size: (i + 1) * size]) for i in range(n // size)]


def protocol_1k(img: np.ndarray, txt: np.ndarray, size: int = 1000, seed: int = 0) -> dict[str, float]:
    """The 1K protocol: :func:`recall_report` on disjoint sets of ``size`` image–caption pairs, averaged."""
    reports = [recall_report(img[rows] @ txt[rows].T) for rows in chunks(len(img), size, seed)]
    out = {k: round(float(np.mean([r[k] for r in reports])), 2) for k in reports[0]}
    out["sets"] = len(reports)
    out["set_size"] = int(min(size, len(img)))
    return out
