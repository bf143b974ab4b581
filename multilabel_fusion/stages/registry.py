"""The registry: the list of stage objects, in the order the pipeline runs them.

Everything that needs to know the stages asks a :class:`Registry`: the pipeline (order and dependencies), the stage
scripts, the notebooks, the reports, the predictor and the fused network (which blocks exist, who makes them).
Adding a stage is one class (a :class:`~multilabel_fusion.stages.base.Stage`) and one entry in :func:`default`
(or ``default().with_stage(MyStage())`` for a stage of your own).
"""

from __future__ import annotations

import difflib
import functools
from typing import Iterable, Iterator

from ..settings import Settings
from .base import Stage


class Registry:
    """An immutable, ordered collection of stages (by name), with the questions asked of it."""

    def __init__(self, stages: Iterable[Stage]):
        self._stages: dict[str, Stage] = {}
        for stage in stages:
            if stage.name in self._stages:
                raise ValueError(f"two stages are called {stage.name!r}")
            taken = {b: s.name for s in self._stages.values() for b in s.blocks}
            for block in stage.blocks:
                if block in taken:
                    raise ValueError(f"stages {taken[block]!r} and {stage.name!r} both offer the block {block!r}")
            self._stages[stage.name] = stage

    def with_stage(self, stage: Stage) -> "Registry":
        """This registry and one stage more (a stage of your own: one entry, nothing else to edit), run before the
        final stage (the fused network reads the blocks of every other)."""
        stages = list(self._stages.values())
        at = next((i for i, s in enumerate(stages) if s.final), len(stages)) if not stage.final else len(stages)
        return Registry([*stages[:at], stage, *stages[at:]])

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages.values())

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def __len__(self) -> int:
        return len(self._stages)

    @property
    def names(self) -> list[str]:
        return list(self._stages)

    def get(self, name: str) -> Stage:
        if name not in self._stages:
            raise KeyError(f"unknown stage {name!r}; stages: {', '.join(self._stages)}")
        return self._stages[name]

    def final(self) -> Stage:
        """The stage whose submission is ``output/predictions.csv`` and whose predictor labels new records."""
        finals = [s for s in self._stages.values() if s.final]
        if len(finals) != 1:
            raise ValueError(f"a registry needs exactly one final stage, not {len(finals)}")
        return finals[0]

    def blocks(self) -> list[str]:
        """Names of every feature block the fused network can read."""
        return [b for s in self._stages.values() for b in s.blocks]

    def block_owner(self, block: str) -> Stage:
        """The stage that makes block ``block``."""
        for stage in self._stages.values():
            if block in stage.blocks:
                return stage
        raise KeyError(f"no stage makes a block {block!r}; blocks: {', '.join(self.blocks())}")

    def check_names(self, settings: Settings) -> None:
        """``pipeline.stages`` and ``fusion.blocks`` name known stages and blocks, and each block can be made under
        ``settings`` (one-line ValueError otherwise)."""
        for where, names, allowed in (("pipeline.stages", settings.pipeline.stages, self.names),
                                      ("fusion.blocks", settings.fusion.blocks, self.blocks())):
            for name in names:
                if name not in allowed:
                    near = difflib.get_close_matches(str(name), allowed, n=1)
                    hint = f" (did you mean {near[0]}?)" if near else ""
                    raise ValueError(f"config: {where} names {name!r}{hint}; choose from {', '.join(allowed)}")
        for block in settings.fusion.blocks:
            problem = self.block_owner(block).block_problem(settings, block)
            if problem:
                raise ValueError(f"config: fusion.blocks names {block!r}, but {problem}")

    def order(self, names: Iterable[str], settings: Settings) -> list[str]:
        """``names`` plus every stage they read, each after what it reads (a stage listed twice runs once)."""
        out: list[str] = []

        def visit(name: str, path: tuple[str, ...] = ()) -> None:
            if name in out:
                return
            if name in path:
                raise ValueError(f"stages read each other in a cycle: {' -> '.join(path + (name,))}")
            for dep in self.get(name).reads(settings, self):
                visit(dep, path + (name,))
            out.append(name)

        for name in names:
            visit(name)
        return out


@functools.lru_cache(maxsize=None)
def default() -> Registry:
    """The project's stages, in the order the pipeline (and ``stages/*.py`` in name order) runs them (the objects
    hold no state: one registry serves every configuration)."""
    from .caption import CaptionNetwork
    from .concat import ConcatNetwork
    from .detector import Detector
    from .fused import FusedNetwork
    from .image import ImageNetwork
    from .joint_embedding import JointEmbedding
    from .label_decoder import LabelDecoder
    from .regions import RegionAttention
    from .text import TextNgrams

    return Registry([ImageNetwork(), CaptionNetwork(), Detector(), TextNgrams(), LabelDecoder(), JointEmbedding(),
                     ConcatNetwork(), RegionAttention(), FusedNetwork()])
