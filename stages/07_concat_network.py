"""Stage 07: the ResNet + LSTM report's one network (frozen CNN features ++ caption LSTM -> two FC layers with batch
norm, BCE with pos_weight, Adadelta), cross-fitted -> block concat_probs, output/submission_concat.csv, metrics.

    python stages/07_concat_network.py --data ../shared/comp5329
    python stages/07_concat_network.py --data ../shared/comp5329 --set concat.pos_weight=off    # the report's 0.847
    python stages/07_concat_network.py --data ../shared/comp5329 --set concat.layers=4          # LSTM-depth experiment

Runs stage 01 first when its image features are missing for the current settings. Stack it in the fused network with
--set "fusion.blocks=[image_probs, caption_probs, detector, detector_boxes, text, concat_probs]".
"""

from multilabel_fusion.cli import stage_main

if __name__ == "__main__":
    stage_main("concat")
