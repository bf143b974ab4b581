"""Captions -> token ids, and the word vectors behind them (stage 02's input side).

Cleaning follows the published caption network: case folding, punctuation and digits removed,
tokenising (``wordpunct_tokenize``: no punkt model needed), NLTK's English stop words removed
(the list is kept in ``resources/`` because no package ships it offline), WordNet lemmatising.
The word vectors behind the vocabulary are resolved by :func:`multilabel_fusion.assets.word_vectors`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Sequence

import numpy as np
from ..io.progress import progress

from . import nltk_setup

nltk_setup.register_data_dir()  # the repository's offline WordNet copy, wherever NLTK looks first

#: Bump when cleaning or vocabulary rules change: it keys the checkpoints and caches built from them.
TEXT_VERSION = 1

PAD, OOV = 0, 1  # reserved vocabulary rows: padding (all zeros) and every word without a vector
SPECIAL_TOKENS = ("<pad>", "<oov>")

# punctuation, digits and underscore (``\w`` would keep them) become spaces, so "dog,cat" stays two words
_NOT_LETTERS = re.compile(r"[^\w\s]|[\d_]")


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    """NLTK's English stop-word list (179 words), as shipped in ``resources/english_stopwords.txt``."""
    text = resources.files("multilabel_fusion").joinpath("resources/english_stopwords.txt").read_text("utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


@lru_cache(maxsize=1)
def _lemmatizer():
    from nltk.stem import WordNetLemmatizer

    if not nltk_setup.wordnet_works():
        nltk_setup.ensure_wordnet()  # first run without setup.sh: builds the offline copy, or says how
    return WordNetLemmatizer()


@lru_cache(maxsize=200_000)
def lemmatize(word: str) -> str:
    """WordNet lemma (noun reading, as published); memoised because captions repeat words constantly."""
    return _lemmatizer().lemmatize(word)


def clean_caption(caption: str) -> list[str]:
    """One caption -> lemmatised content words; may be empty (e.g. only stop words or digits)."""
    from nltk.tokenize import wordpunct_tokenize

    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}: {caption!r}")
    text = _NOT_LETTERS.sub(" ", caption.casefold())
    stop = stopwords()
    return [lemmatize(token) for token in wordpunct_tokenize(text) if token not in stop]


def clean_captions(captions: Iterable[str], desc: str | None = "cleaning captions") -> list[list[str]]:
    captions = list(captions)
    return [clean_caption(c) for c in progress(captions, desc=desc, unit="caption", disable=desc is None,
                                           mininterval=1.0)]


@dataclass
class Vocabulary:
    """Token <-> row of the embedding matrix; rows 0 and 1 are padding and out-of-vocabulary."""

    tokens: list[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        if tuple(self.tokens[:2]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}, got {self.tokens[:2]}")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, token_lists: Sequence[Sequence[str]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Token lists -> (ids [N, seq_len] int64, lengths [N] int64), first ``seq_len`` tokens, padded at the end.

        A caption with no words left after cleaning becomes one OOV token (length 1), so every
        sequence can be packed and the network still gives it a (learned) "no information" answer.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        ids = np.full((len(token_lists), seq_len), PAD, dtype=np.int64)
        lengths = np.ones(len(token_lists), dtype=np.int64)
        get = self.index.get
        for row, tokens in enumerate(token_lists):
            kept = [get(t, OOV) for t in tokens[:seq_len]] or [OOV]
            ids[row, : len(kept)] = kept
            lengths[row] = len(kept)
        return ids, lengths


def build_vocabulary(token_lists: Sequence[Sequence[str]], vectors) -> tuple[Vocabulary, np.ndarray]:
    """Vocabulary of every corpus word that has a vector, and its embedding matrix [V, dim] (float32).

    Words of any caption (train or test: no labels are used) with a pretrained vector get their own
    row, so a frozen embedding still understands test-only words; words without a vector share the
    OOV row. Only these rows are kept, not the whole pretrained table.
    """
    counts = Counter(t for tokens in token_lists for t in tokens)
    lookup = vectors.key_to_index
    words = sorted((w for w in counts if w in lookup), key=lambda w: (-counts[w], w))
    matrix = np.zeros((len(words) + len(SPECIAL_TOKENS), vectors.vector_size), dtype=np.float32)
    if words:
        matrix[len(SPECIAL_TOKENS):] = vectors.vectors[np.fromiter((lookup[w] for w in words), np.int64, len(words))]
    return Vocabulary([*SPECIAL_TOKENS, *words]), matrix


def oov_report(token_lists: Sequence[Sequence[str]], vocab: Vocabulary, top: int = 20) -> dict[str, Any]:
    """How many distinct words (and word occurrences) of these captions have no vector."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    missing = Counter({w: c for w, c in counts.items() if w not in vocab.index})
    total = sum(counts.values())
    return {
        "vocabulary_words": len(counts),
        "oov_words": len(missing),
        "oov_tokens": sum(missing.values()),
        "oov_token_fraction": round(sum(missing.values()) / max(total, 1), 5),
        "empty_captions": sum(1 for tokens in token_lists if not tokens),
        "most_common_oov": [w for w, _ in missing.most_common(top)],
    }
