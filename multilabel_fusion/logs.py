"""Logging for the command lines and notebooks: the console, a run's log file, and one-line errors.

The package logs through the standard :mod:`logging` module (``logging.getLogger(__name__)`` in every module, the
logger ``multilabel_fusion`` at level INFO, no handler of its own). A command line attaches a console handler
(:func:`console_logging`, messages as they are, progress-bar records left out: the console has the bar) and the
run's log file (:func:`run_log`: ``<output>/logs/<name>-<time>.log``, the same messages plus a progress bar's state
every few seconds, and how the run ended). A notebook calls :func:`show` once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator, TextIO

from .data.reader import DataError
from .evaluation.submission import SubmissionError
from .io.artifacts import MissingArtifact
from .io.assets import AssetUnavailable
from .io.atomic import DamagedFile, DiskFull
from .io.locks import FolderBusy
from .io.progress import LOGGER as PROGRESS_LOGGER
from .settings import ConfigError
from .stages.base import PredictorUnavailable
from .training.trainer import ResumeRequired

PACKAGE = "multilabel_fusion"

#: Errors that are the user's input or setup, not a bug: one line on the console, no traceback.
USER_ERRORS = (DataError, SubmissionError, MissingArtifact, AssetUnavailable, ResumeRequired, ConfigError,
               PredictorUnavailable, DamagedFile, DiskFull, FolderBusy)


class _NoProgress(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(PROGRESS_LOGGER)


def _handler(stream: TextIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_NoProgress())
    return handler


@contextlib.contextmanager
def console_logging(stream: TextIO | None = None) -> Iterator[logging.Handler]:
    """Show the package's messages on ``stream`` (default: standard output) while the block runs."""
    logger = logging.getLogger(PACKAGE)
    handler = _handler(stream or sys.stdout)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # a notebook's root handler would print them twice
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def show(stream: TextIO | None = None) -> None:
    """Show the package's messages from now on (a notebook's first cell); calling it again changes nothing."""
    logger = logging.getLogger(PACKAGE)
    if not any(getattr(h, "_mlf_show", False) for h in logger.handlers):
        handler = _handler(stream or sys.stdout)
        handler._mlf_show = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


class _LogFile(logging.StreamHandler):
    """A run's log file: a write that fails (a full disk) leaves the log short, never a traceback on the console
    (the console shows every message anyway)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


def log_path(output_dir: Path, name: str) -> Path:
    """``<output>/logs/<name>-<date>-<time>.log``, a new file for every run."""
    folder = Path(output_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{name}-{stamp}.log", 1
    while path.exists():
        n += 1
        path = folder / f"{name}-{stamp}-{n}.log"
    return path


@contextlib.contextmanager
def run_log(output_dir: Path, name: str) -> Iterator[Path]:
    """Everything the package logs during the block also goes to ``<output>/logs/<name>-<time>.log``, with the
    progress bars' states every few seconds; the log starts with the command and ends with how the run ended: an
    ``error: …`` line, a traceback, or the exit status."""
    try:
        path = log_path(output_dir, name)
        file = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below, whatever happens
        file.write(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n# started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')} in {Path.cwd()}\n")
    except OSError as err:  # no log (a full disk, a folder that cannot be written): the run is not stopped for it
        print(f"(no log kept: {err.strerror or err})", file=sys.stderr)
        yield None
        return
    logger = logging.getLogger(PACKAGE)
    handler = _LogFile(file)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    status = "finished"
    try:
        yield path
    except SystemExit as stop:
        status = f"exit status {stop.code}" if not isinstance(stop.code, str) else stop.code
        raise
    except BaseException as exc:
        status = "".join(traceback.format_exception(exc)).rstrip()
        raise
    finally:
        logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # a full disk: the console has said how it ended
            handler.flush()
            file.write(f"# {status} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        with contextlib.suppress(OSError):
            file.close()


@contextlib.contextmanager
def one_line_errors(*more: type[Exception]):
    """Input and set-up problems (:data:`USER_ERRORS`, and ``more`` of a command's own) end the command with one line
    (``error: …``, exit status 1), never a traceback."""
    try:
        yield
    except (*USER_ERRORS, *more) as err:
        raise SystemExit(f"error: {err}") from None
    except OSError as err:  # no space left where no folder was named, or a folder that cannot be written
        if err.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            where = f"{err.filename}: " if err.filename else ""
            raise SystemExit(f"error: {where}{err.strerror or err}") from None
        raise
    except ValueError as err:  # a setting refused after loading (e.g. a block name)
        if str(err).startswith("config:"):
            raise SystemExit(f"error: {err}") from None
        raise
