"""Artifacts keyed by what produced them, found by key (as make or DVC do): no "latest" pointer.

A stage's artifact (a feature block, probabilities …) lives in ``output/artifacts/<stage>/<key>/`` where the
key hashes its spec (settings that shape it, asset identities, input keys, data fingerprint; see
:mod:`multilabel_fusion.stages.context`). A downstream stage computes the key from the current configuration and
finds exactly that folder, or stops with a one-line error naming the stage to run. Changing a setting and
changing it back finds the old artifact again.

Folders are written under a temporary name and renamed into place with their manifest last; every array
is checked against the manifest on load, so a half-written or damaged artifact is never used. Large arrays
are filled through memory-mapped files (:meth:`ArtifactWriter.array`), so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .atomic import atomic_dir, remove_stale_temporaries, write_json

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
            w = ArtifactWriter(tmp)
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

    def __init__(self, folder: Path):
        self.folder = folder
        self.info: dict[str, Any] = {}
        self._open: dict[str, np.ndarray] = {}
        self._specs: dict[str, dict] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable ``.npy`` file mapped into memory; rows written to it go straight to disk."""
        out = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=np.dtype(dtype),
                                        shape=tuple(shape))
        self._open[name] = out
        return out

    def put(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        np.save(self.folder / f"{name}.npy", array, allow_pickle=False)
        self._specs[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}

    def close(self) -> dict[str, dict]:
        for name, mapped in self._open.items():
            mapped.flush()
            self._specs[name] = {"shape": list(mapped.shape), "dtype": str(mapped.dtype)}
        self._open.clear()
        return dict(self._specs)


def _read(folder: Path, mmap: bool = False) -> Artifact | None:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        out = Artifact(manifest=manifest)
        for name, spec in manifest["arrays"].items():
            array = np.load(folder / f"{name}.npy", allow_pickle=False, mmap_mode="r" if mmap else None)
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                return None
            out[name] = array
        out.dir = folder
        return out
    except (OSError, ValueError, KeyError, EOFError):
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
