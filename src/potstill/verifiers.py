"""Answer verifiers for eval: ``verify(prompt, answer, reference) -> bool | None``.

``prompt`` is the last user message, ``answer`` the model's completion text, ``reference`` the
prompt file's other keys for that line (``answer``, ``skill``, ...). None means "nothing to
check against" (the prompt is left out of accuracy), never a silent zero.

Built in: ``exact`` (the completion, stripped, equals ``reference["answer"]``). More come from
installed packages through the ``potstill.verifiers`` entry-point group, so a task's checker
ships with the task, e.g. in its pyproject.toml:

    [project.entry-points."potstill.verifiers"]
    skillmix = "potstill.tasks.skillmix:verify_example"
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

Verifier = Callable[[str, str, dict], "bool | None"]


def exact(prompt: str, answer: str, reference: dict) -> bool | None:
    ref = reference.get("answer")
    return None if ref is None else answer.strip() == str(ref).strip()


def available() -> dict[str, object]:
    found = {ep.name: ep for ep in entry_points(group="potstill.verifiers")}
    return {"exact": exact, **found}


def load(name: str) -> Verifier:
    from potstill.errors import PotstillError

    options = available()
    if name not in options:
        raise PotstillError(f"eval.verifier {name!r} is not installed; available: {', '.join(sorted(options))}")
    return exact if name == "exact" else options[name].load()
