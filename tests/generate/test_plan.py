"""Generate records its plan (the request hashes of every prompt and sample, and the teacher's
description) in the ledger; train reads it and never plans again. A ledger from before plans,
or a recipe edited since generate, is planned by `potstill train` / `run` (nothing sent)."""

import sqlite3

import pytest

from potstill import pipeline
from potstill.errors import PotstillError
from potstill.generate import generate, recipe_requests
from potstill.ledger import Ledger, merge_ledgers
from potstill.ledger.plans import plan_key, recipe_plan
from potstill.recipe import load_recipe
from potstill.train.loop import ledger_examples

from helpers import QUICKSTART, tiny_overrides


def quick(tmp_path, *more):
    return load_recipe(QUICKSTART / "recipe.yaml", tiny_overrides(tmp_path / "run", 12) + [
        "generation.top_logprobs=2", "generation.max_new_tokens=8", *more])


def test_train_reads_the_plan_generate_recorded_and_plans_nothing(tmp_path, monkeypatch):
    recipe = quick(tmp_path)
    generate(recipe)
    desc, hashes = recipe_requests(recipe)
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        assert recipe_plan(ledger, recipe) == (desc, hashes)

    def no_planning(*args, **kwargs):
        raise AssertionError("train planned again")

    # what planning needs: the teacher's backend (its tokenizer) and the prompt file
    monkeypatch.setattr("potstill.teachers.backends.LocalBackend.__init__", no_planning)
    monkeypatch.setattr("potstill.prompts.load_prompts", no_planning)
    examples, _, descriptions, _ = ledger_examples(recipe, "student")
    assert sorted(ex.request_hash for ex in examples) == sorted(hashes)
    assert desc in descriptions.values()


def test_a_ledger_from_before_plans_is_planned_by_train_and_trains_the_same_rows(tmp_path):
    recipe = quick(tmp_path)
    generate(recipe)
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        before = recipe_plan(ledger, recipe)
    db = sqlite3.connect(recipe.run_dir / "ledger.sqlite")  # as an older potstill left it: no plans table
    db.execute("DROP TABLE plans")
    db.commit()
    db.close()
    with pytest.raises(PotstillError, match="has no plan for this recipe.*run `potstill generate`"):
        ledger_examples(recipe, "student")  # the stage alone says what to do, in one line
    pipeline.planned(recipe)  # what `potstill train` and `potstill run` do before training
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        assert recipe_plan(ledger, recipe) == before
    assert len(ledger_examples(recipe, "student")[0]) == len(before[1])


def test_an_edited_recipe_has_no_plan_until_planned(tmp_path):
    recipe = quick(tmp_path)
    generate(recipe)
    fewer = quick(tmp_path, "prompts.limit=5")  # a plan serves any recipe asking for fewer prompts
    assert plan_key(fewer) == plan_key(recipe)
    assert [ex.request_hash for ex in ledger_examples(fewer, "student")[0]] == \
        [ex.request_hash for ex in ledger_examples(recipe, "student")[0] if ex.request_hash in
         recipe_requests(fewer)[1]]
    assert len(recipe_requests(fewer)[1]) == 5
    more = quick(tmp_path, "prompts.limit=16")  # 4 prompts generate never answered
    with pytest.raises(PotstillError, match="has no plan"):
        ledger_examples(more, "student")
    pipeline.planned(more)
    with pytest.raises(PotstillError, match="4 of the recipe's 16 requests have no completion"):
        ledger_examples(more, "student")
    # a file the plan names changing (same recipe text) also needs a new plan
    prompts = tmp_path / "prompts.jsonl"  # a file of 12 prompts: no limit, so the plan covers the whole file
    prompts.write_text("".join((QUICKSTART / "prompts" / "train.jsonl").open().readlines()[:12]))
    copied = quick(tmp_path, f"prompts.path={prompts}", "prompts.limit=null")
    generate(copied)
    key = plan_key(copied)
    prompts.write_text(prompts.read_text() + prompts.read_text().splitlines()[0] + "\n")
    assert plan_key(copied) != key


def test_each_shard_records_the_whole_plan_and_merge_keeps_it(tmp_path):
    recipe = quick(tmp_path)
    for i in range(2):
        generate(recipe, shard=(i, 2))
    shards = [recipe.run_dir / f"ledger-shard-{i}-of-2.sqlite" for i in range(2)]
    merge_ledgers(recipe.run_dir / "ledger.sqlite", shards)
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        desc, hashes = recipe_plan(ledger, recipe)
    assert (desc, hashes) == recipe_requests(recipe) and len(hashes) == 12
    assert len(ledger_examples(recipe, "student")[0]) == 12
