"""The shared trainer: run folders, reuse / resume semantics, exact resume after a SIGKILL, precision choice.

Everything runs on generated data: a small MLP with dropout on 400 random samples with 18 multi-hot
targets, shuffled by a DataLoader with a seeded generator, so a missed random-number state (dropout
or shuffling) changes the history and the predictions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from multilabel_fusion.networks.precision import Precision, gpu_inference_dtype, training_precision
from multilabel_fusion.training import trainer
from multilabel_fusion.training.trainer import ResumeRequired

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CPU = torch.device("cpu")
N_FEATURES, N_CLASSES, BATCH = 24, 18, 32
BATCHES_PER_EPOCH = -(-400 // BATCH)  # 13
COMPARED = ["epoch", "train_loss", "val_loss", "val_mean_f1", "lr"]  # every history column but the timing


# ------------------------------------------------------------------------------------------ the toy job


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, N_FEATURES)).astype(np.float32)
    w = rng.normal(size=(N_FEATURES, N_CLASSES))
    y = ((x @ w) / np.sqrt(N_FEATURES) + 0.7 * rng.normal(size=(600, N_CLASSES)) > 0.6).astype(np.float32)
    return (x[:400], y[:400]), (x[400:500], y[400:500]), x[500:]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, N_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class KillingLoss(nn.Module):
    """BCE that SIGKILLs its own process at its ``kill_at``-th call (mid-epoch: no chance to clean up)."""

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.bce, self.calls, self.kill_at = nn.BCEWithLogitsLoss(), 0, kill_at

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.bce(logits, targets)


def _job(run_dir: Path, *, epochs: int, patience: int = 100, resume: bool = False, kill_at: int | None = None,
         lr: float = 1e-2, on_epoch_end=None, precision: Precision | None = None):
    """Build everything from scratch (as a stage does) and fit; returns (result, test probabilities)."""
    (x, y), (xv, yv), xt = _data()
    torch.manual_seed(0)
    model = Net()
    train = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(torch.from_numpy(xv), torch.from_numpy(yv)), batch_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    result = trainer.fit(model, train, val, yv, loss_fn=KillingLoss(kill_at), optimizer=optimizer,
                         scheduler=scheduler, run_dir=run_dir, epochs=epochs, patience=patience, device=CPU,
                         precision=precision, resume=resume, name="toy",
                         settings={"toy": 1, "lr": lr, "epochs": epochs, "patience": patience},
                         on_epoch_end=on_epoch_end)
    probs = trainer.predict(model, DataLoader(TensorDataset(torch.from_numpy(xt)), batch_size=64), CPU)
    return result, probs


def _main(argv: list[str]) -> None:
    """Subprocess entry: ``run_dir epochs resume(0/1) kill_at(-1: none) out.pt``."""
    run_dir, epochs, resume, kill_at, out = argv
    result, probs = _job(Path(run_dir), epochs=int(epochs), resume=resume == "1",
                         kill_at=None if int(kill_at) < 0 else int(kill_at))
    torch.save({"history": result.history.to_dict("records"), "best_epoch": result.best_epoch,
                "best_score": result.best_score, "resumed_from": result.resumed_from, "reused": result.reused,
                "probs": probs}, out)


def _spawn(run_dir: Path, epochs: int, out: Path, *, resume: bool = False, kill_at: int | None = None):
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_trainer; test_trainer._main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [str(run_dir), str(epochs), "1" if resume else "0", str(-1 if kill_at is None else kill_at), str(out)]
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


def _rows(history) -> list[dict]:
    records = history.to_dict("records") if hasattr(history, "to_dict") else history
    return [{k: row[k] for k in COMPARED} for row in records]


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------- resume


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    epochs, kill_epoch = 8, 5
    kill_at = (kill_epoch - 1) * BATCHES_PER_EPOCH + 6  # the 6th batch of epoch 5
    straight = _spawn(tmp_path / "straight", epochs, tmp_path / "straight.pt")
    killed = _spawn(tmp_path / "killed", epochs, tmp_path / "never.pt", kill_at=kill_at)
    rc, output = _finish(killed)
    assert rc == -signal.SIGKILL, output
    rc, output = _finish(straight)
    assert rc == 0, output
    reference = torch.load(tmp_path / "straight.pt", weights_only=False)

    run = tmp_path / "killed"
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] == kill_epoch - 1 and not state["finished"]
    # without --resume: one line saying what exists, and nothing touched
    before = _snapshot(run)
    with pytest.raises(ResumeRequired) as info:
        _job(run, epochs=epochs)
    message = str(info.value)
    assert message == (f"{run}: an unfinished run (epoch {kill_epoch - 1} of {epochs}) exists; "
                       "pass --resume to continue it, or delete the folder to start over")
    assert _snapshot(run) == before

    rc, output = _finish(_spawn(run, epochs, tmp_path / "resumed.pt", resume=True))
    assert rc == 0, output
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert resumed["resumed_from"] == kill_epoch - 1 and not resumed["reused"]
    assert len(reference["history"]) == epochs
    assert len({row["val_mean_f1"] for row in reference["history"]}) > 1  # the score moves: a real selection
    assert _rows(resumed["history"]) == _rows(reference["history"])
    assert (resumed["best_epoch"], resumed["best_score"]) == (reference["best_epoch"], reference["best_score"])
    assert resumed["probs"].dtype == np.float32
    assert np.array_equal(resumed["probs"], reference["probs"])


def test_raising_epochs_continues_the_run_exactly(tmp_path):
    run = tmp_path / "run"
    first, _ = _job(run, epochs=3)
    assert list(first.history.epoch) == [1, 2, 3] and not first.reused

    before = _snapshot(run)
    with pytest.raises(ResumeRequired) as info:
        _job(run, epochs=6)
    assert str(info.value) == (f"{run}: a finished run of 3 epochs exists and 6 epochs are now asked; "
                               "pass --resume to continue it, or delete the folder to start over")
    assert _snapshot(run) == before

    continued, probs = _job(run, epochs=6, resume=True)
    fresh, fresh_probs = _job(tmp_path / "fresh", epochs=6)
    assert continued.resumed_from == 3 and not continued.reused
    assert list(continued.history.epoch) == [1, 2, 3, 4, 5, 6]
    assert _rows(continued.history)[:3] == _rows(first.history)
    assert _rows(continued.history) == _rows(fresh.history)
    assert (continued.best_epoch, continued.best_score) == (fresh.best_epoch, fresh.best_score)
    assert np.array_equal(probs, fresh_probs)
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] == 6 and state["finished"] and state["epochs"] == 6
    assert list(pd.read_csv(run / "history.csv").epoch) == [1, 2, 3, 4, 5, 6]


def test_the_grad_scaler_state_is_continued(tmp_path):
    """An enabled GradScaler (fp16 on a GPU; here on the CPU) carries on from its saved state."""
    scaled = Precision("cpu", None, use_scaler=True)
    _job(tmp_path / "run", epochs=2, precision=scaled)
    continued, probs = _job(tmp_path / "run", epochs=4, precision=scaled, resume=True)
    fresh, fresh_probs = _job(tmp_path / "fresh", epochs=4, precision=scaled)
    states = [torch.load(tmp_path / d / "last.pt", weights_only=False)["scaler"] for d in ("run", "fresh")]
    assert states[0]["_growth_tracker"] == 4 * BATCHES_PER_EPOCH  # counted on from epoch 2, not restarted
    assert states[0] == states[1]
    assert _rows(continued.history) == _rows(fresh.history) and np.array_equal(probs, fresh_probs)


@pytest.mark.parametrize("missed", ["torch", "loader"])
def test_a_missed_random_state_would_be_caught(tmp_path, monkeypatch, missed):
    """The comparison above can fail: restore every state but one (dropout's or shuffling's) and it does."""
    restore = trainer._restore_rng

    def restore_all_but_one(state, loader, name):
        state = dict(state)
        if missed == "torch":
            state["torch"] = torch.get_rng_state()  # keep whatever the process has now
        else:
            state["loader"] = None
        restore(state, loader, name)

    _job(tmp_path / "run", epochs=3)
    monkeypatch.setattr(trainer, "_restore_rng", restore_all_but_one)
    continued, probs = _job(tmp_path / "run", epochs=6, resume=True)
    monkeypatch.undo()
    fresh, fresh_probs = _job(tmp_path / "fresh", epochs=6)
    assert _rows(continued.history)[:3] == _rows(fresh.history)[:3]
    assert _rows(continued.history)[3:] != _rows(fresh.history)[3:]
    assert not np.array_equal(probs, fresh_probs)


# ----------------------------------------------------------------------------------------------- reuse


def test_a_finished_run_is_reused_and_fewer_epochs_reuse_it_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    first, first_probs = _job(run, epochs=3)
    assert {p.name for p in run.iterdir()} >= {"last.pt", "best.pt", "history.csv", "settings.json"}
    assert json.loads((run / "settings.json").read_text()) == {
        "toy": 1, "lr": 1e-2, "epochs": 3, "patience": 100}
    before = _snapshot(run)
    caplog.clear()

    trained = []
    again, probs = _job(run, epochs=3, on_epoch_end=lambda epoch, row: trained.append(epoch))
    assert again.reused and trained == [] and not again.extra["trained_beyond_request"]
    assert _rows(again.history) == _rows(first.history)
    assert (again.best_epoch, again.best_score) == (first.best_epoch, first.best_score)
    assert np.array_equal(probs, first_probs)  # the best weights are loaded
    assert not [m for m in caplog.messages if "warning" in m]
    caplog.clear()

    fewer, _ = _job(run, epochs=2, on_epoch_end=lambda epoch, row: trained.append(epoch))
    assert fewer.reused and trained == [] and fewer.extra["trained_beyond_request"]
    warnings = [m for m in caplog.messages if "warning" in m]
    caplog.clear()
    assert len(warnings) == 1 and "trained 3 epochs, more than this request" in warnings[0]
    assert len(fewer.history) == 3
    assert _snapshot(run) == before

    # the caller keys the folder by the settings; given other ones, it says so (epochs / patience don't count)
    _job(run, epochs=3, lr=0.02)
    assert "was trained with other settings" in caplog.text


def test_early_stop_is_reused_unless_patience_is_raised(tmp_path):
    run = tmp_path / "run"
    # lr 0: the weights never change, so the validation score stops improving after epoch 1
    stopped, _ = _job(run, epochs=10, patience=2, lr=0.0)
    assert list(stopped.history.epoch) == [1, 2, 3] and stopped.extra["stopped_early"]

    more_epochs, _ = _job(run, epochs=20, patience=2, lr=0.0)
    assert more_epochs.reused and not more_epochs.extra["trained_beyond_request"]

    before = _snapshot(run)
    with pytest.raises(ResumeRequired, match="stopped early at epoch 3 .* patience 4 is now asked"):
        _job(run, epochs=10, patience=4, lr=0.0)
    assert _snapshot(run) == before

    continued, probs = _job(run, epochs=10, patience=4, lr=0.0, resume=True)
    fresh, fresh_probs = _job(tmp_path / "fresh", epochs=10, patience=4, lr=0.0)
    assert list(continued.history.epoch) == [1, 2, 3, 4, 5] and continued.resumed_from == 3
    assert _rows(continued.history) == _rows(fresh.history)
    assert np.array_equal(probs, fresh_probs)


def test_best_weights_lost_between_the_two_writes_are_repaired(tmp_path):
    """last.pt is written before best.pt: a kill in between leaves best.pt behind; last.pt has the weights."""
    best = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 2, "score": 0.4}, best)
    state = {"epoch": 3, "best_epoch": 3, "best_score": 0.5, "model": {"w": torch.ones(2)}}
    trainer._repair_best(state, best)
    repaired = torch.load(best, weights_only=False)
    assert repaired["epoch"] == 3 and torch.equal(repaired["model"]["w"], torch.ones(2))
    mtime = best.stat().st_mtime_ns
    trainer._repair_best({**state, "best_epoch": 2}, best)  # best epoch not the last one: nothing to do
    assert best.stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------- precision


def test_cpu_and_mps_train_in_fp32():
    for device in (CPU, torch.device("mps")):
        for mixed in (True, False):
            p = training_precision(device, mixed)
            assert p == Precision(device.type, None, False) and p.name == "fp32"
    scaler = training_precision(CPU, True).scaler()
    assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()
    a = torch.randn(4, 4)
    with training_precision(CPU, True).autocast():
        assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                  ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_gpu_precision_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a T4 says True too: not the test
    cuda = torch.device("cuda")
    p = training_precision(cuda, True)
    assert p.name == expected and p.device_type == "cuda"
    assert p.dtype == (torch.bfloat16 if expected == "bf16" else torch.float16)
    assert p.use_scaler == (expected == "fp16")
    assert gpu_inference_dtype(cuda) == p.dtype
    off = training_precision(cuda, False)
    assert off == Precision("cuda", None, False) and off.name == "fp32"


def test_gpu_inference_dtype_needs_a_gpu():
    with pytest.raises(ValueError):
        gpu_inference_dtype(CPU)


def test_fit_trains_under_a_given_autocast(tmp_path):
    bf16 = Precision("cpu", torch.bfloat16, False)
    with bf16.autocast():
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
    result, probs = _job(tmp_path / "run", epochs=1, precision=bf16)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["precision"] == "bf16"
    assert len(result.history) == 1 and probs.shape == (100, N_CLASSES) and np.isfinite(probs).all()
