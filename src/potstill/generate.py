"""The generate stage: ask the teacher for every prompt not yet answered, and store each answer
in the ledger before counting it done. Rerunning sends nothing already done.

The teacher answers through its backend (``potstill.teachers.backends.BACKENDS``): ``local``
(transformers), ``openai`` (any OpenAI-compatible endpoint), ``openai_batch`` (OpenAI's Batch API);
a backend that reads no prompts (``imported``: its file holds prompts and answers) stores its file
in the ledger instead.
``shard=(i, n)`` keeps only the requests of shard i of n, in a ledger of its own
(``ledger-shard-i-of-n.sqlite``) for ``potstill merge`` to combine.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from potstill.errors import PotstillError
from potstill.hf import prompt_ids
from potstill.ledger import Ledger, exclusive, requests_for, teacher_key
from potstill.ledger.plans import plan_key, prompt_limit
from potstill.prompts import Prompt, load_prompts
from potstill.recipe import Recipe, save_recipe
from potstill.teachers.backends import BACKENDS, Backend, ask, for_recipe
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
    reads_prompts = BACKENDS[spec.backend].reads_prompts
    # a bad prompt file is refused before anything is written
    prompts = load_prompts(recipe.prompts.path, recipe.prompts.limit) if reads_prompts else None
    run.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run / "recipe.yaml")
    if not reads_prompts:
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
        loaded = prompts
        prompts, skipped = fitting_prompts(recipe, loaded, backend.tokenizer)
        notes = [f"left out {skipped} prompts longer than the teacher's context allows "
                 f"(generation.long_prompts=skip)"] if skipped else []
        ledger.record_plan(plan_key(recipe), *planned_pairs(recipe, backend.describe(), loaded, prompts),  # all shards'
                           prompt_limit(recipe))
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
    """The generate stage of a teacher whose file holds the prompts and the answers (``imported``):
    the file goes into the ledger (idempotent), and its rows are the recipe's plan."""
    with exclusive(ledger_path(recipe)), Ledger(ledger_path(recipe)) as ledger:
        backend = for_recipe(recipe)
        counts = backend.store(ledger)
        ledger.record_plan(plan_key(recipe), *planned_requests(recipe, backend), None)
        return {"planned": counts["read"], "sent": 0, **ledger.counts(), "spend": ledger.spend(), "imported": counts}


def sampling_params(recipe: Recipe) -> dict:
    g = recipe.generation
    params = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
              "top_logprobs": g.top_logprobs, "seed": g.seed}
    if g.stop:  # only when set: the params are part of every request hash
        params["stop"] = list(g.stop)
    return params


def recipe_requests(recipe: Recipe) -> tuple[dict, list[str]]:
    """The teacher's description and the request hashes this recipe asks for (every shard's), planned
    as generate plans them: what generate records in the ledger for train to read."""
    desc, pairs = planned_requests(recipe)
    return desc, [h for _, h in pairs]


def planned_requests(recipe: Recipe, backend: Backend | None = None) -> tuple[dict, list[tuple[int, str]]]:
    """The teacher's description and (prompt index, request hash) for every request of the recipe
    (``backend``: the recipe's, when already built)."""
    backend = backend or for_recipe(recipe)
    if not backend.reads_prompts:  # its file's rows, in file order
        desc, hashes = backend.plan()
        return desc, list(enumerate(hashes))
    loaded = load_prompts(recipe.prompts.path, recipe.prompts.limit)
    fitted, _ = fitting_prompts(recipe, loaded, backend.tokenizer)
    return planned_pairs(recipe, backend.describe(), loaded, fitted)


def planned_pairs(recipe: Recipe, desc: dict, loaded: list[Prompt],
                  fitted: list[Prompt]) -> tuple[dict, list[tuple[int, str]]]:
    """The teacher's description and (index in ``loaded``, hash) of every request for the prompts
    that fit the teacher's context (``fitted``, a subset of ``loaded`` in its order)."""
    index = {id(p): i for i, p in enumerate(loaded)}
    planned = requests_for(teacher_key(desc), fitted, sampling_params(recipe), recipe.generation.samples_per_prompt)
    return desc, [(index[id(p)], h) for h, p, _ in planned]


def record_plan(recipe: Recipe) -> None:
    """Plan the recipe's requests as generate does, sending nothing, and record the plan in its
    ledger: for a ledger written before plans were kept, or a recipe edited since generate."""
    with Ledger(ledger_path(recipe)) as ledger:
        ledger.record_plan(plan_key(recipe), *planned_requests(recipe), prompt_limit(recipe))


def context_length(recipe: Recipe, tokenizer) -> int | None:
    """The teacher's context in tokens: its config's max_position_embeddings (the model folder, or
    an HTTP teacher's tokenizer folder when it holds a config), else the tokenizer's
    model_max_length when it states one; None when unknown."""
    from transformers import AutoConfig

    folder = recipe.teacher.tokenizer_dir
    if folder and (Path(folder) / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=recipe.teacher.trust_remote_code)
        except (OSError, ValueError) as e:
            raise PotstillError(f"{folder}/config.json could not be read: {str(e).splitlines()[0]}") from None
        n = getattr(config.get_text_config(), "max_position_embeddings", None)
        if isinstance(n, int):
            return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and n < 10**8 else None  # transformers says 1e30 when it does not know


def fitting_prompts(recipe: Recipe, prompts: list[Prompt], tokenizer) -> tuple[list[Prompt], int]:
    """The prompts whose tokens leave generation.max_new_tokens of the teacher's context, and how
    many were left out (generation.long_prompts=skip); with long_prompts=error the first that does
    not fit stops the run, naming its file:line. Unchecked without a tokenizer or a known context."""
    limit = None if tokenizer is None else context_length(recipe, tokenizer)
    if limit is None:
        return prompts, 0
    room = limit - recipe.generation.max_new_tokens
    kept = []
    for p in prompts:
        n = len(prompt_ids(tokenizer, p.chat))
        if n <= room:
            kept.append(p)
        elif recipe.generation.long_prompts == "error":
            raise PotstillError(f"{p.source}: the prompt is {n} tokens; the teacher's context of {limit} leaves {room} "
                                f"with generation.max_new_tokens={recipe.generation.max_new_tokens}: shorten it, or "
                                f"set generation.long_prompts=skip to leave such prompts out")
    return kept, len(prompts) - len(kept)
