"""Stage 02: the caption network (Bi-LSTM over word vectors) -> caption features, submission, metrics.

    python stages/02_caption_network.py --data ../shared/comp5329 [--resume] [--set caption.lr=0.01]
"""

from multilabel_fusion import caption_network, pipeline

if __name__ == "__main__":
    pipeline.stage_cli("Stage 02: train the Bi-LSTM caption network, cache its 100-d caption features and "
                       "write the caption-only submission.", caption_network.run_stage)
