"""``python -m multilabel_fusion.retrieve``: photos for a caption, or captions for a photo, by the trained joint
embedding of stage 06. (What it does is :class:`multilabel_fusion.retrieve.Retriever`; this is its command line.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..logs import console_logging, one_line_errors
from ..settings import add_arguments, from_args
from . import Hit, Retriever


def main(argv: list[str] | None = None) -> list[Hit]:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m multilabel_fusion.retrieve",
        description="Search the data's photos by a caption, or its captions by a photo, with the trained joint "
                    "embedding of stage 06 (never trains)."))
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption: show the photos that match it best")
    query.add_argument("--image", type=Path, help="a photo (any JPEG/PNG): show the captions that match it best")
    parser.add_argument("--top", type=int, default=None,
                        help="how many results (default: joint_embedding.retrieval_top)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default output/figures/retrieval/...)")
    args = parser.parse_args(argv)
    settings = from_args(args)
    with console_logging(sys.stderr), one_line_errors():  # stdout holds only the answer
        finder = Retriever.open(settings, demo_mode=args.demo)
        hits, path = finder.by_text(args.text, args.top, args.out) if args.text is not None else \
            finder.by_image(args.image, args.top, args.out)
    for hit in hits:
        print(hit.describe())
    print(f"grid: {path}")
    return hits


if __name__ == "__main__":
    main()
