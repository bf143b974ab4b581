"""Recurrent label decoders: the label set predicted one label at a time by an LSTM, on cached CNN features.

Three published models (paper and poster "Applying NLP Deep Learning Ideas to Image Classification"), each
optionally with Bahdanau attention over the CNN's intermediate features:

* ``joint`` — image–label joint embedding (Wang et al. 2016, CNN-RNN): the LSTM reads the previous label's
  embedding; ``x_t = tanh(h_t W_h + I W_I)`` joins its output and the image, scores ``s_t = x_t E^T`` against the
  label embeddings themselves;
* ``init_hidden`` / ``init_hidden_cell`` / ``init_input`` — CNN as initialisation: the image is the first hidden
  state (cell zero), both states, or the input of an extra first step whose states start the decoding;
* ``seq2seq`` — an encoder LSTM reads the pooled features of several depths of the CNN (each projected to the
  embedding size), the decoder starts from its final state; ``+shared``: the encoder and the decoder are one LSTM
  (the same weights: the paper's best seq2seq).

Attention: ``s_i = tanh(h_i W_1 + d_t W_2 + b) v^T``, ``c_t = sum_i softmax(s)_i h_i``,
``d~_t = tanh([c_t; d_t] W_c + b_c)`` read by the output layer, and input feeding
``x~_t = tanh([d~_{t-1}; x_t] W_x + b_x)``. The encoder states ``h_i`` are the encoder LSTM's outputs (seq2seq)
or the projected depth features (joint, init).

Tokens: the 18 label columns (0..17), END (18), START (19), PAD (20); the output layer scores labels + END.
Training: teacher forcing on the labels sorted by training frequency (most frequent first), or order-free
(``pla`` / ``mla``, Yazici et al. 2020): the decoder runs on its own predictions and each image's targets are
re-ordered to match them. Decoding: beam search (greedy = width 1), vectorised over the batch, until END,
never a label twice and never END first (every image has a label).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data import labels as L
from ..io.progress import progress
from ..settings import decoder_variant_tokens

NUM_LABELS = L.NUM_CLASSES
END, START, PAD = NUM_LABELS, NUM_LABELS + 1, NUM_LABELS + 2
N_OUT = NUM_LABELS + 1  # what a step scores: the labels and END
VOCAB = NUM_LABELS + 3
MASKED = -1e9  # a logit that can never win (finite: log_softmax of a row stays finite)


@dataclass(frozen=True)
class Variant:
    """One decoder: architecture, attention, label embeddings, target order, inputs (``+caption``), and whether
    its encoder is its decoder (``+shared``, seq2seq)."""

    arch: str
    attention: bool = False
    embeddings: str = "random"  # random (Xavier) | word_vectors
    order: str = "frequency"  # frequency (teacher forcing) | pla | mla (order-free)
    caption: bool = False  # representation = image and caption features
    shared: bool = False  # seq2seq: one LSTM reads the depths, then decodes the labels

    @classmethod
    def parse(cls, name: str) -> "Variant":
        """``seq2seq+attention+pla`` -> Variant (grammar and errors: :func:`config.decoder_variant_tokens`)."""
        arch, mods = decoder_variant_tokens(name)
        order = "pla" if "pla" in mods else "mla" if "mla" in mods else "frequency"
        return cls(arch, "attention" in mods, "word_vectors" if "word_vectors" in mods else "random", order,
                   "caption" in mods, "shared" in mods)

    @property
    def name(self) -> str:
        mods = (["shared"] if self.shared else []) + (["attention"] if self.attention else [])
        mods += ["word_vectors"] if self.embeddings != "random" else []
        mods += ([self.order] if self.order != "frequency" else []) + (["caption"] if self.caption else [])
        return "+".join([self.arch] + mods)

    @property
    def uses_depths(self) -> bool:
        return self.arch == "seq2seq" or self.attention


# --------------------------------------------------------------------------------------------- sequences


def frequency_rank(targets: np.ndarray) -> np.ndarray:
    """Rank of each label column by training frequency (0 = most frequent; ties by column)."""
    counts = np.asarray(targets).sum(0)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(NUM_LABELS, dtype=np.int64)
    rank[order] = np.arange(NUM_LABELS)
    return rank


def label_sequences(y: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot [B, 18] -> (decoder inputs, targets), both [B, T] with T = most labels + 1.

    Targets: the labels by ``rank`` (most frequent first), END, then PAD; inputs: START then the targets shifted
    by one (what the decoder reads under teacher forcing).
    """
    y = y > 0.5
    n = y.sum(1)
    steps = int(n.max()) + 1 if len(y) else 1
    key = torch.where(y, rank[None, :], rank[None, :] + NUM_LABELS)
    order = key.argsort(1)
    if steps > NUM_LABELS:
        order = torch.cat([order, order.new_full((len(y), steps - NUM_LABELS), PAD)], 1)
    pos = torch.arange(steps, device=y.device)[None, :]
    targets = torch.where(pos < n[:, None], order[:, :steps],
                          torch.where(pos == n[:, None], torch.full_like(order[:, :steps], END),
                                      torch.full_like(order[:, :steps], PAD)))
    inputs = torch.cat([targets.new_full((len(y), 1), START), targets[:, :-1]], 1)
    return inputs, targets


# ---------------------------------------------------------------------------------------------- network


class LabelDecoder(nn.Module):
    """Features -> (encoder) -> LSTM decoder over label tokens. Standardisation statistics of the representation
    and of the depth features are buffers (fitted on the training part), so a checkpoint alone decodes raw features.

    Inputs: ``rep`` [B, rep_dim] (the image representation I: pooled features, or pooled image + caption) and
    ``depths`` [B, sum(depth_dims)] (the encoder's sequence, depth by depth; used by seq2seq and attention).
    """

    def __init__(self, variant: Variant, rep_dim: int, depth_dims: list[int], *, embed: int = 100,
                 hidden: int = 512, proj_dropout: float = 0.5, lstm_dropout: float = 0.2,
                 rank: np.ndarray | None = None, embedding_init: torch.Tensor | None = None):
        super().__init__()
        self.variant, self.depth_dims = variant, [int(d) for d in depth_dims]
        arch, att = variant.arch, variant.attention
        self.register_buffer("rep_mean", torch.zeros(rep_dim))
        self.register_buffer("rep_std", torch.ones(rep_dim))
        self.register_buffer("depth_mean", torch.zeros(sum(self.depth_dims)))
        self.register_buffer("depth_std", torch.ones(sum(self.depth_dims)))
        self.register_buffer("rank", torch.as_tensor(np.arange(NUM_LABELS) if rank is None else rank).long())
        self.embedding = nn.Embedding(VOCAB, embed)
        with torch.no_grad():
            if embedding_init is None:
                nn.init.xavier_uniform_(self.embedding.weight)
            else:
                self.embedding.weight.copy_(embedding_init)
        self.drop_proj, self.drop_lstm = nn.Dropout(proj_dropout), nn.Dropout(lstm_dropout)
        self.rnn = nn.LSTM(embed, hidden, batch_first=True)
        if variant.uses_depths:
            self.depth_proj = nn.ModuleList(nn.Linear(d, embed) for d in self.depth_dims)
        if arch == "seq2seq":  # +shared: the decoder's LSTM itself (one set of weights, as the paper's best)
            self.encoder = self.rnn if variant.shared else nn.LSTM(embed, hidden, batch_first=True)
        if arch == "joint":
            self.w_image = nn.Linear(rep_dim, embed)  # I W_I
            self.w_state = nn.Linear(hidden, embed, bias=False)  # h_t W_h
        else:
            self.out = nn.Linear(hidden, N_OUT)
        if arch in ("init_hidden", "init_hidden_cell"):
            self.init_h = nn.Linear(rep_dim, hidden)
        if arch == "init_hidden_cell":
            self.init_c = nn.Linear(rep_dim, hidden)
        if arch == "init_input":
            self.init_x = nn.Linear(rep_dim, embed)
        if att:
            memory = hidden if arch == "seq2seq" else embed
            self.att_memory = nn.Linear(memory, hidden)  # h_i W_1 + b
            self.att_state = nn.Linear(hidden, hidden, bias=False)  # d_t W_2
            self.att_v = nn.Linear(hidden, 1, bias=False)
            self.att_out = nn.Linear(memory + hidden, hidden)  # W_c, b_c
            self.feed = nn.Linear(hidden + embed, embed)  # input feeding W_x, b_x

    @property
    def decoder(self) -> nn.LSTM:
        """The decoder's LSTM (for ``seq2seq+shared`` the very module ``encoder`` is)."""
        return self.rnn

    def fit_standardisation(self, rep: np.ndarray, depths: np.ndarray | None = None) -> None:
        for array, mean, std in ((rep, self.rep_mean, self.rep_std), (depths, self.depth_mean, self.depth_std)):
            if array is not None and array.shape[1]:
                x = torch.as_tensor(np.asarray(array, dtype=np.float32))
                mean.copy_(x.mean(0))
                std.copy_(x.std(0).clamp_min(1e-6))

    # ---- encoder and initial state

    def encode(self, rep: torch.Tensor, depths: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        """Static context of the decoding (image projection, attention memory) and the initial state (h, c, d~)."""
        v, hidden = self.variant, self.rnn.hidden_size
        rep = (rep.float() - self.rep_mean) / self.rep_std
        b = len(rep)
        static: dict[str, torch.Tensor] = {}
        zeros = rep.new_zeros(b, hidden)
        h, c = zeros, zeros
        memory = None
        if v.uses_depths:
            depths = (depths.float() - self.depth_mean) / self.depth_std
            parts = torch.split(depths, self.depth_dims, 1)
            memory = torch.stack([self.drop_proj(proj(p)) for proj, p in zip(self.depth_proj, parts)], 1)
        if v.arch == "seq2seq":
            memory, (h0, c0) = self.encoder(memory)
            h, c = h0[0], c0[0]
        elif v.arch == "joint":
            static["image"] = self.drop_proj(self.w_image(rep))
        elif v.arch in ("init_hidden", "init_hidden_cell"):
            h = torch.tanh(self.drop_proj(self.init_h(rep)))
            if v.arch == "init_hidden_cell":
                c = self.drop_proj(self.init_c(rep))
        elif v.arch == "init_input":
            _, (h0, c0) = self.rnn(self.drop_proj(self.init_x(rep))[:, None], (zeros[None], zeros[None]))
            h, c = h0[0], c0[0]
        if v.attention:
            static["memory"], static["keys"] = memory, self.att_memory(memory)
        return static, (h, c, zeros)

    # ---- one decoding step

    def step(self, static: dict[str, torch.Tensor], state: tuple, tokens: torch.Tensor):
        """Read ``tokens`` [B] (the previous labels) -> (logits [B, labels + END], next state)."""
        h, c, attentional = state
        x = self.drop_lstm(self.embedding(tokens))
        if self.variant.attention:  # input feeding: the previous attentional state joins the input
            x = torch.tanh(self.feed(torch.cat([attentional, x], 1)))
        out, (h, c) = self.rnn(x[:, None], (h[None], c[None]))
        h, c = h[0], c[0]
        d = self.drop_lstm(out[:, 0])
        if self.variant.attention:
            scores = self.att_v(torch.tanh(static["keys"] + self.att_state(d)[:, None])).squeeze(-1)
            context = (torch.softmax(scores, 1)[..., None] * static["memory"]).sum(1)
            d = attentional = torch.tanh(self.att_out(torch.cat([context, d], 1)))
        return self.scores(d, static), (h, c, attentional)

    def scores(self, d: torch.Tensor, static: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder states [B, H] or [B, T, H] -> logits over labels + END: ``x_t E^T`` with
        ``x_t = tanh(d_t W_h + I W_I)`` (joint embedding), else a linear layer."""
        if self.variant.arch != "joint":
            return self.out(d)
        image = static["image"] if d.dim() == 2 else static["image"][:, None]
        return torch.tanh(self.w_state(d) + image) @ self.embedding.weight[:N_OUT].t()

    # ---- training losses

    def teacher_forced_logits(self, rep: torch.Tensor, depths: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, labels + END] when the decoder reads ``inputs`` [B, T] (START, then the true labels).

        Without attention the LSTM reads the whole sequence in one call, packed so that no step past a row's
        END is computed (half the work at 1.55 labels per image); with attention (input feeding) step by step.
        """
        static, state = self.encode(rep, depths)
        lengths = ((inputs != PAD) & (inputs != END)).sum(1).clamp_min(1)  # START + labels: the steps needed
        if not self.variant.attention:
            from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

            h, c, _ = state
            x = pack_padded_sequence(self.drop_lstm(self.embedding(inputs)), lengths.cpu(), batch_first=True,
                                     enforce_sorted=False)
            out, _ = self.rnn(x, (h[None].contiguous(), c[None].contiguous()))
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.shape[1])
            return self.scores(self.drop_lstm(out), static)
        # step by step over the rows still running: sorted by length, those are a prefix of the batch
        order = lengths.argsort(descending=True)
        static = {name: s[order] for name, s in static.items()}
        state, inputs, running = tuple(s[order] for s in state), inputs[order], lengths[order]
        out = []
        for t in range(inputs.shape[1]):
            n = int((running > t).sum())
            if n == 0:
                out.append(out[-1].new_zeros(len(order), N_OUT))
                continue
            state = tuple(s[:n] for s in state)
            logits, state = self.step({name: s[:n] for name, s in static.items()}, state, inputs[:n, t])
            out.append(F.pad(logits, (0, 0, 0, len(order) - n)))
        return torch.stack(out, 1)[order.argsort()]

    def loss(self, rep: torch.Tensor, depths: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per label token (END included, PAD ignored): teacher forcing on the frequency order, or
        order-free on the decoder's own predictions."""
        if self.variant.order == "frequency":
            inputs, targets = label_sequences(y, self.rank)
            logits = self.teacher_forced_logits(rep, depths, inputs)
        else:
            logits, targets = self.order_free(rep, depths, y)
        return F.cross_entropy(logits.reshape(-1, N_OUT).float(), targets.reshape(-1), ignore_index=PAD)

    def order_free(self, rep: torch.Tensor, depths: torch.Tensor, y: torch.Tensor):
        """Yazici et al. 2020: decode on the model's own predictions (the most probable label not yet read is the
        next input), then give each image's true labels to the steps in the order that matches the predictions.

        ``pla`` (predicted label alignment): a step that predicted a true label keeps it as its target; the other
        true labels go to the remaining steps. ``mla`` (minimal loss alignment): every true label goes to the step
        where it is most probable. Both assignments are greedy (highest probability first, vectorised over the
        batch) where the reference solves them exactly (Hungarian): at most 7 labels, the matchings rarely
        differ. Step n (n = number of labels) has target END; later steps are PAD.
        """
        y = y > 0.5
        b, n = len(y), y.sum(1)
        steps = int(n.max()) + 1
        static, state = self.encode(rep, depths)
        tokens = torch.full((b,), START, dtype=torch.long, device=y.device)
        read = torch.zeros(b, NUM_LABELS, dtype=torch.bool, device=y.device)
        out, said = [], []
        for _ in range(steps):
            logits, state = self.step(static, state, tokens)
            out.append(logits)
            tokens = logits.detach()[:, :NUM_LABELS].masked_fill(read, MASKED).argmax(1)
            read = read | F.one_hot(tokens, NUM_LABELS).bool()
            said.append(tokens)
        logits = torch.stack(out, 1)
        with torch.no_grad():
            logp = F.log_softmax(logits.float(), -1)[:, :, :NUM_LABELS]  # [B, T, 18]
            pos = torch.arange(steps, device=y.device)[None, :]
            open_step = pos < n[:, None]  # steps that need a label
            targets = torch.where(pos == n[:, None], END, PAD).expand(b, steps).clone()
            left = y.clone()  # true labels not yet given to a step
            if self.variant.order == "pla":
                predicted = torch.stack(said, 1)  # each step's prediction: distinct labels along a row
                hit = open_step & left.gather(1, predicted)
                targets = torch.where(hit, predicted, targets)
                open_step = open_step & ~hit
                left = left & ~(F.one_hot(predicted, NUM_LABELS).bool() & hit[..., None]).any(1)
            cost = logp.masked_fill(~(open_step[:, :, None] & left[:, None, :]), -math.inf)
            for _ in range(int(open_step.sum(1).max())):
                best, flat = cost.flatten(1).max(1)
                rows = torch.nonzero(best > -math.inf).squeeze(1)
                if not len(rows):
                    break
                step, label = flat[rows] // NUM_LABELS, flat[rows] % NUM_LABELS
                targets[rows, step] = label
                cost[rows, step, :] = -math.inf
                cost[rows, :, label] = -math.inf
        return logits, targets

    # ---- decoding

    @torch.no_grad()
    def beam_search(self, rep: torch.Tensor, depths: torch.Tensor, width: int = 1,
                    max_labels: int = NUM_LABELS) -> dict[str, torch.Tensor]:
        """Beam search until END (greedy when ``width`` is 1), vectorised over the batch and the beams.

        A label already on a beam and END at the first step are masked before the softmax (the step's
        probabilities are renormalised over what may still be said); a finished beam carries its score on
        unchanged. Returns the best beam's label set ``sets`` [B, 18] (bool), its tokens ``tokens`` [B, steps]
        (labels in the order said, then END, then END again for a beam that finished before the others), its
        log-probability ``logp`` [B], and ``scores`` [B, 18]: each label's highest probability over the best
        beam's steps (the feature block).
        """
        width = max(1, min(int(width), NUM_LABELS))
        b, k = len(rep), width
        static, state = self.encode(rep, depths)
        expand = lambda t: t.repeat_interleave(k, 0)  # noqa: E731  rows b*k .. b*k+k-1 are image b's beams
        static = {name: expand(t) for name, t in static.items()}
        state = tuple(expand(t) for t in state)
        device = rep.device
        beam_logp = torch.full((b, k), -math.inf, device=device)
        beam_logp[:, 0] = 0.0  # one live beam at the start
        emitted = torch.zeros(b * k, NUM_LABELS, dtype=torch.bool, device=device)
        finished = torch.zeros(b * k, dtype=torch.bool, device=device)
        best_p = torch.zeros(b * k, NUM_LABELS, device=device)
        tokens = torch.full((b * k,), START, dtype=torch.long, device=device)
        said = tokens.new_zeros(b * k, 0)
        stay = torch.full((N_OUT,), MASKED, device=device)
        stay[END] = 0.0
        for t in range(max_labels + 1):
            logits, state = self.step(static, state, tokens)
            mask = torch.cat([emitted, torch.full((b * k, 1), t == 0, device=device)], 1)
            if t == max_labels:  # no more labels: END only
                mask[:, :NUM_LABELS] = True
            logp = F.log_softmax(logits.float().masked_fill(mask, MASKED), 1)
            best_p = torch.where(finished[:, None], best_p, torch.maximum(best_p, logp[:, :NUM_LABELS].exp()))
            logp = torch.where(finished[:, None], stay, logp)
            total = (beam_logp.reshape(-1, 1) + logp).reshape(b, k * N_OUT)
            beam_logp, flat = total.topk(k, 1)
            src = (torch.arange(b, device=device)[:, None] * k + flat // N_OUT).reshape(-1)
            tokens = (flat % N_OUT).reshape(-1)
            state = tuple(s[src] for s in state)
            emitted, finished, best_p = emitted[src], finished[src], best_p[src]
            said = torch.cat([said[src], tokens[:, None]], 1)
            emitted = emitted | (F.one_hot(tokens.clamp_max(NUM_LABELS - 1), NUM_LABELS).bool()
                                 & (tokens < NUM_LABELS)[:, None])
            finished = finished | (tokens == END)
            if bool(finished.all()):
                break
        top = torch.arange(b, device=device) * k  # topk is sorted: beam 0 is the best
        return {"sets": emitted[top], "scores": best_p[top], "logp": beam_logp[:, 0], "tokens": said[top]}


# ------------------------------------------------------------------------------------------- batches, decoding


class FeatureBatches:
    """Mini-batches ``((rep, depths), targets)`` sliced from whole tensors (faster than a DataLoader's per-item
    collate); with ``shuffle`` the order is redrawn every epoch from the seeded generator at ``.generator``."""

    def __init__(self, rep: np.ndarray, depths: np.ndarray, targets: np.ndarray | None, batch_size: int, *,
                 shuffle: bool = False, seed: int = 0):
        self.rep = torch.as_tensor(np.asarray(rep, dtype=np.float32))
        self.depths = torch.as_tensor(np.asarray(depths, dtype=np.float32))
        self.targets = (torch.zeros(len(self.rep), NUM_LABELS) if targets is None
                        else torch.as_tensor(np.asarray(targets, dtype=np.float32)))
        self.batch_size, self.shuffle = int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.rep) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        order = torch.randperm(len(self.rep), generator=self.generator) if self.shuffle else torch.arange(len(self.rep))
        for start in range(0, len(order), self.batch_size):
            rows = order[start: start + self.batch_size]
            yield (self.rep[rows], self.depths[rows]), self.targets[rows]


def batch_loss(model: LabelDecoder, inputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The trainer's ``batch_loss`` hook: the decoder builds its own target sequences from the multi-hot rows."""
    return model.loss(*inputs, targets)


@torch.no_grad()
def decode(model: LabelDecoder, rep: np.ndarray, depths: np.ndarray, width: int, *, max_labels: int = NUM_LABELS,
           device: torch.device | str = "cpu", batch_size: int = 2048, desc: str | None = None) -> dict[str, np.ndarray]:
    """Beam-search every row: ``sets`` [N, 18] uint8, ``scores`` [N, 18] float32, ``logp`` [N]."""
    model.eval().to(device)
    batches = FeatureBatches(rep, depths, None, batch_size)
    out: dict[str, list] = {"sets": [], "scores": [], "logp": []}
    for (r, d), _ in progress(batches, desc=desc, leave=False, disable=desc is None):
        got = model.beam_search(r.to(device), d.to(device), width, max_labels)
        for name in out:
            out[name].append(got[name].cpu().numpy())
    return {"sets": np.concatenate(out["sets"]).astype(np.uint8),
            "scores": np.concatenate(out["scores"]).astype(np.float32),
            "logp": np.concatenate(out["logp"]).astype(np.float32)}


@torch.no_grad()
def mean_loss(model: LabelDecoder, batches: FeatureBatches, device: torch.device | str = "cpu") -> float:
    """The training loss on held-out rows (dropout off), averaged per batch row."""
    model.eval().to(device)
    total, count = 0.0, 0
    for (r, d), y in batches:
        total += float(model.loss(r.to(device), d.to(device), y.to(device))) * len(y)
        count += len(y)
    return total / max(count, 1)


def sample_prf(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of each sample, averaged over the samples (the paper's table; F1 = Kaggle's)."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = (t & p).sum(1).astype(float)
    npred, ntrue = p.sum(1), t.sum(1)
    precision = np.divide(tp, npred, out=np.zeros_like(tp), where=npred > 0)
    recall = np.divide(tp, ntrue, out=np.zeros_like(tp), where=ntrue > 0)
    f1 = np.divide(2 * tp, npred + ntrue, out=np.zeros_like(tp), where=(npred + ntrue) > 0)
    return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}


# ------------------------------------------------------------------------------------------- label embeddings


def label_embedding_init(vectors: Any, embed: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """A [VOCAB, embed] matrix: Xavier rows, with each label's row starting with its word vector (a two-word class
    name, e.g. "traffic light", is the mean of its words' vectors); START, END and PAD stay random.

    The word vectors are rescaled to the Xavier entries' spread (their geometry is kept); when they are shorter
    than ``embed`` (GloVe 6B 50-d offline), the remaining columns stay random, so the embedding size — and so
    everything else — is the same as with random embeddings. Returns the matrix and what was used.
    """
    weight = torch.empty(VOCAB, embed)
    nn.init.xavier_uniform_(weight, generator=torch.Generator().manual_seed(seed))
    rows, missing = [], []
    for name in L.names():
        words = [w for w in name.split() if w in vectors.key_to_index]
        missing += [w for w in name.split() if w not in vectors.key_to_index]
        rows.append(np.mean([vectors[w] for w in words], 0) if words else None)
    dim = int(vectors.vector_size)
    found = np.stack([r for r in rows if r is not None]) if any(r is not None for r in rows) else np.zeros((1, dim))
    scale = float(weight.std()) / max(float(found.std()), 1e-8)
    cols = min(dim, embed)
    for i, row in enumerate(rows):
        if row is not None:
            weight[i, :cols] = torch.as_tensor(row[:cols] * scale, dtype=torch.float32)
    return weight, {"vector_dim": dim, "columns_from_vectors": cols, "words_missing": missing,
                    "labels_from_vectors": sum(r is not None for r in rows)}
