"""The stage registry, artifacts found by key, the main job, and one-line errors on the command line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.data import demo
from multilabel_fusion.evaluation import submission
from multilabel_fusion.io import assets
from multilabel_fusion.io.artifacts import ArtifactStore
from multilabel_fusion.io.atomic import remove_stale_temporaries
from multilabel_fusion.pipeline import run_all
from multilabel_fusion.stages import image as image_network
from multilabel_fusion.stages.registry import default as default_registry
from multilabel_fusion.training.trainer import ResumeRequired

REPO = Path(__file__).resolve().parent.parent
SMALL = ["image.offline_fallback=efficientnet_lite0", "image.image_size=64", "image.head_epochs=3", "caption.epochs=2", "fusion.epochs=3", "fusion.hidden=64",
         "trainer.num_workers=0", "detector.image_size=64", "detector.zoom_size=96", "detector.batch_size=16"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("pipeline") / "data", n_train=120, n_test=40, seed=5,
                         image_size=(48, 36))


def _cfg(data, out, *extra):
    return config.load(overrides=SMALL + list(extra), data=data, output=out / "output", models=out / "models")


def _stage(name, cfg, resume=False):
    """One stage as its script runs it (the stages it reads, where missing, first)."""
    return pipeline.run_stage(name, cfg, resume=resume)


def _fused_only(cfg):
    """The fused network's stage alone, once its blocks exist."""
    ws = pipeline.workspace(cfg)
    return ws.registry.get("fusion").run(ws.context("fusion"))


def test_registry_orders_dependencies_and_names_unknown_stages():
    registry = default_registry()
    cfg = config.load(overrides=["fusion.blocks=[image, caption_probs, detector, detector_boxes]"])
    assert registry.order(["fusion"], cfg) == ["image", "caption", "detector", "fusion"]
    assert registry.block_owner("caption_probs").name == "caption" and registry.block_owner("text").name == "text"
    assert registry.order(["caption", "image"], cfg) == ["caption", "image"]
    assert {"image", "image_probs", "caption", "caption_probs", "detector", "text"} <= set(registry.blocks())
    assert [s.script for s in registry][:4] == [
        "stages/01_image_network.py", "stages/02_caption_network.py", "stages/03_detector.py", "stages/04_text_ngrams.py"]
    assert all((REPO / s.script).is_file() for s in registry)
    # the scripts in name order are the order the pipeline runs, and the last one writes predictions.csv
    assert [s.script for s in registry] == sorted(f"stages/{p.name}" for p in (REPO / "stages").glob("[0-9]*.py"))
    assert registry.names[-1] == registry.final().name == "fusion"
    for stage in registry:  # a stage reads only stages that run before it
        assert all(registry.names.index(dep) < registry.names.index(stage.name) for dep in stage.reads(cfg, registry))
    with pytest.raises(ValueError, match=r"fusion.blocks names 'captoin' \(did you mean caption\?\)"):
        registry.check_names(config.load(overrides=["fusion.blocks=[image, captoin]"]))


def test_changed_settings_and_back_find_exactly_their_own_artifacts(tiny_data, tmp_path, monkeypatch, caplog):
    """image_size 64 -> 48 -> 64 and seq_len 8 -> 6 -> 8, then fusion: it reads the 64-px and 8-token blocks
    (the old 'latest' pointer gave it the 48-px and 6-token ones, silently)."""
    calls = []
    real_extract = image_network.extract
    monkeypatch.setattr(image_network, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    first_image = _stage("image", _cfg(tiny_data, tmp_path))
    first_caption = _stage("caption", _cfg(tiny_data, tmp_path))
    other_image = _stage("image", _cfg(tiny_data, tmp_path, "image.image_size=48"))
    other_caption = _stage("caption", _cfg(tiny_data, tmp_path, "caption.seq_len=6"))
    assert other_image["artifact_key"] != first_image["artifact_key"]
    assert other_caption["artifact_key"] != first_caption["artifact_key"]
    extracted = len(calls)
    caplog.clear()
    again = _stage("image", _cfg(tiny_data, tmp_path))
    _stage("caption", _cfg(tiny_data, tmp_path))
    out = caplog.text
    assert len(calls) == extracted  # found by key: no extraction
    assert "reusing the features" in out and again["artifact_key"] == first_image["artifact_key"]
    assert again["val_mean_f1_tuned"] == first_image["val_mean_f1_tuned"]
    m = _fused_only(_cfg(tiny_data, tmp_path, "fusion.blocks=[image, caption]"))
    assert m["blocks"]["image"]["artifact_key"] == first_image["artifact_key"]
    assert m["blocks"]["caption"]["artifact_key"] == first_caption["artifact_key"]
    # and with the other settings, fusion reads the other artifacts
    m2 = _fused_only(_cfg(tiny_data, tmp_path, "fusion.blocks=[image, caption]", "image.image_size=48",
                               "caption.seq_len=6"))
    assert m2["blocks"]["image"]["artifact_key"] == other_image["artifact_key"]
    assert m2["blocks"]["caption"]["artifact_key"] == other_caption["artifact_key"]


def test_raising_epochs_continues_the_run_and_never_overwrites_it(tiny_data, tmp_path):
    two = _stage("caption", _cfg(tiny_data, tmp_path, "caption.epochs=2", "caption.patience=50"))
    run_dir = Path(two["run_dir"])
    saved = {p.name: p.read_bytes() for p in run_dir.glob("*.pt")}
    with pytest.raises(ResumeRequired, match="pass --resume"):
        _stage("caption", _cfg(tiny_data, tmp_path, "caption.epochs=4", "caption.patience=50"))
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.pt")} == saved  # untouched
    four = _stage("caption", _cfg(tiny_data, tmp_path, "caption.epochs=4", "caption.patience=50"), resume=True)
    assert four["run_dir"] == two["run_dir"]
    assert [r["epoch"] for r in four["history"]] == [1, 2, 3, 4]
    assert four["history"][:2] == two["history"]  # the first two epochs are the same run's, continued
    # going back to 2 epochs finds the 2-epoch artifact by its key
    back = _stage("caption", _cfg(tiny_data, tmp_path, "caption.epochs=2", "caption.patience=50"))
    assert back["artifact_key"] == two["artifact_key"] and back["val_mean_f1_tuned"] == two["val_mean_f1_tuned"]


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    store = ArtifactStore(tmp_path)
    folder = tmp_path / "artifacts" / "image"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".abc123.{dead.pid}.x1y2.tmp"
    live = folder / f".def456.{os.getpid()}.z9.tmp"
    for t in (stale, live):
        t.mkdir()
        (t / "train.npy").write_bytes(b"half written")
    assert store.load("image", "abc123") is None
    assert not stale.exists() and live.exists()
    assert remove_stale_temporaries(folder) == []


def _no_detector_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_ultralytics_download",
                        lambda name, folder: (_ for _ in ()).throw(ConnectionError("offline")))
    empty = tmp_path / "no_assets"
    empty.mkdir(exist_ok=True)
    return [f"paths.assets={empty}", "detector.weights=missing_weights.pt"]


def test_main_job_without_detector_weights_fuses_without_that_block(tiny_data, tmp_path, monkeypatch, caplog):
    missing = _no_detector_weights(tmp_path, monkeypatch)
    results = run_all(_cfg(tiny_data, tmp_path, *missing), demo_mode=False)
    out = caplog.text
    assert "[detector] SKIPPED: no COCO detector weights" in out
    assert "leaving out the 'detector' block" in out
    assert list(results) == ["image", "caption", "text", "fusion", "skipped"] and "detector" in results["skipped"]
    m = results["fusion"]
    assert list(m["blocks"]) == ["image_probs", "caption_probs", "text"] and "detector" in m["blocks_left_out"]
    assert submission.validate_file(tmp_path / "output" / "predictions.csv", tiny_data / "test.csv") == 40


def test_main_job_on_demo_data_then_warm_rerun(tmp_path, caplog):
    cfg = lambda: config.load(overrides=SMALL, data=tmp_path / "no_data_here", output=tmp_path / "out",  # noqa: E731
                              models=tmp_path / "models")
    results = run_all(cfg(), demo_mode="auto")
    out = caplog.text
    caplog.clear()
    assert "running on generated demo data" in out
    predictions = tmp_path / "out" / "demo" / "predictions.csv"  # demo results: under their own folder
    assert submission.validate_file(predictions, tmp_path / "out" / "demo" / "input" / "test.csv") == 100
    assert not (tmp_path / "out" / "predictions.csv").exists()
    assert list(results) == ["image", "caption", "detector", "text", "fusion", "skipped"]  # all before the fusion
    assert results["fusion"]["blocks"].keys() == {"image_probs", "caption_probs", "detector", "detector_boxes", "text",
                                                  "detector_zoom"}
    assert results["fusion"]["held_out"] == "out-of-fold (5 folds)"
    first = predictions.read_text()
    start = time.time()
    again = run_all(cfg(), demo_mode="auto")
    warm = time.time() - start
    out = caplog.text
    assert "reusing the features" in out and "reusing the detections" in out and out.count("reusing") >= 4
    assert predictions.read_text() == first
    assert again["fusion"]["val_mean_f1_tuned"] == results["fusion"]["val_mean_f1_tuned"]
    print(f"warm re-run of the demo pipeline: {warm:.1f} s")


def _cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("override, message", [
    ("fusion.lrr=0.1", "unknown key fusion.lrr (did you mean fusion.lr?)"),
    ("nosection.x=1", "unknown section nosection"),
    ("fusion.lr=abc", "fusion.lr = 'abc': expected a number"),
    ("fusion.epochs=-1", "fusion.epochs = -1: must be >= 1"),
])
def test_bad_settings_are_one_line_errors_before_anything_runs(tmp_path, override, message):
    result = _cli("stages/09_fused_network.py", "--demo", "--output", str(tmp_path / "out"), "--set", override)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_stage_07_runs_the_stages_of_missing_blocks_first_and_missing_weights_are_one_line_errors(tiny_data, tmp_path):
    """Stage 09 on its own, as notebook 09 and the main job: the (earlier) stages whose blocks are missing run first."""
    small = [a for s in SMALL for a in ("--set", s)]
    paths = ["--data", str(tiny_data), "--output", str(tmp_path / "out"), "--models", str(tmp_path / "models")]
    result = _cli("stages/09_fused_network.py", *paths, *small, "--set", "fusion.blocks=[image, caption]")
    assert result.returncode == 0, result.stderr
    assert "===== 01 image network =====" in result.stdout and "===== 02 caption network =====" in result.stdout
    assert "===== 03" not in result.stdout and "===== 04" not in result.stdout  # only what the blocks need
    assert submission.validate_file(tmp_path / "out" / "predictions.csv", tiny_data / "test.csv") == 40
    empty = tmp_path / "no_assets"
    empty.mkdir()
    result = _cli("stages/03_detector.py", *paths, "--set", f"paths.assets={empty}",
                  "--set", "detector.weights=missing_weights.pt")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "no detector weights" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_one_image_decoder_one_asset_resolver_one_registry():
    """The layout shows the architecture: images are decoded in one place, assets resolved in one place, and
    the list of stages written in one place (it used to be written out in six)."""
    package = REPO / "multilabel_fusion"
    for sub in ("io", "data", "networks", "evaluation", "features", "training", "stages", "reports"):
        assert (package / sub / "__init__.py").is_file()
    sources = {p.relative_to(REPO).as_posix(): p.read_text() for p in package.rglob("*.py")}
    sources.update({p.relative_to(REPO).as_posix(): p.read_text() for p in (REPO / "notebooks").glob("*.py")})
    decoders = sorted(f for f, text in sources.items() if any(
        call in text for call in ("cv2.imread", "cv2.imdecode", "Image.open", "torchvision.io.decode")))
    assert decoders == ["multilabel_fusion/data/images.py"]
    downloads = sorted(f for f, text in sources.items() if any(
        call in text for call in ("gensim.downloader", "load_state_dict_from_url", "attempt_download_asset",
                                  ".get_state_dict(")))
    assert downloads == ["multilabel_fusion/io/assets.py"]
    stage_lists = sorted(f for f, text in sources.items() if "01_image_network" in text and "03_detector" in text)
    assert stage_lists == [], stage_lists  # script names come from the stage objects (number + module), nowhere else
