"""Stage 04: the YOLO detection baseline -> per-label detection scores (feature block), submission, metrics.

    python stages/04_detector.py --data ../shared/comp5329
    python stages/04_detector.py --set detector.weights=yolov5xu.pt --set detector.image_size=640
"""

from multilabel_fusion.stages import base

if __name__ == "__main__":
    base.stage_cli("detector")
