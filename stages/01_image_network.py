"""Stage 01: the image network (network 1: ResNet50 by default) -> cached image features + CNN-only submission.

    python stages/01_image_network.py --data ../shared/comp5329            # frozen backbone (fast on CPU)
    python stages/01_image_network.py --set image.fine_tune=true --resume  # the published fine-tuning
    python stages/01_image_network.py --bench 512                          # loader vs bare-forward throughput
    python stages/01_image_network.py --bench all --backbones efficientnet_lite0 resnet50 vgg16
"""

from multilabel_fusion import pipeline
from multilabel_fusion.cli import stage_main
from multilabel_fusion.reports import extraction_benchmark
from multilabel_fusion.settings import FEATURE_DIMS


def run(settings, demo_mode=False, resume=False, args=None):
    if args is not None and args.bench:
        return extraction_benchmark.benchmark(settings, args.bench, demo_mode, args.backbones)
    return pipeline.run_stage("image", settings, demo_mode, resume)


def _images(text):
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(text)
    return int(text)


def _extra(parser):
    parser.add_argument("--bench", type=_images, default=None, metavar="N|all",
                        help="only benchmark: full extraction vs bare forward on the first N images (all: every "
                             "train and test image, the time to extract the whole data set)")
    parser.add_argument("--backbones", nargs="+", default=None, choices=sorted(FEATURE_DIMS),
                        help="backbones to benchmark (default: image.backbone); random weights where the "
                             "ImageNet ones cannot be had (same speed)")


if __name__ == "__main__":
    stage_main("image", run=run, extra_args=_extra)
