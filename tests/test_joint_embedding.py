"""Stage 06: negative mining and loss on constructed batches, R@K on constructed similarity matrices, the
network, one real training step with the shared trainer, and the stage + retrieval end to end on demo data."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from multilabel_fusion import pipeline, retrieve
from multilabel_fusion import settings as C
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as data
from multilabel_fusion.io.artifacts import ArtifactStore
from multilabel_fusion.networks import joint_embedding as J
from multilabel_fusion.reports import joint_embedding_page
from multilabel_fusion.retrieve.__main__ import main as retrieve_main
from multilabel_fusion.training import trainer

M = 0.1
#: anchors in rows, positives on the diagonal. Row 0 (positive 0.90): 0.95 hard, 0.85 semi-hard, 0.20 easy.
#: Row 1 (positive 0.50): 0.45 semi-hard, 0.80 hard, 0.10 easy. Row 2 (0.70): nothing within the margin.
#: Row 3 (0.60): 0.55 semi-hard only.
SIMS = torch.tensor([[0.90, 0.95, 0.85, 0.20],
                     [0.10, 0.50, 0.45, 0.80],
                     [0.30, 0.20, 0.70, 0.10],
                     [0.00, 0.10, 0.55, 0.60]])
HINGE = {(0, 1): 0.15, (0, 2): 0.05, (1, 2): 0.05, (1, 3): 0.40, (3, 2): 0.05}  # m - s_p + s_n where > 0


def picked(strategy):
    mask = J.pick_negatives(SIMS, strategy, M)
    return {tuple(ix) for ix in mask.nonzero().tolist()}


@pytest.mark.parametrize("strategy, expected", [
    ("all", {(0, 1), (0, 2), (1, 2), (1, 3), (3, 2)}),  # hard + semi-hard
    ("hard", {(0, 1), (1, 3)}),
    ("semi_hard", {(0, 2), (1, 2), (3, 2)}),
    ("top1", {(0, 1), (1, 3), (3, 2)}),  # each anchor's largest violation; row 2 has none
    ("top2", {(0, 1), (0, 2), (1, 3), (1, 2), (3, 2)}),
    ("top10", {(0, 1), (0, 2), (1, 3), (1, 2), (3, 2)}),  # K beyond the batch: every violating negative
    ("vsepp", {(0, 1), (1, 3), (3, 2)}),
])
def test_each_strategy_picks_the_right_negatives(strategy, expected):
    assert picked(strategy) == expected


@pytest.mark.parametrize("strategy", ["all", "hard", "semi_hard", "top1", "top2", "vsepp"])
def test_loss_value_is_the_mean_of_the_picked_hinge_terms(strategy):
    terms = [HINGE[ix] for ix in sorted(picked(strategy))]
    expected = sum(terms) if strategy == "vsepp" else sum(terms) / len(terms)
    assert float(J.direction_loss(SIMS, strategy, M)) == pytest.approx(expected, abs=1e-6)


def test_infonce_compares_with_every_candidate_through_a_softmax():
    assert picked("infonce") == {(a, n) for a in range(4) for n in range(4) if a != n}
    logits = SIMS / 0.05
    expected = -torch.log_softmax(logits, 1).diagonal().mean()
    assert float(J.direction_loss(SIMS, "infonce", M, 0.05)) == pytest.approx(float(expected), rel=1e-5)
    img = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    both = J.ranking_loss(img, img, "infonce", M, 0.1, 0.05)  # both directions weighted 1, as CLIP
    assert float(both) == pytest.approx(2 * float(J.direction_loss(img @ img.T, "infonce", M, 0.05)), rel=1e-5)


def test_no_violation_costs_nothing_and_positives_are_never_negatives():
    easy = torch.eye(4) * 0.9  # every positive beats every negative by more than the margin
    for strategy in ("all", "hard", "semi_hard", "top1", "top10", "vsepp"):
        assert float(J.direction_loss(easy, strategy, M)) == 0.0
        assert not J.pick_negatives(torch.rand(5, 5), strategy, M).diagonal().any()


def test_bidirectional_loss_weights_the_caption_anchored_term_and_vsepp_matches_its_definition():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(6, 8), dim=1)
    sims = img @ txt.T
    for strategy in ("all", "top1"):
        expected = J.direction_loss(sims, strategy, M) + 0.1 * J.direction_loss(sims.T, strategy, M)
        assert float(J.ranking_loss(img, txt, strategy, M, 0.1)) == pytest.approx(float(expected), abs=1e-6)
    # VSE++ (max violation): per query, the largest hinge over its negatives, summed, both directions weighted 1
    n, naive = len(sims), 0.0
    for i in range(n):
        naive += max(max(0.0, M - sims[i, i].item() + sims[i, j].item()) for j in range(n) if j != i)
        naive += max(max(0.0, M - sims[i, i].item() + sims[j, i].item()) for j in range(n) if j != i)
    assert float(J.ranking_loss(img, txt, "vsepp", M, 0.1)) == pytest.approx(naive, abs=1e-5)
    loss = J.TripletRankingLoss("top1", M, 0.1)(torch.stack([img, txt], 1), torch.zeros(6, 18))
    assert float(loss) == pytest.approx(float(J.ranking_loss(img, txt, "top1", M, 0.1)))
    with pytest.raises(ValueError, match="unknown negative-mining strategy"):
        J.TripletRankingLoss("top0")


def test_recall_at_k_median_and_mean_rank_on_a_constructed_matrix():
    # query q's own caption (the diagonal, 0.5) has ranks[q] - 1 captions above it (0.9), the rest below (0.1)
    ranks = [1, 2, 5, 6, 11, 12, 1, 1, 3, 10, 4, 7]
    n = len(ranks)
    sims = np.full((n, n), 0.1)
    for q, r in enumerate(ranks):
        others = [c for c in range(n) if c != q]
        sims[q, others[: r - 1]] = 0.9
        sims[q, q] = 0.5
    assert J.ranks(sims).tolist() == ranks
    report = J.recall_report(sims)
    assert report["i2t_r1"] == pytest.approx(100 * 3 / 12, abs=0.01)
    assert report["i2t_r5"] == pytest.approx(100 * 7 / 12, abs=0.01)
    assert report["i2t_r10"] == pytest.approx(100 * 10 / 12, abs=0.01)
    assert report["i2t_medr"] == 4.5 and report["i2t_meanr"] == pytest.approx(63 / 12, abs=0.05)
    # caption -> image reads the columns: the same figures as image -> caption of the transposed matrix
    flipped = J.recall_report(sims.T)
    assert all(report[f"t2i_{k}"] == flipped[f"i2t_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr"))
    assert report["rsum"] == pytest.approx(sum(report[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)),
                                           abs=0.02)


def test_ranks_count_ties_against_the_query_and_the_1k_protocol_uses_disjoint_sets():
    assert J.ranks(np.ones((3, 3))).tolist() == [3, 3, 3]  # all equal: never optimistic
    sets = J.chunks(2500, 1000, seed=0)
    assert [len(s) for s in sets] == [1000, 1000] and not set(sets[0]) & set(sets[1])
    assert [len(s) for s in J.chunks(300, 1000)] == [300]
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2000, 16))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    report = J.protocol_1k(img, img, 1000)  # identical embeddings: every match ranks first
    assert report["sets"] == 2 and report["i2t_r1"] == 100.0 and report["t2i_medr"] == 1.0


def test_branches_end_in_batch_norm_without_relu_and_embed_onto_the_unit_sphere():
    vectors = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    vectors[:2] = 0
    for encoder in ("mean", "gru"):
        model = J.JointEmbedding(12, vectors, encoder=encoder, embed_dim=8, hidden=16, layers=2, rnn_hidden=5)
        kinds = [type(m).__name__ for m in model.image_branch]
        assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "BatchNorm1d"]
        ids = torch.tensor([[2, 3, 0, 0], [1, 4, 5, 0], [6, 0, 0, 0]])
        out = model.eval()(torch.randn(3, 12), ids, torch.tensor([2, 3, 1]))
        assert out.shape == (3, 2, 8)
        assert torch.allclose(out.norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    mean = J.MeanVectors(vectors)(torch.tensor([[2, 3, 1, 0]]), torch.tensor([3]))  # OOV and PAD left out
    assert torch.allclose(mean[0], torch.as_tensor(vectors[2:4]).mean(0), atol=1e-6)


def _pairs(n=96, dim=12, seed=0):
    """Image features and two-word captions (a topic word, a filler word) of 6 topics: pairs share their topic."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 6, n)
    feats = np.eye(6)[topic] @ rng.normal(size=(6, dim)) + 0.3 * rng.normal(size=(n, dim))
    ids = np.zeros((n, 3), np.int64)
    ids[:, 0] = topic + 2
    ids[:, 1] = rng.integers(8, 20, n)
    vectors = rng.normal(size=(20, 5)).astype(np.float32)
    vectors[:2] = 0
    return feats.astype(np.float32), ids, np.full(n, 2, np.int64), vectors, topic


def test_one_real_training_step_with_the_shared_trainer_and_score_hook(tmp_path):
    feats, ids, lengths, vectors, _ = _pairs()
    torch.manual_seed(0)
    model = J.JointEmbedding(feats.shape[1], vectors, encoder="gru", embed_dim=8, hidden=32, rnn_hidden=6)
    model.fit_standardisation(feats)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = J.PairBatches(feats, ids, lengths, None, 32, shuffle=True, seed=0, drop_last=True)

    def score(m):
        img, txt = J.embed(m, feats[:40], ids[:40], lengths[:40])
        report = J.recall_report(img @ txt.T)
        return {"score": report["rsum"], **report}

    kwargs = dict(loss_fn=J.TripletRankingLoss("all", 0.1, 0.1), run_dir=tmp_path / "run", epochs=2, patience=5,
                  device=torch.device("cpu"), name="joint", score_fn=score)
    result = trainer.fit(model, batches, None, None, optimizer=torch.optim.Adam(model.parameters(), 2e-3), **kwargs)
    assert len(result.history) == 2 and result.history["train_loss"].gt(0).all()
    assert {"i2t_r1", "t2i_r10", "rsum"} <= set(result.history.columns)
    assert result.history["val_mean_f1"].tolist() == result.history["rsum"].tolist()  # the selection score
    assert result.history["val_loss"].isna().all()
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("image_branch") for k in changed) and any(k.startswith("text_encoder.gru") for k in changed)
    assert not any(k in ("mean", "std") for k in changed)  # standardisation is fitted once, not trained
    # the finished run is reused, not retrained
    again = J.JointEmbedding(feats.shape[1], vectors, encoder="gru", embed_dim=8, hidden=32, rnn_hidden=6)
    reused = trainer.fit(again, batches, None, None, optimizer=torch.optim.Adam(again.parameters(), 2e-3), **kwargs)
    assert reused.reused and reused.best_epoch == result.best_epoch


def _rsum(model, feats, ids, lengths):
    img, txt = J.embed(model, feats, ids, lengths)
    return J.recall_report(img @ txt.T)["rsum"]


def test_training_learns_to_retrieve_matching_pairs(tmp_path):
    feats, ids, lengths, vectors, topic = _pairs(n=192)
    torch.manual_seed(0)
    model = J.JointEmbedding(feats.shape[1], vectors, encoder="mean", embed_dim=8, hidden=32)
    model.fit_standardisation(feats)
    batches = J.PairBatches(feats, ids, lengths, None, 32, shuffle=True, seed=0, drop_last=True)
    trainer.fit(model, batches, None, None, loss_fn=J.TripletRankingLoss("top1", 0.1, 0.1),
                optimizer=torch.optim.Adam(model.parameters(), 5e-3), run_dir=tmp_path / "run", epochs=15, patience=15,
                device=torch.device("cpu"), name="joint", score_fn=lambda m: _rsum(m, feats, ids, lengths))
    img, txt = J.embed(model, feats, ids, lengths)
    sims = img @ txt.T
    same_topic = topic[:, None] == topic[None, :]
    # one caption per topic word: the best caption of an image is one of its topic (chance: about 1 in 6)
    assert same_topic[np.arange(len(sims)), sims.argmax(1)].mean() > 0.9


# ------------------------------------------------------------------------------------------------ end to end

SMALL = ["joint_embedding.comparisons=true", "split.folds=2", "image.backbone=efficientnet_lite0", "image.image_size=64", "joint_embedding.epochs=2",
         "joint_embedding.hidden=32", "joint_embedding.embed_dim=16", "joint_embedding.rnn_hidden=8",
         "joint_embedding.batch_size=16", "joint_embedding.selection_size=20", "joint_embedding.knn=5",
         "joint_embedding.compare_strategies=[top1]", "joint_embedding.compare_encoders=[mean, gru]",
         "joint_embedding.learning_curve=[0.5]", "joint_embedding.retrieval_top=4"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("joint") / "data", n_train=120, n_test=30, seed=5, image_size=(48, 36))


def _cfg(demo_dir, tmp_path, *extra):
    return C.load(overrides=SMALL + list(extra), data=demo_dir, output=tmp_path / "out", models=tmp_path / "models")


def _fake_image_artifact(cfg, demo_dir, tmp_path):
    """Image features under the key the settings give (1280-d like EfficientNet-Lite0), tied to the labels, described
    as the image stage describes its extraction (what its predictor reads to embed a new photo)."""
    d = data.load(demo_dir)
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(18, 1280))
    feats = {part: (getattr(d, f"{part}_targets") if part == "train" else rng.random((len(d.test), 18)) < 0.2)
             @ proj + 0.5 * rng.normal(size=(len(getattr(d, part)), 1280)) for part in ("train", "test")}
    ws = pipeline.workspace(cfg)
    ArtifactStore(tmp_path / "out").save("image", ws.key("image"), ws.spec("image"), {
        "train": feats["train"].astype(np.float16), "test": feats["test"].astype(np.float16),
        "train_ids": d.train["ImageID"].to_numpy(str), "test_ids": d.test["ImageID"].to_numpy(str)},
        {"backbone": {"name": "efficientnet_lite0", "weights_used": "ImageNet", "dim": 1280},
         "extraction": {"precision": "fp32"}})
    return d


@pytest.mark.slow
def test_stage_and_retrieval_end_to_end_on_demo_data(demo_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="multilabel_fusion")
    cfg = _cfg(demo_dir, tmp_path)
    # no image features yet: one line naming the stage to run, from the stage and from the retrieval command
    with pytest.raises(SystemExit, match=r"run stages/06_joint_embedding.py .* run stages/01_image_network.py"):
        retrieve_main(["--data", str(demo_dir), "--output", str(tmp_path / "out"), "--models", str(tmp_path / "models"),
                       *sum((["--set", s] for s in SMALL), []), "--text", "a dog"])
    d = _fake_image_artifact(cfg, demo_dir, tmp_path)
    with pytest.raises(SystemExit, match=r"no 'joint_embedding' artifact .* run stages/06_joint_embedding.py"):
        retrieve_main(["--data", str(demo_dir), "--output", str(tmp_path / "out"), "--models", str(tmp_path / "models"),
                       *sum((["--set", s] for s in SMALL), []), "--text", "a dog"])
    caplog.clear()
    metrics = pipeline.run_stage("joint_embedding", cfg)
    said = capsys.readouterr()  # the selection score is the R-sum of retrieval, and is called so
    assert "best selection R-sum" in caplog.text and "best val mean-F1" not in caplog.text
    assert "val_f1=" not in said.err  # the progress bar (when one is drawn) says selection_R_sum=
    saved = json.loads((tmp_path / "out" / "metrics" / "joint_embedding.json").read_text())
    assert saved["artifact_key"] == metrics["artifact_key"]
    r = saved["retrieval"]["protocol_1k"]
    assert 0 <= r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] <= 100 and r["t2i_medr"] >= 1
    assert [(row["encoder"], row["strategy"]) for row in saved["comparison"]] == [("mean", "top1"), ("gru", "top1")]
    assert {"recall_per_epoch", "retrieval_text_query", "retrieval_image_query"} <= set(saved["figures"])
    curve = saved["learning_curve"]
    assert [(r["fraction"], r["test_pairs"]) for r in curve] == [(0.5, False), (1.0, False), (1.0, True)]
    assert curve[0]["training_pairs"] < curve[1]["training_pairs"] < curve[2]["training_pairs"]
    assert curve[1]["protocol_1k"] == saved["retrieval"]["per_fold"][0]["protocol_1k"]  # the stage's own run
    doc = joint_embedding_page.results_markdown(saved, [{"blocks": ["image", "joint_embedding"], "val_mean_f1_tuned": 0.5,
                                                          "mean_f1_threshold_cv": 0.49, "val_mean_f1_at_0.5": 0.4}])
    assert "| 1K sets" in doc and "Learning curve" in doc and "| image, joint_embedding | 0.4000 | 0.5000 | 0.4900 |" in doc
    assert "One caption per image" in doc and joint_embedding_page.closing_note(saved) in doc
    # its section of docs/RESULTS.md, refreshed alone from the metrics file, with its figures
    from multilabel_fusion.reports import bench

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# Results\n")
    assert bench.main(["--docs", str(docs), "--stage-sections", "--stage", "joint_embedding",
                       str(tmp_path / "out" / "metrics" / "joint_embedding.json")]) == 0
    page = (docs / "RESULTS.md").read_text()
    assert page.startswith("# Results\n") and "## Stage 06: image–caption joint embedding" in page
    assert "### Strategies × caption encoders" in page and "| gru | 1 hardest (K = 1) |" in page
    for name in ("joint_embedding_comparison.png", "joint_embedding_recall.png", "joint_embedding_text_query.png"):
        assert f"](figures/{name})" in page and (docs / "figures" / name).is_file()
    assert (tmp_path / "out" / "submission_joint_embedding.csv").is_file()
    art = ArtifactStore(tmp_path / "out").load("joint_embedding", metrics["artifact_key"])
    assert art["train"].shape == (len(d.train), 73) and art["test"].shape == (len(d.test), 73)
    assert not np.isnan(art["train"]).any()  # every training record has its out-of-fold row
    assert art["gallery_train_images"].shape == (len(d.train), 16)
    # retrieval by text and by a photo of the data: the grids are written, nothing is trained
    capsys.readouterr()
    args = ["--data", str(demo_dir), "--output", str(tmp_path / "out"), "--models", str(tmp_path / "models"),
            *sum((["--set", s] for s in SMALL), [])]
    hits = retrieve_main(args + ["--text", "a dog and a person"])
    out = capsys.readouterr().out
    assert len(hits) == 4 and "grid: " in out and "train joint" not in out
    assert all(h1.score >= h2.score for h1, h2 in zip(hits, hits[1:]))
    png = out.split("grid: ")[1].strip()
    assert png.endswith(".png") and (tmp_path / "out" / "figures" / "retrieval").is_dir()
    photo = d.image_paths("train")[3]
    finder = retrieve.Retriever.open(cfg)
    hits, path = finder.by_image(photo, top=len(d.train) + len(d.test))
    assert path.is_file() and sum(h.own for h in hits) == 1  # its own caption is among all, marked
    # a second run reuses everything: the artifact and every training run
    again = pipeline.run_stage("joint_embedding", cfg)
    assert again["embedding"] == "reused" and all(row["reused"] for row in again["comparison"])
    assert again["retrieval"] == saved["retrieval"]


@pytest.mark.slow
def test_stage_command_line_runs_stage_01_first_and_writes_its_results_page(demo_dir, tmp_path):
    from multilabel_fusion.cli import stage_main

    results_doc = tmp_path / "RESULTS_joint_embedding.md"
    args = ["--data", str(demo_dir), "--output", str(tmp_path / "out"), "--models", str(tmp_path / "models"),
            *sum((["--set", x] for x in SMALL + ["joint_embedding.compare_strategies=[]", "joint_embedding.learning_curve=[]",
                                                 "image.head_epochs=1"]), []), "--results-doc", str(results_doc)]
    m = stage_main("joint_embedding", args, extra_args=joint_embedding_page.arguments, run=joint_embedding_page.run)
    assert (tmp_path / "out" / "metrics" / "image.json").is_file()  # stage 01 ran first: no features were there
    assert m["embedding"] == "computed" and m["image_dim"] == 1280
    text = results_doc.read_text()
    assert text.startswith("# Stage 06") and "| 1K sets" in text and "](out/figures/joint_embedding_recall.png)" in text


def test_a_hit_is_listed_on_one_line_even_when_its_caption_spans_lines(tmp_path):
    hit = retrieve.Hit(1, 0.5, "train", "3.jpg", tmp_path / "3.jpg", "Close up of a person\nand a car ", ["person"],
                       own=True)
    line = hit.describe()
    assert "\n" not in line and "Close up of a person and a car  <- the photo's own caption" in line


@pytest.mark.slow
def test_a_new_photo_goes_through_the_backbone_like_the_extraction(demo_dir, tmp_path):
    """A photo outside the data: embedded through the image stage's backbone (EfficientNet-Lite0 offline weights)."""
    import shutil

    cfg = _cfg(demo_dir, tmp_path, "joint_embedding.compare_strategies=[]")
    _fake_image_artifact(cfg, demo_dir, tmp_path)
    pipeline.run_stage("joint_embedding", cfg)
    photo = tmp_path / "elsewhere.jpg"
    shutil.copy(data.load(demo_dir).image_paths("test")[0], photo)
    finder = retrieve.Retriever.open(cfg)
    features = finder.image_features(photo)
    assert features.shape == (1, 1280) and np.isfinite(features).all()
    hits, path = finder.by_image(photo, top=3)
    assert len(hits) == 3 and path.is_file() and not any(h.own for h in hits)
    assert math.isfinite(hits[0].score)
