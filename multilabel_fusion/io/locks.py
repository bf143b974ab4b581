"""One run at a time per output and models folder: a second job on the same folders stops in one line instead of
putting two writers on one training run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # lock files this process holds -> depth (a run inside a run of the same process)


class FolderBusy(RuntimeError):
    """Another live process holds the folder; the message says which and what to do."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<folder>/.lock`` (an advisory ``flock``, released by the system when the holder dies, even by
    SIGKILL) while the block runs; :class:`FolderBusy` at once when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_NAME).resolve()
    if _held.get(str(path)):
        _held[str(path)] += 1
        try:
            yield path
        finally:
            _held[str(path)] -= 1
        return
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderBusy(f"{folder} is in use by another run ({holder}); wait for it to finish, or give this run "
                             "other folders (--output, --models)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        _held[str(path)] = 1
        try:
            yield path
        finally:
            _held.pop(str(path), None)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
