"""Stage 02: the caption network (Bi-LSTM over word vectors) -> caption features, submission, metrics.

    python stages/02_caption_network.py --data ../shared/comp5329 [--resume] [--set caption.lr=0.01]
"""

from multilabel_fusion.stages import base

if __name__ == "__main__":
    base.stage_cli("caption")
