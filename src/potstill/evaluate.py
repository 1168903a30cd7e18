"""The eval stage: teacher, student and baseline on the same held-out prompts, greedy decoding.

Per model: accuracy against the reference (per category), agreement with the teacher's answers,
per-token KL(teacher || student) on the teacher's own completions, parameters, size on disk and
generation tokens/s. Written to ``<run>/eval.json`` with provenance.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from potstill import skillmix
from potstill.card import write_card
from potstill.errors import PotstillError
from potstill.prompts import Prompt, load_prompts
from potstill.provenance import git_commit, library_versions
from potstill.recipe import Recipe
from potstill.teachers.base import Request
from potstill.teachers.local import LocalTeacher


def is_correct(verifier: str, prompt: Prompt, answer: str) -> bool | None:
    """None when the prompt has no reference to check against."""
    if verifier == "skillmix":
        return skillmix.verify(prompt.text, answer)
    ref = prompt.meta.get("answer")
    return None if ref is None else answer.strip() == str(ref).strip()


def greedy(model: LocalTeacher, prompts: list[Prompt], max_new_tokens: int, batch_size: int):
    """Greedy completions (text, token ids) and generation tokens/s over the whole set."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0, "seed": 0}
    requests = [Request(p.sha256, p.chat, 0, 0) for p in prompts]
    out = []
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        out += model.complete(requests[i:i + batch_size], params)
    seconds = time.perf_counter() - start
    return out, sum(len(c.token_ids) for c in out) / seconds


@torch.no_grad()
def kl_on_teacher_text(teacher: LocalTeacher, student: LocalTeacher, prompts: list[Prompt], completions,
                       batch_size: int) -> tuple[float, float]:
    """Mean per-token KL(teacher || student) and top-1 agreement, on the teacher's completions
    (full vocabulary, temperature 1)."""
    from potstill.teachers.local import prompt_ids

    tok = teacher.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kl_sum, top1, n = 0.0, 0, 0
    for s in range(0, len(prompts), batch_size):
        rows = [(prompt_ids(tok, p.chat), c.token_ids) for p, c in zip(prompts[s:s + batch_size], completions[s:s + batch_size])]
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), pad)
        att = torch.zeros_like(ids)
        mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # positions that predict a completion token
        for i, (a, b) in enumerate(rows):
            ids[i, :len(a) + len(b)] = torch.tensor(a + b)
            att[i, :len(a) + len(b)] = 1
            mask[i, len(a) - 1:len(a) + len(b) - 1] = True
        t = teacher.model(input_ids=ids, attention_mask=att).logits[:, :-1][mask].float().log_softmax(-1)  # (N, V)
        q = student.model(input_ids=ids, attention_mask=att).logits[:, :-1][mask].float().log_softmax(-1)
        kl_sum += (t.exp() * (t - q)).sum().item()
        top1 += (t.argmax(-1) == q.argmax(-1)).sum().item()
        n += t.shape[0]
    return kl_sum / max(n, 1), top1 / max(n, 1)


def evaluate(recipe: Recipe) -> dict:
    run = recipe.run_dir
    spec = recipe.eval
    prompts = load_prompts(spec.prompts, spec.limit)
    models = {"teacher": Path(recipe.teacher.path)}
    for name in ("student", "baseline"):
        if (run / name / "potstill.json").is_file():
            models[name] = run / name
    if len(models) == 1:
        raise PotstillError(f"no trained student in {run}: run `potstill train` first")

    results: dict[str, dict] = {}
    teacher = LocalTeacher(models["teacher"], dtype=recipe.teacher.dtype)
    teacher_out = None
    for name, path in models.items():
        model = teacher if name == "teacher" else LocalTeacher(path)
        if name != "teacher" and model.describe()["tokenizer_sha256"] != teacher.describe()["tokenizer_sha256"]:
            raise PotstillError(f"{path}: its tokenizer differs from the teacher's; eval compares token by token and needs the same one")
        completions, tokens_per_s = greedy(model, prompts, spec.max_new_tokens, spec.batch_size)
        if name == "teacher":
            teacher_out = completions
        by_cat: dict[str, list[bool]] = {}
        for p, c in zip(prompts, completions):
            ok = is_correct(spec.verifier, p, c.text)
            if ok is not None:
                by_cat.setdefault(str(p.meta.get("skill", "all")), []).append(ok)
        checked = [ok for v in by_cat.values() for ok in v]
        row = {
            "accuracy": sum(checked) / len(checked) if checked else None,
            "accuracy_by_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())},
            "agreement": sum(c.text == t.text for c, t in zip(completions, teacher_out)) / len(prompts),
            "parameters": sum(p.numel() for p in model.model.parameters()),
            "size_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
            "tokens_per_second": tokens_per_s,
            "weights_sha256": model.describe()["weights_sha256"],
        }
        if name == "teacher":
            row["kl_per_token"], row["top1_agreement"] = 0.0, 1.0
        else:
            row["kl_per_token"], row["top1_agreement"] = kl_on_teacher_text(teacher, model, prompts, teacher_out, spec.batch_size)
        row["samples"] = [{"prompt": p.text, "answer": c.text} for p, c in zip(prompts[:20], completions[:20])]
        results[name] = row

    report = {
        "models": results,
        "prompts": {"path": spec.prompts, "n": len(prompts),
                    "sha256": hashlib.sha256("".join(p.sha256 for p in prompts).encode()).hexdigest()},
        "provenance": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "versions": library_versions(), "git_commit": git_commit(), "machine": platform.machine(),
                       "threads": torch.get_num_threads(), "recipe_sha256": recipe.sha256(), "verifier": spec.verifier},
    }
    (run / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for name in models:
        if name != "teacher":
            write_card(models[name], report)  # the card now states the measured results
    return report
