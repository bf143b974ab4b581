"""Stage 03: the fused network on the image + caption (+ detector) feature blocks -> output/predictions.csv.

    python stages/03_fusion.py --data ../shared/comp5329
    python stages/03_fusion.py --set "fusion.blocks=[image, caption]"
"""

from multilabel_fusion.stages import base

if __name__ == "__main__":
    base.stage_cli("fusion")
