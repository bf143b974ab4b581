"""Search the data's photos and captions with the trained joint embedding (stage 06): text -> photos, photo -> captions.

    python3 -m multilabel_fusion.retrieve --data ../shared/comp5329 --text "a dog asleep on a couch"
    python3 -m multilabel_fusion.retrieve --data ../shared/comp5329 --image path/to/photo.jpg [--top 8]

The gallery is every train and test record of the data (photos and captions), embedded once by the stage's
first-fold network (kept in its artifact); a query is embedded by the same network. A new photo first goes
through the image stage's backbone with exactly the extraction's preprocessing. Nothing is trained here: the
artifact of the configuration given (``--data``, ``--output``, ``--models``, ``--set``) is used, or a one-line
error names the stage to run. The answer is printed and drawn as a grid (PNG, path printed).
"""

from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import registry
from .data import labels as L
from .data import text
from .networks import joint_embedding as J

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


class Retriever:
    """The first-fold network of a stage-06 artifact and its embedded gallery (every train and test record)."""

    def __init__(self, ctx, artifact):
        self.ctx, self.artifact = ctx, artifact
        saved = torch.load(Path(artifact.dir) / MODEL_FILE, map_location="cpu", weights_only=False)
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
        self._plan = None

    @classmethod
    def open(cls, cfg, demo_mode: bool | str = False) -> "Retriever":
        """The retriever of the configuration's stage-06 artifact (MissingArtifact naming the stage otherwise)."""
        from .stages import base

        from .engine.artifacts import MissingArtifact

        ctx = base.prepare(cfg, "joint_embedding", demo_mode)
        try:
            return cls(ctx, ctx.require("joint_embedding"))
        except MissingArtifact as err:
            if ctx.store.load("image", ctx.key("image")) is None:  # say the whole way, not one step at a time
                raise MissingArtifact(f"{err} (it needs the image features, missing too: run "
                                      f"{registry.get('image').script} before it)") from None
            raise

    # ------------------------------------------------------------------------------------------ queries
    def embed_text(self, query: str) -> tuple[np.ndarray, list[str], list[str]]:
        """(embedding, the cleaned words read, the words without a vector in the vocabulary)."""
        tokens = text.clean_caption(query)
        ids, lengths = self.vocab.encode([tokens], self.saved["seq_len"])
        unknown = [t for t in tokens if t not in self.vocab.index]
        return J.embed(self.model, ids=ids, lengths=lengths)[1][0], tokens, unknown

    def image_features(self, path: str | Path) -> np.ndarray:
        """The image stage's features of a new photo: its backbone with the extraction's decoding and resizing."""
        from .data.images import ImageFiles
        from .engine.inference import prepare_inference
        from .networks.backbones import load_backbone

        ci = self.ctx.cfg.image
        if ci.fine_tune:
            raise ValueError("config: retrieval by a new photo needs the ImageNet backbone the features came from; "
                             "with image.fine_tune=true use a photo of the data (its cached features) instead")
        depths = self.saved.get("image_features") == "depths"
        if self._plan is None:
            self._plan = prepare_inference(load_backbone(ci), ci, self.ctx.device, self.ctx.cfg.trainer.mixed_precision,
                                           depths=depths, hflip=bool(ci.hflip_average))
        image = ImageFiles([path], self._plan.image_size)[0].unsqueeze(0)  # the backbone's own side (an ensemble: 320)
        out = self._plan(image)
        out = out[1] if depths else out
        # the cached features went through the artifact's storage dtype: round the same way
        return out.cpu().numpy().astype(ci.feature_dtype).astype(np.float32)

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
        top = top or self.ctx.cfg.joint_embedding.retrieval_top
        vector, tokens, unknown = self.embed_text(query)
        if not tokens or len(unknown) == len(tokens):
            read = ", ".join(tokens) or "nothing left after cleaning"
            print(f"[retrieve] warning: no word of {query!r} is in the vocabulary ({read}); the answer is close to "
                  "arbitrary")
        elif unknown:
            print(f"[retrieve] words without a vector (read as unknown): {', '.join(unknown)}")
        hits = self._hits(self.images @ vector, top)
        path = Path(out) if out else self._default_path("text", query)
        grid(hits, path, f"photos for the caption \u201c{query}\u201d (words read: {' '.join(tokens) or '-'})")
        return hits, path

    def by_image(self, image: str | Path, top: int | None = None, out: str | Path | None = None,
                 features: np.ndarray | None = None) -> tuple[list[Hit], Path]:
        """The captions best matching a photo (shown with their own photos), and the grid figure of them. A photo of
        the data uses its cached features (exactly what the gallery was made from); its own caption is marked."""
        from .data.images import read_rgb
        from .stages.joint_embedding import image_features

        top = top or self.ctx.cfg.joint_embedding.retrieval_top
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
    """Thumbnails of the hits (and the query photo first) with rank, similarity, caption and labels under each."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.images import read_rgb
    from .reports.figures import _save

    cells = ([("query", query)] if query is not None else []) + [(h, None) for h in hits]
    cols = min(len(cells), 5)
    rows = int(np.ceil(len(cells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (hit, picture) in zip(axes.flat, cells):
        if hit == "query":
            ax.imshow(picture)
            ax.set_title("query photo", fontsize=10, fontweight="bold")
            continue
        ax.imshow(read_rgb(hit.path))
        labels = ", ".join(hit.labels) if hit.labels is not None else "test record: no labels"
        caption = textwrap.fill(hit.caption, 34)
        head = f"#{hit.rank}  sim {hit.score:.2f}  {hit.image_id}" + ("  (its own caption)" if hit.own else "")
        ax.set_title(f"{head}\n{caption}\n[{labels}]", fontsize=7.5, loc="left",
                     color="tab:green" if hit.own else "black")
    fig.suptitle(textwrap.fill(title, 120), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> list[Hit]:
    from . import config as C
    from .stages import base

    parser = C.add_arguments(argparse.ArgumentParser(
        description="Search the data's photos by a caption, or its captions by a photo, with the trained joint "
                    "embedding of stage 06 (never trains)."))
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption: show the photos that match it best")
    query.add_argument("--image", type=Path, help="a photo (any JPEG/PNG): show the captions that match it best")
    parser.add_argument("--top", type=int, default=None,
                        help="how many results (default: joint_embedding.retrieval_top)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default output/figures/retrieval/...)")
    args = parser.parse_args(argv)
    cfg = C.from_args(args)
    try:
        finder = Retriever.open(cfg, demo_mode=args.demo)
        hits, path = finder.by_text(args.text, args.top, args.out) if args.text is not None else \
            finder.by_image(args.image, args.top, args.out)
    except base.USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:
        if str(err).startswith("config:"):
            raise SystemExit(f"error: {err}") from None
        raise
    for hit in hits:
        print(hit.describe())
    print(f"grid: {path}")
    return hits


if __name__ == "__main__":
    main()
