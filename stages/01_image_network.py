"""Stage 01: the image network (ResNet50 by default) -> cached image features + CNN-only submission.

    python stages/01_image_network.py --data ../shared/comp5329            # frozen backbone (fast on CPU)
    python stages/01_image_network.py --set image.fine_tune=true --resume  # the published fine-tuning
    python stages/01_image_network.py --bench 512                          # loader vs bare-forward throughput
"""

from multilabel_fusion import image_network, pipeline


def run(cfg, demo_mode=False, resume=False, args=None):
    if args is not None and args.bench:
        return image_network.benchmark(cfg, args.bench, demo_mode)
    return image_network.run_stage(cfg, demo_mode, resume)


def _extra(parser):
    parser.add_argument("--bench", type=int, default=0, metavar="N",
                        help="only benchmark: full extraction vs bare forward on N images")


if __name__ == "__main__":
    pipeline.stage_cli(__doc__.splitlines()[0], run, extra_args=_extra)
