"""An OpenAI-compatible chat endpoint that misbehaves, and bills like a provider: the bench's own
fault injector, independent of tests/mock_endpoint.py (another stack: the standard library's
threaded ``http.server``, not asyncio; its own answers, faults and accounting).

    python bench/fault_server.py --faults 0.1 --latency 0.02 [--seed 0]   # prints its port

GET /stats returns what it received and billed. It bills as a provider would: every request it
generated an answer for (a 200, whatever happened to the body on the way: truncated, reset
after the answer, trickled past the client's deadline, NaN logprobs, a lie in ``usage``), at
its own honest count, never 429s, 5xx, 401s or resets before an answer. Faults (each equally
likely, ``--faults`` of all sends together):

    429 with an HTTP-date Retry-After, 503, reset before the answer, reset after it, truncated
    body, invalid JSON, no choices, NaN logprob, short top-k, token id 99999, usage 10^9,
    usage -10^6, usage 10^30, trickle (a byte per 50 ms), Retry-After "1e9", 401 echoing the
    key masked and as a 20-character prefix.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429_date", "503", "reset_before", "reset_after", "truncated", "invalid_json", "no_choices", "nan",
          "short_topk", "bad_id", "usage_huge", "usage_negative", "usage_overflow", "trickle", "retry_after_1e9",
          "401_echo")
VOCAB = 41  # ids under the bundled teacher's vocabulary


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sends = 0
        self.faults: dict[str, int] = {}
        self.billed_prompt = 0
        self.billed_completion = 0
        self.billed_answers = 0

    def as_dict(self) -> dict:
        with self.lock:
            return {"sends": self.sends, "faults": dict(self.faults), "billed_answers": self.billed_answers,
                    "billed_prompt_tokens": self.billed_prompt, "billed_completion_tokens": self.billed_completion}


def answer(body: dict) -> tuple[dict, int, int]:
    """(chat completion, prompt tokens, completion tokens): the last message's words sorted, one
    token per character, ids = character code modulo VOCAB."""
    messages = body.get("messages") or []
    prompt_tokens = sum(len(str(m.get("content", ""))) + 3 for m in messages)
    limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
    last = str(messages[-1].get("content", "")) if messages else ""
    text = " ".join(sorted(last.split()))[:limit]
    k = int(body.get("top_logprobs") or 0)
    ids = body.get("return_tokens_as_token_ids")

    def tok(code: int) -> str:
        return f"token_id:{code % VOCAB}" if ids else chr(code)

    content = [{"token": tok(ord(ch)), "logprob": -0.05, "bytes": None,
                "top_logprobs": [{"token": tok(ord(ch) + j), "logprob": -0.05 - 0.5 * j, "bytes": None}
                                 for j in range(k)]} for ch in text]
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": "length" if len(text) == limit else "stop",
              "logprobs": {"content": content} if body.get("logprobs") else None}
    return ({"id": "chatcmpl-fault", "object": "chat.completion", "created": int(time.time()),
             "model": body.get("model"), "choices": [choice],
             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text),
                       "total_tokens": prompt_tokens + len(text)}}, prompt_tokens, len(text))


def make_handler(stats: Stats, rate: float, latency: float, rng: random.Random, kinds: tuple[str, ...]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, payload: bytes, headers: dict | None = None, length: int | None = None):
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

        def do_GET(self):
            self._send(200, json.dumps(stats.as_dict()).encode())

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            body = json.loads(raw)
            with stats.lock:
                stats.sends += 1
                fault = rng.choice(kinds) if rng.random() < rate else "ok"
                stats.faults[fault] = stats.faults.get(fault, 0) + 1
            time.sleep(latency)
            if fault in ("429_date", "retry_after_1e9"):
                when = "1e9" if fault == "retry_after_1e9" else email.utils.formatdate(time.time() + 2, usegmt=True)
                return self._send(429, b'{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}',
                                  {"retry-after": when})
            if fault == "503":
                return self._send(503, b'{"detail": "overloaded"}')
            if fault == "401_echo":
                key = self.headers.get("authorization", "").removeprefix("Bearer ")
                msg = f"Incorrect API key provided: {key[:8]}{'*' * 20}{key[-4:]}; key {key[:20]} revoked"
                return self._send(401, json.dumps({"error": {"message": msg, "code": "invalid_api_key"}}).encode())
            if fault == "reset_before":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            data, p, c = answer(body)
            with stats.lock:  # an answer was generated: billed, whatever happens to it now
                stats.billed_answers += 1
                stats.billed_prompt += p
                stats.billed_completion += c
            choice = data["choices"][0]
            if fault == "no_choices":
                data["choices"] = []
            elif fault == "nan" and choice["logprobs"] and choice["logprobs"]["content"]:
                choice["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] = float("nan")
            elif fault == "short_topk" and choice["logprobs"] and choice["logprobs"]["content"]:
                choice["logprobs"]["content"][-1]["top_logprobs"].pop()
            elif fault == "bad_id" and choice["logprobs"] and choice["logprobs"]["content"]:
                choice["logprobs"]["content"][0]["top_logprobs"][-1]["token"] = "token_id:99999"
            elif fault == "usage_huge":
                data["usage"] = {"prompt_tokens": 10**9, "completion_tokens": 10**9, "total_tokens": 2 * 10**9}
            elif fault == "usage_negative":
                data["usage"] = {"prompt_tokens": -10**6, "completion_tokens": -10**6, "total_tokens": -2 * 10**6}
            elif fault == "usage_overflow":
                data["usage"] = {"prompt_tokens": 10**30, "completion_tokens": 10**30, "total_tokens": 2 * 10**30}
            payload = json.dumps(data).encode()
            if fault == "invalid_json":
                payload = payload[:len(payload) // 2] + b" " * (len(payload) - len(payload) // 2)
            if fault == "reset_after":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault == "truncated":
                self.close_connection = True
                return self._send(200, payload[:len(payload) // 2], length=len(payload))
            if fault == "trickle":
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                try:
                    for i in range(len(payload)):
                        self.wfile.write(payload[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:  # the client gave up: its deadline
                    self.close_connection = True
                return
            self._send(200, payload)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--faults", type=float, default=0.1, help="fraction of sends that get a fault")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds before each answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(f for f in FAULTS if f != "401_echo"),
                        help="comma-separated faults to draw from (default: all but 401_echo, which stops a run)")
    args = parser.parse_args()
    stats = Stats()
    server = ThreadingHTTPServer(("127.0.0.1", args.port),
                                 make_handler(stats, args.faults, args.latency, random.Random(args.seed),
                                              tuple(args.kinds.split(","))))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
