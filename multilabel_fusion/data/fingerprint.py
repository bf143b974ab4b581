"""What a set of photos is: a fingerprint of every image file's content, cheap to recompute.

A changed photo (same name, other content) must change the key of every artifact made from the images, so their
fingerprint hashes the content of each file. Re-reading 40,000 files every run is avoided by a cache of content
hashes keyed by each file's name, size and modification time (``<output>/cache/image_hashes.json``): a run stats the
files and hashes only those that are new or changed (a file edited in place keeps neither its size nor its
modification time; copying another file over it with its timestamps preserved and the same size would go unseen).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from ..io.atomic import write_text


def _content_hash(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:32]
    except OSError:
        return "unreadable"


def images_fingerprint(paths: Sequence[Path], cache_file: Path | None = None) -> str:
    """One digest of the content of every image in ``paths`` (a missing or unreadable file counts as such)."""
    cache: dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    changed = False
    digest = hashlib.sha256()
    for path in paths:
        key = os.fspath(path)
        try:
            st = os.stat(key)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = [-1, -1]
        known = cache.get(key)
        if known is None or known[:2] != stamp:
            known = stamp + [_content_hash(key) if stamp[0] >= 0 else "missing"]
            cache[key] = known
            changed = True
        digest.update(f"{os.path.basename(key)}:{known[2]}\n".encode())
    if changed and cache_file is not None:
        try:
            write_text(cache_file, json.dumps(cache))
        except OSError:
            pass  # a cache that cannot be written only costs hashing again next time
    return digest.hexdigest()[:16]
