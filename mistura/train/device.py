"""Where a run trains and in which precision: the device a config names, and its autocast type."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The device `name` names; "auto" is CUDA, then MPS, then the CPU, whichever this machine has first."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on request, or by default on CUDA devices that support it; else fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None
