"""The one training loop every network uses (image head, fine-tuned CNN, Bi-LSTM, fusion MLP).

Per epoch: train, predict the validation part, score mean-F1 at 0.5, step the scheduler, write
``last.pt`` (atomic) and ``best.pt`` when the score improves, append to ``history.csv``; stop early
after ``patience`` epochs without improvement. ``resume=True`` continues from ``last.pt``. A run
whose checkpoint says it finished with the same settings is not trained again: its best weights
are loaded, which is what makes re-running a stage cheap.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import save_torch, write_text
from .cache import settings_key
from .metrics import mean_f1
from .thresholds import decide


def select_device(preference: str = "auto") -> torch.device:
    """cuda > mps > cpu for ``auto``; an explicit choice is honoured."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on a GPU (bf16 where supported, else fp16); a no-op context on CPU."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def num_workers(setting: Any, device: torch.device | None = None) -> int:
    """DataLoader worker processes for image streams.

    ``auto``: with the network on a GPU the CPU is free, so one worker per core (at most 8). With the
    network on a CPU of up to 4 cores, none: decoding in the main process between batches costs only the
    decode time (~0.7 ms an image), while parallel workers preempt the forward pass's threads (on 2 cores:
    extraction at 0.84-0.86 of the bare forward speed with 1-2 workers, 0.90-0.93 with none). Larger CPUs
    keep 2 workers.
    """
    if setting == "auto":
        cores = os.cpu_count() or 1
        if device is not None and device.type == "cpu":
            return 0 if cores <= 4 else 2
        return min(8, cores)
    return int(setting)


def model_size_mb(module: nn.Module) -> float:
    """Size of a network's weights and buffers in MB (what a checkpoint of it takes)."""
    return round(sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20, 1)


def file_digest(path: str | Path, chars: int | None = 16) -> str:
    """sha256 of a file, read in 1 MB chunks (checkpoints and weight files key the caches they produce).

    ``chars``: how many hex digits to keep (``None``: all 64).
    """
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:chars]


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weighted_bce(label1_weight: float, num_classes: int = 18) -> nn.Module:
    """BCE with the published class weights: label 1 (person, column 0) down-weighted, the others 1."""
    weight = torch.ones(num_classes)
    weight[0] = label1_weight
    return nn.BCEWithLogitsLoss(weight=weight)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, *, amp: bool = True,
            desc: str | None = None) -> np.ndarray:
    """Sigmoid probabilities for every batch of ``loader``.

    A batch is a tensor, or a list/tuple whose first element is the inputs (``(inputs, targets)`` as in
    :func:`fit`, or ``(inputs,)`` from a TensorDataset); tuple inputs go to ``model(*inputs)``.
    """
    model.eval()
    out = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        with autocast(device, amp):
            logits = _forward(model, _to_device(inputs, device))
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
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


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    val_targets: np.ndarray,
    *,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint_dir: str | Path,
    epochs: int,
    patience: int,
    scheduler: Any = None,
    scheduler_uses_metric: bool = False,
    grad_clip: float | None = None,
    device: torch.device | None = None,
    mixed_precision: bool = True,
    resume: bool = False,
    settings: dict | None = None,
    name: str = "model",
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train ``model`` with early stopping on validation mean-F1; ``model`` ends with its best weights."""
    device = device or select_device()
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    signature = settings_key(settings or {})
    model.to(device)
    loss_fn.to(device)
    use_scaler = device.type == "cuda" and mixed_precision and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_epoch, best_score, best_epoch, bad_epochs, rows = 1, -math.inf, 0, 0, []
    if last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        same = state.get("signature") == signature
        if same and state.get("finished"):
            model.load_state_dict(torch.load(best_path, map_location=device, weights_only=False)["model"])
            print(f"[{name}] reusing the finished run in {checkpoint_dir} (same settings): "
                  f"best val mean-F1 {state['best_score']:.4f} at epoch {state['best_epoch']}")
            return FitResult(pd.DataFrame(state["history"]), state["best_score"], state["best_epoch"],
                             0.0, state["epoch"], reused=True)
        if resume and same:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler"):
                scheduler.load_state_dict(state["scheduler"])
            start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
            bad_epochs, rows = state["bad_epochs"], list(state["history"])
            print(f"[{name}] resuming after epoch {state['epoch']} from {last_path}")
        elif resume:
            print(f"[{name}] not resuming: {last_path} was written with other settings; starting afresh")
    resumed_from = start_epoch - 1

    t0 = time.time()
    finished = bad_epochs >= patience
    epoch = start_epoch - 1
    bar = tqdm(range(start_epoch, epochs + 1), desc=f"train {name}", unit="epoch", initial=start_epoch - 1,
               total=epochs)
    for epoch in bar:
        if finished:
            break
        model.train()
        t_epoch, total, count = time.time(), 0.0, 0
        for inputs, targets in tqdm(train_loader, desc=f"epoch {epoch}", leave=False, unit="batch",
                                    disable=len(train_loader) < 20):
            inputs, targets = _to_device(inputs, device), targets.to(device, non_blocking=True).float()
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, mixed_precision):
                logits = _forward(model, inputs)
            loss = loss_fn(logits.float(), targets)
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(targets)
            count += len(targets)
        val_probs = predict(model, val_loader, device, amp=mixed_precision)
        val_loss = float(nn.functional.binary_cross_entropy(
            torch.from_numpy(val_probs).clamp(1e-7, 1 - 1e-7), torch.from_numpy(val_targets).float()))
        score = mean_f1(val_targets, decide(val_probs, 0.5))
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step(score) if scheduler_uses_metric else scheduler.step()
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            save_torch({"model": model.state_dict(), "epoch": epoch, "score": score}, best_path)
        else:
            bad_epochs += 1
        finished = bad_epochs >= patience or epoch == epochs
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_mean_f1": score,
               "lr": lr, "seconds": time.time() - t_epoch}
        rows.append(row)
        save_torch({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "history": rows, "signature": signature, "settings": settings, "finished": finished,
        }, last_path)
        write_text(checkpoint_dir / "history.csv", pd.DataFrame(rows).to_csv(index=False))
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_f1=f"{score:.4f}", best=f"{best_score:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    bar.close()
    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=False)["model"])
    print(f"[{name}] best val mean-F1 {best_score:.4f} at epoch {best_epoch} ({time.time() - t0:.1f} s)")
    return FitResult(pd.DataFrame(rows), best_score, best_epoch, time.time() - t0, resumed_from)
