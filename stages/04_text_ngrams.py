"""Stage 04: TF-IDF word and character n-grams + logistic regression -> out-of-fold text block, submission.

    python stages/04_text_ngrams.py --data ../shared/comp5329
"""

from multilabel_fusion.cli import stage_main

if __name__ == "__main__":
    stage_main("text")
