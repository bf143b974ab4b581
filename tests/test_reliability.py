"""Nothing silent, nothing stale, nothing lost: the 14 causes of failure a round of hostile probes found, each
rebuilt here as the probe built it (numbered as in the issue), with what must happen instead."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from multilabel_fusion import pipeline
from multilabel_fusion import settings as S
from multilabel_fusion.data import demo
from multilabel_fusion.data import reader as D
from multilabel_fusion.data.images import find_bad_images, image_problem
from multilabel_fusion.evaluation import submission
from multilabel_fusion.evaluation.submission import SubmissionError
from multilabel_fusion.io import atomic
from multilabel_fusion.io.artifacts import ArtifactStore
from multilabel_fusion.io.assets import Asset, load_vectors
from multilabel_fusion.io.atomic import DamagedFile, DiskFull
from multilabel_fusion.io.locks import folder_lock
from multilabel_fusion.settings import ConfigError
from multilabel_fusion.training import trainer

REPO = Path(__file__).resolve().parent.parent
TINY = ["image.offline_fallback=efficientnet_lite0", "image.image_size=64", "image.head_epochs=2", "image.head_hidden=16",
        "caption.epochs=2", "fusion.epochs=2", "fusion.hidden=16", "trainer.num_workers=0", "detector.image_size=64",
        "detector.zoom_size=96", "detector.batch_size=16"]


def _cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return demo.generate(tmp_path_factory.mktemp("reliability") / "data", n_train=60, n_test=20, seed=3,
                         image_size=(64, 48))


# ----------------------------------------------------------------------------------------------- 1. a record lost


@pytest.mark.parametrize("line", [' 30003.jpg,"A cat on a mat."', '5.JPG,"A cat on a mat."', 'abc.jpg,"A cat."',
                                  'x30003.jpg,"A cat on a mat."'])
def test_1_a_line_that_looks_like_a_record_is_never_glued_to_a_closed_caption(tmp_path, line):
    test_csv = tmp_path / "test.csv"
    test_csv.write_text(f'ImageID,Caption\n30000.jpg,"A dog."\n30001.jpg,"Two dogs."\n{line}\n30004.jpg,"A bike."\n')
    with pytest.raises(D.DataError, match=r"test.csv: line 4: .*looks like a record but is not one.*30001.jpg "
                                          r"\(line 3\), which already ended"):
        D.read_records(test_csv, with_labels=False)
    # the validator, reading the same file, refuses it too instead of agreeing with a submission a row short
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageID,Labels\n30000.jpg,1\n30001.jpg,1\n30004.jpg,1\n")
    with pytest.raises(D.DataError, match="looks like a record"):
        submission.validate_file(sub, test_csv)


# ----------------------------------------------------------------------------------------------- 2. damaged artifact


def test_2_an_artifact_whose_array_was_overwritten_is_computed_again(small, tmp_path, caplog):
    cfg = S.load(overrides=["text.min_df=1"], data=small, output=tmp_path / "out", models=tmp_path / "models")
    first = pipeline.run_stage("text", cfg)
    store = ArtifactStore(tmp_path / "out")
    art = store.require("text", first["artifact_key"], "stage 04")
    np.save(art.dir / "test_probs.npy", np.full_like(np.asarray(art["test_probs"]), 0.99))  # same shape and dtype
    assert store.load("text", first["artifact_key"]) is None
    assert "checksum mismatch" in caplog.text
    again = pipeline.run_stage("text", cfg)
    assert again["probabilities"] == "computed" and again["artifact_key"] == first["artifact_key"]
    rows = (tmp_path / "out" / "submission_text.csv").read_text().splitlines()[1:]
    assert not all(len(r.split(",")[1].split()) == 18 for r in rows)  # not every label for every image
    kept = np.asarray(store.require("text", first["artifact_key"], "04")["test_probs"])
    assert not np.isclose(kept, 0.99).all() and kept.std() > 0.01  # the recomputed probabilities, not the 0.99s


# ----------------------------------------------------------------------------------------------- 3. a changed photo


def test_3_a_changed_photo_changes_the_keys_of_what_was_made_from_the_photos(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small, data)
    cfg = S.load(overrides=TINY, data=data, output=tmp_path / "out", models=tmp_path / "models")
    before = pipeline.workspace(cfg)
    keys = {name: before.key(name) for name in ("image", "detector", "caption", "text")}
    shutil.copyfile(data / "data" / "7.jpg", data / "data" / "3.jpg")  # same name, other content
    after = pipeline.workspace(cfg)
    assert after.key("image") != keys["image"] and after.key("detector") != keys["detector"]
    assert after.key("caption") == keys["caption"] and after.key("text") == keys["text"]  # captions only
    assert after.block_key("image_probs") != before.block_key("image_probs")


# ----------------------------------------------------------------------------------------------- 4. tampered bundles


def _bundle(path: Path, files: dict[str, bytes], manifest=None, extra: dict[str, bytes] | None = None) -> Path:
    """A bundle of ``files`` whose manifest lists them with their sha256 (``manifest``: another manifest, a dict or
    raw text; ``extra``: entries the manifest does not list)."""
    if manifest is None:
        manifest = {"format": 2, "final": "text", "blocks": ["text"], "folds": 1, "decision": "per_class",
                    "thresholds": [0.5] * 18, "at_least_one": True,
                    "stages": {"text": {"blocks": ["text"], "description": {"folds": 1}}},
                    "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", manifest if isinstance(manifest, str) else json.dumps(manifest))
        for name, data in {**files, **(extra or {})}.items():
            archive.writestr(name, data)
    return path


def test_4_a_tampered_bundle_is_one_line_and_nothing_is_unpickled_before_its_hashes_match(tmp_path, monkeypatch):
    import pickle

    from multilabel_fusion.predict import Predictor, PredictorError

    unpickled = []

    def loads(*args, **kwargs):
        unpickled.append(1)
        raise pickle.UnpicklingError("not a pickle")

    monkeypatch.setattr(pickle, "loads", loads)
    files = {"text/models.pkl": b"bytes that are not a pickle"}
    honest = json.loads(zipfile.ZipFile(_bundle(tmp_path / "honest.zip", files)).read("manifest.json"))
    changed = {**honest, "files": {"text/models.pkl": "0" * 64}}
    incomplete = {k: v for k, v in honest.items() if k != "stages"}
    cases = [(_bundle(tmp_path / "a.zip", files, changed), "does not match the sha256 its manifest lists"),
             (_bundle(tmp_path / "b.zip", files, "{not json"), "manifest.json is not JSON"),
             (_bundle(tmp_path / "c.zip", files, incomplete), "its manifest lacks stages"),
             (_bundle(tmp_path / "d.zip", files, extra={"text/extra.pkl": b"x"}), "is not listed in its manifest")]
    for path, message in cases:
        with pytest.raises(PredictorError, match=re.escape(message)):
            Predictor.load(bundle=path, warm_up=False)
    assert unpickled == []  # each refused before anything was unpickled
    with pytest.raises(PredictorError, match=re.escape("a bundle this version cannot read (UnpicklingError")):
        Predictor.load(bundle=tmp_path / "honest.zip", warm_up=False)
    assert unpickled == [1]  # the hashes matched: only then was the entry unpickled, and its error is one line
    # a damaged zip (compressed bytes of an entry changed): one line, from the command line too
    blob = bytearray((tmp_path / "honest.zip").read_bytes())
    at = blob.find(b"text/models.pkl") + len(b"text/models.pkl") + 4
    blob[at: at + 6] = b"\xff" * 6
    (tmp_path / "damaged.zip").write_bytes(bytes(blob))
    result = _cli("-m", "multilabel_fusion.predict", "--bundle", str(tmp_path / "damaged.zip"), "--image",
                  str(tmp_path / "damaged.zip"), "--caption", "a dog")
    assert "damaged.zip" in _one_line(result)


# ----------------------------------------------------------------------------------------------- 5. models/ damaged


def _train(run_dir: Path, epochs: int = 2):
    x, y = torch.randn(64, 4), (torch.rand(64, 18) < 0.3).float()
    model = torch.nn.Linear(4, 18)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    return trainer.fit(model, loader, val, y.numpy(), loss_fn=torch.nn.BCEWithLogitsLoss(), run_dir=run_dir,
                       epochs=epochs, patience=99, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       device=torch.device("cpu"))


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_5_a_truncated_checkpoint_is_refused_in_one_line_naming_it_and_what_to_do(tmp_path, name):
    _train(tmp_path / "run")
    path = tmp_path / "run" / name
    assert (tmp_path / "run" / f"{name}.sha256").is_file()  # written with it
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DamagedFile, match=re.escape(f"{path}: damaged") + r".*delete the folder"):
        _train(tmp_path / "run")


def test_5_truncated_word_vectors_are_refused_in_one_line(tmp_path):
    from gensim.models import KeyedVectors

    vectors = KeyedVectors(vector_size=4)
    vectors.add_vectors([f"w{i}" for i in range(100)], np.random.default_rng(0).random((100, 4), dtype=np.float32))
    vectors.save(str(tmp_path / "tiny.kv"), sep_limit=0)  # the matrix in a .npy beside the .kv, as converted ones
    npy = next(tmp_path.glob("tiny.kv.*.npy"))
    npy.write_bytes(npy.read_bytes()[:200])
    asset = Asset("word vectors", "tiny", "local copy", "tiny:x", tmp_path / "tiny.kv")
    with pytest.raises(DamagedFile, match=r"tiny.kv: unreadable word vectors .*delete .*to convert them again"):
        load_vectors(asset)


# ----------------------------------------------------------------------------------------------- 6. disk full


def test_6_a_full_disk_is_one_line_naming_the_folder_and_the_bytes(small, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    store = ArtifactStore(tmp_path / "out")
    with pytest.raises(DiskFull, match=rf"no space left on the device of {re.escape(str(tmp_path / 'out' / 'artifacts' / 'image'))} \(80,\d+ bytes needed"):
        with store.writer("image", "k", {}) as w:
            w.array("train", (100, 400), "float16")  # reserved before a row is written: never a bus error
    assert store.load("image", "k") is None and not (tmp_path / "out" / "artifacts" / "image" / "k").exists()
    # the whole command: one line, and the run's log ends with it
    script = ("import errno, os, sys\n"
              "def full(fd, offset, length):\n"
              "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "os.posix_fallocate = full\n"
              "from multilabel_fusion.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    args = ["--data", str(small), "--output", str(tmp_path / "o2"), "--models", str(tmp_path / "m2"), "--stages",
            "image", *[a for s in TINY for a in ("--set", s)]]
    line = _one_line(_cli("-c", script, *args))
    assert "no space left on the device of" in line and "bytes needed" in line
    log = next((tmp_path / "o2" / "logs").glob("main-*.log")).read_text().rstrip().splitlines()[-1]
    assert log.startswith("# error: ") and "no space left" in log


def test_6_any_other_write_without_space_names_its_folder(tmp_path, monkeypatch):
    real = Path.write_bytes

    def no_space(self, data):
        if self.name.startswith("."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(DiskFull, match=rf"{re.escape(str(tmp_path / 'metrics'))} \(5 bytes needed"):
        atomic.write_text(tmp_path / "metrics" / "x.json", "hello")
    assert not (tmp_path / "metrics" / "x.json").exists()


# ----------------------------------------------------------------------------------------------- 7. too little data


@pytest.mark.parametrize("n, folds", [(5, 2), (1, 5)])
def test_7_too_few_records_for_the_folds_is_one_line_saying_how_many_are_needed(tmp_path, n, folds):
    data = demo.generate(tmp_path / "data", n_train=n, n_test=3, seed=1, image_size=(32, 24))
    line = _one_line(_cli("-m", "multilabel_fusion", "--data", str(data), "--output", str(tmp_path / "out"),
                          "--models", str(tmp_path / "models"), "--set", f"split.folds={folds}"))
    assert f"{n} labelled record" in line and "too few for split.folds" in line and "records or more" in line
    assert not (tmp_path / "out" / "artifacts").exists()  # refused before any stage ran


def test_7_a_split_just_large_enough_runs_end_to_end(tmp_path):
    data = demo.generate(tmp_path / "data", n_train=8, n_test=3, seed=1, image_size=(32, 24))
    cfg = S.load(overrides=TINY + ["split.folds=2", "pipeline.stages=[caption, text, fusion]",
                                   "fusion.blocks=[caption_probs, text]", "text.min_df=1"],
                 data=data, output=tmp_path / "out", models=tmp_path / "models")
    results = pipeline.run_all(cfg, demo_mode=False)
    assert submission.validate_file(tmp_path / "out" / "predictions.csv", data / "test.csv") == 3
    assert results["fusion"]["held_out"] == "out-of-fold (2 folds)"


# ----------------------------------------------------------------------------------------------- 8. unavailable device


def test_8_a_device_this_machine_does_not_have_is_a_config_error(small, tmp_path, monkeypatch):
    from multilabel_fusion.networks.device import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"config: trainer.device = 'cuda': this machine has no CUDA GPU"):
        select_device("cuda")
    line = _one_line(_cli("-m", "multilabel_fusion", "--data", str(small), "--output", str(tmp_path / "out"),
                          "--set", "trainer.device=cuda", env={"CUDA_VISIBLE_DEVICES": ""}))
    assert "trainer.device = 'cuda'" in line


# ----------------------------------------------------------------------------------------------- 9. corrupt JPEG


def test_9_a_jpeg_corrupted_in_the_middle_is_a_bad_image_named_by_file(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small, data)
    bad = data / "data" / "4.jpg"
    blob = bytearray(bad.read_bytes())
    middle = len(blob) // 2
    blob[middle: middle + 300] = b"\x00" * 300  # the end marker stays: only the compressed data is damaged
    bad.write_bytes(bytes(blob))
    assert image_problem(bad).startswith("corrupt JPEG data")
    assert [p.name for p, _ in find_bad_images(sorted((data / "data").glob("*.jpg")))] == ["4.jpg"]
    cfg = S.load(overrides=TINY, data=data, output=tmp_path / "out", models=tmp_path / "models")
    with pytest.raises(D.DataError, match=rf"{re.escape(str(bad))}: corrupt JPEG data.*data.bad_images=replace"):
        pipeline.run_stage("image", cfg)
    replaced = pipeline.run_stage("image", cfg.override("data.bad_images=replace"))
    assert any(entry.startswith(str(bad)) for entry in replaced["bad_images"])


# ----------------------------------------------------------------------------------------------- 10. README commands


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(line)
    commands += re.findall(r"`(python3 -m [^`]+)`", text)
    return list(dict.fromkeys(commands))


def test_10_every_command_in_readme_runs(small, tmp_path):
    """Each command of README.md, run on demo data with small settings (the data path replaced, a photo of the demo
    data for the predictor), so that a renamed module or option cannot leave a dead command behind."""
    commands = _readme_commands()
    last_stage = max((REPO / "stages").glob("[0-9][0-9]_*.py")).name  # the fused network, whatever its number
    assert any("multilabel_fusion.predict" in c for c in commands) and any(last_stage in c for c in commands)
    data, out, models = small, tmp_path / "out", tmp_path / "models"
    tiny = " ".join(f"--set {s}" for s in TINY)
    ran = []
    for command in commands:
        parts = [p.strip() for p in command.split("&&")]
        for part in parts:
            if part == "./setup.sh":  # the set-up CI runs before the tests
                assert os.access(REPO / "setup.sh", os.X_OK)
                continue
            if part.startswith("python3 -m pytest"):  # the test command itself: not again from inside the tests
                assert _cli("-m", "pytest", "--version").returncode == 0
                continue
            assert part.startswith("python3 "), command
            line = part.replace("../shared/comp5329", str(data)).replace("photo.jpg", str(data / "data" / "30000.jpg"))
            if "--data" not in line:
                line += f" --data {data}"
            line += f" --output {out} --models {models} {tiny}"  # every command takes the shared options
            args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', line)[1:]]
            result = _cli(*args)
            assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
            ran.append(command)
    assert len(ran) >= 4, ran


# ----------------------------------------------------------------------------------------------- 11. validator


def test_11_the_validator_refuses_non_utf8_text_and_labels_kaggle_reads_differently(small, tmp_path):
    ids = [r.image_id for r in D.read_records(small / "test.csv", with_labels=False)]
    good = "ImageID,Labels\n" + "\n".join(f"{i},1" for i in ids) + "\n"
    path = tmp_path / "sub.csv"
    path.write_bytes(good.replace(f"{ids[2]},1", f"{ids[2]},1\xff").encode("latin-1"))
    with pytest.raises(SubmissionError, match=r"sub.csv: line 4: not UTF-8 text"):
        submission.validate_file(path, small / "test.csv")
    result = _cli("-m", "multilabel_fusion.evaluation.submission", str(path), "--test-csv", str(small / "test.csv"))
    assert result.returncode == 1 and result.stderr.startswith("INVALID: ") and "Traceback" not in result.stderr
    with pytest.raises(SubmissionError, match=r"labels '01' must be label ids"):
        submission.validate_text(good.replace(f"{ids[0]},1", f"{ids[0]},01"), ids)
    with pytest.raises(SubmissionError, match=r"labels '1 03' must be"):
        submission.validate_text(good.replace(f"{ids[0]},1", f"{ids[0]},1 03"), ids)


# ----------------------------------------------------------------------------------------------- 12. predictor CLI


def test_12_an_unwritable_output_is_refused_before_any_work_and_an_empty_caption_for_its_reason(small, tmp_path):
    for out in (tmp_path / "missing" / "labels.csv", tmp_path / "a_file" / "labels.csv", tmp_path):
        (tmp_path / "a_file").write_text("x")
        result = _cli("-m", "multilabel_fusion.predict", "--data", str(small), "--output", str(tmp_path / "none"),
                      "--csv", str(small / "test.csv"), "--images", str(small / "data"), "--out", str(out))
        line = _one_line(result)
        assert str(out) in line and "predictor:" not in result.stdout, line  # said before loading anything
    result = _cli("-m", "multilabel_fusion.predict", "--data", str(small), "--output", str(tmp_path / "none"),
                  "--image", str(small / "data" / "30000.jpg"), "--caption", "")
    line = _one_line(result)
    assert line == "error: the caption is empty (give the caption of the photo, a sentence)"


# ----------------------------------------------------------------------------------------------- 13. reader, minor


def test_13_an_extra_field_a_quote_all_resave_and_cr_line_endings(tmp_path):
    extra = tmp_path / "train.csv"
    extra.write_text('ImageID,Labels,Caption\n5.jpg,1,"cap","extra"\n')
    with pytest.raises(D.DataError, match=r"line 2 \(5.jpg\): a field after the caption"):
        D.read_records(extra, with_labels=True)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"ImageID","Labels","Caption"\n"5.jpg","1 3","A sign that reads ""stop"""\n'
                      '"6.jpg","2","A bike."\n')
    assert [(r.image_id, r.labels, r.caption) for r in D.read_records(quoted, with_labels=True)] == [
        ("5.jpg", (1, 3), 'A sign that reads "stop"'), ("6.jpg", (2,), "A bike.")]
    cr = tmp_path / "cr.csv"
    cr.write_bytes(b'ImageID,Caption\r30000.jpg,"A dog."\r30001.jpg,"A cat."\r')
    assert [r.caption for r in D.read_records(cr, with_labels=False)] == ["A dog.", "A cat."]
    long = tmp_path / "long.csv"
    long.write_text("Image,Caption," + "x" * 5000 + "\n")
    with pytest.raises(D.DataError) as err:
        D.read_records(long, with_labels=False)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- 14. two jobs


def test_14_a_second_job_on_the_same_folders_stops_in_one_line(small, tmp_path):
    out, models = tmp_path / "out", tmp_path / "models"
    args = ["-m", "multilabel_fusion", "--data", str(small), "--output", str(out), "--models", str(models),
            "--stages", "text", "--set", "text.min_df=1"]
    with folder_lock(out):  # a running job holds the output folder
        line = _one_line(_cli(*args))
        assert f"{out} is in use by another run (pid {os.getpid()}" in line and "--output" in line
        assert not (out / "artifacts").exists()
        other = subprocess.run([sys.executable, "-c", f"from multilabel_fusion.io.locks import folder_lock\n"
                                f"with folder_lock({str(models)!r}): pass\n"
                                f"with folder_lock({str(out)!r}): pass"], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        assert other.returncode != 0 and "FolderBusy" in other.stderr  # another process: refused
        with folder_lock(out):  # this process again (a run inside a run): the lock is reentrant
            pass
    assert _cli(*args).returncode == 0  # released: the next job runs
    # a holder killed with SIGKILL releases it (the system drops a dead process's lock)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom multilabel_fusion.io.locks import "
                               f"folder_lock\nwith folder_lock({str(out)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    assert "in use by another run" in _one_line(_cli(*args))
    holder.kill()
    holder.wait()
    assert _cli(*args).returncode == 0
