"""Atomic training checkpoints: a checkpoint either is complete and verified, or is not used.

Saving: write every file into a temporary folder next to the final one, fsync each file, write
``manifest.json`` (sha256 and size per file), then the ``COMPLETE`` marker last, fsync the folder,
rename it to ``step-N``, fsync the parent. Only after the new checkpoint verifies are old ones
beyond ``keep_last`` deleted, so at least one complete checkpoint is always on disk.

Loading: the newest ``step-N`` with a COMPLETE marker whose files match the manifest. Folders
without the marker are remnants of a crash during a save and are ignored; a checkpoint whose
files do not match its manifest was damaged or tampered with, and is refused with a clear error.

Weights are safetensors; the optimizer state is a torch file read with ``weights_only=True``
(no arbitrary unpickling).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from potstill.errors import PotstillError
from potstill.provenance import file_sha256

_STEP = re.compile(r"^step-(\d+)$")


def crash_point(name: str) -> None:
    """Fault injection for the kill tests: SIGKILL this process when POTSTILL_CRASH_AT == name."""
    if os.environ.get("POTSTILL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict, keep_last: int = 2) -> Path:
    """Write ``root/step-<step>`` atomically; ``extra`` is JSON (step counters, data position)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # separate contiguous copies: safetensors refuses tensors sharing storage (tied embeddings)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    crash_point(f"save-{step}-weights")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    manifest = {name: {"sha256": file_sha256(tmp / name, remember=False), "bytes": (tmp / name).stat().st_size} for name in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / "manifest.json")
    crash_point(f"save-{step}-marker")
    (tmp / "COMPLETE").write_text("ok\n")
    _fsync(tmp / "COMPLETE")
    _fsync(tmp)
    if final.exists():  # a rerun of the same step: replace it only now that the new one is whole
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(root)
    crash_point(f"save-{step}-renamed")
    verify(final)
    for old in sorted(_complete(root), key=lambda p: -_step(p))[keep_last:]:
        shutil.rmtree(old)
    return final


def _step(path: Path) -> int:
    return int(_STEP.match(path.name).group(1))


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _STEP.match(p.name) and (p / "COMPLETE").is_file()]


def verify(path: Path) -> None:
    """Raise PotstillError unless every file listed in the manifest is present and matches."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise PotstillError(f"checkpoint {path} has a COMPLETE marker but no readable manifest.json; "
                            f"delete it to resume from an older one") from None
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != entry["bytes"] or file_sha256(f, remember=False) != entry["sha256"]:
            raise PotstillError(f"checkpoint {path}: {name} does not match its manifest (damaged or modified); "
                                f"delete {path} to resume from an older checkpoint, or set train.resume=false")


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (verified), or None."""
    found = sorted(_complete(root), key=_step)
    if not found:
        return None
    verify(found[-1])
    return found[-1]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from a verified checkpoint; returns trainer.json. (No RNG state:
    the loop reseeds every step from (seed, step, rank).)"""
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "trainer.json").read_text())
