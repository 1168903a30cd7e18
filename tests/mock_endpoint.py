"""A loopback OpenAI-compatible chat endpoint with a fixed latency and injected faults.

Plain asyncio HTTP/1.1 (keep-alive, Content-Length bodies) so a fault can be exactly what a real
network does: a reset is a closed socket, a truncated body is a short read. Every request is
logged by the sha256 of its JSON body, which is how tests count re-sends. Used by the tests and
by bench/http_bench.py (run it as a separate process there: ``python tests/mock_endpoint.py``).

Faults are drawn per (body without its seed, attempt) from a seeded hash, so a run is reproducible:

    429 with Retry-After (seconds or ms), 500/503, reset, timeout (sleep past the client's),
    trickle (the body a byte at a time), truncated body, invalid JSON, NaN logprobs, no logprobs,
    a token id outside the vocabulary, FastAPI's 422 ``{"detail": ...}``, and the fatal ones 400,
    401 (echoing the key, masked and as a prefix), insufficient_quota. ``usage`` replaces the
    honest usage of every answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field


VOCAB = 41  # the bundled teacher's tokenizer (examples/quickstart/teacher)


def body_sha256(body: dict) -> str:
    """How the mock names a request in its log: the sha256 of its canonical JSON body."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_shas(recipe) -> dict[str, str]:
    """body sha256 (what the mock logs) -> request hash, for every request of an HTTP recipe."""
    from potstill.generate import recipe_requests, sampling_params
    from potstill.ledger import requests_for, teacher_key
    from potstill.prompts import load_prompts
    from potstill.records import Request
    from potstill.teachers.openai.wire import request_body, split_extras

    desc, _ = recipe_requests(recipe)
    params = sampling_params(recipe)
    out = {}
    for h, p, i in requests_for(teacher_key(desc), load_prompts(recipe.prompts.path, recipe.prompts.limit), params,
                                recipe.generation.samples_per_prompt):
        body, extra = split_extras(request_body(Request(h, p.chat, i, params["seed"]), params, recipe.teacher, None))
        out[body_sha256({**body, **extra})] = h
    return out


@dataclass
class Faults:
    """Probabilities of each fault per attempt; ``retry_after`` as sent with a 429."""

    rate_limit: float = 0.0
    retry_after: str = "1"  # header value; "ms:250" sends retry-after-ms: 250 instead
    server_error: float = 0.0
    reset: float = 0.0
    timeout: float = 0.0
    truncated: float = 0.0
    invalid_json: float = 0.0
    nan: float = 0.0
    trickle: float = 0.0
    no_logprobs: float = 0.0
    bad_id: float = 0.0
    detail: float = 0.0
    fatal: dict[str, float] = field(default_factory=dict)  # "400" / "401" / "insufficient_quota" -> probability
    timeout_seconds: float = 30.0
    trickle_seconds: float = 0.05  # between two bytes of a trickled body
    usage: dict | None = None
    seed: int = 0
    sticky: bool = False  # a body's fault is the same at every attempt (a prompt that always fails)


class MockEndpoint:
    def __init__(self, latency: float = 0.0, faults: Faults | None = None, rule=None):
        self.latency = latency
        self.rule = rule  # the last message's text -> the answer's (default: the message reversed)
        self.faults = faults or Faults()
        self.log: list[tuple[float, str, str]] = []  # (monotonic time, body sha256, what was answered)
        self.attempts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.server = None
        self.port = None

    # -- what to answer ------------------------------------------------------------------------

    def _draw(self, sha: str, attempt: int) -> str:
        attempt = 0 if self.faults.sticky else attempt
        u = int(hashlib.sha256(f"{self.faults.seed}:{sha}:{attempt}".encode()).hexdigest()[:12], 16) / 16 ** 12
        f = self.faults
        for name, p in [("rate_limit", f.rate_limit), ("server_error", f.server_error), ("reset", f.reset),
                        ("timeout", f.timeout), ("truncated", f.truncated), ("invalid_json", f.invalid_json),
                        ("nan", f.nan), ("trickle", f.trickle), ("no_logprobs", f.no_logprobs), ("bad_id", f.bad_id),
                        ("detail", f.detail), *f.fatal.items()]:
            if u < p:
                return name
            u -= p
        return "ok"

    @staticmethod
    def completion(body: dict, nan: bool = False, rule=None) -> dict:
        """A deterministic answer: the last message reversed (or ``rule`` of it), one token per character; with
        ``return_tokens_as_token_ids`` tokens read ``token_id:N`` (N = the character's code modulo
        ``VOCAB``: an id the bundled teacher's tokenizer has)."""
        prompt = body["messages"][-1]["content"] if "messages" in body else str(body.get("prompt"))
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        full = rule(prompt) if rule else prompt[::-1]
        text = full[:limit]
        finish = "stop" if len(full) <= limit else "length"
        for stop in body.get("stop") or []:
            if stop in text:
                text, finish = text[:text.index(stop)], "stop"
        ids = body.get("return_tokens_as_token_ids")
        k = body.get("top_logprobs") or 0

        def token(ch: str) -> str:
            return f"token_id:{ord(ch) % VOCAB}" if ids else ch

        content = []
        for ch in text:
            top = [{"token": token(chr(ord(ch) + j)), "logprob": -0.1 - j, "bytes": None} for j in range(k)]
            content.append({"token": token(ch), "logprob": float("nan") if nan else -0.1, "bytes": None,
                            "top_logprobs": top})
        if nan and content and k:
            content[0]["top_logprobs"][0]["logprob"] = float("nan")
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": {"content": content} if body.get("logprobs") else None}
        return {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "mock"), "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text),
                          "total_tokens": len(prompt) + len(text)}}

    async def _answer(self, body: dict, key: str = "") -> tuple[int, dict, bytes, str]:
        """(status, extra headers, body bytes, what) for one request; ``what`` goes to the log."""
        sha = body_sha256(body)
        attempt = self.attempts.get(sha, 0)
        self.attempts[sha] = attempt + 1
        # drawn from the body without its seed: potstill derives seeds from request keys, which name
        # the endpoint and so the mock's port; this keeps a test's fault schedule the same every run
        what = self._draw(body_sha256({k: v for k, v in body.items() if k != "seed"}), attempt)
        self.log.append((time.monotonic(), sha, what))
        if self.latency:
            await asyncio.sleep(self.latency)
        if what == "rate_limit":
            ra = self.faults.retry_after
            header = {"retry-after-ms": ra[3:]} if ra.startswith("ms:") else {"retry-after": ra}
            return 429, header, _error("Rate limit reached", "rate_limit_exceeded"), what
        if what == "server_error":
            return 503, {}, _error("overloaded", None), what
        if what == "timeout":
            await asyncio.sleep(self.faults.timeout_seconds)
        if what == "400":
            return 400, {}, _error("bad request", None), what
        if what == "401":
            # as OpenAI does: the message echoes the key, masked; and as others do, a long prefix of it
            return 401, {}, _error(f"Incorrect API key provided: {key[:8]}{'*' * 20}{key[-4:]}. The key starting "
                                   f"{key[:20]} was revoked", "invalid_api_key"), what
        if what == "detail":  # FastAPI's HTTPException, as transformers serve sends a wrong model name
            return 422, {}, json.dumps({"detail": f"Server is pinned to 'mock-7b'; requested '{body.get('model')}'"}
                                       ).encode(), what
        if what == "insufficient_quota":
            return 429, {}, _error("You exceeded your current quota", "insufficient_quota"), what
        answer = self.completion(body, nan=what == "nan", rule=self.rule)
        if what == "no_logprobs":
            answer["choices"][0]["logprobs"] = None
        if what == "bad_id" and answer["choices"][0]["logprobs"] and answer["choices"][0]["logprobs"]["content"]:
            answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"][-1]["token"] = "token_id:99999"
        if self.faults.usage is not None:
            answer["usage"] = self.faults.usage
        payload = json.dumps(answer).encode()
        if what == "invalid_json":
            payload = payload[: len(payload) // 2] + b" " * (len(payload) - len(payload) // 2)
        return 200, {}, payload, what

    # -- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", 0)))
                method, path = line.decode().split()[:2]
                if method == "GET" and path.endswith("/models"):
                    self._write(writer, 200, {}, json.dumps({"object": "list", "data": [{"id": "mock", "object": "model",
                                                              "created": 0, "owned_by": "potstill"}]}).encode())
                    continue
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    key = headers.get("authorization", "").removeprefix("Bearer ")
                    status, extra, payload, what = await self._answer(json.loads(raw), key)
                finally:
                    self.in_flight -= 1
                if what == "reset":
                    writer.transport.abort()
                    return
                if what == "trickle":
                    writer.write(_head(200, {}, len(payload)))
                    for i in range(len(payload)):
                        writer.write(payload[i:i + 1])
                        await writer.drain()
                        await asyncio.sleep(self.faults.trickle_seconds)
                    continue
                if what == "truncated":
                    head = _head(200, {}, len(payload))
                    writer.write(head + payload[: len(payload) // 2])
                    await writer.drain()
                    writer.transport.abort()
                    return
                self._write(writer, status, extra, payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    def _write(writer, status: int, extra: dict, payload: bytes) -> None:
        writer.write(_head(status, extra, len(payload)) + payload)

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- in a background thread, for tests ------------------------------------------------------

    def start_in_thread(self) -> MockEndpoint:
        ready = threading.Event()

        def main():
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(self.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def stop_thread(self) -> None:
        async def shutdown():  # end the handlers still sleeping (timeouts, latency) while the loop runs
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _head(status: int, extra: dict, length: int) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 422: "Unprocessable Entity", 429: "Too Many Requests",
              503: "Service Unavailable"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {length}",
             *(f"{k}: {v}" for k, v in extra.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _error(message: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "mock_error", "param": None, "code": code}}).encode()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--faults", default="{}", help="JSON of Faults fields")
    parser.add_argument("--log", default=None, help="write the request log here (JSONL) on SIGTERM")
    args = parser.parse_args()
    mock = MockEndpoint(args.latency, Faults(**json.loads(args.faults)))

    async def main():
        import signal

        await mock.start(args.port)
        print(mock.port, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        if args.log:
            with open(args.log, "w") as f:
                for t, sha, what in mock.log:
                    f.write(json.dumps({"t": t, "sha": sha, "what": what}) + "\n")

    asyncio.run(main())
