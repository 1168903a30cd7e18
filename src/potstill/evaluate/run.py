"""The eval stage: teacher, student and baseline on the same held-out prompts, greedy decoding.

Per model: accuracy against the reference (per category, with a 95% bootstrap interval), ROUGE-L
against the reference, agreement with the teacher's answers, per-token KL(teacher || model),
top-1 agreement and perplexity on the teacher's own completions, a judge's win rate against the
teacher (when the recipe names a judge), parameters, size on disk, generation tokens/s (batched)
and latency (one request alone), and each student as a speculative-decoding draft of the teacher
(acceptance from the same logits as KL, and a measured assisted-generation run:
:mod:`potstill.evaluate.draft`). Written to ``<run>/eval.json`` with provenance.

The per-token metrics need the model to read the teacher's token ids. A student with another
tokenizer (sequence-level KD, ``train.objective=sft``) gets them as null, with the reason under
``not_applicable``; everything measured on text applies to any student.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

from potstill.errors import PotstillError
from potstill import verifiers
from potstill.evaluate.draft import GAMMA, Acceptance, expected_tokens_per_step, measure_assisted, universal_gap
from potstill.evaluate.judge import HTTPJudge, judge_pairs
from potstill.hf import LocalModel
from potstill.progress import progress
from potstill.prompts import Prompt, load_prompts
from potstill.provenance import git_commit, library_versions
from potstill.receipts.card import add_results
from potstill.recipe import Recipe
from potstill.records import Request, greedy_params

SPEED_TIMINGS = 3  # tokens/s is the median of at least this many timed batches, after an untimed warm-up


def greedy(model: LocalModel, prompts: list[Prompt], max_new_tokens: int, batch_size: int):
    """Greedy completions (text, token ids) and the generation speed: tokens/s of each batch of the
    first batch's size, after an untimed warm-up (a model's first calls allocate and pick kernels;
    timed cold, one run of the same model read 291 tokens/s and the next 5,021), re-timing the first
    batch until there are ``SPEED_TIMINGS``. The median is the figure, the range its spread."""
    params = greedy_params(max_new_tokens)
    requests = [Request(p.sha256, p.chat, 0, 0) for p in prompts]
    if not requests:
        return [], {"tokens_per_second": None, "tokens_per_second_range": None}
    model.complete(requests[:min(batch_size, 8)], params)  # warm-up, untimed

    def timed(batch: list[Request]):
        start = time.perf_counter()
        done = model.complete(batch, params)
        return done, sum(len(c.token_ids) for c in done) / (time.perf_counter() - start)

    size = min(batch_size, len(requests))
    out, rates = [], []
    for i in range(0, len(requests), batch_size):
        done, rate = timed(requests[i:i + batch_size])
        out += done
        if len(done) == size:  # batches of one size compare; a short last batch runs at another speed
            rates.append(rate)
    while len(rates) < SPEED_TIMINGS:
        rates.append(timed(requests[:size])[1])
    return out, {"tokens_per_second": statistics.median(rates), "tokens_per_second_range": [min(rates), max(rates)]}


TOKEN_METRICS = ("kl_per_token", "top1_agreement", "perplexity_teacher_text")


@torch.no_grad()
def completion_logits(model: LocalModel, prompts: list[Prompt], completions) -> torch.Tensor:
    """(N, V) float32 logits of ``model`` at the N positions that predict the completions' tokens
    (all completions, in order), each prompt formatted with the model's own chat template."""
    from potstill.hf import prompt_ids

    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [(prompt_ids(tok, p.chat), c.token_ids) for p, c in zip(prompts, completions)]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad)
    att = torch.zeros_like(ids)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # positions that predict a completion token
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        att[i, :len(a) + len(b)] = 1
        mask[i, len(a) - 1:len(a) + len(b) - 1] = True
    device = model.model.device
    logits = model.model(input_ids=ids.to(device), attention_mask=att.to(device)).logits[:, :-1]
    return logits[mask.to(device)].float()


def score_teacher_text(teacher: LocalModel, model: LocalModel, prompts: list[Prompt], completions,
                       batch_size: int, accept: Acceptance | None = None) -> dict:
    """On the teacher's own completions (full vocabulary, temperature 1): mean per-token
    KL(teacher || model), top-1 agreement, and the model's perplexity of the teacher's text.
    Needs the teacher's token ids to be the model's; each sees the prompt in its own chat template.
    ``accept`` gets the same logits: the model as a draft (acceptance), at no second forward pass."""
    kl_sum, nll_sum, top1, n = 0.0, 0.0, 0, 0
    for s in range(0, len(prompts), batch_size):
        batch_p, batch_c = prompts[s:s + batch_size], completions[s:s + batch_size]
        t = completion_logits(teacher, batch_p, batch_c)  # (N, V_teacher)
        q = completion_logits(model, batch_p, batch_c).to(t.device)  # (N, V_model)
        targets = torch.tensor([i for c in batch_c for i in c.token_ids], device=t.device)  # (N,) the teacher's tokens
        shared = min(t.shape[-1], q.shape[-1])  # padded vocabularies: compare on the rows both have
        if accept is not None:  # each position's category and index in its answer
            accept.add(t[:, :shared], q[:, :shared], [category(p) for p, c in zip(batch_p, batch_c) for _ in c.token_ids],
                       [i for c in batch_c for i in range(len(c.token_ids))])
        t, q = t[:, :shared].log_softmax(-1), q[:, :shared].log_softmax(-1)
        kl_sum += (t.exp() * (t - q)).sum().item()
        nll_sum -= q.gather(-1, targets[:, None]).sum().item()
        top1 += (t.argmax(-1) == q.argmax(-1)).sum().item()
        n += t.shape[0]
    n = max(n, 1)
    return {"kl_per_token": kl_sum / n, "top1_agreement": top1 / n, "perplexity_teacher_text": math.exp(nll_sum / n)}


@torch.no_grad()
def answer_logliks(model: LocalModel, prompts: list[Prompt], completions, batch_size: int,
                   own_ids: bool = False) -> list[float]:
    """Each answer's log-likelihood under ``model`` at temperature 1, teacher-forced after the prompt
    in the model's own chat template: the model's own tokens of the answer's text (``own_ids``: the
    answer's token ids, when they are the model's), with its EOS when the answer stopped."""
    tok, out = model.tokenizer, []
    for s in range(0, len(prompts), batch_size):
        batch_p, batch_c = prompts[s:s + batch_size], completions[s:s + batch_size]
        rows = [SimpleNamespace(token_ids=list(c.token_ids) if own_ids else
                                tok(c.text, add_special_tokens=False)["input_ids"]
                                + ([tok.eos_token_id] if c.finish_reason == "stop" and tok.eos_token_id is not None
                                   else [])) for c in batch_c]
        logits = completion_logits(model, batch_p, rows)  # (N, V)
        targets = torch.tensor([i for r in rows for i in r.token_ids], dtype=torch.long, device=logits.device)
        per_token = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].tolist() if len(targets) else []
        start = 0
        for r in rows:
            out.append(sum(per_token[start:start + len(r.token_ids)]))
            start += len(r.token_ids)
    return out


def kl_per_byte(teacher_ll: list[float], model_ll: list[float], completions) -> float:
    """sum(log p_teacher - log p_model) over the teacher's answers / their bytes: how much less likely
    the model finds the teacher's answers than the teacher does, per byte of text. Every tokenizer
    spells the same bytes, so models of any tokenizer compare on it (on the teacher's greedy answers:
    a KL-type gap, not an unbiased KL estimate; 0 for the teacher)."""
    n_bytes = sum(len(c.text.encode("utf-8")) for c in completions) or 1
    return (sum(teacher_ll) - sum(model_ll)) / n_bytes


def token_level_gap(name: str, model: LocalModel, teacher: LocalModel) -> str | None:
    """Why the per-token metrics (KL, top-1, perplexity of the teacher's text) do not apply to
    this model, or None when they do."""
    if model.describe()["tokenizer_sha256"] != teacher.describe()["tokenizer_sha256"]:
        return (f"the {name}'s tokenizer differs from the teacher's, so token i is not the same token in both "
                f"whatever it was trained on; compare KL/byte and the text-level metrics")
    return None


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence; Lin 2004) as Google's ``rouge_score`` computes it, so
    that figures compare with published ones: lowercased, tokens are runs of ASCII letters and
    digits (punctuation dropped), no stemming; 0.0 when either side has no token."""
    return _rouge_scorer().score(reference, candidate)["rougeL"].fmeasure


@functools.cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer  # imports nltk (about a second): only when eval scores

    return RougeScorer(["rougeL"], use_stemmer=False)


def bootstrap_ci(values: list[float], n: int = 1000, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of the mean (resampling prompts)."""
    if not values:
        return None
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return [means[int(0.025 * n)], means[int(0.975 * n) - 1]]


def latency_ms(model: LocalModel, prompts: list[Prompt], max_new_tokens: int, n: int = 8) -> float:
    """Median wall time of one request alone (batch size 1), in milliseconds."""
    params = greedy_params(max_new_tokens)
    times = []
    for p in prompts[:n]:
        start = time.perf_counter()
        model.complete([Request(p.sha256, p.chat, 0, 0)], params)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def lm_eval_scores(path: Path, spec, batch_size: int, device: str) -> dict:
    """Scores of lm-evaluation-harness tasks for the model at ``path``, through its Python API."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PotstillError("eval.lm_eval needs lm-evaluation-harness: pip install 'potstill[lm_eval]'") from None
    manager = TaskManager(include_path=spec.include_path) if spec.include_path else TaskManager()
    unknown = [t for t in spec.tasks if t not in manager.all_tasks]
    if unknown:
        raise PotstillError(f"eval.lm_eval.tasks: {', '.join(unknown)} not found (built in, or a YAML under "
                            f"eval.lm_eval.include_path)")
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(path), "dtype": "float32"},
                                  tasks=spec.tasks, task_manager=manager, device=device, batch_size=batch_size,
                                  limit=spec.limit, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in out["results"].items()}


def http_teacher_answers(recipe: Recipe, prompts: list[Prompt]) -> list:
    """The HTTP teacher's greedy answers to the held-out prompts, asked as generate asks (``ask``) and
    into a ledger of their own (``eval-ledger.sqlite``): a rerun pays for none of them again."""
    from potstill.ledger import Ledger
    from potstill.teachers.backends import ask, for_recipe

    params = greedy_params(recipe.eval.max_new_tokens)
    with Ledger(recipe.run_dir / "eval-ledger.sqlite") as ledger:
        # online even for an openai_batch teacher: a few hundred prompts do not need a day's batch
        asked = ask(for_recipe(recipe, online=True), ledger, prompts, params, recipe.sha256())
        if asked.stopped:
            raise PotstillError(f"the teacher's held-out answers stopped: {asked.stopped}; rerun eval to resume")
        hashes = asked.hashes
        answers = {ex.request_hash: ex for ex in ledger.examples(hashes)}
    missing = [h for h in hashes if h not in answers]
    if missing:
        raise PotstillError(f"the teacher failed {len(missing)} of {len(hashes)} held-out prompts (reasons in "
                            f"{recipe.run_dir / 'eval-ledger.sqlite'}); rerun eval to retry them")
    return [answers[h] for h in hashes]


def evaluate(recipe: Recipe) -> dict:
    """With the teacher's weights (``teacher.path``) every model is scored the same way. Without
    them (an API teacher), the teacher's answers come over HTTP, and what needs its distribution
    (KL, top-1, perplexity of its text) or its weights (size, speed) is left out; an imported
    teacher without weights has no row at all."""
    start = time.perf_counter()
    spec = recipe.eval
    prompts = load_prompts(spec.prompts, spec.limit, need_user=True)
    models = models_to_score(recipe)
    device = recipe.device_for("eval")
    teacher = LocalModel(models["teacher"], dtype=recipe.teacher.dtype, device=device,
                         use_generation_config=recipe.teacher.use_generation_config,
                         trust_remote_code=recipe.teacher.trust_remote_code) if models.get("teacher") else None
    judge = make_judge(recipe, device)
    verify = verifiers.load(spec.verifier)
    results: dict[str, dict] = {}
    teacher_out = None  # the teacher's answers: scored first, then every other model against them
    reference: dict = {}  # the teacher alone in the measured draft runs: timed once for every student
    with progress("eval", len(models)) as advance:
        for name, path in models.items():
            if name == "teacher" and teacher is None:  # an API teacher: its answers over HTTP, no weights
                model, completions, speed = None, http_teacher_answers(recipe, prompts), {}
            else:
                model = teacher if name == "teacher" else LocalModel(path, device=device)
                completions, speed = greedy(model, prompts, spec.max_new_tokens, spec.batch_size)
            if name == "teacher":
                teacher_out = completions
            row = answer_metrics(prompts, completions, teacher_out, verify)
            if model is not None:
                row.update(model_metrics(model, Path(path), prompts, spec.max_new_tokens), **speed)
            if model is not None and teacher is not None:
                if name == "teacher":
                    teacher_ll = answer_logliks(teacher, prompts, teacher_out, spec.batch_size, own_ids=True)
                model_ll = teacher_ll if name == "teacher" else answer_logliks(model, prompts, teacher_out,
                                                                               spec.batch_size)
                row["kl_per_byte"] = kl_per_byte(teacher_ll, model_ll, teacher_out)
                accept = None
                if gap := token_level_gap(name, model, teacher):
                    row.update({key: None for key in TOKEN_METRICS}, not_applicable=dict.fromkeys(TOKEN_METRICS, gap))
                else:
                    accept = Acceptance(recipe.generation.temperature)
                    row.update(score_teacher_text(teacher, model, prompts, teacher_out, spec.batch_size, accept))
                draft_metrics(row, recipe, name, teacher, model, prompts, accept, gap, reference)
            if spec.lm_eval is not None and path is not None:
                row["lm_eval"] = lm_eval_scores(Path(path), spec.lm_eval, spec.batch_size, device)
            if judge is not None and name != "teacher" and teacher_out is not None:
                row["judge"] = judged(judge, prompts, completions, teacher_out, spec)
            row["samples"] = [{"prompt": p.text, "answer": c.text} for p, c in zip(prompts[:20], completions[:20])]
            results[name] = row
            advance(1)
    report = {"models": results, "prompts": prompts_record(spec.prompts, prompts),
              "draft_cost": draft_cost(results, time.perf_counter() - start),
              "provenance": eval_provenance(recipe, device, judge)}
    (recipe.run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, path in models.items():
        if name != "teacher":
            add_results(path, report)
    return report


def draft_metrics(row: dict, recipe: Recipe, name: str, teacher: LocalModel, model: LocalModel,
                  prompts: list[Prompt], accept: Acceptance | None, gap: str | None, reference: dict) -> None:
    """The model as a speculative-decoding draft of the teacher (:mod:`potstill.evaluate.draft`), into
    ``row``: ``acceptance`` for the table (alpha at the recipe's sampling temperature; at greedy when
    it samples greedily), and ``draft``: alpha at greedy and at T, the expected tokens per step for
    gamma = 1..8, by category and position, the teacher it was measured against, and (students) the
    measured assisted-generation run."""
    draft = accept.summary() if accept is not None else {"temperature": recipe.generation.temperature or None,
                                                         "alpha": None, "expected_tokens_per_step": None}
    if accept is None:
        row["acceptance"] = None
        row.setdefault("not_applicable", {})["acceptance"] = gap
    else:
        row["acceptance"] = draft["alpha"]["sampled"] if draft["temperature"] else draft["alpha"]["greedy"]
    info = teacher.describe()
    draft["teacher"] = {"id": recipe.teacher.id or info.get("id"), "weights_sha256": info.get("weights_sha256")}
    draft["measured"] = None
    if name != "teacher" and prompts:
        if gap and (why := universal_gap(teacher, model)):
            row.setdefault("not_applicable", {})["draft_measured"] = why
        else:
            measured = measure_assisted(teacher, model, prompts, recipe.eval.max_new_tokens, same_tokenizer=gap is None,
                                        reference=reference)
            if accept is not None:  # the i.i.d. estimate at the measured gamma, beside the measurement
                measured["expected_tokens_per_step"] = expected_tokens_per_step(draft["alpha"]["greedy"], GAMMA)
            draft["measured"] = measured
    row["draft"] = draft


def draft_cost(results: dict, eval_seconds: float) -> dict:
    """What the draft figures cost in this eval: the acceptance sums (on logits eval computes anyway)
    and the measured assisted-generation runs, in seconds and as a share of the rest of eval."""
    acceptance = sum((m.get("draft") or {}).get("seconds", 0.0) for m in results.values())
    assisted = sum(((m.get("draft") or {}).get("measured") or {}).get("seconds", 0.0) for m in results.values())
    rest = eval_seconds - acceptance - assisted
    return {"eval_seconds": eval_seconds, "acceptance_seconds": acceptance, "assisted_seconds": assisted,
            "added_share": (acceptance + assisted) / rest if rest > 0 else None}


def models_to_score(recipe: Recipe) -> dict[str, Path | None]:
    """teacher (its folder; None for an API teacher answering over HTTP; absent for an imported
    teacher without weights), then the students the run has."""
    run = recipe.run_dir
    models: dict[str, Path | None] = {}
    if recipe.teacher.path is not None or recipe.teacher.http:
        models["teacher"] = None if recipe.teacher.path is None else Path(recipe.teacher.path)
    for name in ("student", "baseline"):
        if (run / name / "potstill.json").is_file():
            models[name] = run / name
    if not {"student", "baseline"} & models.keys():
        raise PotstillError(f"no trained student in {run}: run `potstill train` first")
    return models


def category(prompt: Prompt) -> str:
    """The category a prompt is reported under (its ``skill``)."""
    return str(prompt.meta.get("skill", "all"))


def answer_metrics(prompts: list[Prompt], completions, teacher_out, verify) -> dict:
    """What the answers' text says, for any model: accuracy (per category, 95 % bootstrap CI),
    ROUGE-L against the reference, agreement with the teacher's answers, answer lengths."""
    by_cat: dict[str, list[bool]] = {}
    for p, c in zip(prompts, completions):
        ok = verify(p.text, c.text, p.meta)
        if ok is not None:
            by_cat.setdefault(category(p), []).append(ok)
    checked = [float(ok) for v in by_cat.values() for ok in v]
    agree = None if teacher_out is None else [float(c.text == t.text) for c, t in zip(completions, teacher_out)]
    rouge = [rouge_l(c.text, str(p.meta["answer"])) for p, c in zip(prompts, completions) if "answer" in p.meta]
    return {
        "accuracy": sum(checked) / len(checked) if checked else None,
        "accuracy_ci95": bootstrap_ci(checked),
        "accuracy_by_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())},
        "rouge_l": sum(rouge) / len(rouge) if rouge else None,
        "agreement": None if agree is None else sum(agree) / len(agree),
        "agreement_ci95": None if agree is None else bootstrap_ci(agree),
        "parameters": None, "size_bytes": None, "tokens_per_second": None, "tokens_per_second_range": None,
        "latency_ms": None,
        "weights_sha256": None,  # filled by model_metrics when the weights are here
        "completion_lengths": [len(c.token_ids) for c in completions if c.token_ids is not None],
    }


def model_metrics(model: LocalModel, path: Path, prompts: list[Prompt], max_new_tokens: int) -> dict:
    """What only local weights tell: parameters, size on disk, latency, the weights' hash."""
    return {"parameters": sum(p.numel() for p in model.model.parameters()),
            "size_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
            "latency_ms": latency_ms(model, prompts, max_new_tokens),
            "weights_sha256": model.describe()["weights_sha256"]}


def prompts_record(path: str, prompts: list[Prompt]) -> dict:
    return {"path": path, "n": len(prompts),
            "sha256": hashlib.sha256("".join(p.sha256 for p in prompts).encode()).hexdigest()}


EVAL_LIBRARIES = ("rouge-score", "numpy")  # ROUGE-L and the bootstrap intervals


def make_judge(recipe: Recipe, device: str) -> LocalModel | HTTPJudge | None:
    spec = recipe.eval.judge
    if spec is None:
        return None
    return HTTPJudge(recipe) if spec.backend == "openai" else LocalModel(spec.path, device=device)


def eval_provenance(recipe: Recipe, device: str, judge: LocalModel | HTTPJudge | None) -> dict:
    """Where eval.json came from: versions, commit, machine, device, seeds, recipe and judge."""
    libraries = EVAL_LIBRARIES + (("lm_eval",) if recipe.eval.lm_eval else ())
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(libraries), "git_commit": git_commit(), "machine": platform.machine(),
            "device": device, "threads": torch.get_num_threads(), "recipe_sha256": recipe.sha256(),
            "verifier": recipe.eval.verifier,
            "seeds": {"train": recipe.train.seed, "generation": recipe.generation.seed, "bootstrap": 0},
            "judge": None if judge is None else judge.describe(),
            # eval runs in one process, also after a multi-process training launch (its first process)
            "distributed": {"type": "NO", "processes": 1, "backend": None}}


def judged(judge: LocalModel | HTTPJudge, prompts: list[Prompt], completions, teacher_out, spec) -> dict:
    """Win rate of a model's answers over the teacher's, judged in both orders."""
    http = isinstance(judge, HTTPJudge)  # an endpoint gets every pair at once: its concurrency, one session
    result = judge_pairs(judge, [p.text for p in prompts], [c.text for c in completions], [t.text for t in teacher_out],
                         max_new_tokens=spec.judge.max_new_tokens,
                         batch_size=2 * len(prompts) if http else spec.batch_size)
    name = judge.name if http else spec.judge.path
    if result.parsed == 0 and result.unparseable:
        raise PotstillError(f"the judge ({name}) gave no parseable verdict in {result.unparseable} replies (expected "
                            f"a first line of A, B or tie); use a judge model that follows instructions")
    if result.parsed == 0:
        raise PotstillError(f"the judge ({name}) failed all {result.failed} requests (reasons in "
                            f"{judge.ledger_path}); rerun eval to retry them")
    if result.failed:
        print(f"eval: the judge ({name}) failed {result.failed} of {len(result.votes)} requests for good, left out of "
              f"the win rate (reasons in {judge.ledger_path}); a rerun retries them", file=sys.stderr)
    return {"win_rate_vs_teacher": result.win_rate, "wins": result.wins, "losses": result.losses, "ties": result.ties,
            "unparseable": result.unparseable, "failed": result.failed,
            "win_rate_ci95": bootstrap_ci([v for v in result.votes if v is not None])}
