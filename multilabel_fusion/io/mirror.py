"""A copy of the run's folders in a place that outlives the machine (Google Drive in Colab).

Work happens on the fast local disk; after each stage and each training epoch the files that changed are copied
to the mirror (each one under a temporary name, then renamed: a disconnect mid-copy leaves the previous copy
whole), and a new machine gets back, before anything runs, every file it lacks. Nothing is read from the mirror
while working (no memory-mapped file on a network mount). The mirror's ``.mirror.json`` lists what it holds with
the size and modification time each file had here, so an unchanged file is never copied twice.

    with mirrored(Mirror(Path("/content/drive/MyDrive/multilabel-fusion"), {"output": out, "models": models})):
        ...                                            # run; the pipeline and the trainer call sync()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from .atomic import _TEMPORARY, atomic_path, write_json
from .locks import LOCK_NAME

log = logging.getLogger(__name__)

MANIFEST = ".mirror.json"


def _skipped(path: Path) -> bool:
    """Locks and the temporaries of writes in progress are this machine's, never copied."""
    return path.name in (LOCK_NAME, MANIFEST) or bool(_TEMPORARY.match(path.name))


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class Mirror:
    """Folders of this machine (``name -> local folder``) kept under ``root/<name>`` of the mirror."""

    def __init__(self, root: str | os.PathLike, folders: dict[str, str | os.PathLike]):
        self.root = Path(root)
        self.folders = {name: Path(local) for name, local in folders.items()}
        self._manifest: dict[str, list[int]] | None = None
        self._last_sync: dict[str, float] = {}

    def manifest(self) -> dict[str, list[int]]:
        if self._manifest is None:
            try:
                self._manifest = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))["files"]
            except (FileNotFoundError, ValueError, KeyError):
                self._manifest = {}
        return self._manifest

    def _local_files(self, within: Path | None):
        """(mirror-relative name, path) of every file to keep: of all folders, or of those under ``within``."""
        for name, local in self.folders.items():
            local = local.resolve()
            top = local if within is None else within.resolve()
            if not top.is_dir() or (top != local and local not in top.parents):
                continue
            for path in sorted(top.rglob("*")):
                if path.is_file() and not path.is_symlink() and not _skipped(path):
                    yield f"{name}/{path.relative_to(local).as_posix()}", path

    def sync(self, within: str | os.PathLike | None = None, at_most_every: float = 0) -> int:
        """Copy the files that are new or changed here (all folders, or only those under ``within``) to the
        mirror; each lands whole or not at all. ``at_most_every``: seconds to wait since the last sync of the same
        ``within`` (a training run of one-second epochs need not copy its checkpoint every second). Returns how
        many were copied."""
        manifest, copied, size, started = self.manifest(), 0, 0, time.time()
        if started - self._last_sync.get(str(within), -math.inf) < at_most_every:
            return 0
        self._last_sync[str(within)] = started
        try:
            for rel, path in self._local_files(Path(within) if within is not None else None):
                stamp = _stamp(path)
                target = self.root / rel
                if manifest.get(rel) == stamp and target.is_file():
                    continue
                with atomic_path(target) as tmp:
                    shutil.copyfile(path, tmp)
                manifest[rel] = stamp
                copied, size = copied + 1, size + stamp[0]
        except OSError as err:  # Drive unmounted or full: the run goes on, its results are here
            log.warning(f"[mirror] could not copy to {self.root} ({err}); the run goes on, and what it makes is on "
                        "this machine only until a later copy succeeds")
        if copied:
            try:
                write_json(self.root / MANIFEST, {"format": 1, "files": manifest})
            except OSError as err:
                log.warning(f"[mirror] could not write {self.root / MANIFEST} ({err})")
            log.info(f"[mirror] copied {copied} file(s), {size / 1e6:.1f} MB, to {self.root} "
                     f"in {time.time() - started:.1f} s")
        return copied

    def restore(self) -> int:
        """Copy back every file of the mirror that this machine lacks (a new runtime); a file present here is
        newer than the mirror's copy or the same, and is kept. Returns how many were copied."""
        copied, size, started = 0, 0, time.time()
        for rel, stamp in sorted(self.manifest().items()):
            name, _, inner = rel.partition("/")
            if name not in self.folders:
                continue
            local, source = self.folders[name] / inner, self.root / rel
            if local.exists() or not source.is_file():
                continue
            with atomic_path(local) as tmp:
                shutil.copyfile(source, tmp)
            os.utime(local, ns=(stamp[1], stamp[1]))  # as it was here: the next sync sees it unchanged
            copied, size = copied + 1, size + stamp[0]
        if copied:
            log.info(f"[mirror] restored {copied} file(s), {size / 1e6:.1f} MB, from {self.root} "
                     f"in {time.time() - started:.1f} s")
        return copied


_active: list[Mirror] = []


@contextlib.contextmanager
def mirrored(mirror: Mirror | None) -> Iterator[Mirror | None]:
    """Make ``mirror`` the one :func:`sync` copies to while the block runs (nothing when None); restore first,
    and sync once more at the end, also when the block fails (what was finished is kept)."""
    if mirror is None:
        yield None
        return
    mirror.restore()
    _active.append(mirror)
    try:
        yield mirror
    finally:
        _active.remove(mirror)
        mirror.sync()


def sync(within: str | os.PathLike | None = None, at_most_every: float = 0) -> int:
    """Copy what changed (under ``within``) to the active mirror (see :meth:`Mirror.sync`); nothing without one."""
    return _active[-1].sync(within, at_most_every) if _active else 0
