"""Stage 08, region attention: the class-specific attention head on constructed maps, the spatial maps of real photos
(what the backbone's pooling averages; OpenVINO agreeing with torch), the stage on demo data (cross-fitting: no
held-out row from a head that saw it; the maps kept apart from the head's settings), the fused network reading its
block and the predictor giving the stage's own rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from multilabel_fusion import pipeline
from multilabel_fusion import settings as S
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as D
from multilabel_fusion.features import openvino_engine
from multilabel_fusion.features.maps import MapExtractor, MapNetwork
from multilabel_fusion.io.assets import backbone_weights
from multilabel_fusion.networks.backbones import build_backbone
from multilabel_fusion.networks.region_attention import MirrorAveraged, RegionAttentionHead, mirrored
from multilabel_fusion.predict import Predictor
from multilabel_fusion.stages import regions as regions_stage
from multilabel_fusion.stages.base import fold_mean
from multilabel_fusion.training import trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the head


def _one_class_head(lam: float, temperatures: tuple[float, ...]) -> RegionAttentionHead:
    """Four channels, no standardisation; class 0 scores channel 0 at every location, the other classes nothing."""
    head = RegionAttentionHead(4, 3, lam=lam, temperatures=temperatures)
    with torch.no_grad():
        for conv in head.heads:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 0] = 1.0
    return head.eval()


def test_attention_counts_a_class_seen_at_one_location_that_pooling_averages_away():
    side = 4
    spot = torch.zeros(1, 4, side * side)
    spot[0, 0, 5] = 8.0  # class 0's evidence at one location of sixteen
    spread = torch.full((1, 4, side * side), 0.0)
    spread[0, 0] = 0.5  # the same total evidence spread over the whole photo
    pooled = _one_class_head(0.0, (99.0,))
    assert pooled(spot)[0, 0].item() == pytest.approx(0.5) and pooled(spread)[0, 0].item() == pytest.approx(0.5)
    csra_max = _one_class_head(0.5, (99.0,))  # T = infinity: the maximum
    assert csra_max(spot)[0, 0].item() == pytest.approx(0.5 + 0.5 * 8.0)
    assert csra_max(spread)[0, 0].item() == pytest.approx(0.5 + 0.5 * 0.5)
    # a finite temperature lies between the mean and the maximum, and the heads' logits are averaged
    soft = _one_class_head(0.5, (1.0,))(spot)[0, 0].item()
    weights = torch.softmax(spot[0, 0], 0)
    assert soft == pytest.approx(0.5 + 0.5 * float((weights * spot[0, 0]).sum()), rel=1e-5)
    assert 0.5 < soft < 0.5 + 0.5 * 8.0
    both = _one_class_head(0.5, (1.0, 99.0))(spot)[0, 0].item()
    assert both == pytest.approx((soft + 0.5 + 0.5 * 8.0) / 2, rel=1e-5)
    assert _one_class_head(0.5, (99.0,))(spot)[0, 1:].abs().max().item() == 0.0  # the other classes saw nothing


def test_standardisation_is_fitted_per_channel_and_kept_in_the_checkpoint():
    maps = torch.randn(20, 3, 9) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1) + torch.tensor([0.0, 2.0, -1.0]).view(1, 3, 1)
    head = RegionAttentionHead(3, 18)
    head.fit_standardisation(maps.numpy())
    assert torch.allclose(head.mean.flatten(), maps.mean((0, 2)), atol=1e-5)
    assert torch.allclose(head.std.flatten(), maps.std((0, 2)), atol=1e-5)
    again = RegionAttentionHead(3, 18)
    again.load_state_dict(head.state_dict())
    assert torch.equal(again.eval()(maps), head.eval()(maps))


def test_mirroring_reverses_the_columns_and_eval_averages_a_map_with_its_mirror():
    maps = torch.arange(2 * 3 * 9, dtype=torch.float32).view(2, 3, 9)
    flipped = mirrored(maps, 3)
    assert torch.equal(flipped.view(2, 3, 3, 3), maps.view(2, 3, 3, 3).flip(-1))
    assert torch.equal(mirrored(flipped, 3), maps)
    torch.manual_seed(0)
    head = RegionAttentionHead(3, 18)
    model = MirrorAveraged(head, 3)
    model.train()
    assert torch.equal(model(maps), head(maps))  # training: the head alone (batches are mirrored at random)
    model.eval()
    expected = (head(maps) + head(flipped)) / 2
    assert torch.allclose(model(maps), expected) and torch.allclose(model(flipped), expected)


def test_map_batches_are_seeded_and_mirror_about_half_of_the_batches():
    maps = np.random.default_rng(0).normal(size=(40, 2, 4)).astype(np.float16)
    labels = np.eye(18, dtype=np.float32)[np.arange(40) % 18]

    def draw(seed):
        batches = regions_stage.MapBatches(maps, labels, 4, 2, shuffle=True, mirror=True, seed=seed)
        return [(x.clone(), y.clone()) for x, y in batches]

    first, again, other = draw(1), draw(1), draw(2)
    assert len(first) == 10 and all(x.dtype == torch.float16 and x.shape == (4, 2, 4) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    plain = torch.from_numpy(maps)
    in_order = list(regions_stage.MapBatches(maps, labels, 4, 2, mirror=True, seed=1))
    flips = []
    for b, (x, y) in enumerate(in_order):  # each batch: its rows' maps as they are, or all mirrored; their labels
        rows = slice(4 * b, 4 * b + 4)
        assert torch.equal(y, torch.from_numpy(labels[rows]))
        assert torch.equal(x, plain[rows]) or torch.equal(x, mirrored(plain[rows], 2))
        flips.append(not torch.equal(x, plain[rows]))
    mirrored_batches = sum(flips)
    assert 0 < mirrored_batches < len(first)


# ---------------------------------------------------------------- the maps of real photos


def test_the_map_is_what_the_backbones_pooling_averages_and_openvino_agrees(shared_data, tmp_path):
    settings = S.load(overrides=["image.offline_fallback=efficientnet_lite0"])
    backbone = build_backbone(backbone_weights(settings.image), 96)
    data = D.load(shared_data)
    paths = data.image_paths("train")[:6]
    # fp32 (on a bf16 CPU mixed precision picks bf16, whose rounding this exact comparison is not about)
    extractor = MapExtractor(backbone, torch.device("cpu"), cpu_backend="torch", batch_size=4, mixed_precision=False)
    assert extractor.shape == (1280, 3, 3) and extractor.choices["backend"] == "torch (asked for)"
    out = np.empty((6, 1280, 9), np.float16)
    timing = extractor(paths, out, workers=0)
    assert timing["images"] == 6
    from multilabel_fusion.data.images import ImageFiles

    images = torch.stack([ImageFiles(paths, 96)[i] for i in range(6)])
    with torch.inference_mode():
        pooled = backbone(images).numpy()  # the image stage's pooled features of the same photos
    assert np.allclose(out.astype(np.float32).mean(-1), pooled, atol=2e-2 * np.abs(pooled).max())
    if openvino_engine.version() is None:
        pytest.fail("OpenVINO is in requirements.txt: it must be installed where the tests run")
    engine = MapExtractor(backbone, torch.device("cpu"), cpu_backend="openvino", batch_size=4,
                          engine_cache=tmp_path / "ov", mixed_precision=False)
    assert engine.choices["backend"].startswith("OpenVINO")
    fast = np.empty_like(out)
    engine(paths, fast, workers=0)
    a, b = out.astype(np.float64).reshape(6, -1), fast.astype(np.float64).reshape(6, -1)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.999
    assert list(MapNetwork(backbone)(images[:1]))[0].shape == (1, 1280, 3, 3)


# ---------------------------------------------------------------- the stage

SMALL = ["split.folds=3", "image.offline_fallback=efficientnet_lite0", "image.image_size=64",
         "image.feature_batch_size=32", "image.head_epochs=2", "image.head_hidden=16", "trainer.num_workers=0",
         "caption.epochs=2", "regions.epochs=3", "regions.batch_size=16", "fusion.epochs=2", "fusion.hidden=16"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, recorded_selections):
    """The stage on demo data, recording what each fold's head trained on and what chose its epoch."""
    root = tmp_path_factory.mktemp("regions")
    demo.generate(root / "out" / "demo" / "input", n_train=120, n_test=40, seed=3, image_size=(48, 36))
    cfg = S.load(overrides=SMALL, output=root / "out", models=root / "models")
    with recorded_selections("regions") as seen:
        metrics = pipeline.run_stage("regions", cfg, demo_mode=True)
    return cfg, metrics, seen


def test_the_stage_writes_its_maps_block_submission_and_metrics(ran):
    cfg, metrics, _ = ran
    ws = pipeline.workspace(cfg, demo_mode=True)
    art = ws.require("regions")
    assert art["probs"].shape == (120, 18) and art["test_probs"].shape == (40, 18)
    assert np.isfinite(art["probs"]).all() and np.isfinite(art["test_probs"]).all()
    maps = ws.store.load(regions_stage.MAPS_KIND, ws.registry.get("regions").spec(ws)["maps"])
    assert maps["train"].dtype == np.float16 and maps["train"].shape == (120, 1280, 4)  # 64 px: 2 x 2 locations
    assert maps["test"].shape == (40, 1280, 4)
    sub = pd.read_csv(ws.output_dir / "submission_regions.csv")
    assert list(sub.columns) == ["ImageID", "Labels"] and len(sub) == 40
    assert metrics["artifact_key"] == art.key and len(metrics["fold_runs"]) == 3
    assert metrics["maps"]["extraction"]["map_shape"] == [1280, 2, 2]
    assert Path(metrics["figures"]["attention_examples"]).is_file()  # where the heads look, on held-out photos
    train, test, _ = ws.block_arrays("regions_probs")
    assert np.array_equal(train, art["probs"]) and np.array_equal(test, art["test_probs"])
    assert pipeline.run_stage("regions", cfg, demo_mode=True)["probabilities"] == "reused"


def test_the_head_settings_change_the_key_but_reuse_the_maps(ran, caplog):
    cfg, _, _ = ran
    other = cfg.override("regions.lam=0.2")
    ws, ws_other = pipeline.workspace(cfg, demo_mode=True), pipeline.workspace(other, demo_mode=True)
    assert ws.key("regions") != ws_other.key("regions")
    stage = ws.registry.get("regions")
    assert stage.spec(ws)["maps"] == stage.spec(ws_other)["maps"]
    assert ws.key("image") == ws_other.key("image") and ws.key("fusion") == ws_other.key("fusion")  # not in the default blocks
    with caplog.at_level("INFO"):
        metrics = pipeline.run_stage("regions", other, demo_mode=True)
    assert "reusing the maps" in caplog.text and "train maps" not in caplog.text
    assert metrics["probabilities"] == "computed"


def test_no_held_out_row_comes_from_a_head_that_saw_it(ran):
    cfg, _, seen = ran
    ws = pipeline.workspace(cfg, demo_mode=True)
    art = ws.require("regions")
    assert [k for k, *_ in seen] == [0, 1, 2]
    covered = np.concatenate([held for *_, held in seen])
    assert sorted(covered.tolist()) == list(range(120))
    predictor = ws.registry.get("regions").predictor(ws, ["regions_probs"])
    maps = ws.store.load(regions_stage.MAPS_KIND, ws.registry.get("regions").spec(ws)["maps"])
    test_rows = []
    for (k, train_idx, select_idx, held_idx), head in zip(seen, predictor.heads):
        assert not set(train_idx) & set(held_idx) and not set(select_idx) & set(held_idx)
        batches = regions_stage.MapBatches(np.asarray(maps["train"])[held_idx], None, 16, 2)
        assert np.array_equal(trainer.predict(head, batches, torch.device("cpu")), art["probs"][held_idx]), k
        test_rows.append(trainer.predict(head, regions_stage.MapBatches(np.asarray(maps["test"]), None, 16, 2),
                                         torch.device("cpu")))
    assert np.array_equal(fold_mean(test_rows), art["test_probs"])


def test_the_fused_network_reads_regions_probs_and_the_predictor_gives_its_rows(ran, tmp_path):
    cfg, _, _ = ran
    fused = cfg.override("fusion.blocks=[image_probs, caption_probs, regions_probs]")
    metrics = pipeline.run_stage("fusion", fused, demo_mode=True)
    assert list(metrics["blocks"]) == ["image_probs", "caption_probs", "regions_probs"]
    ws = pipeline.workspace(fused, demo_mode=True)
    data = D.load(ws.settings.path("data"))
    paths, captions = data.image_paths("test"), data.test["Caption"].tolist()
    predictor = Predictor.load(fused, demo_mode=True, warm_up=False)
    rows = predictor.blocks(paths, captions)["regions_probs"]
    expected = ws.block_arrays("regions_probs")[1]
    assert rows.dtype == np.float32 and np.allclose(rows, expected, atol=1e-6)
    predictor.export(tmp_path / "predictor.zip")
    loaded = Predictor.load(bundle=tmp_path / "predictor.zip", warm_up=False)
    assert np.allclose(loaded.blocks(paths, captions)["regions_probs"], rows, atol=1e-6)


def test_the_stage_is_opt_in_and_runs_just_before_the_fused_network():
    from multilabel_fusion.stages.registry import default as default_registry

    cfg, registry = S.load(), default_registry()
    assert "regions" not in cfg.pipeline.stages and "regions_probs" not in cfg.fusion.blocks
    assert registry.names.index("regions") == registry.names.index("fusion") - 1
    assert registry.get("regions").script == "stages/08_region_attention.py"
    assert (Path(__file__).resolve().parent.parent / registry.get("regions").script).is_file()


def test_a_member_the_backbone_lacks_is_a_one_line_config_error(ran):
    cfg, _, _ = ran
    ws = pipeline.workspace(cfg.override("regions.member=3"), demo_mode=True)
    with pytest.raises(ValueError, match=r"regions.member 3: .* has 1 member"):
        regions_stage.member_weights(ws)
