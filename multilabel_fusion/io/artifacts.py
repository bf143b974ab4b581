"""Artifacts keyed by what produced them, found by key (as make or DVC do): no "latest" pointer.

A stage's artifact (a feature block, probabilities …) lives in ``output/artifacts/<stage>/<key>/`` where the
key hashes its spec (settings that shape it, asset identities, input keys, data fingerprint; see
:mod:`multilabel_fusion.stages.context`). A downstream stage computes the key from the current configuration and
finds exactly that folder, or stops with a one-line error naming the stage to run. Changing a setting and
changing it back finds the old artifact again.

Folders are written under a temporary name and renamed into place with their manifest last. The manifest records
every array's shape, dtype and sha256, checked on every load: a half-written, truncated or edited artifact is never
used (it is computed again, and the log says why). Large arrays are filled through memory-mapped files
(:meth:`ArtifactWriter.array`), allocated on disk before the first row is written, so memory stays bounded and a
full disk is an error when the array is made, never a crash half-way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .atomic import allocate, atomic_dir, disk_space, remove_stale_temporaries, write_json
from .hashing import file_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class MissingArtifact(FileNotFoundError):
    """The artifact for the current settings does not exist; the message names the stage to run."""


class Artifact(dict):
    """The arrays of one artifact by name, plus ``manifest`` (spec, info, shapes); ``.dir`` is its folder."""

    dir: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return self["manifest"]

    @property
    def info(self) -> dict[str, Any]:
        return self["manifest"].get("info", {})

    @property
    def key(self) -> str:
        return self["manifest"]["key"]


class ArtifactStore:
    """``output/artifacts/<stage>/<key>/`` folders: load by key, write atomically."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir) / "artifacts"

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str, *, mmap: bool = False) -> Artifact | None:
        """The artifact, or None when absent, incomplete or damaged (then it is recomputed, never trusted).

        Temporary folders that killed writers left beside it (any key of this stage) are removed on the way.
        """
        remove_stale_temporaries(self.root / stage)
        return _read(self.dir(stage, key), mmap)

    def require(self, stage: str, key: str, hint: str) -> Artifact:
        found = self.load(stage, key, mmap=True)
        if found is None:
            others = sorted(p.name for p in (self.root / stage).glob("*") if (p / MANIFEST).is_file())
            also = f" ({len(others)} made with other settings exist)" if others else ""
            raise MissingArtifact(f"{self.dir(stage, key)}: no '{stage}' artifact for the current settings{also}; "
                                  f"run {hint} first")
        return found

    @contextlib.contextmanager
    def writer(self, stage: str, key: str, spec: dict[str, Any]) -> Iterator["ArtifactWriter"]:
        """Fill an artifact in a temporary folder; it is renamed into place, manifest last, only on success.

        An exception (an interrupted extraction) leaves nothing loadable; the temporary folder of a process
        that was killed is removed by the next writer of the same artifact.
        """
        with atomic_dir(self.dir(stage, key)) as tmp:
            w = ArtifactWriter(tmp, self.root / stage)
            yield w
            arrays = w.close()
            write_json(tmp / MANIFEST, {"stage": stage, "key": key, "spec": spec, "arrays": arrays,
                                        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "info": w.info})

    def save(self, stage: str, key: str, spec: dict[str, Any], arrays: dict[str, np.ndarray],
             info: dict[str, Any] | None = None) -> Artifact:
        with self.writer(stage, key, spec) as w:
            for name, array in arrays.items():
                w.put(name, array)
            w.info.update(info or {})
        return self.load(stage, key)


class ArtifactWriter:
    """Arrays of one artifact being written: :meth:`array` (memory-mapped, filled in place) or :meth:`put`."""

    def __init__(self, folder: Path, target: Path | None = None):
        self.folder = folder
        self.target = target or folder  # the folder a user knows (the temporary one is renamed into it)
        self.info: dict[str, Any] = {}
        self._open: dict[str, np.ndarray] = {}
        self._specs: dict[str, dict] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable ``.npy`` file mapped into memory; rows written to it go straight to disk. Its blocks are
        allocated first, so a full disk is an error here (naming the folder and the bytes), not a crash later."""
        path = self.folder / f"{name}.npy"
        dtype, shape = np.dtype(dtype), tuple(shape)
        with disk_space(self.target, int(np.prod(shape)) * dtype.itemsize):
            out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            allocate(path, path.stat().st_size, self.target)
        self._open[name] = out
        return out

    def put(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        path = self.folder / f"{name}.npy"
        with disk_space(self.target, array.nbytes), open(path, "wb") as f:
            np.save(f, array, allow_pickle=False)
        self._specs[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": file_digest(path, None)}

    def close(self) -> dict[str, dict]:
        for name, mapped in self._open.items():
            mapped.flush()
            path = self.folder / f"{name}.npy"
            self._specs[name] = {"shape": list(mapped.shape), "dtype": str(mapped.dtype),
                                 "sha256": file_digest(path, None)}
        self._open.clear()
        return dict(self._specs)


def _read(folder: Path, mmap: bool = False) -> Artifact | None:
    """The artifact in ``folder`` if it is complete and every array is the one written (shape, dtype, sha256);
    otherwise None, and the log says what was wrong (it is then computed again)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        out = Artifact(manifest=manifest)
        for name, spec in manifest["arrays"].items():
            path = folder / f"{name}.npy"
            if "sha256" not in spec:
                log.warning(f"{folder}: made before artifacts carried checksums; computing it again")
                return None
            if file_digest(path, None) != spec["sha256"]:
                log.warning(f"{path}: its content is not what was written (checksum mismatch); computing the "
                            "artifact again")
                return None
            array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                return None
            out[name] = array
        out.dir = folder
        return out
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError) as err:
        log.warning(f"{folder}: unreadable ({type(err).__name__}: {err}); computing it again")
        return None


def pick_rows(art: Artifact, picks: dict[str, tuple[str, np.ndarray]], skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays of a per-image artifact for other records of the same images: ``picks[part] = (source part,
    source rows)`` makes every array ``<part>`` / ``<part>_*`` from the source's ``<source part>`` / ``<source
    part>_*`` rows; arrays of neither part (e.g. class names) are kept as they are, and names ending in one of
    ``skip`` left out (the caller re-indexes what is not one row per record)."""
    names = [n for n in art.manifest["arrays"] if not (skip and n.endswith(skip))]
    out = {n: np.asarray(art[n]) for n in names if n.partition("_")[0] not in ("train", "test")}
    for part, (source, rows) in picks.items():
        for name in names:
            head, _, rest = name.partition("_")
            if head == source:
                out[part + (f"_{rest}" if rest else "")] = np.asarray(art[name][np.asarray(rows)])
    return out
