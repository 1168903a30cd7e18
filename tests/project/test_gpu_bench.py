"""bench/gpu_bench.py runs end to end (--tiny, on the CPU): every potstill arm gives a number, and the
arms that compute the same objective give the same loss. TRL's and Liger's arms run when those
libraries import (the bench-gpu extra) and are printed as skipped otherwise."""

import importlib.util
import re
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_the_gpu_bench_runs_tiny_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    text = bench.main(["--tiny"])
    for heading in ("KD loss alone", "Full training step", "Generation with top-k logprobs", "machine: CPU",
                    "versions: torch", "peak:"):
        assert heading in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| potstill") or
            line.startswith("| plain") or line.startswith("| TRL") or line.startswith("| Liger")]
    potstill = [r for r in rows if not r[0].startswith(("| TRL", "| Liger"))]
    assert len(potstill) == 7 + 5 + 2 and not any("skipped" in " ".join(r) for r in potstill)
    for r in rows:  # a number in every measured cell, or the reason it was skipped
        assert "skipped (" in r[1] or re.fullmatch(r"[\d,.]+", r[1].strip()), r
    # the online arms of the loss table (dense, chunked, compiled, and TRL's when present) compute one forward KL
    loss_table = text.split("KD loss alone")[1].split("Full training step")[0]
    online = {line.split(" | ")[-1].strip(" |") for line in loss_table.splitlines()
              if ("online" in line or "dense" in line or "ChunkedDivergence" in line) and "skipped" not in line}
    assert len(online) == 1, online
