"""Stage 09: the fused network (network 3) on the stacked feature blocks -> output/predictions.csv.

    python stages/09_fused_network.py --data ../shared/comp5329
    python stages/09_fused_network.py --set "fusion.blocks=[image_probs, caption_probs, text]"

Run after stages 01-08 (what it reads and is missing for the current settings is made first).
"""

from multilabel_fusion.cli import stage_main

if __name__ == "__main__":
    stage_main("fusion")
