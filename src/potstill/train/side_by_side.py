"""Train the student and the baseline at the same time, one process each: on a CPU with cores to
spare, or on a machine with a GPU for each.

Why: a small student on a CPU uses its cores badly. On 2 cores one training process runs a
quickstart step in about 27 ms with 2 threads and 40 ms with 1; two processes of 1 thread each
train both students in the time of one (docs/benchmarks.md, "Training both students side by
side"). With more cores each process gets ``cores // students`` threads.

Each student trains exactly as ``train`` would (same seed, data order and checkpoints), in a
spawned process. The children's progress and printed lines come back to this process through
one queue, so there is one set of bars; the first failure stops the other student and is raised
here as it was raised there.

On GPUs (``device`` auto or cuda, as many GPUs as students, no launcher) each student gets a GPU
of its own (``cuda:0``, ``cuda:1``): without this they would take turns on ``cuda:0`` while the
other GPUs idle. A student's recorded training section is unchanged: only where it runs moves.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import sys
import traceback
from collections.abc import Callable

from potstill.errors import PotstillError
from potstill.recipe import Recipe, TrainSpec


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def side_by_side_threads(recipe: Recipe, todo: list[tuple[str, TrainSpec]]) -> int:
    """Threads per student when ``todo`` should train side by side, else 0: two students or more,
    all on the CPU, at least a core each, and not already one of several ``accelerate launch``
    processes."""
    from potstill.devices import resolve_device

    if len(todo) < 2 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0
    if any(resolve_device(spec.device or recipe.device) != "cpu" for _, spec in todo):
        return 0
    return cpu_cores() // len(todo)


def side_by_side_gpus(recipe: Recipe, todo: list[tuple[str, TrainSpec]]) -> list[str]:
    """One CUDA device per student (cuda:0, cuda:1, ...) when ``todo`` should train at the same time
    on GPUs: two students or more, each asking for ``cuda`` or ``auto`` that resolves to CUDA (not a
    chosen cuda:N), at least a GPU each, and not already one of several ``accelerate launch``
    processes; else []."""
    import torch

    from potstill.devices import resolve_device

    if len(todo) < 2 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return []
    if any(resolve_device(spec.device or recipe.device) != "cuda" for _, spec in todo):
        return []
    if torch.cuda.device_count() < len(todo):
        return []
    return [f"cuda:{i}" for i in range(len(todo))]


def on_device(recipe: Recipe, device: str) -> Recipe:
    """``recipe`` with training on ``device``: what a side-by-side child trains with (train reads
    ``recipe.device_for("train")``; the student's own training section, recorded in its
    potstill.json, is left as it was)."""
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"device": device})})


def train_side_by_side(recipe: Recipe, todo: list[tuple[str, TrainSpec]], accept_terms_risk: str | None,
                       threads: int, devices: list[str] | None = None) -> None:
    """Train every ``(name, spec)`` of ``todo`` at once, ``threads`` torch threads each, on
    ``devices`` (one per student, from ``side_by_side_gpus``) or where the recipe says."""
    from potstill.progress import live_bars

    from transformers.utils import logging

    ctx = multiprocessing.get_context("spawn")  # fork would copy this process's torch thread pools
    events = ctx.Queue()
    bars_off = not logging.is_progress_bar_enabled()  # the CLI turns transformers' bars off; so do the children
    recipes = [on_device(recipe, device) for device in devices] if devices else [recipe] * len(todo)
    children = {name: ctx.Process(target=_child, args=(mine, spec, name, accept_terms_risk, threads, events,
                                                       bars_off),
                                  name=f"potstill-train-{name}", daemon=True)
                for (name, spec), mine in zip(todo, recipes, strict=True)}
    for child in children.values():
        child.start()
    running = set(children)
    try:
        with live_bars() as bars:
            while running:
                try:
                    kind, name, *rest = events.get(timeout=1.0)
                except queue_module.Empty:
                    for name in list(running):
                        if not children[name].is_alive() and events.empty():
                            raise PotstillError(f"training {name} side by side stopped without a word (exit code "
                                                f"{children[name].exitcode}); run `potstill train` to see why")
                    continue
                if kind == "total":
                    bars.add(name, f"train {name}", rest[0])
                elif kind == "advance":
                    bars.advance(name, rest[0])
                elif kind == "line":
                    bars.print(rest[0])
                elif kind == "error":
                    raise rest[0]
                elif kind == "done":
                    running.discard(name)
                    children[name].join()
    finally:
        for child in children.values():
            if child.is_alive():
                child.terminate()
            child.join()
        events.close()


class _Lines:
    """A child's stdout: whole lines go to the parent, which prints them above the bars."""

    def __init__(self, name: str, events):
        self.name, self.events, self.pending = name, events, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.events.put(("line", self.name, line))
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Send what is left of an unfinished last line."""
        if self.pending:
            self.events.put(("line", self.name, self.pending))
            self.pending = ""


def _child(recipe: Recipe, spec: TrainSpec, name: str, accept_terms_risk: str | None, threads: int, events,
           bars_off: bool) -> None:
    import torch
    from transformers.utils import logging

    from potstill import progress
    from potstill.train.loop import train

    torch.set_num_threads(threads)
    if bars_off:
        logging.disable_progress_bar()
    sys.stdout = lines = _Lines(name, events)
    progress.SINK = _sink(name, events)
    try:
        train(recipe, spec, name, accept_terms_risk)
        lines.close()
    except PotstillError as error:
        events.put(("error", name, error))
        return
    except BaseException as error:  # noqa: BLE001 - a bug: its traceback goes to the parent, which raises
        events.put(("line", name, traceback.format_exc()))
        events.put(("error", name, RuntimeError(f"training {name} side by side failed: {type(error).__name__}: "
                                                f"{error} (traceback above)")))
        return
    events.put(("done", name))


def _sink(name: str, events) -> Callable[[str, int], Callable[[int], None]]:
    """``progress``'s hook in a child: announce the bar's total, then send each advance."""

    def open_bar(description: str, total: int) -> Callable[[int], None]:
        events.put(("total", name, total))
        return lambda n: events.put(("advance", name, n))

    return open_bar
