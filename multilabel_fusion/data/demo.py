"""A small synthetic dataset in exactly the competition's raw format, so the pipeline runs anywhere.

Each class is a coloured shape drawn on a noisy background; captions name some of the objects
(not always all, so image and caption carry complementary evidence). Like the real files, captions
are wrapped in quotes whose inner quotes are not doubled, some hold commas inside those quotes,
and some hold raw newlines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io.atomic import atomic_dir
from . import labels as L

# (RGB colour, shape) per class, in label order: distinct enough for a frozen ImageNet CNN to separate.
_STYLES = [
    ((220, 40, 40), "ellipse"), ((40, 200, 40), "rectangle"), ((40, 40, 220), "triangle"),
    ((230, 200, 30), "ellipse"), ((200, 40, 200), "rectangle"), ((30, 200, 200), "triangle"),
    ((250, 140, 20), "ellipse"), ((120, 60, 20), "rectangle"), ((250, 250, 250), "triangle"),
    ((10, 10, 10), "ellipse"), ((130, 130, 250), "rectangle"), ((250, 120, 170), "triangle"),
    ((90, 160, 60), "ellipse"), ((160, 90, 200), "rectangle"), ((60, 110, 160), "triangle"),
    ((200, 160, 120), "ellipse"), ((140, 20, 60), "rectangle"), ((20, 90, 40), "triangle"),
]
_TEMPLATES = [
    "A photo of {objs} in the street.",
    "There is {objs} near the old building",
    "{objs} on a sunny day, next to a park.",
    'A sign that reads "look, {objs}!" beside the road.',  # unescaped inner quotes holding a comma
    "Close up of {objs}\nat the corner.",  # raw newline inside the quotes
    'Someone wrote "{objs}" on the wall',
    "{objs}",
]


def _sample_labels(rng: np.random.Generator) -> list[int]:
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    labels = set()
    if rng.random() < 0.6:
        labels.add(1)  # person dominates, as in the real data
    others = [x for x in L.LABEL_IDS if x != 1]
    while len(labels) < n:
        labels.add(int(rng.choice(others)))
    return sorted(labels)


def _caption(rng: np.random.Generator, labels: list[int]) -> str:
    named = [lab for lab in labels if rng.random() < 0.75] or [labels[int(rng.integers(len(labels)))]]
    objs = " and ".join(f"a {L.LABEL_NAMES[lab]}" for lab in named)
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    text = template.format(objs=objs)
    return text[0].upper() + text[1:]


def _draw(rng: np.random.Generator, labels: list[int], size: tuple[int, int]) -> Image.Image:
    w, h = size
    background = rng.integers(90, 170, size=3)
    pixels = np.clip(background + rng.normal(0, 18, size=(h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for lab in labels:
        colour, shape = _STYLES[L.column_of(lab)]
        s = int(rng.integers(h // 4, h // 2))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        box = (x, y, x + s, y + s)
        if shape == "ellipse":
            draw.ellipse(box, fill=colour)
        elif shape == "rectangle":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=colour)
    return image


def generate(root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0,
             image_size: tuple[int, int] = (160, 120)) -> Path:
    """Write ``train.csv``, ``test.csv`` and ``data/*.jpg`` under ``root`` (atomically, as a whole folder)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    with atomic_dir(root) as tmp:
        (tmp / "data").mkdir()
        train_lines, test_lines = ["ImageID,Labels,Caption"], ["ImageID,Caption"]
        for i in range(n_train + n_test):
            labels = _sample_labels(rng)
            image_id = f"{i}.jpg" if i < n_train else f"{30000 + i - n_train}.jpg"
            _draw(rng, labels, image_size).save(tmp / "data" / image_id, quality=90)
            caption = _caption(rng, labels)
            if i < n_train:
                order = list(rng.permutation(labels))  # raw files do not always list labels ascending
                train_lines.append(f'{image_id},{" ".join(map(str, order))},"{caption}"')
            else:
                test_lines.append(f'{image_id},"{caption}"')
        (tmp / "train.csv").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
        (tmp / "test.csv").write_text("\n".join(test_lines) + "\n", encoding="utf-8")
    return root


def ensure(root: str | Path, **kwargs) -> Path:
    """Generate the demo data unless a complete copy is already there."""
    root = Path(root)
    if not ((root / "train.csv").is_file() and (root / "test.csv").is_file() and (root / "data").is_dir()):
        generate(root, **kwargs)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multilabel_fusion.demo",
                                     description="Generate a synthetic dataset in the competition format.")
    parser.add_argument("folder", nargs="?", default="output/demo/input")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate(args.folder, args.train, args.test, args.seed)
    print(f"demo data written to {root}: {args.train} train and {args.test} test records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
