"""One way to ask a teacher. ``BACKENDS`` is the registry of ``teacher.backend`` names; ``for_recipe``
builds the one the recipe names; ``ask`` plans the requests, keeps those the ledger lacks, and has
the backend answer them into the ledger. generate and eval both call ``ask``; neither knows which
backend answers.

A backend is built as ``Backend(recipe, teacher=None, online=False)`` and has a ``tokenizer`` (None
for an HTTP teacher without one), ``describe()`` (provenance, computed without loading weights or
calling an endpoint: its hash is part of every request hash) and ``reads_prompts``. One that reads
the recipe's prompts answers them: ``answer(requests, params, ledger, session, key)`` stores each
answer in the ledger and returns why sending stopped early (budget, a non-retryable error), or None.
One that does not (``imported``) has a file that holds the prompts and the answers at once:
``plan()`` gives its description and the hashes of its rows, ``store(ledger)`` puts the file in the
ledger. A new backend is a class here (or in its own module) and a line in ``BACKENDS``, plus its
name and required fields in the recipe's ``TeacherSpec`` (docs/extending.md).
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from potstill.errors import PotstillError
from potstill.ledger.store import Ledger, requests_for
from potstill.progress import progress
from potstill.prompts import Prompt
from potstill.recipe import Recipe
from potstill.records import Request
from potstill.teachers.base import Teacher


class Backend(Protocol):
    tokenizer: object | None
    reads_prompts: bool  # False: its own file holds the prompts and the answers (plan, store; no answer)

    def describe(self) -> dict:
        """The teacher's provenance: id, backend, weights or endpoint, tokenizer and template hashes, terms."""

    def answer(self, requests: list[Request], params: dict, ledger: Ledger, session: int, key: str) -> str | None:
        """Answer ``requests`` into ``ledger``; why sending stopped early, or None."""


def make_teacher(recipe: Recipe) -> Teacher:
    from potstill.hf import LocalModel

    spec = recipe.teacher
    return LocalModel(spec.path, id=recipe.teacher_id(), revision=spec.revision, terms_family=spec.terms_family,
                      terms_url=spec.terms_url, dtype=spec.dtype, device=recipe.device_for("teacher"),
                      use_generation_config=spec.use_generation_config, trust_remote_code=spec.trust_remote_code,
                      watermark=recipe_watermark(recipe))


def recipe_watermark(recipe: Recipe):
    """teacher.watermark's Watermark (its key read from key_file), or None."""
    from potstill.watermark import load_watermark

    w = recipe.teacher.watermark
    return load_watermark(w.key_file, w.gamma, w.delta, w.context) if w else None


class LocalBackend:
    """A Hugging Face model folder, generated from here in batches; the weights load on the first
    answer, so a rerun with nothing to ask never loads them. ``teacher``: the model already loaded."""

    reads_prompts = True

    def __init__(self, recipe: Recipe, teacher: Teacher | None = None, online: bool = False):
        from potstill.hf import check_model_dir, load_tokenizer_dir

        self.recipe, self._teacher = recipe, teacher
        spec = recipe.teacher
        # the folder is checked first: a folder without safetensors is refused for that, whatever its tokenizer
        self.tokenizer = load_tokenizer_dir(check_model_dir(spec.path, "teacher"), "teacher tokenizer",
                                            spec.trust_remote_code)

    def describe(self) -> dict:
        if self._teacher is not None:
            return self._teacher.describe()
        from potstill.hf import describe_local

        spec = self.recipe.teacher
        return describe_local(Path(spec.path), self.tokenizer, id=self.recipe.teacher_id(), revision=spec.revision,
                              terms_family=spec.terms_family, dtype=spec.dtype, terms_url=spec.terms_url,
                              use_generation_config=spec.use_generation_config,
                              trust_remote_code=spec.trust_remote_code,
                              watermark=recipe_watermark(self.recipe).describe() if spec.watermark else None)

    def answer(self, requests: list[Request], params: dict, ledger: Ledger, session: int, key: str) -> None:
        teacher = self._teacher = self._teacher or make_teacher(self.recipe)
        batch_size = self.recipe.generation.batch_size
        # similar lengths together: less padding per batch
        requests = sorted(requests, key=lambda r: (sum(len(m["content"]) for m in r.messages), r.request_hash))
        with progress("generate", len(requests)) as advance:
            for i in range(0, len(requests), batch_size):
                batch = requests[i:i + batch_size]
                ledger.record(session, teacher.complete(batch, params))
                advance(len(batch))
        return None


class HTTPBackend:
    """An OpenAI-compatible endpoint, one request at a time with retries (``potstill.teachers.openai.dispatch``)."""

    reads_prompts = True

    def __init__(self, recipe: Recipe, teacher: Teacher | None = None, online: bool = False, label: str = "generate"):
        from potstill.teachers.openai.wire import load_tokenizer

        self.recipe, self.spec = recipe, recipe.teacher  # spec: how to send (a judge's: eval.judge as a teacher)
        self.tokenizer = load_tokenizer(recipe.teacher)
        self.label = label  # the progress bar's name

    def describe(self) -> dict:
        from potstill.teachers.openai.wire import describe_openai

        return describe_openai(self.recipe.teacher, self.tokenizer, self.recipe.teacher_id())

    def answer(self, requests: list[Request], params: dict, ledger: Ledger, session: int, key: str) -> str | None:
        from potstill.teachers.openai.dispatch import dispatch

        return dispatch(self.spec, params, requests, ledger, session, key, self.tokenizer, self.label)


class BatchBackend(HTTPBackend):
    """OpenAI's Batch API: files of requests, collected when done (``potstill.teachers.openai.batch``).
    ``online``: one request at a time instead, as ``openai`` (a few hundred held-out prompts do not
    need a day's batch)."""

    def __init__(self, recipe: Recipe, teacher: Teacher | None = None, online: bool = False):
        super().__init__(recipe)
        self.online = online

    def answer(self, requests: list[Request], params: dict, ledger: Ledger, session: int, key: str) -> str | None:
        if self.online:
            return super().answer(requests, params, ledger, session, key)
        from potstill.teachers.openai.batch import run_batches

        return run_batches(self.spec, params, requests, ledger, session, key, self.tokenizer)


class ImportedBackend:
    """Completions someone already has (teacher.data: OpenAI chat JSONL, or JSONL / Parquet of prompt +
    response; ``teachers/imported.py``). The file holds the prompts and the answers at once, so it
    reads no prompt file and answers nothing: its generate step stores the file in the ledger."""

    reads_prompts = False

    def __init__(self, recipe: Recipe, teacher: Teacher | None = None, online: bool = False):
        from potstill.teachers.openai.wire import load_tokenizer

        spec = recipe.teacher
        tokenizer = self.tokenizer = load_tokenizer(spec)  # when known, an id past it stops the import
        self.path = spec.data
        self.how = dict(format=spec.format, teacher_id=recipe.teacher_id(), terms_family=spec.terms_family,
                        terms_url=spec.terms_url, n_tokens=None if tokenizer is None else len(tokenizer))

    def describe(self) -> dict:
        from potstill.teachers.imported import imported_description

        return imported_description(self.path, **self.how)

    def plan(self) -> tuple[dict, list[str]]:
        """The description and the request hashes of the file's rows, in file order (no ledger needed)."""
        from potstill.teachers.imported import imported_requests

        return imported_requests(self.path, **self.how)

    def store(self, ledger: Ledger) -> dict:
        """The file into ``ledger`` (idempotent); counts: read, new, already, skipped (and why)."""
        from potstill.teachers.imported import import_file

        return import_file(ledger, self.path, **self.how)


# teacher.backend -> the class that answers for it
BACKENDS: dict[str, type[Backend]] = {
    "local": LocalBackend,
    "openai": HTTPBackend,
    "openai_batch": BatchBackend,
    "imported": ImportedBackend,
}


def for_recipe(recipe: Recipe, teacher: Teacher | None = None, online: bool = False) -> Backend:
    """The recipe's teacher backend. ``teacher``: an already loaded local teacher; ``online``:
    answer a few requests now, never through a batch job (eval's held-out prompts)."""
    return BACKENDS[recipe.teacher.backend](recipe, teacher, online)


@dataclass
class Asked:
    key: str  # the teacher's key in the ledger
    planned: list[tuple]  # (request_hash, prompt, sample_index) for every request asked for
    sent: int  # requests the ledger lacked, sent this time
    stopped: str | None  # why sending stopped early, or None

    @property
    def hashes(self) -> list[str]:
        return [h for h, _, _ in self.planned]


def ask(backend: Backend, ledger: Ledger, prompts: list[Prompt], params: dict, recipe_sha256: str,
        samples_per_prompt: int = 1, shard: tuple[int, int] | None = None) -> Asked:
    """Plan the requests for ``prompts``, keep those ``ledger`` has no answer for, and have the
    backend answer them into it (one session, recorded with the recipe's hash, when it ended and
    why it stopped early)."""
    key = ledger.register_teacher(backend.describe())
    planned = requests_for(key, prompts, params, samples_per_prompt, shard)
    todo = ledger.add_requests(key, planned, params)
    if not todo:
        return Asked(key, planned, 0, None)
    session = ledger.start_session(recipe_sha256)
    try:
        stopped = backend.answer(todo, params, ledger, session, key)
    except PotstillError as e:  # a ledger that cannot be written, a teacher that cannot start: kept if it can be
        with contextlib.suppress(sqlite3.Error):
            ledger.end_session(session, str(e))
        raise
    ledger.end_session(session, stopped)  # why it stopped early is kept, not only printed
    return Asked(key, planned, len(todo), stopped)
