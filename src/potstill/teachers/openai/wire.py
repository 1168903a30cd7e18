"""Any OpenAI-compatible endpoint as the teacher: OpenAI, vLLM, llama.cpp, Ollama, `potstill serve`.

This file knows the wire format only: the request body for a potstill ``Request`` (the same body
goes online and into a Batch API line), and the parse of a response body into a ``Completion``,
or a ``Malformed`` error naming what was wrong. Sending, retries, limits and budgets live in
``potstill.teachers.openai.dispatch``; the Batch API in ``potstill.teachers.openai.batch``.

Token ids: OpenAI returns logprobs keyed by token *strings*, which cannot be mapped back to ids
reliably, so potstill does not ask for them: such completions keep their text (sequence-level KD)
and no top-k. vLLM and ``potstill serve`` return ids when asked (``return_tokens_as_token_ids``:
tokens read ``token_id:123``); with ``teacher.token_ids: true`` potstill asks for them and stores
the top-k like the local backend does, so logit KD works over HTTP.
"""

from __future__ import annotations

import json
import math

import numpy as np

from potstill.errors import PotstillError
from potstill.provenance import text_sha256
from potstill.records import Completion, Request


class Malformed(Exception):
    """A 2xx response that cannot be stored as a valid completion (retried a little, then failed)."""


def load_tokenizer(spec):
    """The teacher's tokenizer, when the recipe says where it is."""
    if not spec.tokenizer_dir:
        return None
    from potstill.hf import load_tokenizer_dir

    return load_tokenizer_dir(spec.tokenizer_dir, "teacher tokenizer", spec.trust_remote_code)


def describe_openai(spec, tokenizer, teacher_id: str) -> dict:
    """Provenance of an HTTP teacher. Only part of it keys the requests (``ledger.IDENTITY``: the
    endpoint(s), model, api, token ids, and the tokenizer when it shapes the request or the ids)."""
    from potstill.hf import tokenizer_sha256

    return {
        "id": teacher_id,
        "backend": "openai",
        "endpoint": " ".join(sorted(u.rstrip("/") for u in spec.endpoints)),
        "model": spec.model,
        "api": spec.api,
        "revision": spec.revision,
        "token_ids": spec.token_ids,
        "tokenizer_sha256": None if tokenizer is None else tokenizer_sha256(tokenizer),
        "chat_template_sha256": None if tokenizer is None else text_sha256(tokenizer.chat_template),
        "terms_family": spec.terms_family,
        "terms_url": spec.terms_url,
    }


def request_seed(request: Request) -> int:
    """A seed per request, from its key and the recipe's seed: every prompt and every sample of it
    draws its own random stream on a seeded endpoint, as the local backend does."""
    return (int(request.request_hash[:8], 16) + request.seed) % 2**31


def request_body(request: Request, params: dict, spec, tokenizer) -> dict:
    """The JSON body for ``request``, vendor extras included (``split_extras`` separates them)."""
    body = {"model": spec.model, "temperature": params["temperature"], "top_p": params["top_p"],
            "seed": request_seed(request), "n": 1}
    # logprobs only when they can be stored: without ids (OpenAI) they would be read and dropped
    k = params["top_logprobs"] if spec.token_ids else 0
    if spec.api == "chat":
        body["messages"] = request.messages
        body["max_completion_tokens"] = params["max_new_tokens"]
        if k:
            body["logprobs"] = True
            body["top_logprobs"] = k
    else:
        from potstill.hf import prompt_ids

        # token ids when we have the tokenizer: the endpoint sees exactly what the local backend would
        body["prompt"] = prompt_ids(tokenizer, request.messages) if tokenizer is not None \
            else "\n".join(m["content"] for m in request.messages)
        body["max_tokens"] = params["max_new_tokens"]
        if k:
            body["logprobs"] = k
    if params.get("stop"):
        body["stop"] = params["stop"]
    if spec.token_ids:
        body["return_tokens_as_token_ids"] = True
    return body


def estimate_tokens(request: Request, params: dict, tokenizer) -> tuple[int, int]:
    """(prompt, completion) tokens at most: what a request may cost before it is answered."""
    if tokenizer is not None:
        from potstill.hf import prompt_ids

        prompt = len(prompt_ids(tokenizer, request.messages))
    else:
        prompt = sum(len(m["content"]) for m in request.messages) // 2 + 8  # generous: ~4 chars per token
    return prompt, params["max_new_tokens"]


def usage_range(prompt_est: int, max_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (low, high) prompt and completion tokens ``counted_usage`` may count for a request:
    completion tokens in [0, max_tokens], prompt tokens in [estimate / 4, 2 x estimate + 16] (the
    estimate is exact with the teacher's tokenizer, about twice the truth from characters)."""
    return (prompt_est // 4, 2 * prompt_est + 16), (0, max_tokens)


def worst_case(prompt_est: int, max_tokens: int) -> tuple[int, int]:
    """The most one send of a request can be counted, (prompt, completion) tokens: what a budget
    reserves for it, so that no answer, whatever its ``usage`` claims, is counted past the budget."""
    (_, prompt), (_, completion) = usage_range(prompt_est, max_tokens)
    return prompt, completion


def counted_usage(data, prompt_est: int, max_tokens: int) -> tuple[int, int, str | None]:
    """(prompt, completion) tokens to count for a billed body, and the endpoint's claim (JSON) when
    it was not counted as is. A claim is not trusted blindly: one outside ``usage_range`` is
    clamped to it, and a missing or unreadable one counts the range's top (the worst case)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    claim = usage if isinstance(usage, dict) else None

    def count(name: str, low: int, high: int) -> int:
        value = claim.get(name) if claim is not None else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return high
        return int(min(max(value, low), high))

    prompt_range, completion_range = usage_range(prompt_est, max_tokens)
    prompt = count("prompt_tokens", *prompt_range)
    completion = count("completion_tokens", *completion_range)
    taken = claim is not None and claim.get("prompt_tokens") == prompt and claim.get("completion_tokens") == completion
    if taken:
        return prompt, completion, None
    said = None if claim is None else {k: claim.get(k) for k in ("prompt_tokens", "completion_tokens")}
    return prompt, completion, json.dumps(said, default=str)[:200]


EXTRAS = ("return_tokens_as_token_ids",)  # vLLM fields the openai client sends through extra_body


def split_extras(body: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in body.items() if k not in EXTRAS}, {k: v for k, v in body.items() if k in EXTRAS})


def _token_id(token: str, vocab: int | None) -> int:
    """The id in ``token_id:N``; it must name a token of the teacher's tokenizer (``vocab`` of them):
    an id outside it would be stored, then crash training."""
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise Malformed(f"token {str(token)[:20]!r} is not token_id:N; does the endpoint support "
                        f"return_tokens_as_token_ids?")
    try:
        i = int(token[9:])
    except ValueError:
        raise Malformed(f"token {token[:20]!r} is not token_id:N") from None
    if i < 0 or (vocab is not None and i >= vocab):
        raise Malformed(f"token id {i} is outside the teacher tokenizer's {vocab} tokens: is teacher.tokenizer the "
                        f"one the endpoint serves?")
    return i


def _topk_rows(rows: list[list[tuple[str, float]]], k: int, vocab: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) ids and logprobs, descending; every row must have k entries and finite logprobs. A
    row may hold more than k (vLLM's legacy completions add the sampled token): the k likeliest stay."""
    if any(len(row) < k for row in rows):
        t = next(t for t, row in enumerate(rows) if len(row) < k)
        raise Malformed(f"position {t} has {len(rows[t])} top logprobs, asked for {k}")
    for t, row in enumerate(rows):
        for _, lp in row:
            if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp) or lp > 1e-3:
                raise Malformed(f"position {t}: logprob {lp!r} is not a finite log-probability")
    rows = [sorted(row, key=lambda e: -e[1])[:k] for row in rows]
    lps = np.array([[lp for _, lp in row] for row in rows], np.float32)  # (T, k), descending
    ids = np.array([[_token_id(tok, vocab) for tok, _ in row] for row in rows], np.int32)
    # -inf (or OpenAI's -9999 sentinel) becomes -1e4: finite, and zero mass after exp
    return ids, np.maximum(lps, -1e4)


def parse_response(request: Request, data: dict, params: dict, spec, seconds: float, used: tuple[int, int],
                   vocab: int | None = None) -> Completion:
    """A chat or completions response body -> ``Completion``; raise ``Malformed`` with the reason,
    whatever the shape of the body. ``used``: the (prompt, completion) tokens counted for it
    (``counted_usage``: the body's own ``usage`` is not trusted); ``vocab``: the teacher
    tokenizer's size, which every returned id must be under."""
    try:
        return _parse_response(request, data, params, spec, seconds, used, vocab)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        raise Malformed(f"unexpected response shape ({type(e).__name__}: {str(e)[:100]})") from None


def _parse_response(request: Request, data: dict, params: dict, spec, seconds: float, used: tuple[int, int],
                    vocab: int | None) -> Completion:
    try:
        choice = data["choices"][0]
        finish = choice.get("finish_reason")
        text = choice["message"].get("content") if spec.api == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise Malformed(f"response has no {e} where a completion was expected") from None
    if finish not in ("stop", "length"):
        raise Malformed(f"finish_reason {finish!r} (not stop or length)")
    if not isinstance(text, str):
        raise Malformed("response text is missing")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): SQLite could not store it
        raise Malformed("response text is not valid Unicode") from None
    k = params["top_logprobs"] if spec.token_ids else 0  # as request_body asked
    token_ids = topk_ids = topk_lps = None
    if k:
        lp = choice.get("logprobs")
        if not lp:
            raise Malformed("asked for logprobs, the response has none")
        if spec.api == "chat":
            content = lp.get("content") or []
            chosen = [e.get("token") for e in content]
            rows = [[(c.get("token"), c.get("logprob")) for c in (e.get("top_logprobs") or [])] for e in content]
        else:
            chosen = lp.get("tokens") or []
            rows = [list((d or {}).items()) for d in (lp.get("top_logprobs") or [])]
        if len(rows) != len(chosen) or not chosen:
            raise Malformed(f"{len(chosen)} tokens but {len(rows)} top-logprob rows")
        token_ids = [_token_id(t, vocab) for t in chosen]
        topk_ids, topk_lps = _topk_rows(rows, k, vocab)
    return Completion(request_hash=request.request_hash, text=text, token_ids=token_ids, topk_ids=topk_ids,
                      topk_logprobs=topk_lps, finish_reason=finish, prompt_tokens=used[0],
                      seed=request_seed(request), seconds=seconds, completion_tokens=used[1])


CONNECT_SHARE = 0.5  # of the attempt's deadline: a connection not made by then is given up as never sent


def make_client(base_url: str, key: str, timeout: float):
    """The official async client with its own retries off: potstill's dispatcher is the one retry layer.
    ``timeout`` is per read (the caller bounds the whole attempt); the connection itself must be
    made within ``CONNECT_SHARE`` of it, so that a host that never accepts fails as the client's
    connect timeout (nothing sent, nothing billed) before the attempt's deadline could pass."""
    try:
        import openai
    except ImportError:
        raise PotstillError("HTTP teachers need the openai client: pip install 'potstill[http]'") from None
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                              timeout=openai.Timeout(timeout, connect=timeout * CONNECT_SHARE))


def endpoint_path(spec) -> str:
    return "/chat/completions" if spec.api == "chat" else "/completions"


def batch_line_problem(line: dict) -> str | None:
    """Why a Batch API output or error line holds no completion, on one line: its error, or the
    status and message of a response other than 200 (a line without a status is a plain chat
    completion, as imported files hold). None when it holds one."""
    error = line.get("error")
    if error:
        what = f"{error.get('code') or 'error'}: {error.get('message')}" if isinstance(error, dict) else str(error)
        return f"batch line error {what}"[:300]
    response = line.get("response")
    if isinstance(response, dict) and "status_code" in response and response["status_code"] != 200:
        body = response.get("body")
        detail = body.get("error") if isinstance(body, dict) else None
        message = (detail.get("message") if isinstance(detail, dict) else None) or str(body)[:200]
        return f"HTTP {response['status_code']}: {message}"[:300]
    return None
