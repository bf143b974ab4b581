"""Stage 03: the YOLO detection baseline -> per-label detection scores (feature blocks), submission, metrics.

    python stages/03_detector.py --data ../shared/comp5329
    python stages/03_detector.py --set detector.weights=yolov5xu.pt --set detector.image_size=640
"""

from multilabel_fusion.cli import stage_main

if __name__ == "__main__":
    stage_main("detector")
