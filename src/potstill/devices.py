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


# The chunked loss's working memory per row of a chunk, per vocabulary entry: the student's and the
# dense teacher's (chunk, V) logits and the logits' gradient in the compute dtype, and six float32
# (chunk, V) tensors at the peak of the chunk's backward (both log-softmaxes, their exponentials, the
# divergence's terms, the float32 gradient). bf16: 3 * 2 + 6 * 4 = 30 bytes; an H200 measured 31
# (issue 14: 5.4 GiB at chunk 1024, 19.3 GiB at 4096, V = 151,936, uncompiled).
CHUNK_FLOAT32_COPIES = 6
# From the cache (a sparse top-k, no dense teacher logits): 3 saved (chunk, V) float32 tensors and
# their 3 gradients at the chunk's backward, 24 bytes in float32 and bf16 alike (docs/memory.md's
# check: "chunked loss, cached", measured within 2 %).
CHUNK_CACHED_BYTES = 24
CHUNK_SHARE = 0.25  # of the memory free after setup; the rest is for activations and optimizer state
CPU_CHUNK = 1024  # where free memory is not measured: the CPU's caches, not its RAM, set the speed here


def chunk_bytes_per_row(vocab: int, dtype_bytes: int, dense_teacher: bool = True) -> int:
    """Bytes one row of a chunk holds at the loss's peak: with a dense (online) teacher's logits see
    CHUNK_FLOAT32_COPIES, from the cache CHUNK_CACHED_BYTES."""
    if not dense_teacher:
        return vocab * CHUNK_CACHED_BYTES
    return vocab * (3 * dtype_bytes + CHUNK_FLOAT32_COPIES * 4)


def pick_chunk_size(free_bytes: int, vocab: int, hidden: int, dtype_bytes: int, *, share: float = CHUNK_SHARE,
                    smallest: int = 64, largest: int = 8192, dense_teacher: bool = True) -> int:
    """The largest power of two of rows whose working memory fits ``share`` of ``free_bytes``:

        chunk = 2 ** floor(log2((share * free - 2 * 4 * V * H) / (V * (3 * dtype_bytes + 6 * 4))))

    clamped to [smallest, largest]. 2 * 4 * V * H: the head's float32 gradient (V, H), accumulated
    over chunks, and its scaled copy kept for backward; they do not grow with the chunk. Past a few
    thousand rows a larger chunk saves no time (issue 14: 89 ms at 1024, 85 ms at 4096), so ``largest``
    caps the memory spent for nothing. From the cache (``dense_teacher`` False) a row holds 24 bytes a
    vocabulary entry instead (CHUNK_CACHED_BYTES), so the chunk may be larger."""
    budget = share * free_bytes - 2 * 4 * vocab * hidden
    rows = int(budget // chunk_bytes_per_row(vocab, dtype_bytes, dense_teacher)) if budget > 0 else 0
    if rows < smallest:
        return smallest
    return min(largest, 1 << (rows.bit_length() - 1))


def resolve_chunk_size(choice: int | str, device: str, vocab: int, hidden: int, dtype_bytes: int,
                       dense_teacher: bool = True) -> int:
    """``auto`` -> picked from the CUDA device's free memory now (call after the models are on it),
    for a loss with a dense (online) teacher's logits or from the cache; ``CPU_CHUNK`` elsewhere. A
    number is kept as it is (0 = no chunking)."""
    if choice != "auto":
        return int(choice)
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return pick_chunk_size(free, vocab, hidden, dtype_bytes, dense_teacher=dense_teacher)
    return CPU_CHUNK
