"""Stage 05: recurrent label decoders (CNN-RNN, seq2seq, attention) on cached features -> block, submission, table.

    python stages/05_label_decoder.py --data ../shared/comp5329 [--resume] [--set label_decoder.variant=seq2seq]
    python stages/05_label_decoder.py --data ../shared/comp5329 --results-doc docs/RESULTS_label_decoder.md
"""

from multilabel_fusion.stages import base, label_decoder

if __name__ == "__main__":
    base.stage_cli("label_decoder", extra_args=label_decoder.cli_arguments, run=label_decoder.run_cli)
