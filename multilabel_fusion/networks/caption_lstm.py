"""The caption network (published: one Bi-LSTM layer over pretrained word vectors), its caption encoder (shared with
the concatenation network of stage 07) and its batches."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..data import labels as L
from ..data import text
from ..io.progress import progress

FEATURE_DESCRIPTION = ("concatenated final hidden states of the forward and backward LSTM "
                       "(packed sequences: the state after each caption's last real word)")


class CaptionEncoder(nn.Module):
    """Word vectors -> LSTM (``layers`` deep, bi-directional or not) -> the last layer's final hidden state(s).

    Row ``text.PAD`` of the embedding is zero and never read (sequences are packed); every token
    without a pretrained vector (row ``text.OOV``) gets one learned vector, ``oov_vector``, which is
    trained even when the pretrained vectors are frozen. Subclasses add what reads the caption feature.
    """

    def __init__(self, embeddings: np.ndarray | torch.Tensor, hidden: int, *, layers: int = 1,
                 bidirectional: bool = True, train_embeddings: bool = False):
        super().__init__()
        embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if embeddings.ndim != 2 or len(embeddings) <= text.OOV:
            raise ValueError(f"embeddings must be a [vocabulary >= 2, dim] matrix, got {tuple(embeddings.shape)}")
        self.embedding = nn.Embedding.from_pretrained(embeddings, freeze=not train_embeddings, padding_idx=text.PAD)
        self.oov_vector = nn.Parameter(torch.zeros(embeddings.shape[1]))
        self.lstm = nn.LSTM(embeddings.shape[1], hidden, num_layers=layers, batch_first=True,
                            bidirectional=bidirectional)

    @property
    def feature_dim(self) -> int:
        return (2 if self.lstm.bidirectional else 1) * self.lstm.hidden_size

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, seq_len] token ids and [B] lengths (>= 1) -> [B, feature_dim] caption features."""
        vectors = self.embedding(ids)
        vectors = torch.where((ids == text.OOV).unsqueeze(-1), self.oov_vector.to(vectors.dtype), vectors)
        packed = pack_padded_sequence(vectors, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        if self.lstm.bidirectional:
            return torch.cat([hidden[-2], hidden[-1]], dim=1)  # last layer's forward and backward states
        return hidden[-1]


class CaptionBiLSTM(CaptionEncoder):
    """Word vectors -> Bi-LSTM -> [forward; backward] final hidden state -> dropout -> 18 logits (stage 02)."""

    def __init__(self, embeddings: np.ndarray | torch.Tensor, hidden: int = 50, dropout: float = 0.1,
                 num_classes: int = L.NUM_CLASSES, train_embeddings: bool = False):
        super().__init__(embeddings, hidden, train_embeddings=train_embeddings)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden, num_classes)

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
def extract_features(model: CaptionEncoder, batches: Batches, device: torch.device, desc: str | None = None) -> np.ndarray:
    """The caption feature of every row of ``batches``, in order, as float32 [N, 2 * hidden]."""
    model.eval().to(device)
    out = [model.features(ids.to(device), lengths).float().cpu().numpy()
           for (ids, lengths), _ in progress(batches, desc=desc, leave=False, disable=desc is None)]
    return np.concatenate(out) if out else np.zeros((0, model.feature_dim), dtype=np.float32)


def make_optimizer(model: CaptionEncoder, lr: float, weight_decay: float,
                   kind: type[torch.optim.Optimizer] = torch.optim.Adam) -> torch.optim.Optimizer:
    """Adam (or ``kind``, e.g. Adadelta); weight decay on the network but not on the word vectors (trainable or
    not), because decaying pretrained vectors towards zero only destroys what they know."""
    vectors = [p for n, p in model.named_parameters() if n == "embedding.weight" and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if n != "embedding.weight" and p.requires_grad]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0})
    return kind(groups, lr=lr)
