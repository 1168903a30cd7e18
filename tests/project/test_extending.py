"""docs/extending.md's examples run: each section's first Python block is executed, plugged into its
registry, and checked the way potstill would use it (a loss in the recipe and the training loss, a
backend through ``ask`` into a ledger, a verifier through the recipe and eval's loader)."""

import re

import pytest
import torch

from potstill import verifiers
from potstill.ledger import Ledger
from potstill.losses import LOSSES, Loss, kd_loss
from potstill.pipeline import unused_fields
from potstill.prompts import load_prompts
from potstill.recipe import EvalSpec, TrainSpec, load_recipe
from potstill.teachers.backends import ask

from helpers import QUICKSTART, ROOT

DOC = (ROOT / "docs" / "extending.md").read_text()


def blocks(section: str) -> list[str]:
    body = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", DOC, re.M | re.S).group(1)
    return re.findall(r"```python\n(.*?)```", body, re.S)


def run(code: str) -> dict:
    namespace: dict = {"__name__": "example"}
    exec(compile(code, "docs/extending.md", "exec"), namespace)
    return namespace


def test_the_loss_example_is_a_loss(monkeypatch):
    code, line = blocks("Add a loss")[:2]
    hellinger = run(code)["hellinger"]
    entry = eval("{" + line + "\n}", {"Loss": Loss, "hellinger": hellinger})  # the registry line, as written
    monkeypatch.setitem(LOSSES, "hellinger", entry["hellinger"])
    assert TrainSpec(loss="hellinger").loss == "hellinger"
    assert {"beta", "alpha"} <= unused_fields(TrainSpec(loss="hellinger"))
    g = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(6, 12, generator=g, dtype=torch.float64) for _ in range(2))
    for t in (0.5, 1.0, 2.0):
        p, q = (teacher / t).softmax(-1), (student / t).softmax(-1)
        reference = 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1).mean() * t**2  # the docstring's second form
        assert torch.allclose(kd_loss("hellinger", student, teacher_logits=teacher, temperature=t), reference)
        top = teacher.topk(12, -1)  # k = V: the sparse form is exact
        sparse = kd_loss("hellinger", student, topk_ids=top.indices, topk_logprobs=top.values.log_softmax(-1),
                         temperature=t)
        assert torch.allclose(sparse, reference)
    assert kd_loss("hellinger", teacher, teacher_logits=teacher).abs() < 1e-12


def test_the_backend_example_answers_into_the_ledger(tmp_path):
    rules = run(blocks("Add a teacher backend")[0])
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [f"output_dir={tmp_path}"])
    prompts = [p for p in load_prompts(QUICKSTART / "prompts" / "heldout.jsonl") if p.text.startswith("sort ")][:5]
    backend = rules["RulesBackend"](recipe)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        asked = ask(backend, ledger, prompts, {"max_new_tokens": 8, "temperature": 0.0}, recipe.sha256())
        assert asked.sent == len(prompts) == 5 and asked.stopped is None
        got = {ex.request_hash: ex.text for ex in ledger.examples(asked.hashes)}
        assert ask(backend, ledger, prompts, {"max_new_tokens": 8, "temperature": 0.0}, recipe.sha256()).sent == 0
    assert [got[h] for h in asked.hashes] == [p.meta["answer"] for p in prompts]


def test_the_verifier_example_is_a_verifier(monkeypatch):
    same_number = run(blocks("Add a verifier")[0])["same_number"]
    assert same_number("add 1 2", " 3.0 ", {"answer": 3}) is True
    assert same_number("add 1 2", "three", {"answer": 3}) is False
    assert same_number("add 1 2", "3", {}) is None
    with pytest.raises(ValueError, match="eval.verifier 'number' is not installed"):
        EvalSpec(prompts="heldout.jsonl", verifier="number")
    monkeypatch.setitem(verifiers.BUILT_IN, "number", same_number)
    assert EvalSpec(prompts="heldout.jsonl", verifier="number").verifier == "number"
    assert verifiers.load("number") is same_number
