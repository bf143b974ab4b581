"""``python -m multilabel_fusion``: the main job (see :func:`multilabel_fusion.cli.main`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
