"""``potstill serve MODEL_DIR``: a local Hugging Face causal LM behind an OpenAI-compatible HTTP API.

So that a local teacher (any causal LM folder with safetensors weights, such as the bundled
quickstart teacher) can be read by any OpenAI client, and so replace the local backend: greedy
output for a prompt is what :class:`~potstill.hf.LocalModel` gives (same text, token
ids and top-k ids; logprobs to float rounding), because both generate with
:func:`~potstill.hf.generate_ids`.

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
  LocalModel records them. The generated tokens include the EOS a completion stopped on: its
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
(``Authorization: Bearer``, the scheme in any case, else a 401); a body over ``max_body_mb`` is
refused unread (413). The rest is checked in the parsed JSON, before any pydantic object, chat
template or tokenizer (400): at most ``max_messages`` messages and as many content parts; texts no
longer in all than the context could hold in any tokens; lists of token ids no longer than the
context; a request's prompts x n within one batch; no lone surrogate (``"\\ud800"``, half of a
UTF-16 pair, which no tokenizer encodes) in a text. Bodies are parsed, validated, templated and
tokenized off the event loop: those over 1 MiB one at a time, apart from the smaller ones, so a
large body neither stops the server answering nor makes a small request wait.

Not supported, refused with a 400 rather than ignored: tools, function calls and tool turns,
roles other than system/developer/user/assistant, response_format other than text, logit_bias,
presence and frequency penalties, best_of, suffix, vLLM's top_k / min_p / repetition_penalty /
min_tokens / ignore_eos / stop_token_ids, message parts other than text. Streaming is not
incremental: the chunks are sent when the request's batch has finished. A client that disconnects
(say, a timeout it will retry) is left out of any batch not yet started.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import secrets
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from potstill.errors import PotstillError

try:  # the serve extra; FastAPI reads the handlers' annotations from this module
    from starlette.requests import Request as HTTPRequest
except ImportError:  # pragma: no cover - build_app says what to install
    HTTPRequest = Any
from potstill.serve.batcher import Batcher, Job, Served, run_batch
from potstill.serve.formats import (chat_logprobs, completion_choice, make_choice, sse, stop_strings,
                                    usage)
from potstill.serve.schema import (UNSUPPORTED, APIError, ChatRequest, CompletionRequest, Message, Sampling,
                                   error_body, validated)
from potstill.hf import DTYPES, load_model_dir, prompt_ids


@dataclass(frozen=True)
class ServeSpec:
    """How a server runs: the options of ``potstill serve``, held once (the CLI builds one from its
    flags; ``serve`` and ``build_app`` take one), checked when made."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the model id clients ask for (default: the folder name)
    dtype: str = "float32"
    device: str = "cpu"
    max_batch_size: int = 32  # rows per batched generate call; a request's prompts x n must fit in one
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    exact_seeds: bool = False  # a seeded sampled request runs alone, so its seed alone decides its samples
    api_key: str | None = None  # wanted on every route (Authorization: Bearer)
    max_body_mb: float = 16  # bodies over this are refused unread
    max_messages: int = 2048  # messages in a chat request, and content parts in all
    watermark: Any = None  # a potstill.audit.Watermark on every generated token

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise PotstillError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_batch_size < 1:
            raise PotstillError(f"max batch size must be at least 1 (got {self.max_batch_size})")
        if self.batch_wait_ms < 0:
            raise PotstillError(f"batch wait must be 0 ms or more (got {self.batch_wait_ms})")
        if not self.max_body_mb > 0:
            raise PotstillError(f"max body size must be more than 0 MB (got {self.max_body_mb})")
        if self.max_messages < 1:
            raise PotstillError(f"max messages must be at least 1 (got {self.max_messages})")
        if self.api_key is not None and not self.api_key.strip():
            raise PotstillError("the API key is empty: give one, or leave --api-key out")


def load_served(model_dir: str | Path, spec: ServeSpec) -> Served:
    model, tokenizer = load_model_dir(model_dir, "model", spec.dtype, spec.device)
    # A fast tokenizer resets its padding and truncation settings on its first encode; done here,
    # before the preparing and the generating threads use it at once ("Already borrowed").
    tokenizer("")
    # a token's vocabulary string has at least as many characters as its text (byte-level BPE
    # spells each byte as a character, SentencePiece each space as "▁")
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return Served(model, tokenizer, spec.model_name or Path(model_dir).resolve().name,
                  getattr(model.config, "max_position_embeddings", None),
                  getattr(model.generation_config, "max_new_tokens", None),
                  min(model.get_input_embeddings().num_embeddings, len(tokenizer)), spec.max_batch_size,
                  max(longest, 1), spec.exact_seeds, spec.watermark, spec.max_messages)


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
    served.check_tokens(prompt_len, param, minimum)
    room = None if served.context is None else served.context - prompt_len
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


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}
SURROGATE = re.compile("[\ud800-\udfff]")


def check_json_type(content_type: str | None) -> None:
    """Read a body as JSON only when it is sent as JSON, as FastAPI does: a web page can post any
    other type to a local server without the browser asking the server first (CSRF)."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        got = repr(content_type) if content_type else "none"
        raise APIError(f"the body must be JSON, sent with 'Content-Type: application/json' (got {got})")


def parse_body(raw: bytes) -> dict:
    """A request body as the JSON object it must be, or one clear 400."""
    try:
        data = json.loads(raw)  # bytes: decoded as UTF-8 with lone surrogates passed through
    except UnicodeDecodeError as e:
        raise APIError(f"the body is not UTF-8 ({e.reason} at byte {e.start:,}): send JSON in UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(f"the body is not valid JSON ({e}): send a JSON object") from None
    except RecursionError:
        raise APIError("the body's JSON is nested too deeply to read: send a JSON object of the API's fields") from None
    if not isinstance(data, dict):
        raise APIError(f"the body is {JSON_TYPES.get(type(data), 'not an object')}: send a JSON object")
    return data


def check_text(text: str, where: str, param: str) -> None:
    """Refuse a lone surrogate: JSON may escape half of a UTF-16 pair ("\\ud800"), which is no
    character and which no tokenizer can encode (the tokenizer's TypeError was a 500, retried)."""
    if not text.isascii() and (bad := SURROGATE.search(text)):
        raise APIError(f"{where}: character {bad.start():,} is a lone surrogate ({ascii(bad.group())}), half of a "
                       "UTF-16 pair and no character: send valid Unicode text", param)


def check_messages(served: Served, messages) -> None:
    """The chat messages as parsed, before any is validated, templated or tokenized: at most
    ``max_messages`` messages and as many content parts, texts no longer in all than the context
    could hold, and no lone surrogate in them. A value of the wrong type is left to the schema."""
    if not isinstance(messages, list):
        return
    limit = served.max_messages
    if len(messages) > limit:
        raise APIError(f"messages: {len(messages):,} messages is more than this server takes ({limit:,}): send "
                       "fewer, or restart it with a larger --max-messages", "messages", "array_above_max_length")
    texts, parts = [], 0  # texts: (where, text) of every string a template may render (a role is one of four)
    for i, m in enumerate(messages):
        for key, value in m.items() if isinstance(m, dict) else ():
            if isinstance(value, str) and key != "role":
                texts.append((f"messages[{i}].{key}", value))
            elif key == "content" and isinstance(value, list):
                parts += len(value)
                if parts > limit:
                    raise APIError(f"messages: {parts:,} content parts in the first {i + 1:,} messages is more than "
                                   f"this server takes ({limit:,}): send fewer, or restart it with a larger "
                                   "--max-messages", "messages", "array_above_max_length")
                texts += [(f"messages[{i}].content[{j}].text", p["text"]) for j, p in enumerate(value)
                          if isinstance(p, dict) and isinstance(p.get("text"), str)]
    served.check_length(sum(len(text) for _, text in texts), "messages")
    for where, text in texts:
        check_text(text, where, "messages")


def check_prompt(served: Served, prompt, n) -> None:
    """A completion's prompt as parsed, before it is validated or tokenized: prompts x n within one
    batch, each text no longer than the context could hold and without a lone surrogate, each list
    of token ids no longer than the context. A value of the wrong type is left to the schema."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        n = n if isinstance(n, int) and n >= 1 else 1
        if len(prompt) * n > served.max_batch_size:
            raise APIError(f"{len(prompt):,} prompts x n={n} is more than this server's max batch size "
                           f"({served.max_batch_size}): send fewer per request, or restart it with a larger "
                           "--max-batch-size", "prompt")
        listed = [(f"prompt[{i}]", p) for i, p in enumerate(prompt)]
    else:
        listed = [("prompt", prompt)]
    for where, p in listed:
        if isinstance(p, str):
            served.check_length(len(p), "prompt")
            check_text(p, where, "prompt")
        elif isinstance(p, list):  # token ids: bounded by the context exactly, and cheaply
            served.check_tokens(len(p), "prompt")


def chat_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of the messages through the chat template, as LocalModel builds them."""
    flat = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise APIError(f"messages[{i}].content: only text parts are supported, each with a text",
                               "messages")
            content = "".join(part["text"] for part in content)
        flat.append({**m.model_dump(exclude_none=True), "content": content or ""})
    try:
        return prompt_ids(tokenizer, flat)
    except TemplateError as e:
        raise APIError(f"the model's chat template rejected the messages: {e}", "messages") from None


def prepare_chat(served: Served, raw: bytes) -> tuple[ChatRequest, list[int]]:
    """A chat request's body checked and validated, and its prompt's token ids (in a worker thread:
    ``Served.prepare``)."""
    data = parse_body(raw)
    check_messages(served, data.get("messages"))
    body = validated(ChatRequest, data)
    check_request(served, body)
    if body.top_logprobs and not body.logprobs:
        raise APIError("top_logprobs needs logprobs=true", "top_logprobs")
    return body, chat_prompt(served.tokenizer, body.messages)


def prepare_completion(served: Served, raw: bytes) -> tuple[CompletionRequest, list[list[int]]]:
    """A completion request's body checked and validated, and its prompts' token ids (in a worker
    thread: ``Served.prepare``)."""
    data = parse_body(raw)
    check_prompt(served, data.get("prompt"), data.get("n"))
    body = validated(CompletionRequest, data)
    check_request(served, body)
    return body, completion_prompts(served, body.prompt)


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


async def chat_completion(served: Served, batcher: Batcher, raw: bytes):
    """A chat completion (dict) for the body ``raw``, or its server-sent events (async iterator) when
    ``stream``."""
    body, ids = await served.prepare(prepare_chat, raw)
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


async def completion(served: Served, batcher: Batcher, raw: bytes):
    """A text completion (dict) for the body ``raw``, or its server-sent events (async iterator) when
    ``stream``."""
    body, prompts = await served.prepare(prepare_completion, raw)
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
        self.key = None if api_key is None else api_key.encode()

    def authorized(self, header: bytes) -> bool:
        """RFC 7235: the scheme ("Bearer") in any case, ended by one or more spaces; the key compared
        in constant time."""
        scheme, _, key = header.partition(b" ")
        return secrets.compare_digest(key.lstrip(b" "), self.key) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and not self.authorized(headers.get(b"authorization", b"")):
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
    body = json.dumps(error_body(message, status, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_app(model_dir: str | Path, spec: ServeSpec | None = None, **options):
    """The FastAPI app serving the model in ``model_dir`` as ``spec`` says (or a ServeSpec of
    ``options``). ``app.state.batcher.batches`` counts the batches run: one generate call each (and
    the prompt scorings its requests asked for)."""
    require_server_libraries()
    from fastapi import FastAPI

    spec = spec or ServeSpec(**options)
    served = load_served(model_dir, spec)
    batcher = Batcher(lambda jobs: run_batch(served, jobs), spec.max_batch_size, spec.batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        served.close()

    app = FastAPI(title="potstill serve", lifespan=lifespan)
    app.state.served, app.state.batcher = served, batcher
    app.add_middleware(Guard, api_key=spec.api_key, max_body_bytes=int(spec.max_body_mb * 2**20))
    add_error_handlers(app)
    add_routes(app, served, batcher)
    return app


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, status, param, code), status_code=status)


def add_error_handlers(app) -> None:
    """Every failure answered in OpenAI's error shape: a refused request, a body FastAPI could not
    read (or one too large), and a crash (500)."""
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        if isinstance(e, BodyTooLarge):
            return error_response(e.status_code, e.detail, code="request_too_large")
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        return error_response(500, f"the server failed: {type(e).__name__}: {e}")


def add_routes(app, served: Served, batcher: Batcher) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "potstill", "max_model_len": served.context}]}

    # The bodies are read as bytes, not as FastAPI's pydantic parameters, which parse and validate
    # on the event loop, before any limit is checked (450,000 tiny messages: 4 s and 400 MiB).
    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        check_json_type(request.headers.get("content-type"))
        return await unless_gone(request, chat_completion(served, batcher, await request.body()))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        check_json_type(request.headers.get("content-type"))
        return await unless_gone(request, completion(served, batcher, await request.body()))


async def unless_gone(request, work):
    """The response to ``work``'s result, or a 499 once the client has disconnected: its jobs are
    then cancelled, and a batch not yet started leaves them out (a timed-out client retries, and
    would otherwise have the server answer every request twice)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)

    watcher = asyncio.ensure_future(gone())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        return error_response(499, "client disconnected")
    watcher.cancel()
    return respond(task.result())


def respond(result):
    """A JSON answer, or a stream of server-sent events."""
    from fastapi.responses import JSONResponse, StreamingResponse

    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


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


def serve(model_dir: str | Path, spec: ServeSpec | None = None, **options) -> None:
    """Serve the model in ``model_dir`` as ``spec`` says (or a ServeSpec of ``options``) until
    interrupted (Ctrl-C)."""
    require_server_libraries()
    import uvicorn

    spec = spec or ServeSpec(**options)
    sock = bind(spec.host, spec.port)  # before the model loads: a taken port fails at once
    if spec.api_key is None and not loopback(spec.host):
        print(f"potstill serve: warning: listening on {spec.host} without an API key: anyone who can reach this "
              "port can use the model (set --api-key-env or --api-key)", file=sys.stderr, flush=True)
    try:
        app = build_app(model_dir, spec)
    except BaseException:
        sock.close()
        raise
    marked = f", watermarked (key id {spec.watermark.key_id})" if spec.watermark else ""
    print(f"potstill serve: {app.state.served.name} at http://{spec.host}:{sock.getsockname()[1]}/v1{marked} "
          "(Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: whatever it resolves to, it may be reachable from elsewhere
        return False
