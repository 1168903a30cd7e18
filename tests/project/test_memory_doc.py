"""docs/memory.md says what bench/memory_plan.py's formulas give: its 80 GB tables are the script's
output now, its check table names the script's configurations, and its per-parameter sums are the
formulas' (a formula changed without the document fails here)."""

import importlib.util
import sys

import pytest
from helpers import ROOT

DOC = (ROOT / "docs" / "memory.md").read_text()


@pytest.fixture(scope="module")
def plan():
    spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "bench" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["memory_plan"]


def test_the_80_gb_tables_are_the_formulas(plan):
    block = DOC.split("<!-- plan-tables: begin -->\n")[1].split("<!-- plan-tables: end -->")[0]
    assert block.strip() == plan.plan_tables().strip(), "rerun `python bench/memory_plan.py --table` into docs/memory.md"


def test_the_check_table_rows_are_the_scripts_configurations(plan):
    section = DOC.split("## The check on the CPU")[1]
    table = section.split("| configuration | student params")[1].split("\n\n")[0]  # the check's table
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()[2:]]
    assert rows == list(plan.CHECKS)


@pytest.mark.parametrize("fields, device, per_param", [
    ({}, "cpu", 16),  # weights 4 + gradients 4 + AdamW 8
    ({"precision": "bf16"}, "cpu", 18),  # + the bf16 weight copies at the end of the backward
    ({}, "cuda", 20),  # + foreach's sqrt(v) at the step
    ({"precision": "bf16"}, "cuda", 20),
    ({"launch": "ddp", "world": 8}, "cuda", 20),  # DDP: the gradients are views into its buckets
    ({"launch": "fsdp2", "world": 8}, "cuda", 20 / 8),
])
def test_per_parameter_sums_are_the_documented_ones(plan, fields, device, per_param):
    """A student whose linear layers are all its parameters, one trained row: bytes per parameter."""
    shape = plan.Shape(hidden=4096, layers=64, intermediate=16384, heads=32, kv_heads=32, vocab=8)
    pred = plan.predict(plan.Run(shape, batch=1, seq=2, prompt=1, chunk=1, **fields), device)
    fsdp = sum(v for k, v in pred.phases[pred.peak_phase].items() if k.startswith("FSDP2"))
    assert (pred.peak - fsdp) / shape.params == pytest.approx(per_param, rel=2e-3)
