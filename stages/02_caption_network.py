"""Stage 02: the caption network (network 2: a Bi-LSTM over word vectors) -> caption features, submission, metrics.

    python stages/02_caption_network.py --data ../shared/comp5329 [--resume] [--set caption.lr=0.01]
"""

from multilabel_fusion.cli import stage_main

if __name__ == "__main__":
    stage_main("caption")
