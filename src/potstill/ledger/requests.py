"""What a recipe asks of the ledger: its sampling parameters, the prompts that fit the teacher's
context, and the request hashes train reads."""

from __future__ import annotations

from pathlib import Path

from potstill.errors import PotstillError
from potstill.ledger.store import requests_for, teacher_key
from potstill.prompts import Prompt, load_prompts
from potstill.recipe import Recipe


def sampling_params(recipe: Recipe) -> dict:
    g = recipe.generation
    params = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
              "top_logprobs": g.top_logprobs, "seed": g.seed}
    if g.stop:  # only when set: the params are part of every request hash
        params["stop"] = list(g.stop)
    return params


def n_tokens(recipe: Recipe) -> int | None:
    """How many ids the teacher's tokenizer has, when the recipe says where it is."""
    from potstill.teachers.openai.wire import load_tokenizer

    tokenizer = load_tokenizer(recipe.teacher)
    return None if tokenizer is None else len(tokenizer)


def recipe_requests(recipe: Recipe) -> tuple[dict, list[str]]:
    """The teacher's description and the request hashes this recipe asks for: what `train` reads
    from the ledger."""
    spec = recipe.teacher
    if spec.backend == "imported":
        from potstill.teachers.imported import imported_requests

        return imported_requests(spec.data, format=spec.format, teacher_id=recipe.teacher_id(),
                                 terms_family=spec.terms_family, terms_url=spec.terms_url, n_tokens=n_tokens(recipe))
    from potstill.teachers.backends import for_recipe

    backend = for_recipe(recipe)
    desc = backend.describe()
    prompts, _ = fitting_prompts(recipe, load_prompts(recipe.prompts.path, recipe.prompts.limit), backend.tokenizer)
    planned = requests_for(teacher_key(desc), prompts, sampling_params(recipe), recipe.generation.samples_per_prompt)
    return desc, [h for h, _, _ in planned]


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
    from potstill.teachers.local import prompt_ids

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
