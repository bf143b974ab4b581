"""The ResNet + LSTM report's one network (stage 07): frozen CNN features and an LSTM over the caption, concatenated,
two fully connected layers with batch norm, 18 logits; trained end to end (the word vectors frozen unless asked)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import labels as L
from .caption_lstm import CaptionEncoder
from .caption_lstm import make_optimizer as caption_optimizer


class ConcatLSTM(CaptionEncoder):
    """[standardised CNN features ; the caption LSTM's final state(s)] -> Linear(fc_hidden) -> BatchNorm -> ReLU ->
    dropout -> Linear(18).

    The CNN features are standardised with statistics of the rows trained on (buffers, so a checkpoint alone
    predicts from raw features): pooled ResNet features are non-negative and of any scale, the LSTM's states lie in
    (-1, 1), and the first layer sees both. The caption encoder (embedding, learned ``<oov>`` vector, LSTM) is the
    caption network's (:class:`~multilabel_fusion.networks.caption_lstm.CaptionEncoder`).
    """

    def __init__(self, image_dim: int, embeddings: np.ndarray | torch.Tensor, hidden: int = 128, *, layers: int = 1,
                 bidirectional: bool = True, fc_hidden: int = 512, dropout: float = 0.5,
                 train_embeddings: bool = False, num_classes: int = L.NUM_CLASSES):
        super().__init__(embeddings, hidden, layers=layers, bidirectional=bidirectional,
                         train_embeddings=train_embeddings)
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.head = nn.Sequential(nn.Linear(image_dim + self.feature_dim, fc_hidden), nn.BatchNorm1d(fc_hidden),
                                  nn.ReLU(), nn.Dropout(dropout), nn.Linear(fc_hidden, num_classes))

    def fit_standardisation(self, image: np.ndarray) -> None:
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))
        self.image_mean.copy_(x.mean(0))
        self.image_std.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, image: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        image = (image.float() - self.image_mean) / self.image_std
        return self.head(torch.cat([image, self.features(ids, lengths).float()], dim=1))


def make_optimizer(model: ConcatLSTM, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adadelta (published) or Adam; the word vectors are never decayed (see
    :func:`multilabel_fusion.networks.caption_lstm.make_optimizer`)."""
    kinds = {"adadelta": torch.optim.Adadelta, "adam": torch.optim.Adam}
    if kind not in kinds:
        raise ValueError(f"optimizer must be one of {', '.join(kinds)}, not {kind!r}")
    return caption_optimizer(model, lr, weight_decay, kinds[kind])

