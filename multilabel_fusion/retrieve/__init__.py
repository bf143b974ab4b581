"""Search the data's photos and captions with the trained joint embedding (stage 06): text -> photos, photo -> captions.

    python3 -m multilabel_fusion.retrieve --data ../shared/comp5329 --text "a dog asleep on a couch"
    python3 -m multilabel_fusion.retrieve --data ../shared/comp5329 --image path/to/photo.jpg [--top 8]

The gallery is every train and test record of the data (photos and captions), embedded once by the stage's
first-fold network (kept in its artifact); a query is embedded by the same network. A new photo first goes
through the image stage's predictor: its backbone with exactly the extraction's preprocessing. Nothing is trained
here: the artifact of the configuration given (``--data``, ``--output``, ``--models``, ``--set``) is used, or a
one-line error names the stage to run. The answer is printed and drawn as a grid (PNG, path printed).
(The search itself is :class:`multilabel_fusion.stages.joint_embedding_search.Retriever`, which the stage also uses for its
example figures; this adds finding the artifact of a configuration, and the command line in ``__main__``.)
"""

from __future__ import annotations

from .. import pipeline
from ..io.artifacts import MissingArtifact
from ..settings import Settings
from ..stages import joint_embedding_search
from ..stages.joint_embedding_search import Hit, grid  # noqa: F401 - the API of retrieval

__all__ = ["Hit", "Retriever", "grid"]


class Retriever(joint_embedding_search.Retriever):
    """The stage-06 retriever of a configuration's artifact (:meth:`open`)."""

    @classmethod
    def open(cls, settings: Settings, demo_mode: bool | str = False) -> "Retriever":
        """The retriever of the settings' stage-06 artifact (MissingArtifact naming the stage to run otherwise, and
        the image stage too when its features are missing as well)."""
        ctx = pipeline.workspace(settings, demo_mode).context("joint_embedding")
        try:
            return cls(ctx, ctx.require("joint_embedding"))
        except MissingArtifact as err:
            if ctx.store.load("image", ctx.key("image")) is None:  # say the whole way, not one step at a time
                raise MissingArtifact(f"{err} (it needs the image features, missing too: run "
                                      f"{ctx.registry.get('image').script} before it)") from None
            raise
