"""`potstill run`: every stage in order, skipping what is up to date.

The rules, in one place: generation sends only the requests without a completion in the ledger (the
ledger's job); a student is retrained only when what it trains on or with changed: the fields of
its training section that it uses (``what_it_trains``), the student section, the intended use or
terms declaration, or the ledger's content hash (recorded in its ``potstill.json``); eval reruns when a student changed or the recipe hash differs; the report is
always rewritten (it is cheap).
"""

from __future__ import annotations

import json
import os
from typing import Callable

from potstill.losses import LOSSES
from potstill.recipe import Recipe, TrainSpec

# the train.* fields some loss reads (beta, alpha: potstill.losses.LOSSES); each changes only the
# models of the losses that read it
LOSS_PARAMS = tuple(dict.fromkeys(p for loss in LOSSES.values() for p in loss.params))
# the fields only logit KD reads: an SFT model is the same whatever they say
KD_ONLY = ("loss", *LOSS_PARAMS, "kd_ratio", "temperature", "teacher_signal", "lmbda", "on_policy_max_new_tokens")
# how an update is computed or kept, not what it is (the chunked loss equals the dense one within
# 1e-5, tested): changing them does not make another model
NOT_WHAT = ("chunk_size", "compile", "checkpoint_every", "keep_checkpoints", "resume")


def unused_fields(spec: TrainSpec) -> set[str]:
    """The fields of ``spec`` that do not change the model it trains (of the loss parameters, those
    its loss does not read)."""
    unused = set(NOT_WHAT)
    if spec.objective == "sft":
        return unused | set(KD_ONLY)
    if spec.teacher_signal != "on_policy":
        unused |= {"lmbda", "on_policy_max_new_tokens"}
    return unused | (set(LOSS_PARAMS) - set(LOSSES[spec.loss].params))


def baseline_spec(recipe: Recipe) -> TrainSpec | None:
    """The baseline's training section: the student's, with the baseline's fields over it. An SFT
    baseline takes none of the student's KD-only fields (it would not use them)."""
    if recipe.baseline is None:
        return None
    fields = {k: v for k, v in recipe.baseline.model_dump().items() if v is not None}
    merged = {**recipe.train.model_dump(), **fields}
    if merged["objective"] == "sft":
        defaults = TrainSpec().model_dump()
        merged.update({k: defaults[k] for k in KD_ONLY if k not in fields})
    return TrainSpec(**merged)


def students(recipe: Recipe) -> list[tuple[str, TrainSpec]]:
    """The models train writes: the student, and the baseline when the recipe has one."""
    out = [("student", recipe.train)]
    if (b := baseline_spec(recipe)) is not None:
        out.append(("baseline", b))
    return out


def student_is_current(recipe: Recipe, name: str, spec: TrainSpec, ledger_sha256: str) -> bool:
    """Whether ``name`` was trained from this training section (the fields it uses), student, ledger
    content, intended use and terms declaration (else the terms gate, too, must run again)."""
    info_path = recipe.run_dir / name / "potstill.json"
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text())
    terms = info.get("terms") or {}
    unused = unused_fields(spec)

    def used(fields: dict) -> dict:
        return {k: v for k, v in fields.items() if k not in unused}

    return (used(info["train"]) == used(spec.model_dump()) and info["ledger_sha256"] == ledger_sha256
            and info.get("student") == recipe.student.model_dump() and terms.get("use") == recipe.use
            and terms.get("declared") == recipe.teacher.terms_declared)


def eval_is_current(recipe: Recipe) -> bool:
    """Whether eval.json was written for this recipe (a retrained student makes it stale too)."""
    path = recipe.run_dir / "eval.json"
    return path.is_file() and json.loads(path.read_text())["provenance"]["recipe_sha256"] == recipe.sha256()


def train_students(recipe: Recipe, todo: list[tuple[str, TrainSpec]], accept_terms_risk: str | None = None,
                   say: Callable[[str], object] = print) -> None:
    """Train each ``(name, spec)``: side by side, one process each, on a CPU with a core per student
    or on a GPU each (train/side_by_side.py says why), else one after the other."""
    from potstill.train import train
    from potstill.train.side_by_side import cpu_cores, side_by_side_gpus, side_by_side_threads, train_side_by_side

    if todo:
        planned(recipe)
    names = " and ".join(name for name, _ in todo)
    if threads := side_by_side_threads(recipe, todo):
        say(f"train: {names} side by side, {threads} thread(s) each")
        train_side_by_side(recipe, todo, accept_terms_risk, threads)
    elif gpus := side_by_side_gpus(recipe, todo):
        say(f"train: {names} side by side, one GPU each ({', '.join(gpus)})")
        train_side_by_side(recipe, todo, accept_terms_risk, max(1, cpu_cores() // len(todo)), devices=gpus)
    else:
        for name, spec in todo:
            train(recipe, spec, name, accept_terms_risk)
    for name, _ in todo:
        say(f"train: wrote {recipe.run_dir / name}")


def main_process() -> bool:
    """Not one of the other processes of a multi-process launch (RANK, as `accelerate launch` and
    torchrun set it): eval and the report run once, in the first."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def planned(recipe: Recipe) -> None:
    """Make sure the ledger holds the recipe's plan, which train reads: a ledger written before
    plans were kept, or a recipe whose prompts, teacher or generation changed since generate, is
    planned here as generate plans (nothing is sent). Without a ledger, train says to generate."""
    from potstill.generate import record_plan
    from potstill.ledger import Ledger
    from potstill.ledger.plans import plan_key, prompt_limit

    path = recipe.run_dir / "ledger.sqlite"
    if not path.is_file():
        return
    with Ledger(path) as ledger:
        if ledger.plan(plan_key(recipe), prompt_limit(recipe)) is not None:
            return
    record_plan(recipe)


def run_all(recipe: Recipe, accept_terms_risk: str | None = None, *,
            generated: Callable[[dict], object] = lambda counts: None,
            say: Callable[[str], object] = print) -> dict:
    """Every stage in order; returns eval's report. ``generated`` gets generate's counts (failed
    requests do not stop the run: train leaves them out and says so); ``say`` gets one line per
    stage kept or written."""
    from potstill.evaluate import evaluate
    from potstill.generate import generate
    from potstill.ledger import Ledger
    from potstill.ledger.plans import recipe_plan
    from potstill.report import write_report

    generated(generate(recipe))
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        # train.data ledger trains on every done row, and hashes them all (train/loop.py: ledger_examples)
        hashes = None if recipe.train.data == "ledger" else recipe_plan(ledger, recipe)[1]
        ledger_sha256 = ledger.content_sha256(hashes)
    todo = []
    for name, spec in students(recipe):
        if student_is_current(recipe, name, spec, ledger_sha256):
            say(f"train: {name} is up to date, kept")
        else:
            todo.append((name, spec))
    train_students(recipe, todo, accept_terms_risk, say)
    if not main_process():  # eval is one process's work: the first of a launch evaluates and reports for all
        return {}
    if todo or not eval_is_current(recipe):
        report = evaluate(recipe)
    else:
        say("eval: up to date, kept")
        report = json.loads((recipe.run_dir / "eval.json").read_text())
    say(f"report: wrote {write_report(recipe.run_dir)}")
    return report
