"""Stage 06: the image-caption joint embedding -> retrieval figures, the joint_embedding block, submission, metrics.

    python stages/06_joint_embedding.py --data ../shared/comp5329 [--resume] [--set joint_embedding.encoder=gru]
        [--set joint_embedding.comparisons=true --results-doc docs/RESULTS_joint_embedding.md
         [--fusion-metrics with.json without.json]]

Search the data afterwards: python -m multilabel_fusion.retrieve --data ../shared/comp5329 --text "a dog asleep on a couch"
"""

from multilabel_fusion.cli import stage_main
from multilabel_fusion.reports import joint_embedding_page

if __name__ == "__main__":
    stage_main("joint_embedding", extra_args=joint_embedding_page.arguments, run=joint_embedding_page.run)
