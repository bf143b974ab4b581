"""Shared fixtures: the real competition copy (../shared/comp5329) and generated demo data."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from multilabel_fusion.data import demo
from multilabel_fusion.stages.context import StageContext

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "comp5329"

# The suite converts dozens of tiny networks: they go to a folder of its own (inherited by the commands it runs),
# never into the user's cache, where they would push out the real conversions (30-50 s each to redo).
os.environ.setdefault("MULTILABEL_FUSION_ENGINE_CACHE", tempfile.mkdtemp(prefix="multilabel_fusion-openvino-"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "train.csv").is_file():
        pytest.skip(f"real competition copy not found at {SHARED} (only present on the project's machines)")
    return SHARED


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small generated dataset in the exact raw competition format."""
    return demo.generate(tmp_path_factory.mktemp("demo") / "data", n_train=120, n_test=40, seed=1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module. On a 2-core machine that other jobs share, two OpenMP threads spin-wait on
    each other (a forward pass measured 50-100x slower than with one); no result depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def recorded_selections():
    """``with recorded_selections(stage) as seen:`` appends ``(k, train_idx, select_idx, held_idx)`` for every fold of
    ``stage`` that chooses its epoch meanwhile (other stages, such as the image head trained first, are left out):
    what a cross-fitting test checks its held-out rows against."""
    @contextlib.contextmanager
    def recording(stage: str):
        seen: list = []
        selection = StageContext.selection

        def recorded(self, k, fit_idx, held_idx):
            train_idx, select_idx = selection(self, k, fit_idx, held_idx)
            if self.stage.name == stage:
                seen.append((k, train_idx, select_idx, held_idx))
            return train_idx, select_idx

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(StageContext, "selection", recorded)
            yield seen

    return recording
