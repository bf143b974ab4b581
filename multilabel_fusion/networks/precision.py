"""The one place that decides the numeric precision of training and GPU inference.

* fp32: no autocast, no GradScaler (CPU, MPS, or mixed precision switched off).
* bf16: autocast to bfloat16 without a GradScaler, only on GPUs that have it natively (compute
  capability 8.0 and later: A100, RTX 30xx, H100, ...). ``torch.cuda.is_bf16_supported()`` is not the
  test: it is also true on a T4 (7.5), where bf16 is emulated and slower than fp16.
* fp16: autocast to float16 with a GradScaler (older GPUs: T4, V100, P100, ...), which keeps small
  gradients from underflowing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: The reduced precisions by name, as autocast takes them (any other name, fp32 or int8: no autocast).
AUTOCAST_DTYPES = {name: dtype for dtype, name in _NAMES.items() if dtype is not None}


@dataclass(frozen=True)
class Precision:
    """How a forward pass runs: ``dtype`` None means fp32 (no autocast)."""

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def name(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return _NAMES[self.dtype]

    def describe(self) -> str:
        """What a log line says: ``fp32``, ``bf16 autocast (no GradScaler)``, ``fp16 autocast + GradScaler``."""
        if self.dtype is None:
            return "fp32"
        return f"{self.name} autocast " + ("+ GradScaler" if self.use_scaler else "(no GradScaler)")

    def autocast(self) -> ContextManager:
        """Autocast to ``dtype`` on ``device_type``; a no-op context for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only with ``use_scaler`` (fp16); a disabled one passes values through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)


def _native_bf16(device: torch.device) -> bool:
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def training_precision(device: torch.device | str, mixed_precision: bool) -> Precision:
    """Precision for training (and validation) on ``device``.

    CUDA with ``mixed_precision``: bf16 where the GPU has it natively (compute capability >= 8.0), fp16 with
    a GradScaler otherwise. CPU, MPS, or ``mixed_precision`` False: fp32.
    """
    device = torch.device(device)
    if device.type == "cuda" and mixed_precision:
        if _native_bf16(device):
            return Precision("cuda", torch.bfloat16, use_scaler=False)
        return Precision("cuda", torch.float16, use_scaler=True)
    return Precision(device.type, None, use_scaler=False)


def gpu_inference_dtype(device: torch.device | str) -> torch.dtype:
    """Half-precision dtype for inference (feature extraction) on a CUDA GPU: bf16 on cc >= 8.0, else fp16."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"gpu_inference_dtype is for CUDA devices, got {device}")
    return torch.bfloat16 if _native_bf16(device) else torch.float16
