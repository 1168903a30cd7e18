"""Which requests a recipe asks the ledger for. ``generate`` plans them (it knows the teacher: its
description, its tokenizer, the prompts that fit its context) and records the plan in the ledger
under the recipe's plan key; ``train`` and ``run`` read it back and never plan again.

The plan key hashes everything that decides the plan without running it: the recipe's
``prompts`` (but ``prompts.limit``), ``teacher`` and ``generation`` sections, and the size and
modification time of every file they name (the prompts file, an imported teacher's file, the
teacher's model and tokenizer folders, a watermark key). A plan keeps each request's prompt index
and the ``prompts.limit`` it was made for, so it serves any recipe asking for as many prompts or
fewer. Change anything else and the recipe has no plan until ``generate`` (or ``potstill train``,
which plans, sending nothing) records one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from potstill.errors import PotstillError
from potstill.ledger.store import Ledger
from potstill.recipe import Recipe

PLANNED_SECTIONS = {"prompts", "teacher", "generation"}


def _stamps(path: str | None) -> list:
    """(path, size, mtime) of a file, or of each file directly in a folder; what is missing is said so."""
    if not path:
        return []
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    stamps = []
    for f in files:
        try:
            st = os.stat(f)
            stamps.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            stamps.append([str(f), None, None])
    return stamps


def plan_key(recipe: Recipe) -> str:
    """The key generate records the recipe's plan under (see the module docstring)."""
    t = recipe.teacher
    files = [recipe.prompts.path if recipe.prompts else None, t.data, t.path, t.tokenizer_dir,
             t.watermark.key_file if t.watermark else None]
    sections = recipe.model_dump(mode="json", include=PLANNED_SECTIONS)
    if sections.get("prompts"):
        sections["prompts"].pop("limit")  # a plan serves every limit up to its own (Ledger.plan)
    payload = {"sections": sections, "files": [_stamps(f) for f in files]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def recipe_plan(ledger: Ledger, recipe: Recipe) -> tuple[dict, list[str]]:
    """The teacher's description and the request hashes of the recipe's plan, as generate recorded
    them; one clear error when the ledger has none for this recipe."""
    plan = ledger.plan(plan_key(recipe), prompt_limit(recipe))
    if plan is None:
        raise PotstillError(f"{ledger.path} has no plan for this recipe's prompts, teacher and generation sections "
                            f"(or a file they name changed since, or it asks for more prompts): run `potstill generate` (it sends only what the "
                            f"ledger lacks) or `potstill train`, which plans first")
    return plan


def prompt_limit(recipe: Recipe) -> int | None:
    """How many of the prompt file's prompts the recipe asks for (None: all, or an imported teacher's file)."""
    return recipe.prompts.limit if recipe.prompts else None
