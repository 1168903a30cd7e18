"""Send requests to HTTP teachers: a bounded in-flight window, rate limits, one retry layer,
budgets, and every answer committed to the ledger before its window slot frees.

The rules, and why:

- **Exactly one retry layer.** The official client's own retries are off; retrying here as well
  would multiply attempts (3 x 3 = 9) and bills.
- **Retried:** 408, 409, 429, 5xx, timeouts, connection resets, and 2xx bodies that cannot be
  stored (truncated, no logprobs, NaN, ids outside the tokenizer: at most ``MALFORMED_RETRIES``
  times). Waits honour ``retry-after-ms`` / ``Retry-After`` (RFC 9110: digits or an HTTP date);
  otherwise exponential backoff with jitter. A 429 with a wait pauses that endpoint for every
  sender. A wait longer than ``teacher.max_retry_wait`` stops the run: rerun later.
- **Not retried:** 400 and 422 fail that request (with the endpoint's message) and the run goes
  on. 401, 403, 404 and ``insufficient_quota`` stop the run once the requests in flight settle;
  nothing new is sent after the first of them.
- **A repeated failure stops the run** (``Streaks``): the settings or the endpoint are wrong,
  not one prompt, and each further send is paid for: ``MAX_BAD_REQUESTS`` refusals in a row,
  ``SAME_FAILURE`` requests in a row whose first send failed the same way, ``MAX_UNREACHABLE``
  sends in a row without an answer, ``SAME_FAILURE`` requests in a row that used all their
  attempts on 429 / 5xx / timeouts (an endpoint that is overloaded or down). A send without an
  answer counts toward these only if nothing was answered while it was out, and first sends
  without one only until the endpoint first answers: "down" means no answers, not slow failures
  among answers.
- **Nothing hangs:** ``teacher.timeout`` bounds the whole attempt (the client's own timeout is
  per read); any unexpected error settles its request and stops the run; a ledger that cannot
  be written stops it with the reason.
- **Idempotency.** A slot of the window is held from the send until the ledger commit of its
  answer, so a crash re-sends at most the window; done requests were filtered out before.
- **Budgets** count the ledger's totals over all sessions and reserve the worst case for each
  send (the most ``counted_usage`` can count: 2 x the prompt estimate + 16, and max tokens), so a
  run stops before a limit, not after, whatever ``usage`` the answers claim. Each send is
  written to ``attempts`` at that worst case before it leaves and settled after, so a crash
  cannot hide a send from the next run's budget; ``usage`` is clamped (``counted_usage``).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import re
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from potstill.errors import PotstillError
from potstill.ledger import Attempt, Ledger, completion_problem
from potstill.progress import live_counts
from potstill.records import Request
from potstill.redaction import api_key, redact
from potstill.teachers.openai.budget import Budget
from potstill.teachers.openai.wire import (
    Malformed,
    counted_usage,
    endpoint_path,
    estimate_tokens,
    make_client,
    parse_response,
    request_body,
    split_extras,
    worst_case,
)

MALFORMED_RETRIES = 2
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  # seconds: 0.5 * 2^n, capped, + up to 25 % jitter
BAD_REQUEST_STATUS = {400, 422}  # this request is wrong: it fails, the run goes on
FATAL_STATUS = {401, 403, 404}  # every request would fail: the run stops
MAX_BAD_REQUESTS = 5  # in a row, with no answer between: the parameters are wrong, not one prompt
MAX_UNREACHABLE = 20  # sends in a row with no answer while they were out (``Streaks``): the endpoint is down
UNSETTLED = "sent (or about to be) when the run ended: counted at its worst case"  # an attempt row until settled
SAME_FAILURE = 5  # requests in a row whose first send failed the same way (malformed, no answer): stop
CONNECTIONS_PER_CLIENT = 8


class TokenBucket:
    """``rate`` units per second, bursts up to ``capacity``; a unit bigger than the bucket waits for
    a full bucket and leaves it in debt."""

    def __init__(self, per_minute: float | None, burst_seconds: float = 1.0):
        self.rate = None if per_minute is None else per_minute / 60.0
        self.capacity = None if per_minute is None else max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self.stamp = time.monotonic()

    async def take(self, units: float) -> None:
        if self.rate is None:
            return
        while True:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
            need = min(units, self.capacity)
            if self.level >= need:
                self.level -= units
                return
            await asyncio.sleep((need - self.level) / self.rate)


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms`` (OpenAI's: a decimal number), else
    ``Retry-After`` as RFC 9110 has it (delta-seconds: digits only, or an HTTP-date); None for
    anything else ("1e9", "inf", "nan", "-1"), which then backs off as if absent."""
    if headers is None:
        return None
    ms = (headers.get("retry-after-ms") or "").strip()
    if re.fullmatch(r"\d{1,12}(\.\d{1,6})?", ms):
        return float(ms) / 1000.0
    value = (headers.get("retry-after") or "").strip()
    if re.fullmatch(r"\d+", value):
        return float(value)
    if not re.search(r"[A-Za-z]{3}", value):  # an HTTP-date names its day and month; parsedate reads more
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def classify(exc: BaseException, key: str | None = None) -> tuple[str, int | None, str, float | None]:
    """(kind, HTTP status, reason, server-requested wait). kind: retry, unreachable (a connection
    error: retried), malformed (a 2xx body we cannot store: retried a little), bad_request (400,
    422: this request fails) or fatal (the run stops).
    The reason is redacted (``key`` and anything shaped like an OpenAI key) before it goes anywhere."""
    kind, status, reason, wait = _classify(exc)
    return kind, status, redact(reason, key), wait


def _classify(exc: BaseException) -> tuple[str, int | None, str, float | None]:
    import openai

    if isinstance(exc, Malformed):
        return "malformed", None, f"malformed response: {exc}", None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = getattr(exc, "code", None) or ""
        message = _error_message(exc)
        reason = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        if code == "insufficient_quota" or status in FATAL_STATUS:
            return "fatal", status, reason, None
        if status in BAD_REQUEST_STATUS:
            return "bad_request", status, reason, None
        if status in (408, 409, 429) or status >= 500:
            return "retry", status, reason, retry_after(exc.response.headers)
        return "fatal", status, reason, None
    if isinstance(exc, openai.APIConnectionError) and _never_sent(exc):  # refused, or a connect timeout
        return "unreachable", None, f"connection error: {type(exc.__cause__).__name__}", None
    if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
        return "unreachable", None, "timeout: no whole answer within teacher.timeout", None
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return "unreachable", None, f"connection error: {type(cause).__name__}", None
    if isinstance(exc, ValueError):  # a body that is not JSON (UnicodeDecodeError is one too)
        return "malformed", None, f"malformed response: {type(exc).__name__}: {str(exc)[:200]}", None
    raise exc


def _error_message(exc) -> str:
    """The endpoint's own words: OpenAI's ``{"error": {"message"}}`` (the SDK hands over the inner
    object), FastAPI's ``{"detail": "..."}`` or its validation list (``transformers serve``, many
    others), or a body that is not JSON at all."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body["error"] if isinstance(body.get("error"), dict) else body
        message = inner.get("message") or inner.get("detail") or ""
        if isinstance(message, list):  # FastAPI: [{"loc": [...], "msg": "...", "type": "..."}]
            message = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" if isinstance(e, dict)
                                else str(e) for e in message)
    else:
        message = body or ""
    return " ".join(str(message).split())[:300]


@dataclass(frozen=True)
class Next:
    """What follows an attempt. All None: it was answered. ``fail``: the request fails for good
    with this reason; ``stop``: the run stops (with ``fail`` too, the request fails; without, it
    stays pending); ``retry_in``: seconds to wait before the next attempt, the whole endpoint
    waiting as long when ``pause`` (a 429 that said how long)."""

    fail: str | None = None
    stop: str | None = None
    retry_in: float | None = None
    pause: bool = False


def decide(kind: str, status: int | None, reason: str | None, asked: float | None, *, attempt: int,
           malformed: int, max_attempts: int, max_retry_wait: float, jitter: float) -> Next:
    """The retry rules (module docstring) as a pure function of one attempt's classification:
    ``attempt`` counts from 0, ``malformed`` bodies so far, ``jitter`` a fraction in [0, 0.25)."""
    if kind == "ok":
        return Next()
    if kind == "fatal":
        return Next(fail=reason, stop=f"{reason} (not retried)")
    if kind == "bad_request":
        return Next(fail=f"{reason} (not retried)")
    if malformed > MALFORMED_RETRIES or attempt + 1 >= max_attempts:
        return Next(fail=f"gave up after {attempt + 1} attempts: {reason}")
    if asked is not None and asked > max_retry_wait:
        return Next(stop=f"asks to wait {asked:.0f} s (Retry-After), more than teacher.max_retry_wait="
                         f"{max_retry_wait:g} s: rerun later to resume")
    delay = (asked if asked is not None else min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt)) * (1 + jitter)
    return Next(retry_in=delay, pause=asked is not None and status == 429)


@dataclass
class Sent:
    """One attempt's result: its settled ledger row and its classification."""

    row: Attempt
    kind: str  # ok, retry, unreachable, malformed, bad_request, fatal (``classify``)
    status: int | None
    reason: str | None
    asked: float | None  # seconds the server asked to wait (Retry-After)
    completion: object  # a Completion when kind is ok
    left: float  # time.monotonic() when it was sent


class Streaks:
    """Why the run should stop when a failure keeps repeating (the settings or the endpoint are
    wrong, not one prompt, and every further send is paid for again), else None: the rules of the
    module docstring, fed one attempt at a time (times from ``time.monotonic()``).

    "The endpoint is down" means no answers, not slow failures among answers. A send that got no
    answer (a timeout, a reset, a refused connection), and a request that used all its attempts,
    count toward it only when nothing was answered between that send and its failure: slow
    failures pile up in the window and end together, after the answers that came while they were
    out (counted in the order they ended, five of them "in a row" stopped an endpoint that answered
    80 % of requests). Five first sends without an answer stop the run only while nothing has been
    answered at all (a wrong URL, a host that is down); once the endpoint has answered, it takes
    ``MAX_UNREACHABLE`` sends in a row with no answer, which an endpoint answering even half of
    them gives about once in a million stretches (0.5^20)."""

    def __init__(self, max_attempts: int):
        self.max_attempts = max_attempts
        self.answered = -math.inf  # when the last answer came
        self.bad_request = self.unreachable = self.gave_ups = 0
        self.same: tuple[str | None, int] = (None, 0)  # (first sends' failure, how many in a row)

    def see(self, kind: str, reason: str | None, *, first: bool, sent: float, now: float) -> str | None:
        """One attempt's classification (``classify``; "ok" when answered), whether it was its
        request's first send, when it was sent and when its outcome came."""
        self.bad_request = self.bad_request + 1 if kind == "bad_request" else 0
        if kind == "ok":
            self.answered = now
            self.unreachable, self.same, self.gave_ups = 0, (None, 0), 0
            return None
        silent = sent >= self.answered  # nothing answered while it was out
        if kind != "unreachable":
            self.unreachable = 0
        elif silent:
            self.unreachable += 1
        if first and (kind == "malformed" or kind == "unreachable" and self.answered == -math.inf):
            # first sends only: the retries of the last few bad prompts of a run come in a row by themselves
            failure = re.sub(r"\d+", "#", reason)
            self.same = (failure, self.same[1] + 1 if self.same[0] == failure else 1)
        if self.bad_request >= MAX_BAD_REQUESTS:
            return f"{MAX_BAD_REQUESTS} requests in a row refused, the last with {reason}: check the teacher and " \
                   f"generation settings"
        if self.unreachable >= MAX_UNREACHABLE:
            return f"unreachable ({reason}, {MAX_UNREACHABLE} sends in a row with no answer)"
        if self.same[1] >= SAME_FAILURE and kind == "unreachable":
            return f"unreachable: the first send of {SAME_FAILURE} requests in a row got no answer ({reason})" + \
                (": is it up? Or raise teacher.timeout" if reason.startswith("timeout") else ": is it up?")
        if self.same[1] >= SAME_FAILURE:
            return f"the first answer to {SAME_FAILURE} requests in a row could not be stored, the same way " \
                   f"({reason}): check the endpoint and the teacher settings (model, token_ids, top_logprobs)"
        return None

    def gave_up(self, reason: str | None, *, sent: float) -> str | None:
        """A request used all its attempts on 429s, 5xx or timeouts, its last sent at ``sent``: an
        endpoint overloaded or down answers every retry the same way, and waiting each request out
        would take hours."""
        if sent < self.answered:  # answers came while its last attempt was out
            return None
        self.gave_ups += 1
        if self.gave_ups < SAME_FAILURE:
            return None
        return f"{SAME_FAILURE} requests in a row used all {self.max_attempts} attempts, the last on {reason}: " \
               f"the endpoint is overloaded or down; rerun later to resume (or lower teacher.concurrency or " \
               f"teacher.requests_per_minute)"


class Endpoint:
    def __init__(self, url: str, clients: list):
        self.url = url.rstrip("/")
        self.clients = clients
        self.sends = 0
        self.in_flight = 0
        self.paused_until = 0.0


class Dispatcher:
    """One generate run against HTTP endpoints; ``run`` drives it to the end or a clean stop, and
    ``stopped`` says why it stopped early (None if it did not)."""

    def __init__(self, spec, params: dict, ledger: Ledger, session: int, teacher_key: str, tokenizer=None,
                 label: str = "generate"):
        self.spec, self.params, self.ledger, self.session, self.label = spec, params, ledger, session, label
        self.tokenizer = tokenizer
        self.vocab = None if tokenizer is None else len(tokenizer)  # every id an endpoint returns must be under it
        self.key = api_key(spec)
        # httpx scans every pooled connection on each request (O(pool) CPU per send): a client per
        # CONNECTIONS_PER_CLIENT slots keeps that scan short at high concurrency
        per_endpoint = -(-spec.concurrency // CONNECTIONS_PER_CLIENT)
        self.endpoints = [Endpoint(u, [make_client(u, self.key, spec.timeout) for _ in range(per_endpoint)])
                          for u in spec.endpoints]
        self.window = spec.concurrency * len(self.endpoints)
        self.rpm, self.tpm = TokenBucket(spec.requests_per_minute), TokenBucket(spec.tokens_per_minute)
        self.stopped: str | None = None
        self.budget = Budget(spec.budget, spec.prices, ledger.spend(teacher_key))
        self.counts = {"done": 0, "failed": 0, "retrying": 0}
        self.streaks = Streaks(spec.max_attempts)
        self.pending_writes: list = []
        self.pending_opens: list[tuple[Attempt, asyncio.Future]] = []
        self.closing = False
        self.write_error: BaseException | None = None

    # -- the run --------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason

    async def run(self, todo: list[Request]) -> str | None:
        slots = asyncio.Semaphore(self.window)
        self.commit_wanted = asyncio.Event()
        writer = asyncio.create_task(self._writer())
        tasks = set()
        with live_counts(self.label, len(todo)) as self.bar:
            for request in todo:
                acquire = asyncio.ensure_future(slots.acquire())
                await asyncio.wait({acquire, writer}, return_when=asyncio.FIRST_COMPLETED)
                if not acquire.done():  # the writer died: no slot will ever free
                    acquire.cancel()
                    break
                if self.stopped:
                    slots.release()
                    break
                task = asyncio.create_task(self._one(request, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
            self.closing = True
            self.commit_wanted.set()
            await writer
        for e in self.endpoints:
            for client in e.clients:
                await client.close()
        if self.write_error is not None:
            raise PotstillError(f"{self.ledger.path}: could not record answers ({type(self.write_error).__name__}: "
                                f"{self.write_error}); answers received since the last commit will be asked again")
        return self.stopped

    def _pick(self) -> Endpoint:
        now = time.monotonic()
        ready = [e for e in self.endpoints if e.paused_until <= now] or self.endpoints
        return min(ready, key=lambda e: (e.in_flight, e.paused_until))

    async def _one(self, request: Request, slots: asyncio.Semaphore) -> None:
        """Settle ``request`` and hand the outcome to the writer, which frees the slot after the
        commit; whatever happens, the slot is handed over."""
        attempts: list[Attempt] = []
        completion = failure = None
        try:
            completion, failure = await self._settle(request, attempts)
        except Exception as exc:  # a bug, or an answer of a shape nobody expected: stop, keep what we have
            self.stop(f"unexpected {type(exc).__name__} on request {request.request_hash[:12]}: "
                      f"{redact(str(exc), self.key)[:200]}")
        self._commit(completion=completion, failure=failure, attempts=attempts, slots=slots)

    async def _settle(self, request: Request, attempts: list[Attempt]):
        """(completion, None) when answered, (None, (hash, reason)) when it failed for good,
        (None, None) when the run stopped first (the request stays pending)."""
        body, extra = split_extras(request_body(request, self.params, self.spec, self.tokenizer))
        estimate = estimate_tokens(request, self.params, self.tokenizer)  # (prompt, max completion) tokens
        worst = worst_case(*estimate)  # the most counted_usage can count for one send: what the budget holds
        h = request.request_hash
        malformed = 0
        for attempt in range(self.spec.max_attempts):
            # wait first (a paused endpoint, the rate limits); then decide and reserve with no
            # await in between, so every sender sees the others' reservations
            while (wait := self._pick().paused_until - time.monotonic()) > 0 and not self.stopped:
                await asyncio.sleep(wait)
            await self.rpm.take(1)
            await self.tpm.take(sum(estimate))
            if self.stopped:
                return None, None
            if (over := self.budget.over(*worst)):
                self.stop(f"budget reached: teacher.budget.{over[0]}={over[1]:g} (spent {over[2]})")
                return None, None
            endpoint = self._pick()
            sent = await self._send(request, endpoint, body, extra, estimate, worst)
            if sent is None:  # the ledger failed before the send: the writer has stopped the run
                return None, None
            attempts.append(sent.row)
            malformed += sent.kind == "malformed"
            if (why := self.streaks.see(sent.kind, sent.reason, first=attempt == 0, sent=sent.left,
                                        now=time.monotonic())):
                self.stop(f"{endpoint.url}: {why}")
                return None, (h, f"{sent.reason} (not retried)") if sent.kind == "bad_request" else None
            then = decide(sent.kind, sent.status, sent.reason, sent.asked, attempt=attempt, malformed=malformed,
                          max_attempts=self.spec.max_attempts, max_retry_wait=self.spec.max_retry_wait,
                          jitter=random.uniform(0, 0.25))
            if then.fail and sent.kind in ("retry", "unreachable") and \
                    (why := self.streaks.gave_up(sent.reason, sent=sent.left)):
                self.stop(f"{endpoint.url}: {why}")
            if then.stop:
                self.stop(f"{endpoint.url}: {then.stop}")
            if then.retry_in is None:  # answered, failed for good, or the run stops
                return (sent.completion, None) if sent.kind == "ok" else (None, (h, then.fail) if then.fail else None)
            if then.pause:
                endpoint.paused_until = max(endpoint.paused_until, time.monotonic() + then.retry_in)
            if then.retry_in > 10:
                self.bar.note(f"{endpoint.url}: {sent.reason}; waiting {then.retry_in:.0f} s")
            self.counts["retrying"] += 1
            self._refresh()
            await asyncio.sleep(then.retry_in)
            self.counts["retrying"] -= 1
        return None, None  # not reached: the last attempt decides above

    async def _send(self, request: Request, endpoint: Endpoint, body: dict, extra: dict, estimate: tuple[int, int],
                    worst: tuple[int, int]):
        """One attempt at ``endpoint``: written to the ledger at its worst case before it leaves, sent
        with one deadline, parsed, classified, and settled with what was billed. None when the
        ledger could not record the send (nothing was sent)."""
        held = self.budget.reserve(*worst)
        endpoint.in_flight += 1
        sent_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        # the send is in the ledger, at its worst case, before it leaves: a crash cannot hide it from the budget
        row = Attempt(request.request_hash, endpoint.url, sent_at, 0.0, "retry", None, UNSETTLED, *worst, held[1])
        opened = await self._open(row)
        start, left = time.perf_counter(), time.monotonic()
        completion = used = None
        kind, status, reason, asked, reached = "ok", None, None, None, True
        try:
            if not opened:
                return None
            client = endpoint.clients[endpoint.sends % len(endpoint.clients)]
            endpoint.sends += 1
            # the whole attempt (connect, headers, body) has one deadline: the client's timeout is per read,
            # and a server trickling a byte at a time would hold the slot forever
            async with asyncio.timeout(self.spec.timeout):
                response = await client.post(endpoint_path(self.spec), body=body, cast_to=_raw(),
                                             options={"extra_json": extra} if extra else {})
            status = response.status_code
            data = response.json()
            used = counted_usage(data, *estimate)  # billed even if we cannot store it
            completion = parse_response(request, data, self.params, self.spec, time.perf_counter() - start,
                                        used[:2], self.vocab)
            if (problem := completion_problem(completion)):
                raise Malformed(problem)
        except Exception as exc:  # classified; anything unknown re-raises there
            kind, status, reason, asked = classify(exc, self.key)
            reached = not _never_sent(exc)
            status = status or (200 if kind == "malformed" else None)
            completion = None
        finally:
            endpoint.in_flight -= 1
            self.budget.release(held)
        if used is None and (status is not None and status >= 300 or not reached):
            used = (0, 0, None)  # an error status, or nothing reached the server: not billed
        elif used is None:  # a reset, a timeout, a body that was not JSON: it may be billed, count the worst case
            used = (*estimate, None)
        cost = self.budget.spend(*used[:2])
        outcome = {"ok": "ok", "bad_request": "failed", "fatal": "failed"}.get(kind, "retry")
        settled = Attempt(request.request_hash, endpoint.url, sent_at, time.perf_counter() - start, outcome, status,
                          reason, used[0], used[1], cost, used[2], row.attempt_id)
        return Sent(settled, kind, status, reason, asked, completion, left)

    # -- the ledger writer: group commit, slots freed after their rows are durable ----------------

    def _commit(self, *, slots, attempts, completion=None, failure=None) -> None:
        self.pending_writes.append((completion, failure, attempts, slots))
        self.commit_wanted.set()

    async def _open(self, attempt: Attempt) -> bool:
        """Write ``attempt`` (a send about to happen) to the ledger; False if the ledger failed."""
        if self.write_error is not None:
            return False
        opened = asyncio.get_running_loop().create_future()
        self.pending_opens.append((attempt, opened))
        self.commit_wanted.set()
        return await opened

    async def _writer(self) -> None:
        while True:
            await self.commit_wanted.wait()
            self.commit_wanted.clear()
            opens, self.pending_opens = self.pending_opens, []
            if opens:
                try:
                    ids = await asyncio.to_thread(self.ledger.open_attempts, self.session, [a for a, _ in opens])
                except Exception as exc:
                    self._writer_failed(exc, opens)
                    return
                for (a, opened), i in zip(opens, ids):
                    a.attempt_id = i
                    opened.set_result(True)
            batch, self.pending_writes = self.pending_writes, []
            if batch:
                try:
                    done, failed = await asyncio.to_thread(self._record, batch)
                except Exception as exc:  # a locked or full disk: stop sending, report, never hang
                    self.pending_writes[:0] = batch
                    self._writer_failed(exc, [])
                    return
                self.counts["done"] += done
                self.counts["failed"] += failed
                for *_, slots in batch:
                    slots.release()
                self.bar.advance(sum(c is not None or f is not None for c, f, _, _ in batch))
                self._refresh()
            if self.closing and not self.pending_writes and not self.pending_opens:
                return

    def _record(self, batch: list) -> tuple[int, int]:
        """Commit ``batch`` (one transaction); if one of its rows cannot be stored (a value SQLite
        cannot hold), commit the others and fail that request with the reason, rather than lose the
        good answers beside it. Returns (done, failed); a ledger that cannot be written raises."""
        def record(items):
            completions = [c for c, _, _, _ in items if c is not None]
            failures = dict(f for _, f, _, _ in items if f is not None)
            self.ledger.record(self.session, completions, failures, [a for _, _, a, _ in items for a in a])
            return len(completions), len(failures)

        try:
            return record(batch)
        except sqlite3.DatabaseError:  # locked, full, corrupt: nothing else would be written either
            raise
        except Exception:
            pass
        done = failed = 0
        for c, f, a, slots in batch:
            try:
                n = record([(c, f, a, slots)])
            except sqlite3.DatabaseError:
                raise
            except Exception as exc:
                h = c.request_hash if c is not None else f[0]
                n = record([(None, (h, f"could not be stored: {type(exc).__name__}: {str(exc)[:200]}"), a, slots)])
            done, failed = done + n[0], failed + n[1]
        return done, failed

    def _writer_failed(self, exc: BaseException, opens: list) -> None:
        self.write_error = exc
        self.stop("the ledger could not be written")
        for _, opened in opens + self.pending_opens:
            opened.set_result(False)
        self.pending_opens = []
        for *_, slots in self.pending_writes:
            slots.release()
        self.pending_writes = []

    def _refresh(self) -> None:
        b, c = self.budget, self.counts
        self.bar.status(f"{c['done']} done, {c['failed']} failed, {c['retrying']} retrying, "
                        f"{b.tokens:,.0f} tok, ${b.cost:.4f}")


NEVER_SENT = ("ConnectError", "ConnectTimeout", "PoolTimeout")  # the transport's errors before a request leaves


def _never_sent(exc: BaseException) -> bool:
    """A request that never left (refused, or no connection within the connect timeout): it cannot
    have been billed. The openai client raises its own ``APIConnectionError`` (``APITimeoutError``
    for a timeout) from its transport's error: httpx's up to openai 2, httpx2's from openai 3 (which
    also takes an httpx client), so the classes of whichever of the two is loaded are checked."""
    import sys

    import openai

    kinds = tuple(getattr(module, name) for module in map(sys.modules.get, ("httpx2", "httpx")) if module is not None
                  for name in NEVER_SENT if hasattr(module, name))
    return isinstance(exc, openai.APIConnectionError) and isinstance(exc.__cause__, kinds)


def _raw():
    import httpx

    return httpx.Response


def dispatch(spec, params: dict, todo: list[Request], ledger: Ledger, session: int, teacher_key: str,
             tokenizer=None, label: str = "generate") -> str | None:
    """Run ``todo`` against the recipe's endpoints; returns why the run stopped early, or None.
    ``label``: the progress bar's name (the judge sends through here too)."""
    if not todo:
        return None
    dispatcher = Dispatcher(spec, params, ledger, session, teacher_key, tokenizer, label)
    try:
        return asyncio.run(dispatcher.run(todo))
    except RuntimeError as e:
        if "event loop" in str(e):
            raise PotstillError("generate with an HTTP teacher cannot run inside a running event loop "
                                "(e.g. a notebook cell): call it from a script") from None
        raise
