"""The generate stage: ask the teacher for every prompt not yet answered, and store each answer
in the ledger before counting it done. Rerunning sends nothing already done."""

from __future__ import annotations

from pathlib import Path

from potstill.ledger import Ledger
from potstill.progress import progress
from potstill.prompts import load_prompts
from potstill.recipe import Recipe, save_recipe
from potstill.teachers.base import Teacher


def make_teacher(recipe: Recipe) -> Teacher:
    from potstill.teachers.local import LocalTeacher

    spec = recipe.teacher
    return LocalTeacher(spec.path, id=recipe.teacher_id(), revision=spec.revision, terms_family=spec.terms_family,
                        terms_url=spec.terms_url, dtype=spec.dtype, device=spec.device)


def recipe_requests(recipe: Recipe) -> tuple[dict, list[str]]:
    """The teacher's description and the request hashes this recipe asks for, computed without
    loading the teacher's weights: what `train` reads from the ledger."""
    from transformers import AutoTokenizer

    from potstill.errors import PotstillError
    from potstill.ledger import request_hash, teacher_key
    from potstill.teachers.local import describe_local

    spec = recipe.teacher
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError) as e:
        raise PotstillError(f"teacher tokenizer {spec.path} could not be loaded: {str(e).splitlines()[0]}") from None
    desc = describe_local(Path(spec.path), tokenizer, id=recipe.teacher_id(), revision=spec.revision,
                          terms_family=spec.terms_family, dtype=spec.dtype, terms_url=spec.terms_url)
    key, params = teacher_key(desc), sampling_params(recipe)
    prompts = load_prompts(recipe.prompts.path, recipe.prompts.limit)
    return desc, [request_hash(key, p.chat, params, i) for p in prompts for i in range(recipe.generation.samples_per_prompt)]


def sampling_params(recipe: Recipe) -> dict:
    g = recipe.generation
    return {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "top_logprobs": g.top_logprobs, "seed": g.seed}


def generate(recipe: Recipe, teacher: Teacher | None = None) -> dict:
    """Returns counts: planned (requests in the recipe), sent (this run), done, failed (ledger)."""
    run = recipe.run_dir
    run.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run / "recipe.yaml")
    prompts = load_prompts(recipe.prompts.path, recipe.prompts.limit)
    params = sampling_params(recipe)
    with Ledger(run / "ledger.sqlite") as ledger:
        teacher = teacher or make_teacher(recipe)
        key = ledger.register_teacher(teacher.describe())
        todo = ledger.plan(key, prompts, params, recipe.generation.samples_per_prompt)
        # similar lengths together: less padding per batch
        todo.sort(key=lambda r: (sum(len(m["content"]) for m in r.messages), r.request_hash))
        if todo:
            session = ledger.start_session(recipe.sha256())
            size = recipe.generation.batch_size
            with progress("generate", len(todo)) as advance:
                for i in range(0, len(todo), size):
                    batch = todo[i:i + size]
                    ledger.record(session, teacher.complete(batch, params))
                    advance(len(batch))
        return {"planned": len(prompts) * recipe.generation.samples_per_prompt, "sent": len(todo), **ledger.counts()}

