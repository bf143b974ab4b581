"""Atomic file and folder writes: a reader never sees a half-written output. Running out of disk space is one
:class:`DiskFull` error naming the folder and the bytes needed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class DiskFull(OSError):
    """No space left on the device of a folder; the message says which folder and how many bytes were needed."""

    def __init__(self, folder: str | os.PathLike, needed: int | None = None):
        folder = Path(folder)
        try:
            free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        except OSError:
            free = None
        need = f"{needed:,} bytes needed" if needed is not None else "more space needed"
        have = f", {free:,} free" if free is not None else ""
        super().__init__(errno.ENOSPC, f"no space left on the device of {folder} ({need}{have}); free some space "
                                       "and run again (nothing half-written is kept)")

    def __str__(self) -> str:
        return self.strerror


def allocate(path: str | os.PathLike, nbytes: int, where: str | os.PathLike | None = None) -> None:
    """Reserve ``nbytes`` for the file ``path`` now, so that writing it later (a memory-mapped array) cannot run out
    of space half-way (which would be a bus error, not an exception); ``where``: the folder to name if it cannot."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(int(nbytes), 1))
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFull(where or Path(path).parent, nbytes) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):  # a file system without it: written
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def disk_space(folder: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn "no space left on device" inside the block into :class:`DiskFull` naming ``folder``."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFull(folder, needed) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    with disk_space(path.parent):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_space(path.parent):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    with atomic_path(path) as tmp, disk_space(Path(path).parent, len(data)):
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the ``.<name>.<pid>.<random>.tmp`` leftovers in ``folder`` whose writing process no longer runs
    (it was killed mid-write); only those of ``name`` when given. A live writer's temporary is left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        match = _TEMPORARY.match(tmp.name)
        if not match or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; it replaces ``path`` only if the block succeeds.

    The temporary name holds the writer's pid, so a later writer removes what a killed one left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    with disk_space(path.parent):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        with disk_space(path.parent):
            yield tmp
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically, with the file's sha256 beside it (``<name>.sha256``), which
    :func:`load_torch` checks: a truncated or damaged checkpoint is named, never half-read."""
    import io

    import torch
    from .hashing import digest_bytes

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    with atomic_path(path) as tmp, disk_space(Path(path).parent, len(data)):
        tmp.write_bytes(data)
    write_text(checksum_path(path), digest_bytes(data) + "\n")
    return Path(path)


def checksum_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.sha256")


class DamagedFile(ValueError):
    """A file the project wrote that is not what it wrote (truncated, edited); the message says what to do."""


def load_torch(path: str | os.PathLike, *, remedy: str, weights_only: bool = True, map_location: str = "cpu") -> Any:
    """A checkpoint written by :func:`save_torch`, checked against its sha256 first; a mismatch or an unreadable file
    is a :class:`DamagedFile` naming it and ``remedy`` (what to do: e.g. delete the run folder to train again)."""
    import torch
    from .hashing import file_digest

    path = Path(path)
    expected = checksum_path(path)
    if expected.is_file():
        found = file_digest(path, None)
        if found != expected.read_text().strip():
            raise DamagedFile(f"{path}: damaged (its content does not match the checksum written with it); {remedy}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise DamagedFile(f"{path}: unreadable ({type(err).__name__}: {first}); {remedy}") from None
