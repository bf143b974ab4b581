"""The one training loop every network uses (image head, fine-tuned CNN, Bi-LSTM, fusion MLP).

Per epoch: train, predict the validation part, score mean-F1 at 0.5, step the scheduler, write
``last.pt`` (atomic) and ``best.pt`` when the score improves, rewrite ``history.csv``; stop early
after ``patience`` epochs without improvement.

A run lives in a folder the caller chooses, keyed by the settings that shape the weights (everything
but how long to train: ``epochs`` and ``patience``). What :func:`fit` does with an existing run:

* its history already reaches the point where the current request would stop (the epoch budget, or
  ``patience`` epochs without improvement): it is reused: ``best.pt`` is loaded, nothing is trained
  (a run that trained more epochs than now asked is reused too, with a warning);
* otherwise (interrupted, or ``epochs`` / ``patience`` raised): ``resume=True`` continues it exactly
  from its last completed epoch (weights, optimizer, scheduler, GradScaler and every random number
  generator, the train loader's shuffling generator included, as they were); ``resume=False`` raises
  :class:`ResumeRequired`. A run's checkpoints are never thrown away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..evaluation.metrics import mean_f1
from ..evaluation.thresholds import decide
from ..io.atomic import load_torch, save_torch, write_text
from ..io.mirror import sync as sync_mirror
from ..io.progress import progress
from ..networks.device import describe_device, select_device
from ..networks.precision import Precision, training_precision

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2


class ResumeRequired(RuntimeError):
    """A run that can go further exists in the run folder and ``resume`` was not asked for."""


def pos_weight(targets: np.ndarray) -> torch.Tensor:
    """BCE's ``pos_weight`` of a label matrix: negatives / positives of each label (a label with 1 positive in 4
    rows weighs its positive terms 3x), so that rare labels' positives count as much as their negatives.

    Give it the rows the network trains on only (a fold's fit part): the held-out rows' labels must shape nothing.
    A label with no positive (or no negative) among them gets 1: the ratio is undefined or zero there, and with no
    positive term in its loss any weight is the same; 0 would switch off the positives of a label that has only
    positives.
    """
    y = np.asarray(targets, dtype=np.float64)
    positives = y.sum(0)
    negatives = len(y) - positives
    ratio = np.divide(negatives, positives, out=np.ones_like(positives), where=(positives > 0) & (negatives > 0))
    return torch.as_tensor(ratio, dtype=torch.float32)


def weighted_bce(label1_weight: float, num_classes: int = 18, pos_weight: torch.Tensor | None = None) -> nn.Module:
    """BCE with the published class weights: label 1 (person, column 0) down-weighted, the others 1; ``pos_weight``
    (:func:`pos_weight`, one per label) weighs the positive terms, as ``BCEWithLogitsLoss`` does."""
    weight = torch.ones(num_classes)
    weight[0] = label1_weight
    return nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight)


def bce_for(setting: str, label1_weight: float, targets: np.ndarray) -> nn.Module:
    """The loss a section's ``pos_weight`` setting asks for: ``auto`` weighs positives by :func:`pos_weight` of
    ``targets`` (the rows trained on), ``off`` gives plain :func:`weighted_bce`."""
    if setting not in ("auto", "off"):
        raise ValueError(f"pos_weight must be auto or off, not {setting!r}")
    return weighted_bce(label1_weight, np.shape(targets)[1], pos_weight(targets) if setting == "auto" else None)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, *, amp: bool = True,
            precision: Precision | None = None, desc: str | None = None,
            activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> np.ndarray:
    """Sigmoid probabilities for every batch of ``loader`` (``activation``: another map of the logits, e.g. the
    softmax of a head trained with a softmax loss).

    A batch is a tensor, or a list/tuple whose first element is the inputs (``(inputs, targets)`` as in
    :func:`fit`, or ``(inputs,)`` from a TensorDataset); tuple inputs go to ``model(*inputs)``.
    ``precision`` (default: :func:`training_precision` of ``device`` and ``amp``) sets the autocast.
    """
    device = torch.device(device)
    precision = precision or training_precision(device, amp)
    model.eval()
    out = []
    for batch in progress(loader, desc=desc, leave=False, disable=desc is None):
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        with precision.autocast():
            logits = _forward(model, _to_device(inputs, device))
        out.append(activation(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class FitResult:
    history: pd.DataFrame
    best_score: float
    best_epoch: int
    seconds: float
    resumed_from: int = 0
    reused: bool = False
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ run state


def _digest(obj: Any) -> str:
    """A short stable digest of a JSON-able object (keys sorted; other values by ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


_DURATION_KEYS = {"epochs", "patience"}


def _weight_settings(obj: Any) -> Any:
    """``settings`` without the keys that only say how long to train (``epochs``, ``patience``, at any depth)."""
    if isinstance(obj, dict):
        return {k: _weight_settings(v) for k, v in obj.items() if k not in _DURATION_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_weight_settings(v) for v in obj]
    return obj


def _json_text(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.dumps(obj, indent=2, default=default) + "\n"


def _loader_generator(loader: Any) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _capture_rng(train_loader: Any) -> dict:
    """Every random number generator the next epoch draws from, as it is now."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "mps": None,
        "loader": None,
    }
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    generator = _loader_generator(train_loader)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _restore_rng(state: dict, train_loader: Any, name: str) -> None:
    """Put back what :func:`_capture_rng` saved (states are CPU tensors: load checkpoints to the CPU)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(f"[{name}] warning: the checkpoint saved {len(cuda)} CUDA generators, this machine has "
                  f"{torch.cuda.device_count()}; CUDA random numbers are not restored")
    if state.get("mps") is not None and getattr(torch.backends, "mps", None) is not None \
            and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    generator = _loader_generator(train_loader)
    if state.get("loader") is not None:
        if generator is None:
            log.warning(f"[{name}] warning: the checkpoint has a shuffling generator but the train loader has none "
                  "(no torch.Generator at .generator); its order is not restored")
        else:
            generator.set_state(state["loader"])


def _stop_epoch(history: list[dict], epochs: int, patience: int) -> int | None:
    """The epoch where a run with this ``history`` stops for ``epochs`` / ``patience``; None: not reached yet."""
    best, bad = -math.inf, 0
    for row in history:
        if row["val_mean_f1"] > best:
            best, bad = row["val_mean_f1"], 0
        else:
            bad += 1
        if bad >= patience or row["epoch"] >= epochs:
            return int(row["epoch"])
    return None


def _remedy(run_dir: Path) -> str:
    """What to do with a damaged checkpoint: the run folder holds one training run; without it, it trains again."""
    return f"delete the folder {run_dir} to train that run again"


def _repair_best(state: dict, best_path: Path) -> None:
    """``last.pt`` is written before ``best.pt``: a kill between the two leaves ``best.pt`` one improvement
    behind; the missing best weights are then the ones in ``last.pt``."""
    if state["best_epoch"] != state["epoch"]:
        return
    if best_path.is_file():
        saved = load_torch(best_path, weights_only=False, remedy=_remedy(best_path.parent))
        if saved.get("epoch") == state["epoch"]:
            return
    save_torch({"model": state["model"], "epoch": state["epoch"], "score": state["best_score"]}, best_path)


def _load_best(model: nn.Module, best_path: Path, fallback: dict | None = None) -> None:
    if best_path.is_file():
        model.load_state_dict(load_torch(best_path, weights_only=False, remedy=_remedy(best_path.parent))["model"])
    elif fallback is not None:
        model.load_state_dict(fallback)


def _describe(state: dict) -> str:
    trained, saved_epochs = state["epoch"], state.get("epochs")
    if not state.get("finished"):
        return f"an unfinished run (epoch {trained} of {saved_epochs})"
    if state["bad_epochs"] >= state.get("patience", math.inf):
        return (f"a run that stopped early at epoch {trained} ({state['bad_epochs']} epochs without improvement, "
                f"patience {state['patience']})")
    return f"a finished run of {trained} epochs"


def _asked(state: dict, epochs: int, patience: int) -> str:
    parts = []
    if epochs != state.get("epochs"):
        parts.append(f"{epochs} epochs")
    if patience != state.get("patience"):
        parts.append(f"patience {patience}")
    if not parts:
        return ""
    return " and " + " with ".join(parts) + (" are" if epochs != state.get("epochs") else " is") + " now asked"


# ------------------------------------------------------------------------------------------------ fit


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    val_targets: np.ndarray,
    *,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_dir: str | Path,
    epochs: int,
    patience: int,
    scheduler: Any = None,
    scheduler_uses_metric: bool = False,
    grad_clip: float | None = None,
    device: torch.device | None = None,
    precision: Precision | None = None,
    resume: bool = False,
    name: str = "model",
    settings: dict | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    score_fn: Callable[[nn.Module], float | dict] | None = None,
    batch_loss: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor] | None = None,
    score_name: str = "val mean-F1",
) -> FitResult:
    """Train ``model`` with early stopping on validation mean-F1; ``model`` ends with its best weights.

    ``run_dir``: the run's folder, chosen by the caller and keyed by the settings that shape the weights
    (not ``epochs`` / ``patience``); it holds ``last.pt``, ``best.pt``, ``history.csv`` and
    ``settings.json`` (``settings`` as given, for humans). ``precision``: default
    ``training_precision(device, True)``. For an exact resume the train loader's shuffling must come
    from a ``torch.Generator`` at ``train_loader.generator`` (a DataLoader given ``generator=``, or the
    project's batch iterators), and DataLoader workers must not be persistent. ``score_fn(model)``
    (optional) replaces validation mean-F1 as the model-selection score, for networks that are not
    18-way classifiers (e.g. a joint embedding scored by retrieval): it returns the score, or a dict with
    ``score``, optionally ``val_loss`` and any further per-epoch figures, which join the history; the
    score is stored as ``val_mean_f1`` and ``val_loader`` / ``val_targets`` are then unused.
    ``batch_loss(model, inputs, targets)`` (optional) returns a training batch's loss instead of
    ``loss_fn(model(inputs), targets)`` (inputs and targets already on the device, called under the
    autocast), for networks whose loss is not a function of one forward pass's logits (e.g. a label
    sequence decoder trained with teacher forcing, which builds its target sequences itself). ``score_name``:
    what the selection score is, in the progress bar and the messages (e.g. ``selection R-sum``). Raises
    :class:`ResumeRequired` when a run that can go further exists and ``resume`` is False.
    """
    device = torch.device(device) if device is not None else select_device()
    precision = precision or training_precision(device, True)
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    model.to(device)
    loss_fn.to(device)
    scaler = precision.scaler()
    weights_key = _digest(_weight_settings(settings or {}))

    state = load_torch(last_path, weights_only=False, remedy=_remedy(run_dir)) if last_path.is_file() else None
    if state is not None:
        if state.get("settings_digest") not in (None, weights_key):
            log.warning(f"[{name}] warning: {run_dir} was trained with other settings than those given now "
                  f"(see {run_dir / 'settings.json'}); the run folder is what counts")
        stop = _stop_epoch(state["history"], epochs, patience)
        if stop is not None:
            return _reuse(model, state, best_path, train_loader, run_dir, name, stop, epochs, score_name)
        if not resume:
            raise ResumeRequired(f"{run_dir}: {_describe(state)} exists{_asked(state, epochs, patience)}; "
                                 "pass --resume to continue it, or delete the folder to start over")

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "settings.json", _json_text(settings or {}))
    start_epoch, best_score, best_epoch, bad_epochs, rows = 1, -math.inf, 0, 0, []
    if state is not None:
        _repair_best(state, best_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        bad_epochs, rows = state["bad_epochs"], list(state["history"])
        if state.get("rng") is not None:
            _restore_rng(state["rng"], train_loader, name)  # last: nothing may draw between this and epoch 1
        else:
            log.warning(f"[{name}] warning: {last_path} has no random-number states; the resumed run is not exact")
        if getattr(train_loader, "persistent_workers", False) and getattr(train_loader, "num_workers", 0):
            log.warning(f"[{name}] warning: persistent DataLoader workers keep their own random states; "
                  "the resumed run is not exact")
        log.info(f"[{name}] resuming {run_dir} after epoch {state['epoch']} (now up to {epochs} epochs, "
              f"patience {patience})")
    resumed_from = start_epoch - 1
    training = {"device": describe_device(device), "precision": precision.describe(),
                "batch_size": getattr(train_loader, "batch_size", None), "engine": "torch"}
    log.info(f"[{name}] training on {training['device']}, {training['precision']}, batch {training['batch_size']}, "
             "torch")

    t0 = time.time()
    bar = progress(range(start_epoch, epochs + 1), desc=f"train {name}", unit="epoch", initial=start_epoch - 1,
               total=epochs)
    for epoch in bar:
        model.train()
        t_epoch, total, count = time.time(), 0.0, 0
        for inputs, targets in progress(train_loader, desc=f"epoch {epoch}", leave=False, unit="batch",
                                    disable=len(train_loader) < 20):
            inputs, targets = _to_device(inputs, device), targets.to(device, non_blocking=True).float()
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                if batch_loss is None:
                    logits = _forward(model, inputs)
                else:
                    loss = batch_loss(model, inputs, targets).float()
            if batch_loss is None:
                loss = loss_fn(logits.float(), targets)
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(targets)
            count += len(targets)
        measured: dict = {}
        if score_fn is None:
            val_probs = predict(model, val_loader, device, precision=precision)
            val_loss = float(nn.functional.binary_cross_entropy(
                torch.from_numpy(val_probs).clamp(1e-7, 1 - 1e-7), torch.from_numpy(val_targets).float()))
            score = mean_f1(val_targets, decide(val_probs, 0.5))
        else:  # a caller's selection score (and extra per-epoch figures) instead of mean-F1 at 0.5
            measured = score_fn(model)
            measured = dict(measured) if isinstance(measured, dict) else {"score": measured}
            score, val_loss = float(measured.pop("score")), float(measured.pop("val_loss", math.nan))
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step(score) if scheduler_uses_metric else scheduler.step()
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
        else:
            bad_epochs += 1
        finished = bad_epochs >= patience or epoch >= epochs
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_mean_f1": score,
               "lr": lr, "seconds": time.time() - t_epoch, **measured}
        rows.append(row)
        save_torch({
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "precision": precision.name,
            "epoch": epoch, "epochs": epochs, "patience": patience,
            "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "history": rows, "finished": finished, "rng": _capture_rng(train_loader),
            "settings": settings, "settings_digest": weights_key,
        }, last_path)
        if improved:  # after last.pt: a kill in between is repaired from last.pt (see _repair_best)
            save_torch({"model": model.state_dict(), "epoch": epoch, "score": score}, best_path)
        write_text(run_dir / "history.csv", pd.DataFrame(rows).to_csv(index=False))
        # with a mirror (Colab: Drive) a disconnect loses at most this epoch (short epochs: at most a minute's)
        sync_mirror(run_dir, at_most_every=0 if finished else 60)
        bar.set_postfix({"loss": f"{row['train_loss']:.4f}", _postfix_key(score_name): f"{score:.4f}",
                         "best": f"{best_score:.4f}"}, refresh=False)  # shown at the bar's next update, as rare
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if finished:
            break
    bar.close()
    _load_best(model, best_path)
    seconds = time.time() - t0
    stopped_early = bad_epochs >= patience
    log.info(f"[{name}] best {score_name} {best_score:.4f} at epoch {best_epoch} ({seconds:.1f} s"
          f"{', stopped early' if stopped_early else ''})")
    return FitResult(pd.DataFrame(rows), best_score, best_epoch, seconds, resumed_from,
                     extra={"stopped_early": stopped_early, "training": training})


def _postfix_key(score_name: str) -> str:
    """``val mean-F1`` -> ``val_f1`` (the progress bar's label of the selection score), ``selection R-sum`` ->
    ``selection_R_sum``."""
    return "val_f1" if score_name == "val mean-F1" else "_".join(score_name.replace("-", " ").split())


def _reuse(model: nn.Module, state: dict, best_path: Path, train_loader: Any, run_dir: Path, name: str,
           stop: int, epochs: int, score_name: str = "val mean-F1") -> FitResult:
    """Load a run's best weights instead of training; the random-number states are set as the run left
    them, so what follows draws the same numbers as after training."""
    _repair_best(state, best_path)
    _load_best(model, best_path, fallback=state["model"])
    if state.get("rng") is not None:
        _restore_rng(state["rng"], train_loader, name)
    trained = state["epoch"]
    beyond = stop < trained
    log.info(f"[{name}] reusing the run in {run_dir}: best {score_name} {state['best_score']:.4f} at epoch "
          f"{state['best_epoch']} of {trained}")
    if beyond:
        log.warning(f"[{name}] warning: {run_dir} trained {trained} epochs, more than this request "
              f"(it would stop at epoch {stop} of {epochs}); its best weights over all {trained} are used")
    return FitResult(pd.DataFrame(state["history"]), state["best_score"], state["best_epoch"], 0.0, trained,
                     reused=True, extra={"trained_beyond_request": beyond,
                                         "stopped_early": state["bad_epochs"] >= state.get("patience", math.inf)})
