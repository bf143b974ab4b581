"""The benchmark command regenerates RESULTS.md from real (cold and warm) runs, here on demo data."""

import json

from multilabel_fusion.data import demo
from multilabel_fusion.reports import bench

SMALL = ["image.backbone=efficientnet_lite0", "image.image_size=64", "image.bench_bare_seconds=0.5",
         "image.cpu_backend=torch", "image.head_epochs=3", "caption.epochs=2", "fusion.epochs=3", "fusion.hidden=64", "trainer.num_workers=0"]


def test_bench_on_demo_data_writes_results(tmp_path):
    data = demo.generate(tmp_path / "data", n_train=120, n_test=40, seed=5)
    args = ["--data", str(data), "--workdir", str(tmp_path / "work"), "--docs", str(tmp_path / "docs"),
            "--seeds", "1", "--no-detector", "--no-ablations", "--image-bench", "40"] + [a for s in SMALL for a in ("--set", s)]
    assert bench.main(args) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert set(results["stages"]) == {"image", "caption", "text", "fusion"}
    for name, r in results["stages"].items():
        assert r["cold"]["wall_s"] > 0 and r["warm"]["peak_mb"] > 0
        assert r["metrics"]["held_out"] == "out-of-fold (5 folds)"
        assert f"| {name} | {r['metrics']['val_mean_f1_at_0.5']:.4f} | {r['metrics']['val_mean_f1_tuned']:.4f} |" in text
    assert results["stages"]["fusion"]["metrics"]["blocks"].keys() == {"image_probs", "caption_probs", "text"}
    assert set(results["k1"]) == {"image", "caption", "text", "fusion"}
    assert all(r["held_out"] == "validation split" for r in results["k1"].values())
    assert "Main job with K=5" in text
    # the warm run reuses the caches: the image stage does no extraction the second time (its metrics say so; its
    # wall time, a few seconds on demo data, once came out longer than the cold run's on a loaded machine)
    assert results["stages"]["image"]["metrics"]["features"] == "reused"
    assert [s["seed"] for s in results["seeds"]] == [0]
    assert "Published reference figures" in text and "0.927" in text
    assert "efficientnet_lite0" in text or "resnet50" in text
    # every backbone's extraction timed (random weights where ImageNet ones cannot be had), with its ratio
    assert set(results["image_benchmark"]) == {"efficientnet_lite0", "resnet50", "vgg16"}
    for b in results["image_benchmark"].values():
        assert b["images"] == 40 and f"| {b['backbone']} | torch (asked for) | {b['weights_used']} |" in text
    assert (tmp_path / "docs" / "figures" / "per_class_f1.png").stat().st_size > 10_000


def test_block_ablations_follow_the_default_blocks():
    """The rows were once written out by hand and kept the old default when detector_boxes joined it."""
    default = ["image_probs", "caption_probs", "detector", "detector_boxes", "text"]
    rows = bench.block_ablations(default)
    assert rows["without text"] == (["image_probs", "caption_probs", "detector", "detector_boxes"], [])
    assert rows["image features instead of image_probs"][0] == ["image", "caption_probs", "detector", "detector_boxes", "text"]
    assert rows["image head on image_depths"] == (default, ["image.head_input=depths"])
    assert all(extra or blocks != default for blocks, extra in rows.values())
    older = bench.block_ablations(["image_probs", "caption_probs", "detector", "text"])
    assert "without detector_boxes" not in older  # equal to that default: not a comparison
    assert older["without text"] == (["image_probs", "caption_probs", "detector"], [])
    assert "without detector_zoom (no second pass)" not in older  # no second pass to leave out
    zoomed = bench.block_ablations(default + ["detector_zoom"])
    assert zoomed["without detector_zoom (no second pass)"] == (default, ["detector.zoom_size=null"])
    assert zoomed["without detector (all its blocks)"][0] == ["image_probs", "caption_probs", "text"]
