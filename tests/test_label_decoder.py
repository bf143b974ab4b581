"""Stage 05's label decoders: sequences and END/PAD, teacher forcing against step-by-step decoding, beam search on
a constructed case with a known best sequence, order-free alignment, one real training step of every variant
through the one trainer (with exact resume), and the stage end to end on demo data."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from multilabel_fusion import settings as C
from multilabel_fusion.networks import label_decoder as LD
from multilabel_fusion.networks.label_decoder import END, N_OUT, NUM_LABELS, PAD, START, LabelDecoder, Variant
from multilabel_fusion.settings import DECODER_ARCHS
from multilabel_fusion.training import trainer

CPU = torch.device("cpu")


def _data(n: int = 64, rep_dim: int = 12, dims=(4, 6, 12), seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, NUM_LABELS)) < 0.12).astype(np.float32)
    y[np.arange(n), rng.integers(0, NUM_LABELS, n)] = 1
    rep = rng.normal(size=(n, rep_dim)).astype(np.float32)
    depths = rng.normal(size=(n, sum(dims))).astype(np.float32)
    return y, rep, depths, list(dims)


def _model(name: str, rep_dim: int = 12, dims=(4, 6, 12), seed: int = 0, **kw) -> LabelDecoder:
    torch.manual_seed(seed)
    v = Variant.parse(name)
    return LabelDecoder(v, rep_dim, list(dims) if v.uses_depths else [], embed=8, hidden=16, **kw)


def _depths(model: LabelDecoder, depths: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(depths) if model.variant.uses_depths else torch.zeros(len(depths), 0)


# ------------------------------------------------------------------------------------------------ sequences


def test_variant_names_round_trip_and_bad_names_are_config_errors():
    v = Variant.parse("seq2seq+caption+pla+attention")
    assert (v.arch, v.attention, v.order, v.caption, v.embeddings) == ("seq2seq", True, "pla", True, "random")
    assert Variant.parse(v.name) == v and v.name == "seq2seq+attention+pla+caption"
    with pytest.raises(C.ConfigError, match="did you mean seq2seq"):
        C.load(overrides=["label_decoder.variant=seq2sq"])
    with pytest.raises(C.ConfigError, match="pla or mla"):
        C.load(overrides=["label_decoder.compare=[joint+pla+mla]"])


def test_label_sequences_frequency_order_then_end_then_pad():
    rank = torch.as_tensor(LD.frequency_rank(np.array([[1, 0, 1, 1] + [0] * 14, [1, 0, 0, 1] + [0] * 14,
                                                       [1, 1, 0, 1] + [0] * 14])))
    assert rank[:4].tolist() == [0, 2, 3, 1]  # counts 3, 1, 1, 3: columns 0, 3, 1, 2 (ties in column order)
    y = torch.zeros(3, NUM_LABELS)
    y[0, [2, 0, 1]] = 1  # three labels, frequency order 0, 1, 2
    y[1, 1] = 1
    y[2, [3, 0]] = 1
    inputs, targets = LD.label_sequences(y, rank)
    assert targets.tolist() == [[0, 1, 2, END], [1, END, PAD, PAD], [0, 3, END, PAD]]
    assert inputs.tolist() == [[START, 0, 1, 2], [START, 1, END, PAD], [START, 0, 3, END]]


def test_pad_positions_do_not_count_in_the_loss():
    y, rep, depths, dims = _data(8)
    model = _model("init_hidden").eval()
    inputs, targets = LD.label_sequences(torch.as_tensor(y), model.rank)
    logits = model.teacher_forced_logits(torch.as_tensor(rep), torch.zeros(8, 0), inputs)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, N_OUT), targets.reshape(-1), ignore_index=PAD)
    changed = logits.clone()
    changed[targets == PAD] += torch.randn_like(changed[targets == PAD]) * 10  # PAD steps: anything
    again = torch.nn.functional.cross_entropy(changed.reshape(-1, N_OUT), targets.reshape(-1), ignore_index=PAD)
    assert (targets == PAD).any() and torch.allclose(loss, again)
    assert torch.allclose(loss, model.loss(torch.as_tensor(rep), torch.zeros(8, 0), torch.as_tensor(y)))


# ------------------------------------------------------------------------------ teacher forcing vs decoding


@pytest.mark.parametrize("name", ["joint", "joint+attention", "init_input", "seq2seq+attention"])
def test_teacher_forcing_on_the_greedy_path_gives_the_decoders_own_steps(name):
    """Fed the tokens greedy decoding said, teacher forcing computes the same logits: each said token is the
    argmax of its step once labels already said (and END at the first step) are masked."""
    y, rep, depths, dims = _data(16)
    model = _model(name).eval()
    d = _depths(model, depths)
    got = model.beam_search(torch.as_tensor(rep), d, width=1)
    said = got["tokens"]
    inputs = torch.cat([torch.full((16, 1), START), said[:, :-1]], 1)
    logits = model.teacher_forced_logits(torch.as_tensor(rep), d, inputs)
    emitted = torch.zeros(16, NUM_LABELS, dtype=torch.bool)
    logp_total = torch.zeros(16)
    done = torch.zeros(16, dtype=torch.bool)
    for t in range(said.shape[1]):
        mask = torch.cat([emitted, torch.full((16, 1), t == 0)], 1)
        step = torch.log_softmax(logits[:, t].masked_fill(mask, LD.MASKED), 1)
        live = ~done
        assert torch.equal(step[live].argmax(1), said[live, t])
        logp_total[live] += step[live].gather(1, said[live, t: t + 1]).squeeze(1)
        emitted |= torch.nn.functional.one_hot(said[:, t].clamp_max(NUM_LABELS - 1), NUM_LABELS).bool() & \
            (said[:, t] < NUM_LABELS)[:, None]
        done |= said[:, t] == END
    assert done.all()
    assert torch.allclose(logp_total, got["logp"], atol=1e-4)
    sets = torch.zeros(16, NUM_LABELS, dtype=torch.bool)
    for row, tokens in enumerate(said.tolist()):
        labels = tokens[: tokens.index(END)]
        assert labels and len(set(labels)) == len(labels)  # at least one label, none twice
        sets[row, labels] = True
    assert torch.equal(sets, got["sets"])


# ------------------------------------------------------------------------------------------------ beam search


class MarkovDecoder(LabelDecoder):
    """Step logits depend only on the previous token: a table, so every sequence's probability is known."""

    def __init__(self, table: torch.Tensor):
        super().__init__(Variant("init_hidden"), 1, [], embed=4, hidden=4)
        self.table = table  # [VOCAB, N_OUT] log-probabilities (before masking)

    def encode(self, rep, depths):
        return {}, (rep.new_zeros(len(rep), 1), rep.new_zeros(len(rep), 1), rep.new_zeros(len(rep), 1))

    def step(self, static, state, tokens):
        return self.table[tokens], state


def _markov_table() -> torch.Tensor:
    """From START: label 0 (0.5) or label 1 (0.45). After 0: nearly uniform (END unlikely). After 1: END (0.99).
    Greedy takes 0 and is stuck; the best sequence is [1, END]."""
    p = torch.full((LD.VOCAB, N_OUT), 1e-4)
    p[START, 0], p[START, 1] = 0.5, 0.45
    p[0, :] = 1.0 / N_OUT
    p[1, END] = 0.99
    p[END, 5] = 0.99  # after END a decoder would go on: a finished beam must not
    for label in range(2, NUM_LABELS):
        p[label, END] = 0.9
    return (p / p.sum(1, keepdim=True)).log()


def _sequence_logp(table: torch.Tensor, labels: tuple[int, ...]) -> float:
    """Log-probability of ``labels`` then END under the decoder's masking (labels said, END at the first step)."""
    prev, said, total = START, set(), 0.0
    for t, token in enumerate(list(labels) + [END]):
        logits = table[prev].clone()
        logits[list(said)] = LD.MASKED
        if t == 0:
            logits[END] = LD.MASKED
        total += float(torch.log_softmax(logits, 0)[token])
        prev = token
        said.add(token)
    return total


def test_beam_search_finds_the_known_best_sequence_where_greedy_does_not():
    table = _markov_table()
    model = MarkovDecoder(table).eval()
    rep = torch.zeros(3, 1)
    candidates = [c for n in (1, 2, 3) for c in itertools.permutations(range(NUM_LABELS), n)]
    best = max(candidates, key=lambda c: _sequence_logp(table, c))
    assert best == (1,)
    greedy = model.beam_search(rep, torch.zeros(3, 0), width=1)
    assert greedy["tokens"][0, 0] == 0 and not greedy["sets"][0, 1]
    assert math.isclose(float(greedy["logp"][0]), _sequence_logp(table, tuple(
        t for t in greedy["tokens"][0].tolist() if t != END)), abs_tol=1e-4)
    beam = model.beam_search(rep, torch.zeros(3, 0), width=2)
    assert beam["sets"][0].nonzero().flatten().tolist() == [1]
    assert math.isclose(float(beam["logp"][0]), _sequence_logp(table, best), abs_tol=1e-4)
    assert beam["tokens"][0].tolist()[:2] == [1, END]
    # the finished beam carries on unchanged while others run: END stays, label 5 (likely after END) never comes
    assert not beam["sets"][:, 5].any()
    # each label's score: its best probability along the best beam (label 1: 0.45 / (1 - p(END)) at step 0)
    first = torch.softmax(table[START].masked_fill(torch.arange(N_OUT) == END, LD.MASKED), 0)
    assert math.isclose(float(beam["scores"][0, 1]), float(first[1]), rel_tol=1e-5)


def test_max_labels_caps_the_decoded_sets():
    p = torch.full((LD.VOCAB, N_OUT), 1.0)
    p[:, END] = 1e-6  # a decoder that never wants to stop
    model = MarkovDecoder((p / p.sum(1, keepdim=True)).log()).eval()
    got = model.beam_search(torch.zeros(4, 1), torch.zeros(4, 0), width=3, max_labels=3)
    assert got["sets"].sum(1).tolist() == [3] * 4
    assert (got["tokens"][:, 3] == END).all()


def test_order_free_alignment_pla_and_mla():
    """Steps predict 5, then 3, then 9 (for labels {3, 5, 7}): PLA keeps 5 and 3 where they were said and gives
    7 to step 2; MLA gives each label the step where it is most probable."""
    p = torch.full((LD.VOCAB, N_OUT), 1e-3)
    p[START, 5], p[START, 7] = 0.6, 0.3
    p[5, 3], p[5, 7] = 0.5, 0.4
    p[3, 9], p[3, 7] = 0.5, 0.2
    p[9, END] = 0.9
    table = (p / p.sum(1, keepdim=True)).log()
    y = torch.zeros(2, NUM_LABELS)
    y[0, [3, 5, 7]] = 1
    y[1, [7]] = 1
    model = MarkovDecoder(table)
    model.variant = Variant("init_hidden", order="pla")
    logits, targets = model.order_free(torch.zeros(2, 1), torch.zeros(2, 0), y)
    assert logits.shape == (2, 4, N_OUT)
    assert targets.tolist() == [[5, 3, 7, END], [7, END, PAD, PAD]]
    model.variant = Variant("init_hidden", order="mla")
    _, targets = model.order_free(torch.zeros(2, 1), torch.zeros(2, 0), y)
    # greedy on log-probabilities: 5 at step 0 (0.6), then 3 at step 1 (0.5), 7 left for step 2 (0.2)
    assert targets.tolist() == [[5, 3, 7, END], [7, END, PAD, PAD]]


def test_label_embeddings_from_word_vectors():
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=6)
    rng = np.random.default_rng(0)
    words = ["person", "traffic", "light", "dog"]
    kv.add_vectors(words, rng.normal(size=(4, 6)).astype(np.float32))
    weight, info = LD.label_embedding_init(kv, embed=8, seed=0)
    assert weight.shape == (LD.VOCAB, 8) and info["labels_from_vectors"] == 3
    light = LD.L.names().index("traffic light")
    person, dog = LD.L.names().index("person"), LD.L.names().index("dog")
    mean = (kv["traffic"] + kv["light"]) / 2
    scale = weight[person, :6] / torch.tensor(kv["person"])
    assert torch.allclose(scale, scale[0].expand(6), rtol=1e-4)  # one rescaling, geometry kept
    assert torch.allclose(weight[light, :6], torch.tensor(mean) * scale[0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(weight[dog, :6], torch.tensor(kv["dog"]) * scale[0], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------- training through the trainer


VARIANTS = [*DECODER_ARCHS, "joint+attention", "init_hidden+attention", "seq2seq+attention", "init_hidden_cell+pla",
            "seq2seq+mla+attention", "joint+word_vectors", "seq2seq+caption", "seq2seq+shared",
            "seq2seq+shared+attention"]


def _fit(name: str, run_dir, epochs: int, resume: bool = False):
    y, rep, depths, dims = _data(80)
    model = _model(name, rank=LD.frequency_rank(y))
    d = depths if model.variant.uses_depths else np.zeros((80, 0), np.float32)
    model.fit_standardisation(rep[:64], d[:64])
    train = LD.FeatureBatches(rep[:64], d[:64], y[:64], 32, shuffle=True, seed=1)
    held = LD.FeatureBatches(rep[64:], d[64:], y[64:], 32)

    def score(m):
        got = LD.decode(m, rep[64:], d[64:], 2)
        prf = LD.sample_prf(y[64:], got["sets"])
        return {"score": prf["f1"], "val_loss": LD.mean_loss(m, held), "val_precision": prf["precision"]}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.fit(model, train, held, y[64:], loss_fn=torch.nn.CrossEntropyLoss(), batch_loss=LD.batch_loss,
                         score_fn=score, optimizer=torch.optim.Adam(model.parameters(), 1e-2, weight_decay=5e-4),
                         run_dir=run_dir, epochs=epochs, patience=10, grad_clip=5.0, device=CPU, resume=resume,
                         name=name)
    return model, result, before


@pytest.mark.parametrize("name", VARIANTS)
def test_one_real_training_step_of_each_variant(name, tmp_path):
    model, result, before = _fit(name, tmp_path / "run", epochs=1)
    row = result.history.iloc[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) and 0 <= row["val_mean_f1"] <= 1
    assert "val_precision" in result.history
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert "rnn.weight_hh_l0" in changed and "embedding.weight" in changed
    assert (tmp_path / "run" / "best.pt").is_file()


def test_shared_seq2seq_encoder_is_its_decoder(tmp_path):
    """``seq2seq+shared``: one LSTM reads the depths and decodes the labels (the paper's best seq2seq): the same
    module and parameters, counted once, trained by one step through both roles, and rebuilt from its weights."""
    shared, apart = _model("seq2seq+shared"), _model("seq2seq")
    assert shared.encoder is shared.decoder is shared.rnn and apart.encoder is not apart.decoder
    assert {id(p) for p in shared.encoder.parameters()} == {id(p) for p in shared.decoder.parameters()}
    lstm = sum(p.numel() for p in apart.encoder.parameters())
    assert sum(p.numel() for p in apart.parameters()) - sum(p.numel() for p in shared.parameters()) == lstm
    model, result, before = _fit("seq2seq+shared", tmp_path / "run", epochs=1)
    assert model.encoder is model.decoder and not torch.equal(model.encoder.weight_hh_l0, before["rnn.weight_hh_l0"])
    again = _model("seq2seq+shared", seed=1)
    again.load_state_dict(model.state_dict())  # the checkpoint names the one LSTM twice: both load the same weights
    assert again.encoder is again.decoder and torch.equal(again.encoder.weight_ih_l0, model.rnn.weight_ih_l0)
    y, rep, depths, dims = _data(8)
    a = model.eval().beam_search(torch.as_tensor(rep), torch.as_tensor(depths), width=2)
    b = again.eval().beam_search(torch.as_tensor(rep), torch.as_tensor(depths), width=2)
    assert torch.equal(a["sets"], b["sets"]) and torch.allclose(a["scores"], b["scores"])
    assert Variant.parse("seq2seq+attention+shared").name == "seq2seq+shared+attention"
    with pytest.raises(C.ConfigError, match="seq2seq only"):
        C.load(overrides=["label_decoder.variant=init_hidden+shared"])


#: the default decoder's key parts, computed before seq2seq+shared and the ranking baselines existed (the cached
#: runs on the real data are found by them): its section's settings spec and its run folders' shaping settings
DEFAULT_SETTINGS_SPEC, DEFAULT_RUN_SHAPING = "79eb1bdab685", "7f31221111ab"


def test_the_default_decoders_keys_are_unchanged_by_the_table_only_settings():
    """The default ``seq2seq`` keys as before (the whole demo key was checked equal, df09fcca02d8, when these were
    added); the table-only settings (ranking heads, their rule, ``compare``) never enter them."""
    from multilabel_fusion.io.hashing import digest
    from multilabel_fusion.stages.label_decoder import VERSION
    from multilabel_fusion.stages.registry import default

    stage = default().get("label_decoder")
    cfg = C.load()
    assert VERSION == 1 and cfg.label_decoder.variant == "seq2seq" and Variant.parse("seq2seq").name == "seq2seq"
    assert digest(stage.settings_spec(cfg)) == DEFAULT_SETTINGS_SPEC
    assert digest(cfg.label_decoder.shaping(weights_only=True)) == DEFAULT_RUN_SHAPING
    other = C.load(overrides=["label_decoder.ranking_baselines=[]", "label_decoder.warp_margin=0.5",
                              "label_decoder.ranking_rule=top_k", "label_decoder.compare=[seq2seq+shared]"])
    assert stage.settings_spec(other) == stage.settings_spec(cfg)
    assert other.label_decoder.shaping(weights_only=True) == cfg.label_decoder.shaping(weights_only=True)
    shared = C.load(overrides=["label_decoder.variant=seq2seq+shared"])
    assert digest(stage.settings_spec(shared)) != DEFAULT_SETTINGS_SPEC  # a shared decoder is another block


def test_sequence_training_resumes_exactly(tmp_path):
    """The batch_loss / score_fn hooks keep the trainer's exact resume: 2 epochs = 1 epoch + resume to 2."""
    _, straight, _ = _fit("seq2seq+attention", tmp_path / "a", epochs=2)
    _fit("seq2seq+attention", tmp_path / "b", epochs=1)
    _, resumed, _ = _fit("seq2seq+attention", tmp_path / "b", epochs=2, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "val_mean_f1", "val_precision"]
    assert resumed.resumed_from == 1
    assert straight.history[columns].equals(resumed.history[columns])


# ----------------------------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_stage_on_demo_data_block_table_and_fusion(tmp_path):
    from multilabel_fusion.evaluation import submission
    from multilabel_fusion.pipeline import run_all

    small = ["label_decoder.comparisons=true", "image.offline_fallback=efficientnet_lite0", "image.image_size=64",
             "image.feature_batch_size=32", "image.head_epochs=2", "image.head_hidden=16",
             "trainer.num_workers=0", "caption.epochs=2", "label_decoder.epochs=2", "label_decoder.hidden=16",
             "label_decoder.embed=8", "label_decoder.compare=[joint+attention, init_input+pla, seq2seq+caption]",
             "label_decoder.data_sizes=[60, 120]",
             "fusion.epochs=2", "fusion.hidden=16", "fusion.blocks=[image, caption, label_decoder]"]
    cfg = C.load(overrides=small, output=tmp_path / "output", models=tmp_path / "models", data=tmp_path / "none")
    results = run_all(cfg, demo_mode=True, stages=["fusion"])
    m = results["label_decoder"]
    out = tmp_path / "output" / "demo"  # --demo results go to output/demo/, the generated data to output/demo/input/
    assert m["demo_data"] and submission.validate_file(m["submission"], out / "input" / "test.csv") > 0
    models = [r["model"] for r in m["table"]]
    assert models[:4] == ["seq2seq", "joint+attention", "init_input+pla", "seq2seq+caption"]
    assert {"BCE MLP head", "BCE linear head", "WARP MLP head", "softmax MLP head"} <= set(models)
    assert all(0 <= r["precision"] <= 1 and 0 <= r["f1"] <= 1 for r in m["table"])
    # the ranking heads, on the BCE heads' features, labelled by a rule chosen on the selection rows
    ranked = [r for r in m["table"] if r["kind"] in ("warp", "softmax")]
    assert sorted((r["kind"], r["features"]) for r in ranked) == sorted(
        (k, f) for k in ("warp", "softmax") for f in ("image", "image + caption_probs"))
    assert all(r["rule"].startswith(("top ", "score >= ")) and "gap_se" in r for r in ranked)
    # F1 by labels per image and per class for every row, with the groups' sizes
    split = m["table_split"]
    assert list(split["images_by_label_count"]) == ["1", "2", "3", "4", "5+"]
    assert sum(split["images_by_label_count"].values()) == split["n_held"]
    assert sum(split["class_support"]) == round(split["labels_per_image"] * split["n_held"])
    for r in m["table"]:
        assert set(r["f1_by_label_count"]) == set(split["images_by_label_count"]) and len(r["per_class_f1"]) == 18
        n = split["images_by_label_count"]
        mean = sum(f * n[g] for g, f in r["f1_by_label_count"].items() if f is not None) / split["n_held"]
        assert mean == pytest.approx(r["f1"], abs=2e-3)  # the groups' F1s average to the row's
        assert "_sets" not in r
    assert Path(m["figures"]["breakdown"]).is_file()
    assert m["features"]["depth_dims"][-1] == m["features"]["pooled_dim"]  # multi-depth features were used
    block = json.loads((next((out / "artifacts" / "label_decoder").glob("*/manifest.json"))).read_text())
    assert block["arrays"]["train"]["shape"] == [300, NUM_LABELS] and block["arrays"]["test"]["shape"] == [100, 18]
    assert "label_decoder" in results["fusion"]["blocks"]
    again = run_all(cfg, demo_mode=True, stages=["label_decoder"])["label_decoder"]  # everything reused
    assert again["block"] == "reused"
    assert [(r["model"], r["f1"]) for r in again["table"]] == [(r["model"], r["f1"]) for r in m["table"]]
    # the learning curve: nested subsets, then the whole fit part (the table's own rows)
    sizes = m["data_sizes"]
    assert [r["n_fit"] for r in sizes] == [60, 120, m["table_split"]["n_fit"]]
    whole = next(r for r in m["table"] if r["model"] == "seq2seq")
    assert sizes[-1]["decoder_f1"] == whole["f1"] and all(r["gap"] == round(r["decoder_f1"] - r["bce_f1"], 4)
                                                          for r in sizes)
    assert Path(m["figures"]["data_sizes"]).is_file()
    assert [(r["n_fit"], r["decoder_f1"]) for r in again["data_sizes"]] == [(r["n_fit"], r["decoder_f1"]) for r in sizes]


@pytest.mark.slow
def test_stage_command_line_and_its_section_of_results_md(tmp_path):
    """``stages/05_label_decoder.py`` on an empty output folder (stages 01 and 02 run first) with ``--results-doc``;
    then the stage's section of docs/RESULTS.md from a snapshot of that run with the fused runs without / with the
    block: figures copied, refreshed alone without touching the rest of the page, and part of what the benchmark
    renders."""
    from multilabel_fusion.cli import stage_main
    from multilabel_fusion.pipeline import run_all
    from multilabel_fusion.reports import bench, label_decoder_page, stage_results

    small = ["label_decoder.comparisons=true", "image.offline_fallback=efficientnet_lite0", "image.image_size=64",
             "image.feature_batch_size=32", "image.head_epochs=2", "image.head_hidden=16",
             "trainer.num_workers=0", "caption.epochs=2", "label_decoder.epochs=1", "label_decoder.hidden=16",
             "label_decoder.embed=8", "label_decoder.compare=[joint]", "label_decoder.data_sizes=[]",
             "fusion.epochs=2", "fusion.hidden=16", "fusion.blocks=[image, caption]"]
    out, models = tmp_path / "output", tmp_path / "models"
    page_05 = tmp_path / "page" / "RESULTS_label_decoder.md"
    m = stage_main("label_decoder", ["--demo", "--output", str(out), "--models", str(models),
                                     *sum((["--set", x] for x in small), []), "--results-doc", str(page_05)],
                   extra_args=label_decoder_page.arguments, run=label_decoder_page.run)
    metrics = out / "demo" / "metrics"  # --demo results go to output/demo/
    assert {"image.json", "caption.json", "label_decoder.json"} <= {p.name for p in metrics.iterdir()}
    text = page_05.read_text()
    assert text.startswith("# Stage 05") and f"| joint | image | {100 * m['table'][1]['precision']:.1f} |" in text
    assert "](../output/demo/figures/label_decoder_comparison.png)" in text  # links relative to the page

    cfg = C.load(overrides=small, output=out, models=models, data=tmp_path / "none")
    without = run_all(cfg, demo_mode=True, stages=["fusion"])["fusion"]
    (tmp_path / "without.json").write_text((metrics / "fusion.json").read_text())
    with_block = C.load(overrides=small + ["fusion.blocks=[image, caption, label_decoder]"], output=out,
                        models=models, data=tmp_path / "none")
    run_all(with_block, demo_mode=True, stages=["fusion"])
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "RESULTS.md"
    page.write_text("# Results\n\nbench tables\n")
    # bad input: one line naming what is wrong
    with pytest.raises(SystemExit, match="no file .*nowhere.json"):
        bench.main(["--docs", str(docs), "--stage-sections", "--stage", "label_decoder", str(tmp_path / "nowhere.json")])
    with pytest.raises(SystemExit, match="is the metrics file of 'fusion'"):
        bench.main(["--docs", str(docs), "--stage-sections", "--stage", "label_decoder", str(tmp_path / "without.json")])
    assert bench.main(["--docs", str(docs), "--stage-sections", "--stage", "label_decoder",
                       str(metrics / "label_decoder.json"), str(tmp_path / "without.json"),
                       f"{metrics / 'fusion.json'}=with the seq2seq block"]) == 0
    text = page.read_text()
    assert text.startswith("# Results\n\nbench tables\n")
    assert "## Stage 05: recurrent label decoders" in text and "### The paper's table, on this data" in text
    assert "| BCE MLP head | image |" in text and "| seq2seq | 71.1 | 68.0 | 69.5 |" in text  # ours beside published
    assert "| WARP MLP head | image |" in text and "| WARP |  |  | 60.7 |" in text and "| softmax |  |  | 61.1 |" in text
    assert "### F1 by number of labels per image and per class" in text and "figures/label_decoder_breakdown.png" in text
    assert f"| {', '.join(without['blocks'])} | {without['val_mean_f1_at_0.5']:.4f} |" in text
    assert "| image, caption, label_decoder (with the seq2seq block) |" in text
    for link in ("figures/label_decoder_comparison.png", "figures/label_decoder_training.png"):
        assert f"]({link})" in text and (docs / link).is_file()
    assert not (docs / "figures" / "label_decoder_per_class_f1.png").exists()  # only what the section shows
    # refreshed alone: the rest of the page is kept byte for byte, the section is replaced, not added twice
    page.write_text(text.replace("bench tables", "bench tables, edited") + "\ntrailing bench text\n")
    stage_results.refresh(docs)
    again = page.read_text()
    assert again.count("## Stage 05: recurrent label decoders") == 1
    assert "bench tables, edited" in again and again.endswith("trailing bench text\n")
    # and make bench renders it from the snapshot too
    fused = json.loads((metrics / "fusion.json").read_text())
    timing = {"wall_s": 1.0, "peak_mb": 1.0}
    rendered = bench.render({"stages": {"fusion": {"cold": timing, "warm": timing, "metrics": fused}},
                             "default_blocks": fused["blocks"]}, tmp_path / "none", docs)
    assert "## Out-of-fold mean-F1 per stage" in rendered and stage_results.section(docs, "label_decoder") in rendered


def test_results_pages_name_the_rule_behind_a_cross_fitted_figure():
    """A metrics file made before thresholds.decision existed (no 'decision' key) was scored with cross-fitted
    per-class thresholds: its snapshot must not be rendered as a cross-fitted decision."""
    from multilabel_fusion.reports.stage_results import cross_fitted, fusion_rows, fusion_summary

    old = {"blocks": {"image": {}}, "val_mean_f1_at_0.5": 0.80, "val_mean_f1_tuned": 0.81, "mean_f1_threshold_cv": 0.805}
    new = {**old, "decision": "expected_f1", "mean_f1_threshold_cv": 0.809}
    runs_old, runs_new = fusion_summary(old), fusion_summary(new)
    assert runs_old["decision"] is None and runs_new["decision"] == "expected_f1"
    assert cross_fitted(old) == "cross-fitted thresholds" and cross_fitted(new) == "a cross-fitted decision"
    assert "| F1 cross-fitted thresholds |" in fusion_rows([runs_old, runs_new])[0]  # one old row: the old name
    table = fusion_rows([runs_new, runs_new])
    assert "| F1 cross-fitted decision |" in table[0] and "| 0.8090 | +0.0000 |" in table[3]
