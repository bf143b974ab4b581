"""``python -m multilabel_fusion.predict``: label new photos and captions, or export the predictor as one bundle.
(What it does is :class:`multilabel_fusion.predict.Predictor`; this is its command line.)"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ..logs import console_logging, one_line_errors
from ..settings import add_arguments, from_args as settings_from_args
from . import Predictor, PredictorError
from . import __doc__ as PREDICT_DOC


def writable(path: Path) -> None:
    """Refuse, in one line, an output file whose folder cannot be written (checked by writing a trial file there)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise PredictorError(f"{path}: is a folder; give a file name")
    if not folder.is_dir():
        raise PredictorError(f"{path}: the folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as err:
        raise PredictorError(f"{path}: cannot write there ({err.strerror or err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m multilabel_fusion.predict", description=PREDICT_DOC.splitlines()[0],
        epilog="Settings (--set, --data, --output, --models) choose the artifacts exactly as for the stages; with "
               "--bundle they come from the bundle instead."))
    parser.add_argument("--bundle", help="predict from this bundle (written by --export) instead of the artifacts")
    parser.add_argument("--image", help="the photo of one record")
    parser.add_argument("--caption", help="the caption of that record")
    parser.add_argument("--csv", help="a CSV of records in the test.csv format (ImageID,Caption)")
    parser.add_argument("--images", help="the folder holding the --csv records' photos")
    parser.add_argument("--out", help="where --csv writes its labels (default: <csv name>_labels.csv here)")
    parser.add_argument("--export", metavar="FILE", help="write the self-contained bundle (a zip) to FILE")
    parser.add_argument("--all", action="store_true", help="show all 18 labels, not only the predicted ones")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: trainer.device; auto with --bundle)")
    args = parser.parse_args(argv)
    if (args.image is None) != (args.caption is None):
        parser.error("--image and --caption go together")
    if (args.csv is None) != (args.images is None):
        parser.error("--csv and --images go together")
    if not (args.image or args.csv or args.export):
        parser.error("nothing to do: give --image and --caption, --csv and --images, or --export FILE")
    if args.caption is not None and not args.caption.strip():
        raise SystemExit("error: the caption is empty (give the caption of the photo, a sentence)")
    settings = None if args.bundle else settings_from_args(args)
    with console_logging(sys.stderr), one_line_errors(PredictorError):  # stdout holds only the answer
        for target in [args.export, args.csv and (args.out or f"{Path(args.csv).stem}_labels.csv")]:
            if target:  # before any work: an output that cannot be written is said at once
                writable(Path(target))
        predictor = Predictor.load(settings, bundle=args.bundle, demo_mode=args.demo, device=args.device,
                                   warm_up=bool(args.image))  # a batch or an export pays no warm-up
        source = args.bundle or predictor.manifest["source"]["output"]
        print(f"predictor: blocks {', '.join(predictor.manifest['blocks'])} x {predictor.manifest['folds']} folds from "
              f"{source}; loaded in {predictor.load_seconds:.1f} s on {predictor.device}")
        if args.export:
            size = predictor.export(args.export)
            print(f"bundle {size['path']}: {size['total_mb']} MB "
                  f"({'within' if size['within_limit'] else 'OVER'} the {size['limit_mb']} MB limit; "
                  f"{size['uncompressed_mb']} MB unpacked)")
            for part, mb in size["parts_mb"].items():
                print(f"  {mb:8.2f} MB  {part}")
        if args.image:
            result = predictor.predict_one(args.image, args.caption)
            print(result.describe(every_label=args.all))
            print(f"predicted in {result.seconds * 1000:.0f} ms")
        if args.csv:
            started = time.perf_counter()
            out = Path(args.out or f"{Path(args.csv).stem}_labels.csv")
            predictor.predict_csv(args.csv, args.images, out)
            print(f"wrote {out} (validated: one row per record of {args.csv}) in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
