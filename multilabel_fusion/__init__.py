"""Multi-label photo+caption classifier for the COMP5329 competition.

The scripts in ``stages/`` and the notebooks are thin wrappers around this package. Layers, bottom to top (each
imports only from those below it; docs/ARCHITECTURE.md): ``settings`` and ``io``; ``data``; ``networks`` and
``evaluation``; ``features``; ``training``; ``stages`` (one object per stage, and the registry that lists them);
``pipeline``, ``predict`` and ``retrieve``; ``logs``; ``reports``; ``cli``.
"""

import logging as _logging
import os as _os
import sys as _sys

__version__ = "0.2.0"

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with another job, spinning threads
# made one EfficientNet forward take 1.1-2.5 s instead of 0.025 s (must be set before torch is imported).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Outside a terminal (a log file, CI, a notebook's captured stream) a progress bar writes a new line at every
# update: at most one every few seconds there, instead of one every batch, and a bar that ends within that time
# (an epoch's batches, a short extraction) writes nothing. tqdm reads its TQDM_* defaults once, when it is
# imported; torch imports it, so when that happened before this package they are read again here.
if not getattr(_sys.stderr, "isatty", lambda: False)():
    _os.environ.setdefault("TQDM_MININTERVAL", "5")
    _os.environ.setdefault("TQDM_DELAY", "5")
    if "tqdm.std" in _sys.modules:
        import functools as _functools

        import tqdm.std as _tqdm_std
        from tqdm.utils import envwrap as _envwrap

        _init = _tqdm_std.tqdm.__dict__.get("__init__")
        if isinstance(_init, _functools.partialmethod):  # tqdm's own env wrapping (tqdm >= 4.66), applied again
            _tqdm_std.tqdm.__init__ = _envwrap("tqdm", is_method=True, types={
                "total": float, "ncols": int, "miniters": float, "position": int, "nrows": int})(_init.func)

# A library logs, the command lines and notebooks show (multilabel_fusion.logs): INFO records are made, and reach
# whatever handler the application attaches; none is attached here.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
_logging.getLogger(__name__).setLevel(_logging.INFO)
