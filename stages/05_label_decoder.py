"""Stage 05: recurrent label decoders (CNN-RNN, seq2seq, attention) on cached features -> block, submission, table.

    python stages/05_label_decoder.py --data ../shared/comp5329 [--resume] [--set label_decoder.variant=seq2seq]
    python stages/05_label_decoder.py --data ../shared/comp5329 --set label_decoder.comparisons=true \
        --results-doc docs/RESULTS_label_decoder.md
"""

from multilabel_fusion.cli import stage_main
from multilabel_fusion.reports import label_decoder_page

if __name__ == "__main__":
    stage_main("label_decoder", extra_args=label_decoder_page.arguments, run=label_decoder_page.run)
