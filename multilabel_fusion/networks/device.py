"""Where and how a network runs: the device, loader workers, CPU threads, seeds, the size of its weights."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn


def select_device(preference: str = "auto") -> torch.device:
    """cuda > mps > cpu for ``auto``; an explicit choice is honoured, and one this machine does not have is a
    one-line :class:`~multilabel_fusion.settings.ConfigError` (before anything runs)."""
    from ..settings import ConfigError

    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: trainer.device = 'cuda': this machine has no CUDA GPU that torch "
                          f"{torch.__version__} can use; choose auto or cpu")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                    and torch.backends.mps.is_available()):
        raise ConfigError("config: trainer.device = 'mps': no Apple GPU (MPS) here; choose auto or cpu")
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA T4)`` on a GPU (which one decides bf16 or fp16 and the speed), else the device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int = 1):
    """One intra-op thread for this small network on CPU, restored afterwards.

    Batches of 250 x 8 x 50 gain nothing from parallel kernels (measured on 2 cores: 0.67 s per
    epoch with one thread, 0.77 s with two), while threads waiting on cores that another CPU job
    holds stretched 0.5 s epochs to 15-35 s. On a GPU this changes nothing.
    """
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

