"""`potstill run`'s "what is up to date" rules (potstill.pipeline), checked on the files they read:
a student's potstill.json and eval.json. The whole pipeline run twice is tests/pipeline/test_end_to_end.py."""

import json
import sys

from potstill.pipeline import baseline_spec, eval_is_current, student_is_current, students
from potstill.recipe import load_recipe

from helpers import QUICKSTART


def recipe_for(tmp_path, *overrides):
    return load_recipe(QUICKSTART / "recipe.yaml", [f"output_dir={tmp_path}", *overrides])


def record(recipe, name="student", ledger="abc"):
    folder = recipe.run_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    info = {"train": dict(students(recipe))[name].model_dump(), "ledger_sha256": ledger,
            "student": recipe.student.model_dump(),
            "terms": {"use": recipe.use, "declared": recipe.teacher.terms_declared}}
    (folder / "potstill.json").write_text(json.dumps(info))


def test_a_student_is_current_until_what_it_was_trained_from_changes(tmp_path):
    recipe = recipe_for(tmp_path)
    spec = recipe.train
    assert not student_is_current(recipe, "student", spec, "abc")  # never trained
    record(recipe)
    assert student_is_current(recipe, "student", spec, "abc")
    assert not student_is_current(recipe, "student", spec, "another ledger")
    for change in ("train.lr=0.5", "student.license=mit", "use=research",
                   "teacher.terms_declared=meta-llama-3"):
        changed = recipe_for(tmp_path, change)
        assert not student_is_current(changed, "student", changed.train, "abc"), change


def test_a_model_is_retrained_only_when_what_it_trains_on_or_with_changed(tmp_path):
    """The SFT baseline ignores the KD-only fields; neither model retrains for the chunk size or the
    checkpoint cadence; a field a model uses still retrains it."""
    recipe = recipe_for(tmp_path)
    record(recipe, "student")
    record(recipe, "baseline")
    cases = {  # override: (student current, baseline current)
        "train.teacher_signal=online": (False, True), "train.lmbda=0.2": (True, True),
        "train.teacher_signal=on_policy": (False, True), "train.temperature=2": (False, True),
        "train.loss=jsd": (False, True), "train.beta=0.9": (True, True), "train.kd_ratio=0.3": (False, True),
        "train.chunk_size=16": (True, True), "train.checkpoint_every=5": (True, True),
        "train.on_policy_max_new_tokens=4": (True, True),
        "train.lr=0.5": (False, False), "train.epochs=2": (False, False), "baseline.objective=kd": (True, False),
    }
    for change, expected in cases.items():
        changed = recipe_for(tmp_path, change)
        got = tuple(student_is_current(changed, name, spec, "abc") for name, spec in students(changed))
        assert got == expected, change
    record(recipe_for(tmp_path, "train.loss=jsd"), "student")
    beta = recipe_for(tmp_path, "train.loss=jsd", "train.beta=0.9")  # jsd reads beta
    assert not student_is_current(beta, "student", beta.train, "abc")


def test_the_baseline_is_the_training_section_with_its_own_fields_over_it(tmp_path):
    recipe = recipe_for(tmp_path)
    base = baseline_spec(recipe)
    assert [name for name, _ in students(recipe)] == ["student", "baseline"]
    assert base.objective == "sft" and base.lr == recipe.train.lr and recipe.train.objective == "kd"


def test_eval_is_current_for_the_recipe_it_was_written_for(tmp_path):
    recipe = recipe_for(tmp_path)
    assert not eval_is_current(recipe)
    (tmp_path / "eval.json").write_text(json.dumps({"provenance": {"recipe_sha256": recipe.sha256()}}))
    assert eval_is_current(recipe)
    assert not eval_is_current(recipe_for(tmp_path, "eval.limit=3"))


def test_under_a_launcher_only_the_first_process_evaluates(tmp_path, monkeypatch):
    """eval is one process's work: the other ranks of `accelerate launch potstill run|eval` leave it
    to the first (each used to evaluate and write eval.json), and eval.json says one process ran it."""
    from potstill import pipeline
    from potstill.cli import main

    calls = []
    monkeypatch.setattr("potstill.evaluate.evaluate", lambda recipe: calls.append(recipe) or {})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("POTSTILL_QUIET", raising=False)  # main() quiets another rank: undone after the test
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    assert not pipeline.main_process()
    assert main(["eval", str(QUICKSTART / "recipe.yaml"), f"output_dir={tmp_path}"]) == 0 and calls == []
    monkeypatch.setenv("RANK", "0")
    assert pipeline.main_process()
