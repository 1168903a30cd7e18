"""OpenAI's Batch API as the teacher: half the online price, answers within 24 hours.

Each batch goes through these steps, in this order, and why:

1. **The input.** One JSONL line per request, ``{"custom_id": request_hash, "method": "POST",
   "url": "/v1/chat/completions", "body": request_body(...)}`` (``/v1/completions`` for
   ``teacher.api: completions``); a line carries the whole body, vendor extras included. At most
   ``MAX_LINES`` lines and ``MAX_BYTES`` bytes per batch: the API's limits.
2. **Persisted before anything is sent.** ``local_id`` = sha256(session id, newline, JSONL bytes)
   (the session keeps a rerun that batches the same requests again, after every line of the first
   batch failed, from reusing a collected batch's tag). The batch and its request hashes enter the
   ledger as ``prepared``; then the upload, and its file id is recorded; then ``batches.create``
   with ``metadata={"potstill_local_id": local_id}``, and its batch id is recorded the moment it
   returns.
3. **Resume polls, never re-creates.** A run first continues this teacher's open batches from the
   ledger; requests already in one are not batched again. A batch whose id was never recorded (a
   crash between create and the write) is looked up in ``batches.list()`` by its metadata tag and
   adopted; one whose file id was recorded is not uploaded again.
4. **Poll** every ``teacher.batch_poll_seconds``. On completed / expired / cancelled, stream the
   output and error files (either may be absent), join on custom_id (the output is unordered), and
   store completions, failures (non-200 lines, error lines, bodies ``parse_response`` rejects) and
   one attempt row per line, ``COLLECT_CHUNK`` lines per ledger transaction, the last marking the
   batch collected. Requests with no line, or a ``batch_expired`` / ``batch_cancelled`` error line
   (never run, unbilled), stay pending: the next run batches them again. A ``failed`` batch (its input rejected at validation) stops the run with the API's message.

Cost of a line = (prompt_tokens * prices.prompt + completion_tokens * prices.completion) / 1e6
* ``BATCH_DISCOUNT``: ``teacher.prices`` are the online list prices, and the Batch API bills half.
Budgets count the ledger's totals plus the worst case of every open batch (the most
``counted_usage`` can count per line: 2 x the prompt estimate + 16, and max_new_tokens;
discounted) and only create a batch that fits, shrunk to what fits.

Client: the official synchronous one. A batch run makes a handful of calls (upload, create, polls,
downloads), none of them concurrent, so async would buy nothing. Its own retries (2) stay on for the
idempotent calls (retrieve, list, download; an upload retried after a lost answer leaves at worst an
unused file, which the API deletes after 30 days) and are off for ``batches.create``, where a blind
retry could start a second, billed batch: after a lost answer the batch is looked up by its tag first.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from potstill.errors import PotstillError
from potstill.ledger import Attempt, Ledger, completion_problem
from potstill.progress import live_counts
from potstill.records import Completion, Request
from potstill.redaction import api_key
from potstill.teachers.openai.budget import Budget, price
from potstill.teachers.openai.wire import (
    Malformed,
    batch_line_problem,
    counted_usage,
    estimate_tokens,
    parse_response,
    request_body,
    worst_case,
)

MAX_LINES = 50_000  # requests per batch input file (API limit)
MAX_BYTES = 200_000_000  # bytes per batch input file (API limit: 200 MB)
BATCH_DISCOUNT = 0.5  # the Batch API bills half the online price per token
CREATE_ATTEMPTS = 3  # batches.create sends after lost answers (timeout, reset, 5xx), each after a lookup
MAX_POLL_ERRORS = 20  # consecutive failed polls (each already retried by the client) before stopping
COLLECTABLE = ("completed", "expired", "cancelled")  # terminal statuses whose files hold the answers


@dataclass
class Job:
    """A batch of the ledger and where it stands."""

    local_id: str
    batch_id: str | None
    input_file_id: str | None
    status: str
    created_at: str
    hashes: set[str]


@dataclass
class Run:
    """What every step of one ``run_batches`` call reads, and its running counts."""

    spec: object
    params: dict
    ledger: Ledger
    session: int
    teacher_key: str
    tokenizer: object
    client: object
    key: str
    requests: dict[str, Request]  # this run's todo, by request hash, in todo order
    bar: object = None
    done: int = 0
    failed: int = 0
    unanswered: int = 0
    cost: float = 0.0

    @property
    def url(self) -> str:
        return self.spec.endpoints[0].rstrip("/")


def run_batches(spec, params: dict, todo: list[Request], ledger: Ledger, session: int, teacher_key: str,
                tokenizer) -> str | None:
    """Answer ``todo`` through the Batch API. Returns None when every request was collected (done or
    failed), else one line saying why the run stopped early (the rest stays pending for a rerun)."""
    if not todo:
        return None
    key = api_key(spec)
    run = Run(spec, params, ledger, session, teacher_key, tokenizer, batch_client(spec, key), key,
              {r.request_hash: r for r in todo})
    import openai  # present: batch_client checked

    jobs = [Job(**row, hashes=ledger.batch_request_hashes(row["local_id"])) for row in ledger.open_batches(teacher_key)]
    in_open = set().union(*(j.hashes for j in jobs))
    fresh = [r for r in todo if r.request_hash not in in_open]
    try:
        with live_counts("generate (batch)", len(todo)) as run.bar:
            for job in jobs:
                if job.batch_id is None:
                    submit(run, job)
            n, over_budget = affordable(run, fresh, jobs)
            for chunk in chunks([(r.request_hash, jsonl_line(r, params, spec, tokenizer)) for r in fresh[:n]]):
                payload = b"".join(line for _, line in chunk)
                local_id = hashlib.sha256(f"{session}\n".encode() + payload).hexdigest()
                hashes = [h for h, _ in chunk]
                ledger.add_batch(local_id, teacher_key, hashes)
                job = Job(local_id, None, None, "prepared", datetime.now(timezone.utc).isoformat(), set(hashes))
                jobs.append(job)
                submit(run, job, payload)
            stopped = poll(run, [j for j in jobs if j.batch_id is not None])
    except openai.APIError as e:
        kind, reason = api_reason(e, key)
        return f"{run.url}: {reason}" + (" (not retried)" if kind == "fatal" else " (after retries)")
    finally:
        run.client.close()
    if stopped or over_budget:
        return stopped or over_budget
    if run.unanswered:
        return (f"{run.unanswered} requests were not answered before their batch expired or was cancelled; they "
                f"stay pending")
    return None


def batch_client(spec, key: str):
    try:
        import openai
    except ImportError:
        raise PotstillError("the Batch API backend needs the openai client: pip install 'potstill[http]'") from None
    return openai.OpenAI(base_url=spec.endpoints[0], api_key=key, timeout=spec.timeout, max_retries=2)


def endpoint_url(spec) -> str:
    return "/v1/chat/completions" if spec.api == "chat" else "/v1/completions"


def jsonl_line(request: Request, params: dict, spec, tokenizer) -> bytes:
    body = request_body(request, params, spec, tokenizer)
    return (json.dumps({"custom_id": request.request_hash, "method": "POST", "url": endpoint_url(spec), "body": body},
                       separators=(",", ":")) + "\n").encode()


def chunks(lines: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """Consecutive runs of (request hash, line) within ``MAX_LINES`` lines and ``MAX_BYTES`` bytes each."""
    out, size = [], 0
    for h, line in lines:
        if len(line) > MAX_BYTES:
            raise PotstillError(f"request {h[:12]} makes a Batch API line of {len(line):,} bytes, over the "
                                f"{MAX_BYTES:,}-byte file limit: shorten its prompt")
        if not out or len(out[-1]) >= MAX_LINES or size + len(line) > MAX_BYTES:
            out.append([])
            size = 0
        out[-1].append((h, line))
        size += len(line)
    return out


# -- budgets ----------------------------------------------------------------------------------------


def budget_of(run: Run) -> Budget:
    """The teacher's budget at Batch prices, with the ledger's spend."""
    return Budget(run.spec.budget, run.spec.prices, run.ledger.spend(run.teacher_key), BATCH_DISCOUNT)


def affordable(run: Run, fresh: list[Request], jobs: list[Job]) -> tuple[int, str | None]:
    """How many of ``fresh`` (in order) fit the budget at worst case, on top of the ledger's spend
    and the worst case of the open batches' pending requests; and why the rest does not."""
    budget = budget_of(run)
    if not budget.limited:
        return len(fresh), None
    # an open batch's pending requests count as spent at their worst case until it is collected
    for h in set().union(*(j.hashes for j in jobs)) & run.requests.keys():
        budget.reserve(*worst_case(*estimate_tokens(run.requests[h], run.params, run.tokenizer)))
    for i, r in enumerate(fresh):
        worst = worst_case(*estimate_tokens(r, run.params, run.tokenizer))  # the most counted_usage can count
        if (over := budget.over(*worst)):
            return i, (f"budget reached: teacher.budget.{over[0]}={over[1]:g} leaves room for {i} of {len(fresh)} "
                       f"new requests at their worst case (spent and reserved: {budget.requests} requests, "
                       f"{budget.tokens + budget.reserved_tokens:,.0f} tokens, ${budget.cost + budget.reserved_cost:.4f}); "
                       f"rerun once open batches are collected, or raise the budget")
        budget.reserve(*worst)
    return len(fresh), None


# -- creating ---------------------------------------------------------------------------------------


def submit(run: Run, job: Job, payload: bytes | None = None) -> None:
    """Upload ``job``'s input (unless its file id is recorded) and create its batch (unless one with
    its tag exists), recording each id the moment the API returns it."""
    import openai

    resumed = payload is None
    if job.input_file_id is None:
        if resumed:  # prepared by an earlier run that stopped before the upload was recorded
            payload = b"".join(jsonl_line(r, run.params, run.spec, run.tokenizer)
                               for h, r in run.requests.items() if h in job.hashes)
            if not payload:
                run.ledger.update_batch(job.local_id, status="collected", error="nothing left to send")
                return
        uploaded = run.client.files.create(file=(f"potstill-{job.local_id[:16]}.jsonl", payload), purpose="batch")
        job.input_file_id = uploaded.id
        run.ledger.update_batch(job.local_id, input_file_id=uploaded.id)
        # no batch can exist for a file uploaded just now: nothing to look up
        resumed = False
    for attempt in range(CREATE_ATTEMPTS):
        if resumed or attempt:
            if (found := find_batch(run.client, job.local_id, job.created_at)) is not None:
                run.bar.note(f"batch {found.id} ({found.status}) found by its tag: adopted, not created again")
                record_created(run, job, found.id, found.status)
                return
        try:
            created = run.client.with_options(max_retries=0).batches.create(
                input_file_id=job.input_file_id, endpoint=endpoint_url(run.spec), completion_window="24h",
                metadata={"potstill_local_id": job.local_id})
        except openai.APIError as e:
            if api_reason(e, run.key)[0] != "retry" or attempt + 1 == CREATE_ATTEMPTS:
                raise
            time.sleep(2 ** attempt)  # the answer may be lost, not the batch: looked up before sending again
            continue
        record_created(run, job, created.id, created.status)
        run.bar.note(f"batch {created.id}: {len(job.hashes)} requests submitted")
        return


def record_created(run: Run, job: Job, batch_id: str, status: str) -> None:
    run.ledger.update_batch(job.local_id, batch_id=batch_id, status=status)
    job.batch_id, job.status = batch_id, status


def find_batch(client, local_id: str, prepared_at: str):
    """The API's batch tagged with ``local_id``, if any. The list is newest first and paged; a
    batch created before ours was prepared cannot be it, so paging stops there."""
    since = datetime.fromisoformat(prepared_at).timestamp() - 300  # 5 min of clock skew
    for batch in client.batches.list(limit=100):
        if (batch.metadata or {}).get("potstill_local_id") == local_id:
            return batch
        if batch.created_at < since:
            return None
    return None


# -- polling and collecting -------------------------------------------------------------------------


def poll(run: Run, jobs: list[Job]) -> str | None:
    """Poll ``jobs`` until every one is collected; a reason if the run must stop first."""
    import openai

    active, total, errors = list(jobs), len(jobs), 0
    progress: dict[str, str] = {}
    while active:
        for job in list(active):
            try:
                batch = run.client.batches.retrieve(job.batch_id)
                if batch.status != job.status:
                    run.ledger.update_batch(job.local_id, status=batch.status)
                    job.status = batch.status
                if batch.status in COLLECTABLE:
                    collect(run, job, batch)
                    active.remove(job)
                    progress.pop(job.local_id, None)
                elif batch.status == "failed":
                    reason = validation_message(batch)
                    # collected: a rerun batches the requests again rather than polling a dead batch
                    run.ledger.update_batch(job.local_id, status="collected", error=reason)
                    return reason
                else:
                    c = batch.request_counts
                    progress[job.local_id] = f"{batch.status} {c.completed + c.failed}/{c.total}" if c else batch.status
                errors = 0
            except openai.APIError as e:
                kind, reason = api_reason(e, run.key)
                errors += 1
                if kind != "retry":
                    return f"{run.url}: {reason} (not retried)"
                if errors >= MAX_POLL_ERRORS:
                    return f"{run.url}: {errors} polls in a row failed ({reason}); the batches keep running at the API"
                run.bar.note(f"poll of batch {job.batch_id} failed ({reason}); trying again")
        run.bar.status(f"batches {total - len(active)}/{total} collected  {'  '.join(progress.values())}  "
                       f"done {run.done}  failed {run.failed}  ${run.cost:.4f}")
        if active:
            time.sleep(run.spec.batch_poll_seconds)
    return None


def validation_message(batch) -> str:
    errors = (batch.errors.data if batch.errors else None) or []
    first = errors[0] if errors else None
    what = "no reason given" if first is None else \
        (f"line {first.line}: " if first.line is not None else "") + f"{first.code or 'error'}: {first.message}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"batch {batch.id} failed validation: {what}{more}; fix the recipe and rerun"


COLLECT_CHUNK = 2000  # output lines per ledger transaction: a 50,000-line batch is never held whole


def _lines(run: Run, batch):
    """The lines of a finished batch's output and error files, streamed from the API."""
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            with run.client.files.with_streaming_response.content(file_id) as response:
                yield from response.iter_lines()


def collect(run: Run, job: Job, batch) -> None:
    """Store every line of a finished batch, ``COLLECT_CHUNK`` lines per transaction, the last one
    marking the batch collected. After a crash part-way, a rerun collects it again: lines whose
    request is done by then are skipped, so no answer is stored or counted twice."""
    counts = getattr(batch, "request_counts", None)
    total = max((counts.total if counts else 0) or len(job.hashes), 1)
    end = batch.completed_at or batch.expired_at or batch.cancelled_at or time.time()
    per_line = max(end - batch.created_at, 0) / total  # seconds: the batch's wall time, shared
    sent_at = datetime.fromtimestamp(batch.created_at, timezone.utc).isoformat(timespec="milliseconds")
    seen, already, skipped, done, failed = set(), set(), 0, 0, 0
    completions, failures, attempts = [], {}, []

    def flush(last: bool) -> None:
        nonlocal done, failed, completions, failures, attempts
        run.ledger.record(run.session, completions, failures, attempts, collected_batch=job.local_id if last else None)
        done, failed = done + len(completions), failed + len(failures)
        completions, failures, attempts = [], {}, []

    for raw in _lines(run, batch):
        try:
            line = json.loads(raw)
            h = line["custom_id"]
        except (ValueError, KeyError, TypeError):
            skipped += raw.strip() != ""
            continue
        if h in seen or h not in job.hashes:
            skipped += 1
            continue
        if _unrun(line):  # expired or cancelled before it ran: unbilled, and the request stays pending
            continue
        if h in run.requests and run.ledger.open_request(h) is not None:
            request, params = run.requests[h], run.params
        elif h not in run.requests and (found := run.ledger.open_request(h)) is not None:
            # a paid answer to a request this run does not ask (the recipe's prompts changed since
            # the batch was made): stored all the same, never asked and paid for again
            request, params = found
        else:  # done since (an earlier, interrupted collection of this batch stored it)
            already.add(h)
            continue
        seen.add(h)
        completion, reason, status, used = read_line(line, request, params, run.spec, per_line, run.tokenizer)
        cost = price(run.spec.prices, *used[:2], BATCH_DISCOUNT)
        run.cost += cost
        attempts.append(Attempt(h, run.url, sent_at, per_line, "ok" if completion else "failed", status, reason,
                                used[0], used[1], cost, used[2]))
        if completion:
            completions.append(completion)
        else:
            failures[h] = reason
        if len(attempts) >= COLLECT_CHUNK:
            flush(last=False)
    flush(last=True)
    unanswered = len(job.hashes & run.requests.keys() - seen - already)
    run.done += done
    run.failed += failed
    run.unanswered += unanswered
    run.bar.advance(len((seen | already) & run.requests.keys()))
    if unanswered:
        run.bar.note(f"batch {batch.id} {batch.status}: {unanswered} requests unanswered stay pending; a rerun "
                     f"batches them again")
    if skipped:
        run.bar.note(f"batch {batch.id}: {skipped} output lines skipped (unreadable, repeated, or already done)")


UNRUN = ("batch_expired", "batch_cancelled")  # error codes of lines the API never ran


def _unrun(line: dict) -> bool:
    error = line.get("error")
    return isinstance(error, dict) and error.get("code") in UNRUN


def read_line(line: dict, request: Request, params: dict, spec, seconds: float, tokenizer=None
              ) -> tuple[Completion | None, str | None, int | None, tuple[int, int, str | None]]:
    """One output or error line -> (completion, None, 200, used) or (None, reason, HTTP status,
    used); used: (prompt, completion) tokens counted and the line's claim when not taken as is
    (``counted_usage``). An error line without usage is not billed."""
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if status == 200 or isinstance(body, dict) and isinstance(body.get("usage"), dict):
        usage = counted_usage(body, estimate_tokens(request, params, tokenizer)[0], params["max_new_tokens"])
    else:
        usage = (0, 0, None)
    if problem := batch_line_problem(line):
        return None, problem, status, usage
    try:
        completion = parse_response(request, body, params, spec, seconds, usage[:2],
                                    None if tokenizer is None else len(tokenizer))
        if (problem := completion_problem(completion)):
            raise Malformed(problem)
    except Malformed as e:
        return None, f"malformed response: {e}", status, usage
    return completion, None, status, usage


def api_reason(exc, key: str) -> tuple[str, str]:
    """(kind, reason) of an API error as the online path classifies it (retry or fatal), the reason
    on one line without the API key, nor anything shaped like an OpenAI key (sk-...), even masked."""
    from potstill.teachers.openai.dispatch import classify

    kind, _, reason, _ = classify(exc, key)
    return {"unreachable": "retry", "malformed": "retry", "bad_request": "fatal"}.get(kind, kind), reason
