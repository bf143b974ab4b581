"""Multi-label photo+caption classifier for the COMP5329 competition.

The stages in ``stages/`` and the notebooks are thin wrappers around this package: ``registry`` lists the
stages, ``stages/`` holds one module per stage, and ``data``, ``engine``, ``evaluation``, ``networks``,
``reports`` hold what they share (see README.md, "Layout").
"""

import os as _os
import sys as _sys

__version__ = "0.2.0"

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with another job, spinning threads
# made one EfficientNet forward take 1.1-2.5 s instead of 0.025 s (must be set before torch is imported).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Outside a terminal (a log file, CI, a notebook's captured stream) a progress bar writes a new line at every
# update: at most one every few seconds there, instead of one every batch (tqdm reads TQDM_* defaults).
if not getattr(_sys.stderr, "isatty", lambda: False)():
    _os.environ.setdefault("TQDM_MININTERVAL", "5")
