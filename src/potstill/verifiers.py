"""Answer verifiers for eval, by name: ``verify(prompt, answer, reference) -> bool | None``.

``prompt`` is the last user message, ``answer`` the model's completion text, ``reference`` the
prompt file's other keys for that line (``answer``, ``skill``, ...). None means "nothing to
check against" (the prompt is left out of accuracy), never a silent zero.

The registry (``available``) is the built-ins (``BUILT_IN``: ``exact``, the completion, stripped,
equals ``reference["answer"]``) and every installed package's entry point in the
``potstill.verifiers`` group, so a task's checker ships with the task, e.g. in its pyproject.toml:

    [project.entry-points."potstill.verifiers"]
    skillmix = "potstill.tasks.skillmix:verify_example"

The recipe checks ``eval.verifier`` against it (``not_installed``); eval loads the one named (``load``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

Verifier = Callable[[str, str, dict], "bool | None"]


def exact(prompt: str, answer: str, reference: dict) -> bool | None:
    ref = reference.get("answer")
    return None if ref is None else answer.strip() == str(ref).strip()


BUILT_IN: dict[str, Verifier] = {"exact": exact}


def available() -> dict[str, Verifier | EntryPoint]:
    """Every verifier by name: the installed entry points (loaded only by ``load``) and the
    built-ins, which an entry point of the same name does not replace."""
    return {**{ep.name: ep for ep in entry_points(group="potstill.verifiers")}, **BUILT_IN}


def not_installed(name: str) -> str | None:
    """Why ``name`` is not a verifier (one line listing those there are), or None when it is."""
    options = available()
    if name in options:
        return None
    return f"eval.verifier {name!r} is not installed; available: {', '.join(sorted(options))}"


def load(name: str) -> Verifier:
    from potstill.errors import PotstillError

    found = available().get(name)
    if found is None:
        raise PotstillError(not_installed(name))
    return found.load() if isinstance(found, EntryPoint) else found
