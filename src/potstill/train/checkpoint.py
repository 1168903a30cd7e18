"""Atomic training checkpoints: a checkpoint either is complete and verified, or is not used.

Saving: write every file into a temporary folder next to the final one, fsync each file, write
``manifest.json`` (sha256 and size per file), then the ``COMPLETE`` marker last, fsync the folder,
rename it to ``step-N``, fsync the parent. Only after the new checkpoint verifies are old ones
beyond ``keep_last`` deleted, so at least one complete checkpoint is always on disk.

Loading: the newest ``step-N`` with a COMPLETE marker whose files match the manifest. Folders
without the marker are remnants of a crash during a save and are ignored; a checkpoint whose
files do not match its manifest was damaged or tampered with, and is refused with a clear error.

Nothing is ever unpickled: weights and the optimizer's tensors are safetensors, the rest of the
optimizer state (hyperparameters, step counts that are not tensors) is JSON.

``train`` clears a student's checkpoint folder when it starts over; ``foreign`` finds anything in
it that ``save_checkpoint`` did not write, so that a user's file there is refused, not deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from potstill.errors import PotstillError
from potstill.provenance import file_sha256

_STEP = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^\.tmp-step-(\d+)$")
# every name save_checkpoint writes in a step folder (optimizer.pt: the pickle of older versions)
_FILES = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "optimizer.pt", "trainer.json",
          "manifest.json", "COMPLETE"}


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


def gathered_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Under FSDP2: the full model and optimizer state (the optimizer's keyed by parameter name),
    gathered into the main process's CPU memory; a collective, so every process calls it. Costs one
    all-gather of the weights and of the optimizer state, and their full size in the main
    process's RAM while the checkpoint is written, as one process's checkpoint does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict, keep_last: int = 2, gathered: tuple[dict, dict] | None = None) -> Path:
    """Write ``root/step-<step>`` atomically; ``extra`` is JSON (step counters, data position);
    ``gathered``: under FSDP2, the full state ``gathered_state`` returned, written instead of the
    model's and optimizer's own (sharded) state."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # separate contiguous copies: safetensors refuses tensors sharing storage (tied embeddings)
    model_state, optim_state = gathered or (model.state_dict(), optimizer.state_dict())
    state = {k: v.detach().contiguous().clone() for k, v in model_state.items()}
    save_file(state, tmp / "model.safetensors")
    crash_point(f"save-{step}-weights")
    tensors, rest = _split_optimizer_state(optim_state)
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(rest))
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


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as safetensors-ready tensors ("state.<param>.<key>") and JSON;
    ``param`` is an index, or under FSDP2 a parameter's dotted name (the key has no dot)."""
    tensors, scalars = {}, {}
    for param, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(param), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    def param(p: str) -> int | str:
        return int(p) if p.isdigit() else p

    state: dict[int | str, dict] = {param(p): dict(v) for p, v in rest["scalars"].items()}
    for name, value in tensors.items():
        p, key = name.split(".", 1)[1].rsplit(".", 1)
        state.setdefault(param(p), {})[key] = value
    # JSON has no tuples; optimizers compare and unpack betas as either
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool = False) -> dict:
    """Restore model and optimizer from a verified checkpoint; returns trainer.json. (No RNG state:
    the loop reseeds every step from (seed, step, rank).) ``fsdp``: the checkpoint holds the full
    state ``gathered_state`` wrote; every process reads it and keeps its own shard."""
    if not (path / "optimizer.safetensors").is_file():
        raise PotstillError(f"checkpoint {path} keeps its optimizer state as a pickle (optimizer.pt, older potstill), "
                            f"which potstill never loads: delete {path.parent} or set train.resume=false")
    try:
        weights = load_file(path / "model.safetensors")
        optim = _join_optimizer_state(load_file(path / "optimizer.safetensors"),
                                      json.loads((path / "optimizer.json").read_text()))
        if fsdp:  # a collective: every process loads the same full state and shards it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                           options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            model.load_state_dict(weights, strict=True)
            optimizer.load_state_dict(optim)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise PotstillError(f"checkpoint {path} could not be loaded ({str(e).splitlines()[0][:200]}); "
                            f"delete {path} or set train.resume=false") from None
    return json.loads((path / "trainer.json").read_text())


def foreign(root: Path) -> Path | None:
    """The first file or folder under ``root`` that save_checkpoint did not write, or None."""
    if not root.exists() and not root.is_symlink():
        return None
    if root.is_symlink() or not root.is_dir():
        return root
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() or not entry.is_dir() or not (_STEP.match(entry.name) or _TMP.match(entry.name)):
            return entry
        for f in sorted(entry.iterdir()):
            if f.is_symlink() or not f.is_file() or f.name not in _FILES:
                return f
    return None


def clear(root: Path) -> None:
    """Delete a checkpoint folder, refusing (deleting nothing) if it holds anything potstill did not write."""
    if (f := foreign(root)) is not None:
        raise PotstillError(f"{f} was not written by potstill, and train would delete it with {root}: move it "
                            f"elsewhere; nothing was deleted")
    shutil.rmtree(root, ignore_errors=True)
