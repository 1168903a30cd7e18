"""One registry of losses (potstill.losses.LOSSES): the recipe accepts its names and no other,
the training step and `potstill run`'s up-to-date rule read from it, and a new loss is a function
and one line in it. The docs that list the losses list them all."""

import inspect
import re

import pytest
import torch
from pydantic import ValidationError

from potstill.losses import LOSSES, Loss, divergence, kd_loss
from potstill.pipeline import KD_ONLY, unused_fields
from potstill.recipe import TrainSpec

from helpers import ROOT


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_is_one_documented_file_taking_the_parameters_it_names(name):
    loss = LOSSES[name]
    module = inspect.getmodule(loss.rows)
    assert module.__name__.startswith("potstill.losses.") and "=" in module.__doc__  # the formula, in its file
    assert list(inspect.signature(loss.rows).parameters) == ["teacher_logp", "student_logp", *loss.params]
    assert set(loss.params) <= set(TrainSpec.model_fields) & set(KD_ONLY)  # recipe fields, KD-only ones


def test_the_recipe_takes_the_registered_names_and_lists_them_for_any_other():
    for name in LOSSES:
        assert TrainSpec(loss=name).loss == name
    listed = "'forward_kl', 'reverse_kl', 'jsd', 'skew_kl', 'skew_reverse_kl' or 'tvd'"
    for wrong in ("reverse_klx", 3, None, ["jsd"]):
        with pytest.raises(ValidationError, match=f"Input should be {listed}"):
            TrainSpec(loss=wrong)


def test_a_new_loss_is_a_function_and_a_line(monkeypatch):
    def half_forward_kl(teacher_logp, student_logp, beta):
        """Per-row beta * KL(p || q)."""
        return beta * (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)

    monkeypatch.setitem(LOSSES, "half_kl", Loss(half_forward_kl, ("beta",)))
    spec = TrainSpec(loss="half_kl", beta=0.25)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    got = kd_loss("half_kl", student, teacher_logits=teacher, beta=spec.beta)
    assert torch.allclose(got, 0.25 * kd_loss("forward_kl", student, teacher_logits=teacher))
    assert "beta" not in unused_fields(spec) and "alpha" in unused_fields(spec)


@pytest.mark.parametrize("name, reads", [("forward_kl", set()), ("jsd", {"beta"}), ("skew_kl", {"alpha"}),
                                         ("skew_reverse_kl", {"alpha"}), ("tvd", set())])
def test_a_model_is_retrained_for_the_parameters_its_loss_reads_only(name, reads):
    assert {"beta", "alpha"} - unused_fields(TrainSpec(loss=name)) == reads
    assert {"loss", "beta", "alpha"} <= unused_fields(TrainSpec(loss=name, objective="sft"))


def test_an_unknown_name_outside_the_recipe_says_what_is_known():
    with pytest.raises(ValueError, match="unknown loss 'nope'; known: forward_kl, reverse_kl, jsd"):
        divergence("nope", torch.zeros(1, 2), torch.zeros(1, 2))


def test_the_docs_and_the_recipe_name_every_loss():
    readme = re.search(r"^- \*\*Losses\*\* \(`train.loss`\):(.+?)^- ", (ROOT / "README.md").read_text(), re.M | re.S)
    field = re.search(r"^(    # .*\n)+    loss: ", (ROOT / "src/potstill/recipe.py").read_text(), re.M)
    for where in (readme.group(1), field.group(0)):
        assert set(re.findall(r"\w+", where)) >= set(LOSSES)
