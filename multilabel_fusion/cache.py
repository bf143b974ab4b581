"""On-disk feature blocks keyed to what produced them.

A block (``image``, ``caption``, ``detector`` …) lives in ``output/features/<block>/<key>/`` where the
key hashes the settings that produced it and the data files' fingerprint: a re-run with the same
settings loads it, any change recomputes. The folder is written under a temporary name and renamed
into place with its manifest last, and every array is checked against the manifest on load, so a
half-written or damaged cache is never reused. ``latest.json`` names the newest key, so a later
stage (the fusion network) can read a block by name alone. Large blocks are written with
:meth:`FeatureCache.writer`, which hands out memory-mapped arrays inside the temporary folder, so
memory stays bounded by one batch whatever the number of images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .atomic import atomic_dir, write_json

MANIFEST = "manifest.json"


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class MissingBlockError(FileNotFoundError):
    pass


class FeatureCache:
    """One feature block for one combination of settings and data."""

    def __init__(self, output_dir: str | Path, block: str, settings: dict[str, Any], data_fingerprint: str):
        self.block = block
        self.settings = dict(settings)
        self.data_fingerprint = data_fingerprint
        self.key = settings_key({"block": block, "settings": self.settings, "data": data_fingerprint})
        self.block_dir = Path(output_dir) / "features" / block
        self.dir = self.block_dir / self.key

    def load(self) -> dict[str, Any] | None:
        """The cached arrays and manifest, or None when absent, incomplete or damaged."""
        return _read(self.dir, self.data_fingerprint)

    def save(self, arrays: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the arrays (e.g. ``train``, ``test``, ``train_ids``) atomically, then point ``latest.json`` here."""
        with self.writer() as w:
            for name, array in arrays.items():
                w.put(name, array)
            w.info.update(info or {})
        return self.load()

    @contextlib.contextmanager
    def writer(self) -> Iterator["CacheWriter"]:
        """Fill arrays in a temporary folder; on success it is renamed into place with its manifest last.

        An exception inside the block (an interrupted extraction) leaves no trace: the previous cache, if
        any, stays as it was and nothing half-written can be loaded.
        """
        with atomic_dir(self.dir) as tmp:
            w = CacheWriter(tmp)
            yield w
            arrays = w.close()
            write_json(tmp / MANIFEST, self._manifest(arrays, w.info))
        write_json(self.block_dir / "latest.json", {"key": self.key})

    def _manifest(self, arrays: dict[str, dict], info: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "block": self.block,
            "key": self.key,
            "settings": self.settings,
            "data_fingerprint": self.data_fingerprint,
            "arrays": arrays,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "info": info or {},
        }


class CacheWriter:
    """Arrays of one cache being written: :meth:`array` (memory-mapped, filled in place) or :meth:`put`."""

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
            del mapped
        self._open.clear()
        return dict(self._specs)


def _read(folder: Path, data_fingerprint: str | None) -> dict[str, Any] | None:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if data_fingerprint is not None and manifest["data_fingerprint"] != data_fingerprint:
            return None
        out: dict[str, Any] = {"manifest": manifest}
        for name, spec in manifest["arrays"].items():
            array = np.load(folder / f"{name}.npy", allow_pickle=False)
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                return None
            out[name] = array
        return out
    except (OSError, ValueError, KeyError, EOFError):
        return None


def load_block(output_dir: str | Path, block: str, data_fingerprint: str) -> dict[str, Any]:
    """The newest cache of ``block`` for this data, as written by the stage that owns it."""
    block_dir = Path(output_dir) / "features" / block
    pointer = block_dir / "latest.json"
    hint = {"image": "stages/01_image_network.py", "caption": "stages/02_caption_network.py",
            "detector": "stages/04_detector.py"}.get(block, "the stage that writes it")
    if not pointer.is_file():
        raise MissingBlockError(f"{block_dir}: no cached '{block}' features; run {hint} first")
    found = _read(block_dir / json.loads(pointer.read_text())["key"], data_fingerprint)
    if found is None:
        raise MissingBlockError(
            f"{block_dir}: the cached '{block}' features are for other data or damaged; run {hint} again"
        )
    return found
