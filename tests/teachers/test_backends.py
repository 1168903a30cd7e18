"""One registry of teacher backends (potstill.teachers.backends.BACKENDS): the recipe's names are
its names, each class says whether it reads the recipe's prompts and has what generate then calls,
and the HTTP settings a teacher and a judge share are declared once."""

import typing

import pytest

from potstill.recipe import HTTPSettings, JudgeSpec, TeacherSpec, load_recipe
from potstill.teachers.backends import BACKENDS, ImportedBackend, for_recipe

from helpers import QUICKSTART


def test_the_recipe_names_the_registered_backends_and_what_each_requires():
    assert set(typing.get_args(TeacherSpec.model_fields["backend"].annotation)) == set(BACKENDS)
    assert set(TeacherSpec.REQUIRED) == set(BACKENDS)
    for name, required in TeacherSpec.REQUIRED.items():
        assert set(required) <= set(TeacherSpec.model_fields), name


@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_has_what_generate_calls(name):
    cls = BACKENDS[name]
    assert callable(cls.describe)
    # one that reads the prompts answers them; one whose file holds them plans and stores it
    needs = ("answer",) if cls.reads_prompts else ("plan", "store")
    assert all(callable(getattr(cls, m, None)) for m in needs), name


def test_an_imported_teacher_is_a_backend_like_the_others(tmp_path):
    data = tmp_path / "answers.jsonl"
    data.write_text('{"prompt": "add 1 2", "response": "3"}\n{"prompt": "add 2 2", "response": "4"}\n')
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [f"output_dir={tmp_path / 'run'}", "teacher.backend=imported",
                                                      f"teacher.data={data}", "prompts=null"])
    backend = for_recipe(recipe)
    assert isinstance(backend, ImportedBackend) and not backend.reads_prompts
    desc, hashes = backend.plan()
    assert backend.describe() == desc and desc["backend"] == "imported" and len(hashes) == 2


def test_teacher_and_judge_share_the_http_settings_and_their_keys_stay_flat():
    shared = set(HTTPSettings.model_fields)
    assert shared == {"model", "endpoints", "api_key_env", "concurrency", "requests_per_minute", "tokens_per_minute",
                      "timeout", "max_attempts", "max_retry_wait", "prices", "budget"}
    assert shared <= set(TeacherSpec.model_fields) and shared <= set(JudgeSpec.model_fields)
    judge = JudgeSpec(backend="openai", model="j", endpoints=["http://x/v1"], concurrency=3, api_key_env="JUDGE_KEY",
                      budget={"max_requests": 5})
    teacher = judge.as_teacher()
    assert {f: getattr(teacher, f) for f in shared} == {f: getattr(judge, f) for f in shared}
    with pytest.raises(ValueError, match="NAME of an environment variable"):  # validated once, for both
        JudgeSpec(backend="openai", model="j", endpoints=["http://x/v1"], api_key_env="sk-pasted")
