"""Stage 03: the fused network on the cached image + caption (+ detector) features -> output/predictions.csv.

    python stages/03_fusion.py --data ../shared/comp5329
    python stages/03_fusion.py --set "fusion.blocks=[image, caption, detector]"
"""

from multilabel_fusion import fusion, pipeline

if __name__ == "__main__":
    pipeline.stage_cli(__doc__.splitlines()[0], fusion.run_stage)
