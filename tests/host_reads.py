"""Counting the places where potstill's own code makes the host wait for the device."""

import os
from pathlib import Path

import torch

import potstill

# Frames are told apart by the folder their file is in, never by a substring of the path: a checkout
# or a virtual environment under a folder named "potstill" puts "/potstill/" into every library's path.
_OURS = os.path.realpath(Path(potstill.__file__).parent) + os.sep
_PASS_THROUGH = tuple(os.path.realpath(p) + os.sep for p in (Path(__file__).parent, Path(torch.__file__).parent))
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts what makes the host wait for the device, called from potstill's own code: reading a
    value (item, bool, float, int, tolist, cpu), nonzero, and indexing by a boolean mask (which
    needs the mask's count). On the CPU none of these wait, but each is a sync point on a GPU."""

    READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        super().__init__()
        self.sites = []
        for name in self.READS:
            method = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(method))

    def _ours(self) -> str | None:
        import traceback
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = os.path.realpath(frame.filename)
            if path.startswith(_OURS):
                return f"{Path(path).name}:{frame.name}:{frame.lineno}"
            if not path.startswith(_PASS_THROUGH):
                return None  # transformers', accelerate's: not ours to count
        return None

    def _counted(self, method):
        def read(tensor, *args, **kwargs):
            if (site := self._ours()) is not None:
                self.sites.append(site)
            return method(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if (masked or func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default)) \
                and (site := self._ours()) is not None:
            self.sites.append(site)
        return func(*args, **(kwargs or {}))
