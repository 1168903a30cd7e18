"""The generate stage: ask the teacher for every prompt not yet answered, and store each answer
in the ledger before counting it done. Rerunning sends nothing already done.

The teacher answers through its backend (``potstill.teachers.backends``): ``local``
(transformers), ``openai`` (any OpenAI-compatible endpoint), ``openai_batch`` (OpenAI's Batch API);
an ``imported`` teacher's file is read into the ledger instead.
``shard=(i, n)`` keeps only the requests of shard i of n, in a ledger of its own
(``ledger-shard-i-of-n.sqlite``) for ``potstill merge`` to combine.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from potstill.errors import PotstillError
from potstill.ledger import Ledger, exclusive
from potstill.ledger.requests import fitting_prompts, n_tokens, recipe_requests, sampling_params  # noqa: F401 (public)
from potstill.prompts import load_prompts
from potstill.recipe import Recipe, save_recipe
from potstill.teachers.backends import ask, for_recipe
from potstill.teachers.base import Teacher


def ledger_path(recipe: Recipe, shard: tuple[int, int] | None = None) -> Path:
    if shard is None:
        return recipe.run_dir / "ledger.sqlite"
    return recipe.run_dir / f"ledger-shard-{shard[0]}-of-{shard[1]}.sqlite"


def generate(recipe: Recipe, teacher: Teacher | None = None, shard: tuple[int, int] | None = None) -> dict:
    """Returns counts: planned (requests in the recipe, or the shard), sent (this run), done,
    failed (ledger). A run that stops early (budget, a non-retryable error) raises after saving."""
    run = recipe.run_dir
    spec = recipe.teacher
    # a bad prompt file is refused before anything is written
    prompts = None if spec.backend == "imported" else load_prompts(recipe.prompts.path, recipe.prompts.limit)
    run.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run / "recipe.yaml")
    if spec.backend == "imported":
        return import_stage(recipe)
    params = sampling_params(recipe)
    if recipe.generation.stop and not spec.http:
        raise PotstillError("generation.stop is sent to HTTP teachers; the local backend stops at the end-of-sequence "
                            "token (and max_new_tokens)")
    if recipe.generation.top_logprobs > 20 and spec.http:
        raise PotstillError(f"generation.top_logprobs={recipe.generation.top_logprobs}: OpenAI-compatible endpoints "
                            f"return at most 20")
    with exclusive(ledger_path(recipe, shard)), Ledger(ledger_path(recipe, shard)) as ledger:
        backend = for_recipe(recipe, teacher)
        prompts, skipped = fitting_prompts(recipe, prompts, backend.tokenizer)
        notes = [f"left out {skipped} prompts longer than the teacher's context allows "
                 f"(generation.long_prompts=skip)"] if skipped else []
        asked = ask(backend, ledger, prompts, params, recipe.sha256(), recipe.generation.samples_per_prompt, shard)
        stopped = asked.stopped
        counts = {"planned": len(asked.planned), "sent": asked.sent, **ledger.counts(), "spend": ledger.spend(asked.key),
                  "skipped_long_prompts": skipped}
        g = recipe.generation
        if g.samples_per_prompt > 1 and g.temperature > 0:
            same = counts["identical_samples"] = ledger.identical_samples(asked.hashes)
            if same["identical"]:
                notes.append(f"{same['identical']} of {same['prompts']} prompts got the same answer in all "
                             f"{g.samples_per_prompt} samples at temperature {g.temperature}" + (
                                 ": does the teacher honour sampling parameters? An endpoint that ignores them "
                                 "decodes greedily, and the ledger records the temperature asked for"
                                 if same["identical"] == same["prompts"] else ""))
        counts["notes"] = notes
        # why the recipe's requests failed for good, most common first: the CLI prints it and exits 1
        mine = set(asked.hashes)
        counts["failures"] = Counter(r for h, r in ledger.failures().items() if h in mine).most_common()
    if stopped:
        raise PotstillError(f"generation stopped: {stopped} (saved: {counts['done']} done, {counts['failed']} failed; "
                            f"rerun the same command to resume)")
    return counts


def import_stage(recipe: Recipe) -> dict:
    """The generate stage of an ``imported`` teacher: its file goes into the ledger (idempotent)."""
    from potstill.teachers.imported import import_file

    spec = recipe.teacher
    with exclusive(ledger_path(recipe)), Ledger(ledger_path(recipe)) as ledger:
        counts = import_file(ledger, spec.data, format=spec.format, teacher_id=recipe.teacher_id(),
                             terms_family=spec.terms_family, terms_url=spec.terms_url, n_tokens=n_tokens(recipe))
        return {"planned": counts["read"], "sent": 0, **ledger.counts(), "spend": ledger.spend(), "imported": counts}
