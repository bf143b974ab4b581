"""Stage 08: a class-specific attention head on the image backbone's spatial map (where, not only what).

    python stages/08_region_attention.py --data ../shared/comp5329
    python stages/09_fused_network.py --data ../shared/comp5329 --set "fusion.blocks=[image_probs, caption_probs, detector, detector_boxes, text, regions_probs]"

Keeps every photo's 10 x 10 map of the image backbone's first member (cached as float16), trains a head per fold.
"""

from multilabel_fusion.cli import stage_main

if __name__ == "__main__":
    stage_main("regions")
