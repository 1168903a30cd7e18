"""Send requests to HTTP teachers: a bounded in-flight window, rate limits, one retry layer,
budgets, and every answer committed to the ledger before its window slot frees.

The rules, and why:

- **Exactly one retry layer.** The official client's own retries are off; retrying here as well
  would multiply attempts (3 x 3 = 9) and bills.
- **Retried:** 408, 409, 429, 5xx, timeouts, connection resets, and 2xx bodies that cannot be
  stored (truncated, no logprobs, NaN: at most ``MALFORMED_RETRIES`` times). Waits honour
  ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date); otherwise exponential backoff
  with jitter. A 429 with a wait pauses that endpoint for every sender. A wait longer than
  ``teacher.max_retry_wait`` stops the run: rerun later.
- **Not retried:** 400 and 422 fail that request (with the endpoint's message) and the run goes
  on, unless ``MAX_BAD_REQUESTS`` come in a row (then the settings are wrong, not one prompt, and
  the run stops). 401, 403, 404 and ``insufficient_quota`` stop the run once the requests in
  flight settle; nothing new is sent after the first of them. ``MAX_UNREACHABLE`` connection
  errors in a row stop it too (the endpoint is down).
- **Nothing hangs:** any unexpected error settles its request and stops the run; a ledger that
  cannot be written stops it with the reason.
- **Idempotency.** A slot of the window is held from the send until the ledger commit of its
  answer, so a crash re-sends at most the window; done requests were filtered out before.
- **Budgets** count the ledger's totals over all sessions and reserve the worst case (prompt
  estimate + max tokens) for each send, so a run stops before a limit, not after.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from datetime import datetime, timezone

from potstill.errors import PotstillError
from potstill.ledger import Attempt, Ledger, completion_problem
from potstill.progress import live_counts
from potstill.teachers.base import Request
from potstill.teachers.openai_api import (Malformed, api_key, endpoint_path, estimate_tokens, make_client,
                                          parse_response, redact, request_body, split_extras)

MALFORMED_RETRIES = 2
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  # seconds: 0.5 * 2^n, capped, + up to 25 % jitter
BAD_REQUEST_STATUS = {400, 422}  # this request is wrong: it fails, the run goes on
FATAL_STATUS = {401, 403, 404}  # every request would fail: the run stops
MAX_BAD_REQUESTS = 5  # in a row, with no answer between: the parameters are wrong, not one prompt
MAX_UNREACHABLE = 20  # connection errors in a row with no answer between: the endpoint is down
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
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``Retry-After`` (seconds or
    an HTTP date); None if absent or unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
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
    if isinstance(exc, openai.APITimeoutError):
        return "retry", None, "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return "unreachable", None, f"connection error: {type(cause).__name__}", None
    if isinstance(exc, ValueError):  # a body that is not JSON (UnicodeDecodeError is one too)
        return "malformed", None, f"malformed response: {type(exc).__name__}: {str(exc)[:200]}", None
    raise exc


def _error_message(exc) -> str:
    body = getattr(exc, "body", None)  # the SDK hands over the "error" object when there is one
    if isinstance(body, dict):
        inner = body["error"] if isinstance(body.get("error"), dict) else body
        return " ".join(str(inner.get("message") or "").split())[:300]
    return ""


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

    def __init__(self, spec, params: dict, ledger: Ledger, session: int, teacher_key: str, tokenizer=None):
        self.spec, self.params, self.ledger, self.session = spec, params, ledger, session
        self.tokenizer = tokenizer
        self.key = api_key(spec)
        # httpx scans every pooled connection on each request (O(pool) CPU per send): a client per
        # CONNECTIONS_PER_CLIENT slots keeps that scan short at high concurrency
        per_endpoint = -(-spec.concurrency // CONNECTIONS_PER_CLIENT)
        self.endpoints = [Endpoint(u, [make_client(u, self.key, spec.timeout) for _ in range(per_endpoint)])
                          for u in spec.endpoints]
        self.window = spec.concurrency * len(self.endpoints)
        self.rpm, self.tpm = TokenBucket(spec.requests_per_minute), TokenBucket(spec.tokens_per_minute)
        self.stopped: str | None = None
        self.spent = ledger.spend(teacher_key)
        self.reserved = {"tokens": 0.0, "cost": 0.0}
        self.counts = {"done": 0, "failed": 0, "retrying": 0}
        self.in_a_row = {"bad_request": 0, "unreachable": 0}  # reset by any answer
        self.pending_writes: list = []
        self.closing = False
        self.write_error: BaseException | None = None

    # -- budgets --------------------------------------------------------------------------------

    def _cost(self, prompt: float, completion: float) -> float:
        p = self.spec.prices
        return (prompt * p.prompt + completion * p.completion) / 1e6

    def _over_budget(self, prompt: int, completion: int) -> str | None:
        b = self.spec.budget
        if b.max_requests is not None and self.spent["requests"] + 1 > b.max_requests:
            return f"budget reached: teacher.budget.max_requests={b.max_requests} sends"
        tokens = self.spent["prompt_tokens"] + self.spent["completion_tokens"] + self.reserved["tokens"]
        if b.max_tokens is not None and tokens + prompt + completion > b.max_tokens:
            return f"budget reached: teacher.budget.max_tokens={b.max_tokens} (spent {tokens:.0f} incl. in flight)"
        cost = self.spent["cost"] + self.reserved["cost"]
        if b.max_cost is not None and cost + self._cost(prompt, completion) > b.max_cost:
            return f"budget reached: teacher.budget.max_cost=${b.max_cost:g} (spent ${cost:.4f} incl. in flight)"
        return None

    # -- the run --------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason

    async def run(self, todo: list[Request]) -> str | None:
        slots = asyncio.Semaphore(self.window)
        self.commit_wanted = asyncio.Event()
        writer = asyncio.create_task(self._writer())
        tasks = set()
        with live_counts("generate", len(todo)) as self.bar:
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
        prompt_est, completion_est = estimate_tokens(request, self.params, self.tokenizer)
        h = request.request_hash
        malformed = 0
        for attempt in range(self.spec.max_attempts):
            # wait first (a paused endpoint, the rate limits); then decide and reserve with no
            # await in between, so every sender sees the others' reservations
            while (wait := self._pick().paused_until - time.monotonic()) > 0 and not self.stopped:
                await asyncio.sleep(wait)
            await self.rpm.take(1)
            await self.tpm.take(prompt_est + completion_est)
            if self.stopped:
                return None, None
            if (reason := self._over_budget(prompt_est, completion_est)):
                self.stop(reason)
                return None, None
            endpoint = self._pick()
            reserve = (prompt_est + completion_est, self._cost(prompt_est, completion_est))
            self.spent["requests"] += 1
            self.reserved["tokens"] += reserve[0]
            self.reserved["cost"] += reserve[1]
            endpoint.in_flight += 1
            client = endpoint.clients[endpoint.sends % len(endpoint.clients)]
            endpoint.sends += 1
            sent_at, start = datetime.now(timezone.utc).isoformat(timespec="milliseconds"), time.perf_counter()
            used, status, asked = (0, 0), None, None
            try:
                response = await client.post(endpoint_path(self.spec), body=body, cast_to=_raw(),
                                             options={"extra_json": extra} if extra else {})
                status = response.status_code
                data = response.json()
                used = _usage(data, prompt_est, completion_est)  # billed even if we cannot store it
                completion = parse_response(request, data, self.params, self.spec, time.perf_counter() - start)
                if (problem := completion_problem(completion)):
                    raise Malformed(problem)
                kind, reason = "ok", None
            except Exception as exc:  # classified; anything unknown re-raises there
                kind, status, reason, asked = classify(exc, self.key)
                status = status or (200 if kind == "malformed" else None)
            finally:
                endpoint.in_flight -= 1
                self.reserved["tokens"] -= reserve[0]
                self.reserved["cost"] -= reserve[1]
            cost = self._cost(*used)
            self.spent["prompt_tokens"] += used[0]
            self.spent["completion_tokens"] += used[1]
            self.spent["cost"] += cost
            outcome = {"ok": "ok", "bad_request": "failed", "fatal": "failed"}.get(kind, "retry")
            attempts.append(Attempt(h, endpoint.url, sent_at, time.perf_counter() - start, outcome, status, reason,
                                    used[0], used[1], cost))
            if kind in ("ok", "malformed", "retry"):  # the endpoint answered
                self.in_a_row["unreachable"] = 0
            if kind != "bad_request":
                self.in_a_row["bad_request"] = 0
            if kind == "ok":
                return completion, None
            if kind == "fatal":
                self.stop(f"{endpoint.url}: {reason} (not retried)")
                return None, (h, reason)
            if kind == "bad_request":
                self.in_a_row["bad_request"] += 1
                if self.in_a_row["bad_request"] >= MAX_BAD_REQUESTS:
                    self.stop(f"{endpoint.url}: {MAX_BAD_REQUESTS} requests in a row refused, the last with {reason}: "
                              f"check the teacher and generation settings")
                return None, (h, f"{reason} (not retried)")
            if kind == "unreachable":
                self.in_a_row["unreachable"] += 1
                if self.in_a_row["unreachable"] >= MAX_UNREACHABLE:
                    self.stop(f"{endpoint.url}: unreachable ({reason}, {MAX_UNREACHABLE} times in a row)")
                    return None, None
            malformed += kind == "malformed"
            if malformed > MALFORMED_RETRIES or attempt + 1 >= self.spec.max_attempts:
                return None, (h, f"gave up after {len(attempts)} attempts: {reason}")
            if asked is not None and asked > self.spec.max_retry_wait:
                self.stop(f"{endpoint.url} asks to wait {asked:.0f} s (Retry-After), more than teacher.max_retry_wait="
                          f"{self.spec.max_retry_wait:g} s: rerun later to resume")
                return None, None
            delay = (asked if asked is not None else min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt)) \
                * (1 + random.uniform(0, 0.25))
            if asked is not None and status == 429:
                endpoint.paused_until = max(endpoint.paused_until, time.monotonic() + delay)
            if delay > 10:
                self.bar.note(f"{endpoint.url}: {reason}; waiting {delay:.0f} s")
            self.counts["retrying"] += 1
            self._refresh()
            await asyncio.sleep(delay)
            self.counts["retrying"] -= 1
        return None, None  # not reached: the last attempt returns above

    # -- the ledger writer: group commit, slots freed after their rows are durable ----------------

    def _commit(self, *, slots, attempts, completion=None, failure=None) -> None:
        self.pending_writes.append((completion, failure, attempts, slots))
        self.commit_wanted.set()

    async def _writer(self) -> None:
        while True:
            await self.commit_wanted.wait()
            self.commit_wanted.clear()
            batch, self.pending_writes = self.pending_writes, []
            if batch:
                completions = [c for c, _, _, _ in batch if c is not None]
                failures = dict(f for _, f, _, _ in batch if f is not None)
                attempts = [a for _, _, a, _ in batch for a in a]
                try:
                    await asyncio.to_thread(self.ledger.record, self.session, completions, failures, attempts)
                except Exception as exc:  # a locked or full disk: stop sending, report, never hang
                    self.write_error = exc
                    self.stop("the ledger could not be written")
                    for *_, slots in batch + self.pending_writes:
                        slots.release()
                    return
                self.counts["done"] += len(completions)
                self.counts["failed"] += len(failures)
                for *_, slots in batch:
                    slots.release()
                self.bar.advance(sum(c is not None or f is not None for c, f, _, _ in batch))
                self._refresh()
            if self.closing and not self.pending_writes:
                return

    def _refresh(self) -> None:
        s, c = self.spent, self.counts
        self.bar.status(f"{c['done']} done, {c['failed']} failed, {c['retrying']} retrying, "
                        f"{s['prompt_tokens'] + s['completion_tokens']:,} tok, ${s['cost']:.4f}")


def _usage(data, prompt_est: int, completion_est: int) -> tuple[int, int]:
    """(prompt, completion) tokens the endpoint says it billed; the estimate when it does not say."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return prompt_est, completion_est
    completion = usage.get("completion_tokens")
    return usage["prompt_tokens"], completion if isinstance(completion, int) else completion_est


def _raw():
    import httpx

    return httpx.Response


def dispatch(spec, params: dict, todo: list[Request], ledger: Ledger, session: int, teacher_key: str,
             tokenizer=None) -> str | None:
    """Run ``todo`` against the recipe's endpoints; returns why the run stopped early, or None."""
    if not todo:
        return None
    dispatcher = Dispatcher(spec, params, ledger, session, teacher_key, tokenizer)
    try:
        return asyncio.run(dispatcher.run(todo))
    except RuntimeError as e:
        if "event loop" in str(e):
            raise PotstillError("generate with an HTTP teacher cannot run inside a running event loop "
                                "(e.g. a notebook cell): call it from a script") from None
        raise
