"""Stage 06: the image-caption joint embedding -> retrieval figures, the joint_embedding block, submission, metrics.

    python stages/06_joint_embedding.py --data ../shared/comp5329 [--resume] [--set joint_embedding.encoder=gru]
        [--results-doc docs/RESULTS_joint_embedding.md [--fusion-metrics with.json without.json]]

Search the data afterwards: python -m multilabel_fusion.retrieve --data ../shared/comp5329 --text "a dog asleep on a couch"
"""

from multilabel_fusion.stages import base, joint_embedding

if __name__ == "__main__":
    base.stage_cli("joint_embedding", extra_args=joint_embedding.extra_args, run=joint_embedding.run_cli)
