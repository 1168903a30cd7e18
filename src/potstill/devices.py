"""Where a stage runs. ``auto`` is CUDA when torch sees a GPU, else Apple's MPS, else the CPU;
an explicit device that this machine lacks is refused rather than silently replaced."""

from __future__ import annotations

import re

import torch

from potstill.errors import PotstillError

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"  # what the recipe's device fields accept


def resolve_device(name: str, key: str = "device") -> str:
    """``auto`` -> "cuda" | "mps" | "cpu"; any other name is returned if this machine has it.
    ``key`` names the recipe field or flag in the error."""
    if not re.match(DEVICE_PATTERN, name):
        raise PotstillError(f"{key}={name}: not a device; use auto, cpu, mps, cuda or cuda:N")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PotstillError(f"{key}={name}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                                f"use {key}=auto or {key}=cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise PotstillError(f"{key}={name}: there are {torch.cuda.device_count()} CUDA devices (from cuda:0)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PotstillError(f"{key}=mps: MPS is not available here; use {key}=auto or {key}=cpu")
    return name


def resolve_mixed_precision(choice: str, device: str) -> str:
    """``auto`` -> bf16 on a CUDA GPU that supports it (Ampere and later), else no mixed precision."""
    if choice != "auto":
        return choice
    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"


def resolve_compile(choice: str, device: str) -> bool:
    """``auto`` -> compile the chunked loss's step on CUDA (where inductor's fused kernels pay for
    their compile time); off on the CPU and MPS, where compiling costs more than a short run gains."""
    if choice != "auto":
        return choice == "on"
    return device.startswith("cuda")
