"""What generate notices about its teacher and prompts: samples that never vary at temperature > 0
(an endpoint ignoring sampling parameters), and prompts longer than the teacher's context."""

import json

import pytest

from potstill.cli import main
from potstill.errors import PotstillError
from potstill.generate import generate, recipe_requests
from potstill.ledger import Ledger
from potstill.recipe import load_recipe
from potstill.report import write_report

from helpers import QUICKSTART, TEACHER, tiny_overrides
from mock_endpoint import MockEndpoint
from helpers import make_run


@pytest.fixture
def greedy_endpoint():
    """An OpenAI-compatible endpoint that answers every request the same way, whatever its
    temperature or seed (as `transformers serve` was seen to)."""
    m = MockEndpoint().start_in_thread()
    yield m
    m.stop_thread()


def test_an_endpoint_that_ignores_temperature_is_named_in_the_summary(tmp_path, greedy_endpoint, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((QUICKSTART / "recipe.yaml").read_text())
    (tmp_path / "teacher").symlink_to(TEACHER)
    (tmp_path / "prompts").symlink_to(QUICKSTART / "prompts")
    args = [f"output_dir={tmp_path / 'run'}", "prompts.limit=6", "teacher.backend=openai", "teacher.model=mock",
            f"teacher.endpoints=[{greedy_endpoint.url}]", "generation.top_logprobs=0",
            "generation.samples_per_prompt=4", "generation.temperature=1.0"]
    assert main(["generate", str(recipe), *args]) == 0
    out = capsys.readouterr().out
    assert "generate: note: 6 of 6 prompts got the same answer in all 4 samples at temperature 1.0: does the " \
           "teacher honour sampling parameters?" in out
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        assert ledger.identical_samples() == {"prompts": 6, "identical": 6}
    # the report says so too, above its tables
    page = write_report(make_run(tmp_path / "run", skill="add")).read_text()
    assert "6 of 6 prompts sampled several times at temperature &gt; 0 got the same answer every time: does the " \
           "teacher honour sampling parameters?" in " ".join(page.split())


@pytest.mark.slow
def test_a_teacher_that_samples_is_not_flagged(tmp_path):
    """The quickstart teacher at temperature 1 varies its "shuffle" answers: some prompts differ."""
    recipe = load_recipe(QUICKSTART / "recipe.yaml", tiny_overrides(tmp_path / "run", 24) + [
        "generation.samples_per_prompt=3", "generation.top_logprobs=0"])
    counts = generate(recipe)
    same = counts["identical_samples"]
    assert same["prompts"] == 24 and 0 < same["identical"] < 24
    assert not any("honour sampling" in note for note in counts["notes"])
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        assert ledger.identical_samples(recipe_requests(recipe)[1]) == same
        greedy = load_recipe(QUICKSTART / "recipe.yaml", tiny_overrides(tmp_path / "run", 24) + [
            "generation.samples_per_prompt=3", "generation.temperature=0"])
    assert "identical_samples" not in generate(greedy)  # greedy: identical by design, nothing to say


def long_prompt_recipe(tmp_path, *extra):
    lines = [{"prompt": "add 1 2"}, {"prompt": "add " + " ".join(["1"] * 28)}, {"prompt": "add 3 4"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return load_recipe(QUICKSTART / "recipe.yaml", tiny_overrides(tmp_path / "run") + [
        f"prompts.path={tmp_path / 'p.jsonl'}", "prompts.limit=null", *extra])


def test_a_prompt_longer_than_the_teachers_context_is_refused_naming_its_line(tmp_path):
    # the quickstart teacher's context is 64 tokens: 12 new tokens leave 52, and line 2 is 61
    with pytest.raises(PotstillError) as err:
        generate(long_prompt_recipe(tmp_path))
    assert str(err.value) == (f"{tmp_path / 'p.jsonl'}:2: the prompt is 61 tokens; the teacher's context of 64 "
                              f"leaves 52 with generation.max_new_tokens=12: shorten it, or set "
                              f"generation.long_prompts=skip to leave such prompts out")
    assert not (tmp_path / "run" / "ledger.sqlite").exists() or Ledger(tmp_path / "run" / "ledger.sqlite").counts()["done"] == 0


def test_skip_leaves_long_prompts_out_of_generate_and_train_alike(tmp_path):
    recipe = long_prompt_recipe(tmp_path, "generation.long_prompts=skip")
    counts = generate(recipe)
    assert counts["done"] == 2 and counts["skipped_long_prompts"] == 1
    assert counts["notes"] == ["left out 1 prompts longer than the teacher's context allows (generation.long_prompts=skip)"]
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        hashes = recipe_requests(recipe)[1]
        assert len(hashes) == 2 and {e.request_hash for e in ledger.examples(hashes)} == set(hashes)
    shorter = long_prompt_recipe(tmp_path, "generation.max_new_tokens=3")  # 61 tokens fit with 3 to spare
    assert generate(shorter)["skipped_long_prompts"] == 0
