"""The main job on generated demo data: stages 01, 02, 04 then 03, then again from the caches."""

import time

from multilabel_fusion import config, submission
from multilabel_fusion.__main__ import run_all

SMALL = ["image.image_size=64", "image.head_epochs=5", "caption.epochs=3", "fusion.epochs=5",
         "fusion.hidden=128", "trainer.num_workers=0"]


def test_main_job_on_demo_data_then_warm_rerun(tmp_path, capsys):
    cfg = lambda: config.load(overrides=SMALL, data=tmp_path / "no_data_here", output=tmp_path / "out",  # noqa: E731
                              models=tmp_path / "models")
    results = run_all(cfg(), demo_mode="auto")
    out = capsys.readouterr().out
    assert "running on generated demo data" in out
    predictions = tmp_path / "out" / "predictions.csv"
    demo_dir = tmp_path / "out" / "demo_data"
    assert submission.validate_file(predictions, demo_dir / "test.csv") == 100
    assert list(results) == ["image", "caption", "detector", "fusion"]  # config.yaml's pipeline.stages
    for stage in results:
        assert results[stage]["demo_data"] is True
        assert 0 < results[stage]["val_mean_f1_tuned"] <= 1
    assert "Validation mean-F1 of every stage" in out
    first = predictions.read_text()

    start = time.time()
    again = run_all(cfg(), demo_mode="auto")
    warm = time.time() - start
    out = capsys.readouterr().out
    assert "reusing cached features" in out and out.count("reusing the finished run") >= 3 and "reusing cached detections" in out.lower()
    assert predictions.read_text() == first
    assert again["fusion"]["val_mean_f1_tuned"] == results["fusion"]["val_mean_f1_tuned"]
    print(f"warm re-run of the demo pipeline: {warm:.1f} s")
