"""``potstill serve MODEL_DIR``: a local Hugging Face causal LM behind an OpenAI-compatible HTTP API.

So that a local teacher (any causal LM folder with safetensors weights, such as the bundled
quickstart teacher) can be read by any OpenAI client, and so replace the local backend: greedy
output for a prompt is what :class:`~potstill.teachers.local.LocalTeacher` gives (same text, token
ids and top-k ids; logprobs to float rounding), because both generate with
:func:`~potstill.teachers.local.generate_ids`.

Supported:

- ``GET /v1/models`` (the one model), ``GET /health``.
- ``POST /v1/chat/completions``: messages (through the model's chat template), max_tokens or
  max_completion_tokens, temperature (0 is greedy), top_p, n, stop, seed, logprobs, top_logprobs
  (0..20), stream (server-sent events; usage in a last chunk with stream_options.include_usage).
- ``POST /v1/completions``: prompt as a text, texts, token ids or lists of token ids, tokenized as the
  tokenizer does by default (no chat template); the same sampling parameters; logprobs (0..20) in
  the legacy shape; echo. ``echo=true, max_tokens=0, logprobs=k`` scores a text without generating.
- vLLM's extras: ``return_tokens_as_token_ids`` (every token string in logprobs is
  ``"token_id:{id}"``: the exact ids) and, on completions, ``prompt_logprobs: k``.
- Batching: concurrent requests with the same temperature, top_p, max tokens and logprob settings
  are gathered for ``batch_wait_ms`` (or until ``max_batch_size`` rows) and run as one left-padded
  generate call, one batch at a time, in a worker thread; ``n`` > 1 is n rows.

What a client must know:

- Logprobs are the model's own distribution at temperature 1, before temperature and top_p, as
  LocalTeacher records them. The generated tokens include the EOS a completion stopped on: its
  entry is there with its logprob and its text is "" (special tokens in generated text decode to
  "", as in the returned text). Token strings are each token's share of the decoded text; use
  ``return_tokens_as_token_ids`` for exact ids (two tokens can share a string, and the legacy
  ``top_logprobs`` dicts then keep the likelier one).
- A stop string cuts the text before it (finish_reason "stop"); the tokens and logprobs run to the
  token that completed the stop string, as generation would have stopped there.
- Without max_tokens the answer may be as long as the model's ``generation_config.max_new_tokens``
  (as vLLM reads it), else the rest of the context; prompt plus max_tokens longer than the model's
  ``max_position_embeddings`` is refused.
- Left padding in a batch can change logits in the last float bits, so a request batched with
  others may differ from the same request alone by rounding.
- Seeds: sampled requests are batched whatever their seed, and a batch samples from one generator
  seeded by its requests' seeds, so a seed reproduces a sample when the batch is the same (e.g.
  the request sent alone). ``exact_seeds`` (``--exact-seeds``) runs every seeded sampled request
  in a batch of its own instead: its seed alone decides its samples, at the cost of batching.

Limits, so one request cannot exhaust the machine: with an API key every route wants it
(``Authorization: Bearer``, else a 401); a body over ``max_body_mb`` is refused unread (413); a text
longer than the context could hold in any tokens is refused before tokenizing; prompts are tokenized
one at a time in a thread of their own; a request's prompts x n must fit one batch.

Not supported, refused with a 400 rather than ignored: tools, function calls and tool turns,
roles other than system/developer/user/assistant, response_format other than text, logit_bias,
presence and frequency penalties, best_of, suffix, vLLM's top_k / min_p / repetition_penalty /
min_tokens / ignore_eos / stop_token_ids, message parts other than text. Streaming is not
incremental: the chunks are sent when the request's batch has finished. A client that disconnects
(say, a timeout it will retry) is left out of any batch not yet started.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import math
import json
import secrets
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from potstill.errors import PotstillError

try:  # the serve extra; FastAPI reads the handlers' annotations from this module
    from starlette.requests import Request as HTTPRequest
except ImportError:  # pragma: no cover - build_app says what to install
    HTTPRequest = Any
from potstill.teachers.base import Completion
from potstill.teachers.local import DTYPES, generate_ids, load_model_dir, prompt_ids

MAX_TOP_LOGPROBS = 20
SCORE_CHUNK = 512  # prompt positions scored per step of echo / prompt_logprobs
# request fields this server cannot honour, with the value that means "not used"
UNSUPPORTED = {"tools": None, "functions": None, "function_call": None, "logit_bias": None,
               "presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "suffix": None,
               "response_format": {"type": "text"}, "tool_choice": None, "parallel_tool_calls": None,
               # vLLM sampling options
               "top_k": -1, "min_p": 0, "repetition_penalty": 1, "min_tokens": 0, "ignore_eos": False,
               "stop_token_ids": None}


class APIError(Exception):
    """A request the server refuses, sent as OpenAI's error JSON with ``status``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


class Sampling(BaseModel):
    """What both endpoints take. Unknown fields are accepted, as OpenAI clients send extras; a null
    means the default, as in OpenAI's API (the official client sends null for None)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    return_tokens_as_token_ids: bool | None = False  # vLLM: token strings are "token_id:{id}"

    @model_validator(mode="after")
    def _nulls_are_defaults(self):
        for name in ("temperature", "top_p", "n", "stream", "return_tokens_as_token_ids", "logprobs", "echo"):
            if name in type(self).model_fields and getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]  # tool turns are not supported
    content: str | list[dict] | None = None

    @model_validator(mode="after")
    def _no_tool_calls(self):
        if (self.model_extra or {}).get("tool_calls") or (self.model_extra or {}).get("function_call"):
            raise ValueError("messages with tool calls are not supported")
        return self


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # vLLM


@dataclass
class Served:
    """The model a server answers with, and what requests are checked against."""

    model: Any
    tokenizer: Any
    name: str
    context: int | None  # max_position_embeddings: prompt + max_tokens must fit in it
    default_max_tokens: int | None  # generation_config.max_new_tokens
    vocab_size: int  # valid prompt token ids: those the tokenizer knows (never a padding row of the embedding)
    max_batch_size: int
    longest_token: int  # characters of the tokenizer's longest token: a text longer than context x this cannot fit
    exact_seeds: bool = False
    watermark: Any = None  # potstill.audit.Watermark on every generated token (prompt scoring is not watermarked)
    created: int = field(default_factory=lambda: int(time.time()))
    alone: dict = field(default_factory=dict)  # (id, skip_special) -> the token decoded by itself
    # Prompts are tokenized here, one at a time: off the event loop (a long text does not freeze
    # /health), and never many large prompts in memory at once.
    tokenizing: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "tokenize"))

    def check_length(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing, a text too long for the context whatever its tokens: a token
        is at most ``longest_token`` characters (tokenizing a 50 MB message took some 20 GB)."""
        if self.context is not None and chars > self.context * self.longest_token:
            raise APIError(f"the prompt is {chars:,} characters: more than the model's context ({self.context} "
                           f"tokens of at most {self.longest_token} characters) holds; shorten it", param,
                           "context_length_exceeded")

    async def tokenize(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)


@dataclass
class Scores:
    """A prompt scored by the model: entry t is about prompt token t + 1 given tokens 0..t."""

    logprobs: np.ndarray  # (L - 1,) float32, temperature 1
    ranks: np.ndarray  # (L - 1,) int: 1 is the most likely token
    top_ids: np.ndarray  # (L - 1, k)
    top_logprobs: np.ndarray  # (L - 1, k) descending


@dataclass
class Choice:
    """One answer: its text, and the generated tokens kept (to EOS, the stop string, or max_tokens)."""

    text: str
    ids: list[int]
    pieces: list[str]
    logprobs: np.ndarray | None  # (T,)
    top_ids: np.ndarray | None  # (T, k)
    top_logprobs: np.ndarray | None  # (T, k)
    finish_reason: str


@dataclass(eq=False)
class Job:
    """One prompt's rows (n copies) waiting for a batch; jobs with equal ``key`` can share one."""

    rows: list[list[int]]
    params: dict  # generate_ids params, plus token_logprobs
    key: tuple
    seed: int | None
    prompt_k: int | None  # score the prompt too, with this many top logprobs
    future: asyncio.Future | None = None
    arrived: float = 0.0


class Batcher:
    """Gathers compatible jobs for up to ``wait_s`` (or ``max_rows`` rows) and runs them as one
    batch in a worker thread, one batch at a time: the model serves one generate call at a time,
    and the event loop keeps accepting requests meanwhile."""

    def __init__(self, run_batch: Callable[[list[Job]], list], max_rows: int, wait_s: float):
        self.run_batch, self.max_rows, self.wait_s = run_batch, max_rows, wait_s
        self.pending: list[Job] = []
        self.arrived = asyncio.Event()
        self.batches = 0  # batches run so far

    async def submit(self, job: Job) -> list:
        job.future = asyncio.get_running_loop().create_future()
        job.arrived = time.monotonic()
        self.pending.append(job)
        self.arrived.set()
        return await job.future

    def _rows(self, key: tuple) -> int:
        return sum(len(j.rows) for j in self.pending if j.key == key)

    def _take(self) -> list[Job]:
        self.pending = [j for j in self.pending if not j.future.done()]  # clients that went away
        if not self.pending:
            return []
        batch, rows = [], 0
        for job in self.pending:
            if job.key == self.pending[0].key and (not batch or rows + len(job.rows) <= self.max_rows):
                batch.append(job)
                rows += len(job.rows)
        self.pending = [j for j in self.pending if j not in batch]
        return batch

    async def run(self) -> None:
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            first = self.pending[0]
            while self._rows(first.key) < self.max_rows and (left := first.arrived + self.wait_s - time.monotonic()) > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except asyncio.TimeoutError:
                    pass
            batch = self._take()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run_batch, batch)
            except Exception as e:  # the model failed (out of memory, ...): each waiting request gets a 500
                results = [e] * len(batch)
            self.batches += 1
            for job, result in zip(batch, results):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)


def run_batch(served: Served, jobs: list[Job]) -> list[list[tuple[Completion | None, Scores | None]]]:
    """Generate for all rows of ``jobs`` in one call, and score the prompts that asked for it.
    Per job, per row: (the completion or None when max_tokens is 0, the prompt's scores or None)."""
    params = dict(jobs[0].params)
    token_logprobs = params.pop("token_logprobs")
    rows = [r for job in jobs for r in job.rows]
    seeds = sorted(job.seed for job in jobs if job.seed is not None)
    seed = int(hashlib.sha256(repr(seeds).encode()).hexdigest()[:8], 16) if seeds else secrets.randbits(32)
    completions = [None] * len(rows)
    if params["max_new_tokens"]:
        completions = generate_ids(served.model, served.tokenizer, rows, params, seed, [""] * len(rows),
                                   token_logprobs=token_logprobs, watermark=served.watermark)
    out, i = [], 0
    for job in jobs:
        scores = None if job.prompt_k is None else score_prompt(served, job.rows[0], job.prompt_k)
        out.append([(c, scores) for c in completions[i:i + len(job.rows)]])
        i += len(job.rows)
    return out


@torch.no_grad()
def score_prompt(served: Served, ids: list[int], k: int) -> Scores:
    """Each prompt token's logprob given the tokens before it, its rank, and the top-k there
    (temperature 1, over the tokenizer's ids as LocalTeacher samples and caches: a model's padding
    rows are no tokens). One unpadded forward pass, so a score is what the model gives the text alone."""
    x = torch.tensor([ids], device=served.model.device)
    # the model's own logits (soft-capping, scaling and all), once; the float32 log-softmax, the
    # ranks and the top-k SCORE_CHUNK positions at a time, never an (L, V) float32 copy
    logits = served.model(input_ids=x).logits[0, :-1]  # (L - 1, V) in the model's dtype
    parts = []
    # at least one step: a one-token prompt has nothing to score, and gets empty (0, ...) arrays
    for s in range(0, max(logits.shape[0], 1), SCORE_CHUNK):
        lp = logits[s:s + SCORE_CHUNK, :served.vocab_size].float().log_softmax(-1)  # (chunk, V_tokenizer)
        chosen = lp.gather(-1, x[0, s + 1:s + 1 + lp.shape[0], None])[:, 0]
        ranks = (lp > chosen[:, None]).sum(-1) + 1
        top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        parts.append((chosen, ranks, top_ids, top_lp))
    chosen, ranks, top_ids, top_lp = (torch.cat(p).cpu().numpy() for p in zip(*parts))
    return Scores(chosen, ranks, top_ids, top_lp)


def token_pieces(tokenizer, ids: list[int], skip_special: bool) -> list[str]:
    """Each token's share of ``decode(ids)``, so that the pieces join to the text. Decoded against
    the previous token (as vLLM does), which keeps the spaces that a token alone would lose; a token
    that ends inside a multi-byte character gets "" and the character goes to the one completing it."""
    pieces, prefix, read = [], 0, 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special)
        after = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=skip_special)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before):])
            prefix, read = read, i + 1
        else:
            pieces.append("")
    if pieces and read < len(ids):
        rest = tokenizer.decode(ids[prefix:], skip_special_tokens=skip_special)
        pieces[-1] += rest[len(tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special)):]
    return pieces


def token_alone(served: Served, i: int, skip_special: bool) -> str:
    """A top-logprob alternative's string: the token decoded by itself (cached)."""
    key = (i, skip_special)
    if key not in served.alone:
        served.alone[key] = served.tokenizer.decode([i], skip_special_tokens=skip_special)
    return served.alone[key]


def logprob(x) -> float:
    """OpenAI's convention: -9999.0 stands for a token the model gives no probability; so does a
    non-finite value (an fp16 overflow), which JSON could not carry."""
    x = float(x)
    return max(x, -9999.0) if math.isfinite(x) or x == float("-inf") else -9999.0


def make_choice(tokenizer, c: Completion | None, stops: list[str]) -> Choice:
    """The completion cut at the first stop string: the text before it, the tokens through the one
    that completed it (where generation would have stopped)."""
    if c is None:
        return Choice("", [], [], None, None, None, "length")
    pieces = token_pieces(tokenizer, c.token_ids, skip_special=True)
    text, n, finish = c.text, len(c.token_ids), c.finish_reason
    found = [(at, s) for s in stops if (at := text.find(s)) >= 0]
    if found:
        at, s = min(found, key=lambda f: (f[0], -len(f[1])))
        ends = list(accumulate(map(len, pieces)))
        n = next((t + 1 for t, end in enumerate(ends) if end >= at + len(s)), n)
        text, finish = text[:at], "stop"
    lps, top_ids, top_lps = (None if a is None else a[:n] for a in (c.token_logprobs, c.topk_ids, c.topk_logprobs))
    return Choice(text, c.token_ids[:n], pieces[:n], lps, top_ids, top_lps, finish)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


def check_request(served: Served, body: Sampling) -> None:
    """The model name, n, and the fields this server refuses rather than ignores."""
    if body.model != served.name:
        raise APIError(f"model {body.model!r} not found: this server serves {served.name!r} (GET /v1/models)",
                       "model", "model_not_found", 404)
    if body.n > served.max_batch_size:
        raise APIError(f"n={body.n} is more than this server's max batch size ({served.max_batch_size}): "
                       "ask for fewer, or restart it with a larger --max-batch-size", "n")
    extra = body.model_extra or {}
    for name, unused in UNSUPPORTED.items():
        if extra.get(name) not in (None, unused):
            raise APIError(f"{name} is not supported by potstill serve: leave it out", name, "unsupported_parameter")


def max_new_tokens(served: Served, prompt_len: int, requested: int | None, minimum: int, param: str) -> int:
    """``requested``, or by default the model's generation_config max_new_tokens (as vLLM reads it),
    or else the rest of the context. Refused when prompt and answer do not fit the context."""
    room = None if served.context is None else served.context - prompt_len
    if room is not None and room < minimum:
        raise APIError(f"the prompt is {prompt_len} tokens and the model's context is {served.context}: "
                       "shorten the prompt", param, "context_length_exceeded")
    if requested is None:
        requested = min((x for x in (served.default_max_tokens, room) if x is not None), default=16)
    if requested < minimum:
        raise APIError(f"max_tokens must be at least {minimum}", "max_tokens")
    if room is not None and requested > room:
        raise APIError(f"the prompt ({prompt_len} tokens) plus max_tokens ({requested}) is more than the "
                       f"model's context ({served.context} tokens): shorten the prompt or lower max_tokens",
                       "max_tokens", "context_length_exceeded")
    return requested


def make_job(body: Sampling, ids: list[int], max_new: int, k: int, token_logprobs: bool, prompt_k: int | None,
             solo: str | None) -> Job:
    """Rows for one prompt. ``solo`` (one per seeded sampled request) keeps a seeded request out of
    other requests' batches, so that its seed alone decides its samples."""
    greedy = body.temperature == 0
    params = {"temperature": body.temperature, "top_p": 1.0 if greedy else body.top_p, "max_new_tokens": max_new,
              "top_logprobs": k, "token_logprobs": token_logprobs}
    return Job([ids] * body.n, params, (*params.values(), solo), body.seed, prompt_k)


def solo_key(served: Served, body: Sampling) -> str | None:
    return uuid.uuid4().hex if served.exact_seeds and body.seed is not None and body.temperature > 0 else None


def chat_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of the messages through the chat template, as LocalTeacher builds them."""
    flat = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise APIError(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(part.get("text", "") for part in content)
        flat.append({**m.model_dump(exclude_none=True), "content": content or ""})
    try:
        return prompt_ids(tokenizer, flat)
    except TemplateError as e:
        raise APIError(f"the model's chat template rejected the messages: {e}", "messages") from None


def completion_prompts(served: Served, prompt) -> list[list[int]]:
    """The prompt(s) as token ids: texts tokenized as the tokenizer does by default, ids as given."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    rows = [served.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]
    if not rows or not all(rows):
        raise APIError("prompt is empty: give a text or at least one token id", "prompt")
    bad = [i for row in rows for i in row if not 0 <= i < served.vocab_size]
    if bad:
        raise APIError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{served.vocab_size - 1})",
                       "prompt")
    return rows


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_name(i: int, text: str, as_ids: bool) -> str:
    return f"token_id:{i}" if as_ids else text


def chat_logprobs(served: Served, ch: Choice, as_ids: bool) -> list[dict]:
    """OpenAI's ``logprobs.content``: one entry per generated token, EOS included."""
    out = []
    for t, (i, piece) in enumerate(zip(ch.ids, ch.pieces)):
        top = []
        if ch.top_ids is not None:
            for j, lp in zip(ch.top_ids[t].tolist(), ch.top_logprobs[t]):
                alone = token_alone(served, j, True)
                top.append({"token": token_name(j, alone, as_ids), "logprob": logprob(lp),
                            "bytes": list(alone.encode())})
        out.append({"token": token_name(i, piece, as_ids), "logprob": logprob(ch.logprobs[t]),
                    "bytes": list(piece.encode()), "top_logprobs": top})
    return out


async def chat_completion(served: Served, batcher: Batcher, body: ChatRequest):
    """A chat completion (dict), or its server-sent events (async iterator) when ``stream``."""
    check_request(served, body)
    if body.top_logprobs and not body.logprobs:
        raise APIError("top_logprobs needs logprobs=true", "top_logprobs")
    served.check_length(sum(len(m.content) if isinstance(m.content, str) else
                            sum(len(str(part.get("text", ""))) for part in m.content or ()) for m in body.messages),
                        "messages")
    ids = await served.tokenize(chat_prompt, served.tokenizer, body.messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_new = max_new_tokens(served, len(ids), requested, 1, "messages")
    k = (body.top_logprobs or 0) if body.logprobs else 0
    rows = await batcher.submit(make_job(body, ids, max_new, k, body.logprobs, None, solo_key(served, body)))
    stops = stop_strings(body.stop)
    choices = [make_choice(served.tokenizer, c, stops) for c, _ in rows]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    total = usage(len(ids), sum(len(ch.ids) for ch in choices))

    def lp(ch):
        return {"content": chat_logprobs(served, ch, body.return_tokens_as_token_ids)} if body.logprobs else None

    if not body.stream:
        return {**head, "object": "chat.completion", "usage": total, "choices": [
            {"index": n, "message": {"role": "assistant", "content": ch.text}, "logprobs": lp(ch),
             "finish_reason": ch.finish_reason} for n, ch in enumerate(choices)]}
    chunks = []
    for n, ch in enumerate(choices):
        chunks.append([{"index": n, "delta": {"role": "assistant", "content": ch.text}, "logprobs": lp(ch),
                        "finish_reason": None}])
        chunks.append([{"index": n, "delta": {}, "logprobs": None, "finish_reason": ch.finish_reason}])
    events = [{**head, "object": "chat.completion.chunk", "choices": c} for c in chunks]
    if (body.stream_options or {}).get("include_usage"):
        events.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": total})
    return sse(events)


def legacy_logprobs(served: Served, rows: list[tuple], as_ids: bool) -> dict:
    """The completions endpoint's logprobs. ``rows``, one per token of the returned text: (id, piece,
    logprob, top (id, logprob) pairs, skip_special), logprob and top None for an echoed prompt's
    first token. Two alternatives with the same string keep the likelier (it comes first)."""
    tops = []
    for i, piece, lp, top, skip in rows:
        named = None if top is None else {}
        for j, v in top or ():
            named.setdefault(token_name(j, token_alone(served, j, skip), as_ids), logprob(v))
        tops.append(named)
    return {"tokens": [token_name(r[0], r[1], as_ids) for r in rows],
            "token_logprobs": [None if r[2] is None else logprob(r[2]) for r in rows],
            "top_logprobs": tops,
            "text_offset": [0, *accumulate(len(r[1]) for r in rows)][:len(rows)]}


def vllm_prompt_logprobs(served: Served, ids: list[int], s: Scores, k: int, as_ids: bool) -> list:
    """vLLM's ``prompt_logprobs``: None for the first token, then {id: {logprob, rank, decoded_token}}
    with the top-k and the prompt's own token."""
    out = [None]
    for t, i in enumerate(ids[1:]):
        row = {str(j): {"logprob": logprob(v), "rank": r + 1,
                        "decoded_token": token_name(j, token_alone(served, j, False), as_ids)}
               for r, (j, v) in enumerate(zip(s.top_ids[t, :k].tolist(), s.top_logprobs[t, :k]))}
        row.setdefault(str(i), {"logprob": logprob(s.logprobs[t]), "rank": int(s.ranks[t]),
                                "decoded_token": token_name(i, token_alone(served, i, False), as_ids)})
        out.append(row)
    return out


def completion_choice(served: Served, body: CompletionRequest, ids: list[int], c: Completion | None,
                      scores: Scores | None, stops: list[str], index: int) -> tuple[dict, int]:
    """One choice of /v1/completions, and the number of tokens it generated."""
    ch = make_choice(served.tokenizer, c, stops)
    prompt = token_pieces(served.tokenizer, ids, skip_special=False) if body.echo else []
    choice = {"index": index, "text": "".join(prompt) + ch.text, "finish_reason": ch.finish_reason, "logprobs": None}
    if body.logprobs is not None:
        k, rows = body.logprobs, []
        if body.echo:
            rows.append((ids[0], prompt[0], None, None, False))
            rows += [(i, piece, scores.logprobs[t], zip(scores.top_ids[t, :k].tolist(), scores.top_logprobs[t, :k]), False)
                     for t, (i, piece) in enumerate(zip(ids[1:], prompt[1:]))]
        rows += [(i, piece, ch.logprobs[t], () if ch.top_ids is None else zip(ch.top_ids[t].tolist(), ch.top_logprobs[t]), True)
                 for t, (i, piece) in enumerate(zip(ch.ids, ch.pieces))]
        choice["logprobs"] = legacy_logprobs(served, rows, body.return_tokens_as_token_ids)
    if body.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(served, ids, scores, body.prompt_logprobs,
                                                         body.return_tokens_as_token_ids)
    return choice, len(ch.ids)


async def completion(served: Served, batcher: Batcher, body: CompletionRequest):
    """A text completion (dict), or its server-sent events (async iterator) when ``stream``."""
    check_request(served, body)
    listed = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) else [body.prompt]
    if len(listed) * body.n > served.max_batch_size:
        raise APIError(f"{len(listed)} prompts x n={body.n} is more than this server's max batch size "
                       f"({served.max_batch_size}): send fewer per request, or restart it with a larger "
                       "--max-batch-size", "prompt")
    for p in listed:
        if isinstance(p, str):  # a list of ids is checked against the context exactly, and cheaply
            served.check_length(len(p), "prompt")
    prompts = await served.tokenize(completion_prompts, served, body.prompt)
    wanted = [x for x in (body.logprobs if body.echo else None, body.prompt_logprobs) if x is not None]
    prompt_k = max(wanted) if wanted else None
    solo = solo_key(served, body)
    jobs = [make_job(body, ids, max_new_tokens(served, len(ids), body.max_tokens, 0, "prompt"), body.logprobs or 0,
                     body.logprobs is not None, prompt_k, solo) for ids in prompts]
    results = await asyncio.gather(*(batcher.submit(job) for job in jobs))
    stops = stop_strings(body.stop)
    choices, generated = [], 0
    for ids, rows in zip(prompts, results):
        for c, scores in rows:
            choice, n = completion_choice(served, body, ids, c, scores, stops, len(choices))
            choices.append(choice)
            generated += n
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name}
    total = usage(sum(map(len, prompts)), generated)
    if not body.stream:
        return {**head, "choices": choices, "usage": total}
    events = [{**head, "choices": [c]} for c in choices]
    if (body.stream_options or {}).get("include_usage"):
        events.append({**head, "choices": [], "usage": total})
    return sse(events)


async def sse(events: list[dict]):
    for event in events:
        yield f"data: {json.dumps(event, allow_nan=False)}\n\n"
    yield "data: [DONE]\n\n"


def load_served(model_dir: str | Path, model_name: str | None, dtype: str, device: str, max_batch_size: int) -> Served:
    if dtype not in DTYPES:
        raise PotstillError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if max_batch_size < 1:
        raise PotstillError(f"max batch size must be at least 1 (got {max_batch_size})")
    model, tokenizer = load_model_dir(model_dir, "model", dtype, device)
    # A fast tokenizer resets its padding and truncation settings on its first encode; done here,
    # before the tokenizing and the generating threads use it at once ("Already borrowed").
    tokenizer("")
    # a token's vocabulary string has at least as many characters as its text (byte-level BPE
    # spells each byte as a character, SentencePiece each space as "▁")
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return Served(model, tokenizer, model_name or Path(model_dir).resolve().name,
                  getattr(model.config, "max_position_embeddings", None),
                  getattr(model.generation_config, "max_new_tokens", None),
                  min(model.get_input_embeddings().num_embeddings, len(tokenizer)), max_batch_size, max(longest, 1))


def validation_message(problems: list[dict]) -> tuple[str, str | None]:
    """FastAPI's validation errors as one line and the top-level field at fault (OpenAI's ``param``:
    a string or null). A field that may take several types (a completion's prompt, a message's
    content) fails once per type: that is said once, with the types."""
    first = problems[0]
    if first["type"] == "json_invalid":  # its loc holds the character offset, not a field
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}): send a JSON object", None
    loc = first["loc"][1:]
    field = loc[0] if loc and isinstance(loc[0], str) else None
    same = [p["loc"][1:] for p in problems if p["loc"][1:2] == loc[:1]]
    n = next(i for i in range(len(loc) + 1) if i == len(loc) or any(len(l) <= i or l[i] != loc[i] for l in same))
    if len(same) > 1 and all(len(l) > n and isinstance(l[n], str) and is_type_tag(l[n]) for l in same):
        where = ".".join(map(str, loc[:n]))
        return f"{where}: expected {' or '.join(dict.fromkeys(l[n] for l in same))}", field
    return f"{'.'.join(map(str, loc)) or 'body'}: {first['msg']}", field


def is_type_tag(name: str) -> bool:
    """Whether a validation error's location step names a union member (``list[int]``), not a field."""
    return "[" in name or name in ("str", "int", "float", "bool", "dict", "list", "none")


def require_server_libraries() -> None:
    """fastapi and uvicorn are needed by this verb only, so they are imported when it runs."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PotstillError("potstill serve needs fastapi and uvicorn: pip install 'potstill[serve]'") from None


class Guard:
    """The ASGI layer in front of every route: the API key (OpenAI's ``Authorization: Bearer``),
    then the body size, counted as it arrives, so an oversized body is refused before it is held
    in memory, parsed or tokenized."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await reply(send, 401, "a valid API key is needed: send it as 'Authorization: Bearer KEY' "
                               "(the openai client's api_key)", "invalid_api_key")
        too_large = (f"the request body is over {self.max_body_bytes:,} bytes: send less, or restart the server "
                     "with a larger --max-body-mb")
        if int(headers.get(b"content-length", b"0") or 0) > self.max_body_bytes:
            return await reply(send, 413, too_large, "request_too_large")
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # a chunked body, sent without a length
                raise BodyTooLarge(413, too_large)
            return message

        await self.app(scope, counted, send)


try:  # an HTTPException, as FastAPI passes those on from reading a body (others become a 400)
    from starlette.exceptions import HTTPException as _HTTPException

    class BodyTooLarge(_HTTPException):
        pass
except ImportError:  # pragma: no cover - build_app says what to install
    BodyTooLarge = None


async def reply(send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_app(model_dir: str | Path, *, model_name: str | None = None, dtype: str = "float32", device: str = "cpu",
              max_batch_size: int = 32, batch_wait_ms: float = 5.0, exact_seeds: bool = False,
              api_key: str | None = None, max_body_mb: float = 16, watermark=None):
    """The FastAPI app serving the model in ``model_dir``, its samples watermarked with ``watermark``
    when given. ``app.state.batcher.batches`` counts the
    batches run: one generate call each (and the prompt scorings its requests asked for). With
    ``api_key``, every route wants it; bodies over ``max_body_mb`` are refused unread."""
    require_server_libraries()
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    if batch_wait_ms < 0:
        raise PotstillError(f"batch wait must be 0 ms or more (got {batch_wait_ms})")
    if not max_body_mb > 0:
        raise PotstillError(f"max body size must be more than 0 MB (got {max_body_mb})")
    if api_key is not None and not api_key.strip():
        raise PotstillError("the API key is empty: give one, or leave --api-key out")
    served = load_served(model_dir, model_name, dtype, device, max_batch_size)
    served.exact_seeds, served.watermark = exact_seeds, watermark
    batcher = Batcher(lambda jobs: run_batch(served, jobs), max_batch_size, batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        served.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="potstill serve", lifespan=lifespan)
    app.state.served, app.state.batcher = served, batcher
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=int(max_body_mb * 2**20))

    def error(status: int, message: str, param: str | None = None, code: str | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error(400, *validation_message(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        if isinstance(e, BodyTooLarge):
            return error(e.status_code, e.detail, code="request_too_large")
        return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        return error(500, f"the server failed: {type(e).__name__}: {e}")

    def respond(result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "potstill", "max_model_len": served.context}]}

    async def unless_gone(request, work):
        """``work``'s result, or None once the client has disconnected: its jobs are then
        cancelled, and a batch not yet started leaves them out (a timed-out client retries, and
        would otherwise have the server answer every request twice)."""
        task = asyncio.ensure_future(work)

        async def gone():
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)

        watcher = asyncio.ensure_future(gone())
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            return JSONResponse({"error": {"message": "client disconnected", "type": "server_error", "param": None,
                                           "code": None}}, status_code=499)
        watcher.cancel()
        return respond(task.result())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest):
        return await unless_gone(request, chat_completion(served, batcher, body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await unless_gone(request, completion(served, batcher, body))

    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to listen on, or one clear error when the address
    is taken: bound here rather than by uvicorn so that the failure says what to do."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PotstillError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None
    return sock


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          dtype: str = "float32", device: str = "cpu", max_batch_size: int = 32, batch_wait_ms: float = 5.0,
          exact_seeds: bool = False, api_key: str | None = None, max_body_mb: float = 16, watermark=None) -> None:
    """Serve the model in ``model_dir`` until interrupted (Ctrl-C)."""
    require_server_libraries()
    import uvicorn

    sock = bind(host, port)  # before the model loads: a taken port fails at once
    if api_key is None and not loopback(host):
        print(f"potstill serve: warning: listening on {host} without an API key: anyone who can reach this port "
              "can use the model (set --api-key-env or --api-key)", file=sys.stderr, flush=True)
    try:
        app = build_app(model_dir, model_name=model_name, dtype=dtype, device=device, max_batch_size=max_batch_size,
                        batch_wait_ms=batch_wait_ms, exact_seeds=exact_seeds, api_key=api_key, max_body_mb=max_body_mb,
                        watermark=watermark)
    except BaseException:
        sock.close()
        raise
    marked = f", watermarked (key id {watermark.key_id})" if watermark else ""
    print(f"potstill serve: {app.state.served.name} at http://{host}:{sock.getsockname()[1]}/v1{marked} (Ctrl-C stops)",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: whatever it resolves to, it may be reachable from elsewhere
        return False
