"""Fixtures and hooks only; what tests share as code lives in helpers.py (``from helpers import ...``)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["POTSTILL_QUIET"] = "1"


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(2)
