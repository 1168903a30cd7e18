"""Where things came from: file hashes, library versions, the git commit of the code."""

from __future__ import annotations

import functools
import hashlib
import os
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import potstill


def file_sha256(path: str | Path, *, remember: bool = True) -> str:
    """sha256 of a file. Remembered per (path, size, mtime) within a process: one `potstill run`
    describes the same teacher in several stages, and a teacher's weights can be many GB.
    Integrity checks pass remember=False: they must read the bytes every time."""
    if not remember:
        return _file_sha256.__wrapped__(str(path), 0, 0)
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """One hash over every safetensors file of a model directory, in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python's, potstill's and the installed versions of the libraries that shape results, plus
    ``extra`` distributions (those not installed are left out)."""
    out = {"python": platform.python_version(), "potstill": potstill.__version__}
    for name in ("torch", "transformers", "accelerate", "tokenizers", "safetensors", *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the potstill checkout in use (with '-dirty' if modified), or None."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
