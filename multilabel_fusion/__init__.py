"""Multi-label photo+caption classifier for the COMP5329 competition.

The stages in ``stages/`` and the notebooks are thin wrappers around this package:
data reading, labels, metric, thresholds, submissions, feature caches, the one trainer,
and the four networks (image, caption, fusion, detector) all live here.
"""

__version__ = "0.1.0"
