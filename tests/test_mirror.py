"""The mirror of output/ and models/ (Google Drive in Colab): what changed is copied after each stage and epoch,
whole or not at all, and a new machine gets back what it lacks before anything runs."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from torch import nn

from multilabel_fusion.io import mirror as M
from multilabel_fusion.training import trainer


@pytest.fixture
def folders(tmp_path):
    local = {"output": tmp_path / "here" / "output", "models": tmp_path / "here" / "models"}
    for folder in local.values():
        folder.mkdir(parents=True)
    return local, tmp_path / "drive"


def test_sync_copies_new_and_changed_files_once_and_skips_locks_and_temporaries(folders):
    local, drive = folders
    (local["output"] / "metrics").mkdir()
    (local["output"] / "metrics" / "image.json").write_text("{}")
    (local["models"] / "run").mkdir()
    (local["models"] / "run" / "last.pt").write_bytes(b"epoch 1")
    (local["output"] / ".lock").write_text("")
    (local["output"] / ".x.npy.123.abc.tmp").write_bytes(b"half")
    mirror = M.Mirror(drive, local)
    assert mirror.sync() == 2
    assert (drive / "output" / "metrics" / "image.json").read_text() == "{}"
    assert (drive / "models" / "run" / "last.pt").read_bytes() == b"epoch 1"
    assert not (drive / "output" / ".lock").exists() and not list(drive.rglob("*.tmp"))
    assert M.Mirror(drive, local).sync() == 0  # unchanged: nothing copied again (a new process reads the manifest)
    (local["models"] / "run" / "last.pt").write_bytes(b"epoch 2, longer")
    assert mirror.sync(local["models"] / "run") == 1
    assert (drive / "models" / "run" / "last.pt").read_bytes() == b"epoch 2, longer"
    assert set(json.loads((drive / M.MANIFEST).read_text())["files"]) == {"output/metrics/image.json",
                                                                           "models/run/last.pt"}


def test_a_copy_cut_short_leaves_the_previous_copy_whole_and_the_run_going(folders, monkeypatch, caplog):
    local, drive = folders
    (local["models"] / "last.pt").write_bytes(b"epoch 1")
    mirror = M.Mirror(drive, local)
    mirror.sync()
    (local["models"] / "last.pt").write_bytes(b"epoch 2 -- a bigger checkpoint")

    def cut(source, target):
        with open(target, "wb") as f:
            f.write(b"epo")
        raise OSError("the runtime disconnected")

    monkeypatch.setattr(M.shutil, "copyfile", cut)
    with caplog.at_level(logging.WARNING):
        assert mirror.sync() == 0  # the run goes on: its results are on this machine
    assert "could not copy to" in caplog.text and "the runtime disconnected" in caplog.text
    assert (drive / "models" / "last.pt").read_bytes() == b"epoch 1"
    assert not [p for p in (drive / "models").iterdir() if p.name != "last.pt"]


def test_restore_brings_back_what_a_new_machine_lacks_and_keeps_newer_local_files(folders):
    local, drive = folders
    (local["output"] / "features.npy").write_bytes(b"features")
    (local["models"] / "last.pt").write_bytes(b"epoch 3")
    M.Mirror(drive, local).sync()
    for folder in local.values():
        shutil.rmtree(folder)
    local["models"].mkdir(parents=True)
    (local["models"] / "last.pt").write_bytes(b"epoch 4 (here, newer)")
    mirror = M.Mirror(drive, local)
    assert mirror.restore() == 1
    assert (local["output"] / "features.npy").read_bytes() == b"features"
    assert (local["models"] / "last.pt").read_bytes() == b"epoch 4 (here, newer)"
    assert mirror.sync() == 1  # only the newer checkpoint goes back; the restored file is seen as unchanged


def test_sync_at_most_every_waits_between_copies_of_the_same_folder(folders):
    local, drive = folders
    mirror = M.Mirror(drive, local)
    (local["models"] / "last.pt").write_bytes(b"1")
    assert mirror.sync(local["models"], at_most_every=60) == 1
    (local["models"] / "last.pt").write_bytes(b"22")
    assert mirror.sync(local["models"], at_most_every=60) == 0  # too soon
    assert mirror.sync(local["models"]) == 1


def test_training_copies_its_checkpoint_to_the_active_mirror_every_epoch(folders):
    """A disconnect loses at most the epoch in progress: after each epoch last.pt is on the mirror."""
    local, drive = folders
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), (torch.rand(64, 18) > 0.7).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    model = nn.Linear(6, 18)
    seen = []
    run_dir = local["models"] / "tiny"

    def after_epoch(epoch, row):
        on_drive = torch.load(drive / "models" / "tiny" / "last.pt", weights_only=False)
        seen.append(on_drive["epoch"] if epoch > 1 else None)  # the first epoch's copy was made just before

    with M.mirrored(M.Mirror(drive, local)):
        trainer.fit(model, loader, loader, y.numpy(), loss_fn=nn.BCEWithLogitsLoss(),
                    optimizer=torch.optim.Adam(model.parameters()), run_dir=run_dir, epochs=3, patience=5,
                    device=torch.device("cpu"), on_epoch_end=after_epoch)
    assert (drive / "models" / "tiny" / "last.pt").is_file()
    final = torch.load(drive / "models" / "tiny" / "last.pt", weights_only=False)
    assert final["epoch"] == 3 and final["finished"]
    # copied during training, not only at the end (epochs within a minute of the last copy wait for the next)
    assert seen == [None, 1, 3]
    assert M.sync() == 0  # no mirror active after the block


def test_pipeline_mirror_comes_from_the_settings(tmp_path):
    from multilabel_fusion import pipeline, settings

    cfg = settings.load(output=tmp_path / "out", models=tmp_path / "models")
    assert pipeline.mirror_of(cfg) is None
    mirror = pipeline.mirror_of(settings.load(output=tmp_path / "out", models=tmp_path / "models",
                                              mirror=tmp_path / "drive"))
    assert mirror.root == tmp_path / "drive"
    assert mirror.folders == {"output": tmp_path / "out", "models": tmp_path / "models"}
    (tmp_path / "a_file").write_text("")
    for bad, message in ((tmp_path / "a_file", "is a file, not a folder"), (tmp_path / "out" / "copy", "overlap"),
                         (tmp_path, "overlap")):
        with pytest.raises(settings.ConfigError, match=message):
            pipeline.mirror_of(settings.load(output=tmp_path / "out", models=tmp_path / "models", mirror=bad))
