"""Stable digests: of a spec (an artifact's key) and of a file's content (weights, checkpoints)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any


def digest(spec: Any, chars: int = 12) -> str:
    """The key of a JSON-able spec: sha256 of its JSON with sorted keys (other values by ``str``), ``chars`` digits."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:chars]


def _file_hash(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


@functools.lru_cache(maxsize=64)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    return _file_hash(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content; memoised by path, size and modification time (a content cache: large weights
    are hashed once a process, and a changed file is hashed again)."""
    st = Path(path).stat()
    return _digest_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def file_digest(path: str | Path, chars: int | None = 16) -> str:
    """sha256 of a file, ``chars`` hex digits (``None``: all 64), never memoised (checkpoints change)."""
    return _file_hash(path)[:chars]


def digest_bytes(data: bytes) -> str:
    """sha256 of bytes (all 64 hex digits)."""
    return hashlib.sha256(data).hexdigest()
