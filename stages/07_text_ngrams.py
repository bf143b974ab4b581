"""Stage 07: TF-IDF word and character n-grams + logistic regression -> out-of-fold text block, submission.

    python stages/07_text_ngrams.py --data ../shared/comp5329
"""

from multilabel_fusion.stages import base

if __name__ == "__main__":
    base.stage_cli("text")
