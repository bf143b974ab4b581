"""Progress bars that a run's log can keep: tqdm on the console, and the bar's state in the log.

Every long loop of the package uses :func:`progress` (a ``tqdm.auto`` bar). Besides drawing itself, a bar sends its
state to the logger ``multilabel_fusion.progress`` at most every :data:`LOG_INTERVAL` seconds and once when it
ends; the console handler leaves those records out (the console has the bar), a run's log file keeps them, so the
log shows a long extraction advancing without one line per update.
"""

from __future__ import annotations

import logging
import math
import re
import time

from tqdm.auto import tqdm

#: Seconds between two bar states kept in a log (its last state is always kept).
LOG_INTERVAL = 5.0
LOGGER = "multilabel_fusion.progress"
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

log = logging.getLogger(LOGGER)


class BarLog:
    """The states of one bar as a log keeps them: at most one every :data:`LOG_INTERVAL` seconds, and the last."""

    def __init__(self, logger: logging.Logger = log, clock=time.monotonic, interval: float = LOG_INTERVAL):
        self.logger, self.clock, self.interval = logger, clock, interval
        self.last_time, self.pending = -math.inf, None

    def update(self, state: str) -> None:
        state = _CONTROL.sub("", state).strip()
        if not state:
            return
        now = self.clock()
        if now - self.last_time >= self.interval:
            self.logger.info(state)
            self.last_time, self.pending = now, None
        else:
            self.pending = state

    def close(self, state: str | None = None) -> None:
        """The bar's final state (or the last one not yet kept)."""
        final = _CONTROL.sub("", state).strip() if state else self.pending
        if final:
            self.logger.info(final)
        self.pending = None


class progress(tqdm):  # noqa: N801 - used like tqdm
    """A ``tqdm.auto`` bar whose state also reaches the run's log, as far as the console showed it (a bar that ends
    before its first display, e.g. an epoch's batches outside a terminal, leaves nothing in the log either)."""

    def __init__(self, *args, **kwargs):
        self._barlog = BarLog() if log.isEnabledFor(logging.INFO) and not kwargs.get("disable") else None
        self._shown = False
        super().__init__(*args, **kwargs)

    def display(self, *args, **kwargs):
        shown = super().display(*args, **kwargs)
        if self._barlog is not None and not args and not kwargs:  # a refresh (not the closing redraw)
            self._shown = True
            self._barlog.update(str(self))
        return shown

    def close(self):
        barlog, self._barlog = getattr(self, "_barlog", None), None
        if barlog is not None and self._shown and not self.disable:
            barlog.close(str(self))
        super().close()
