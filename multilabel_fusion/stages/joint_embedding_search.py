"""Search with a stage-06 artifact: text -> photos, photo -> captions, over every train and test record embedded
once by the first fold's network (the stage draws its example figures with it; ``python -m multilabel_fusion.retrieve``
finds the artifact of a configuration and adds the command line)."""

from __future__ import annotations

import logging
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import labels as L
from ..data import text
from ..data.images import read_rgb
from ..evaluation import figures as plots
from ..io.artifacts import Artifact
from ..io.atomic import load_torch
from ..networks import joint_embedding as J
from .base import BlockPredictor, NewRecords
from .context import StageContext, Workspace

log = logging.getLogger(__name__)

def _image_block(image_features: str) -> str:
    return "image" if image_features == "pooled" else "image_depths"


def image_features(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """The image stage's features of the current settings (``pooled`` or every stage's pooled output), rows checked."""
    block = ws.require("image")
    ws.check_rows(block, ws.registry.get("image"))
    if ws.settings.joint_embedding.image_features == "depths":
        if "train_depths" not in block:
            raise ValueError("config: joint_embedding.image_features=depths needs image.depth_features=true")
        return np.asarray(block["train_depths"], np.float32), np.asarray(block["test_depths"], np.float32)
    return np.asarray(block["train"], np.float32), np.asarray(block["test"], np.float32)


#: The file in a stage-06 artifact holding the first fold's network, for retrieval.
MODEL_FILE = "retrieval_model.pt"



@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity in the joint space
    part: str  # train | test
    image_id: str
    path: Path
    caption: str
    labels: list[str] | None  # None for a test record (no labels)
    own: bool = False  # the query photo's own caption (a photo of the data)

    def describe(self) -> str:
        labels = ", ".join(self.labels) if self.labels is not None else "test record: no labels"
        mine = "  <- the photo's own caption" if self.own else ""
        caption = " ".join(self.caption.split())  # a raw caption may span lines: one line per hit
        return f"{self.rank:2d}. {self.score:.3f}  {self.part} {self.image_id}  [{labels}]  {caption}{mine}"

    def cell(self) -> str:
        """What a grid shows above the hit's photo."""
        labels = ", ".join(self.labels) if self.labels is not None else "test record: no labels"
        head = f"#{self.rank}  sim {self.score:.2f}  {self.image_id}" + ("  (its own caption)" if self.own else "")
        return f"{head}\n{textwrap.fill(self.caption, 34)}\n[{labels}]"


class Retriever:
    """The first-fold network of a stage-06 artifact and its embedded gallery (every train and test record): text ->
    photos, photo -> captions, each answer drawn as a grid."""

    def __init__(self, ctx: StageContext, artifact: Artifact):
        self.ctx, self.artifact = ctx, artifact
        saved = load_torch(Path(artifact.dir) / MODEL_FILE, weights_only=False,
                           remedy=f"delete the folder {artifact.dir} and run stage 06 again")
        self.saved = saved
        self.model = J.JointEmbedding(saved["image_dim"], np.zeros((saved["vocab_rows"], saved["vector_dim"]),
                                                                    np.float32), **saved["kwargs"])
        self.model.load_state_dict(saved["state"])
        self.model.eval()
        self.vocab = text.Vocabulary([str(t) for t in artifact["vocab"]])
        self.images = np.concatenate([artifact["gallery_train_images"],
                                      artifact["gallery_test_images"]]).astype(np.float32)
        self.captions = np.concatenate([artifact["gallery_train_captions"],
                                        artifact["gallery_test_captions"]]).astype(np.float32)
        data = ctx.data
        self.n_train = len(data.train)
        self.ids = np.concatenate([data.train["ImageID"].to_numpy(str), data.test["ImageID"].to_numpy(str)])
        self.texts = np.concatenate([data.train["Caption"].to_numpy(str), data.test["Caption"].to_numpy(str)])
        self.label_lists = [sorted(int(x) for x in labels) for labels in data.train["Labels"]]
        self._photos: BlockPredictor | None = None

    # ------------------------------------------------------------------------------------------ queries
    def embed_text(self, query: str) -> tuple[np.ndarray, list[str], list[str]]:
        """(embedding, the cleaned words read, the words without a vector in the vocabulary)."""
        tokens = text.clean_caption(query)
        ids, lengths = self.vocab.encode([tokens], self.saved["seq_len"])
        unknown = [t for t in tokens if t not in self.vocab.index]
        return J.embed(self.model, ids=ids, lengths=lengths)[1][0], tokens, unknown

    def image_features(self, path: str | Path) -> np.ndarray:
        """The image stage's features of a new photo, computed by that stage's predictor (its backbone, the
        extraction's decoding, resizing and precision, rounded through the stored dtype)."""
        if self.ctx.settings.image.fine_tune:
            raise ValueError("config: retrieval by a new photo needs the ImageNet backbone the features came from; "
                             "with image.fine_tune=true use a photo of the data (its cached features) instead")
        block = _image_block(self.saved.get("image_features", "pooled"))
        if self._photos is None:
            self._photos = self.ctx.registry.get("image").predictor(self.ctx, [block]).to(self.ctx.device)
        return self._photos.transform(NewRecords.of([path], [""]), {})[block]

    def embed_image(self, path: str | Path, features: np.ndarray | None = None) -> np.ndarray:
        if features is None:
            features = self.image_features(path)
        return J.embed(self.model, np.asarray(features, np.float32).reshape(1, -1))[0][0]

    def _hits(self, scores: np.ndarray, top: int, own: int | None = None) -> list[Hit]:
        order = np.argsort(-scores, kind="stable")[:top]
        hits = []
        for rank, row in enumerate(order, 1):
            part = "train" if row < self.n_train else "test"
            labels = [L.LABEL_NAMES[i] for i in self.label_lists[row]] if part == "train" else None
            hits.append(Hit(rank, float(scores[row]), part, str(self.ids[row]),
                            self.ctx.data.image_dir / str(self.ids[row]), str(self.texts[row]), labels,
                            own=row == own))
        return hits

    def by_text(self, query: str, top: int | None = None, out: str | Path | None = None) -> tuple[list[Hit], Path]:
        """The photos best matching ``query``, and the grid figure of them."""
        top = top or self.ctx.settings.joint_embedding.retrieval_top
        vector, tokens, unknown = self.embed_text(query)
        if not tokens or len(unknown) == len(tokens):
            read = ", ".join(tokens) or "nothing left after cleaning"
            log.warning(f"[retrieve] warning: no word of {query!r} is in the vocabulary ({read}); the answer is close "
                        "to arbitrary")
        elif unknown:
            log.info(f"[retrieve] words without a vector (read as unknown): {', '.join(unknown)}")
        hits = self._hits(self.images @ vector, top)
        path = Path(out) if out else self._default_path("text", query)
        grid(hits, path, f"photos for the caption \u201c{query}\u201d (words read: {' '.join(tokens) or '-'})")
        return hits, path

    def by_image(self, image: str | Path, top: int | None = None, out: str | Path | None = None,
                 features: np.ndarray | None = None) -> tuple[list[Hit], Path]:
        """The captions best matching a photo (shown with their own photos), and the grid figure of them. A photo of
        the data uses its cached features (exactly what the gallery was made from); its own caption is marked."""
        top = top or self.ctx.settings.joint_embedding.retrieval_top
        image = Path(image)
        own = self._row_of(image)
        if features is None and own is not None:
            train, test = image_features(self.ctx)
            features = train[own] if own < self.n_train else test[own - self.n_train]
        scores = self.captions @ self.embed_image(image, features)
        hits = self._hits(scores, top, own=own)
        path = Path(out) if out else self._default_path("image", image.stem)
        note = ""
        if own is not None:
            rank = int((scores >= scores[own]).sum())
            note = (f" (a photo of the data: its own caption ranks {rank} of {len(scores)}: "
                    f"\u201c{self.texts[own]}\u201d)")
        grid(hits, path, f"captions for the photo {image.name}{note}", query=read_rgb(image))
        return hits, path

    def _row_of(self, image: Path) -> int | None:
        if image.resolve().parent != self.ctx.data.image_dir.resolve():
            return None
        rows = np.flatnonzero(self.ids == image.name)
        return int(rows[0]) if len(rows) else None

    def _default_path(self, kind: str, what: str) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "_", str(what).lower()).strip("_")[:40] or "query"
        return self.ctx.output_dir / "figures" / "retrieval" / f"{kind}_{slug}.png"


def grid(hits: list[Hit], path: Path, title: str, query: np.ndarray | None = None) -> Path:
    """Thumbnails of the hits (and the query photo first) with rank, similarity, caption and labels above each."""
    cells = ([(query, "query photo", False)] if query is not None else [])
    return plots.photo_grid(cells + [(read_rgb(h.path), h.cell(), h.own) for h in hits], path, title)
