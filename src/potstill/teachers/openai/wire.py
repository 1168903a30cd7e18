"""Any OpenAI-compatible endpoint as the teacher: OpenAI, vLLM, llama.cpp, Ollama, `potstill serve`.

This file knows the wire format only: the request body for a potstill ``Request`` (the same body
goes online and into a Batch API line), and the parse of a response body into a ``Completion``,
or a ``Malformed`` error naming what was wrong. Sending, retries, limits and budgets live in
``potstill.teachers.openai.dispatch``; the Batch API in ``potstill.teachers.openai.batch``.

Logprobs: whenever the sampling params ask for a top-k (``top_logprobs`` > 0, at most 20, OpenAI's
cap), a request asks for logprobs, and each generated position keeps the chosen token's logprob and
the k likeliest alternatives' logprobs (descending). Tokens are kept as raw bytes: an entry's
``bytes`` (a token may end inside a UTF-8 character), else the UTF-8 of its string (the legacy
completions API has no bytes, and spells a partial character ``bytes:\\xe2\\x80``): strings
cannot be mapped back to ids, but bytes compare across tokenizers. vLLM and ``potstill serve``
return ids when asked (``return_tokens_as_token_ids``: tokens read ``token_id:123``, and ``bytes``
then spell that string); with ``teacher.token_ids: true`` potstill asks for them and stores ids
instead of bytes, like the local backend does, so logit KD works over HTTP.

A body is ``Malformed``, never stored as valid, when a position's logprob is not a log-probability
(NaN, infinite, OpenAI's -9999 "unknown" or less, above 0 past rounding), when it has fewer
alternatives than asked or one twice (the same id, or the same bytes: only special tokens, which
spell no text, may share empty ones), when bytes are not values 0-255, when a token but the
last has no bytes, when there are more positions than max tokens, or when the tokens' bytes do not
join to the text's UTF-8 (a stop string the endpoint cut off may follow it, as vLLM returns it).
"""

from __future__ import annotations

import json
import re

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
    k = top_k(params)
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


MAX_TOP_LOGPROBS = 20  # OpenAI's cap (generate refuses more for an HTTP teacher)


def top_k(params: dict) -> int:
    """The alternatives a request asks for at each position, and a valid answer holds."""
    return min(params["top_logprobs"], MAX_TOP_LOGPROBS)


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


def _token_id(token: str, vocab: int | None, where: str = "") -> int:
    """The id in ``token_id:N``; it must name a token of the teacher's tokenizer (``vocab`` of them):
    an id outside it would be stored, then crash training."""
    where = f"{where}: " if where else ""
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise Malformed(f"{where}token {str(token)[:20]!r} is not token_id:N; does the endpoint support "
                        f"return_tokens_as_token_ids?")
    try:
        i = int(token[9:])
    except ValueError:
        raise Malformed(f"{where}token {token[:20]!r} is not token_id:N") from None
    if i < 0 or (vocab is not None and i >= vocab):
        raise Malformed(f"{where}token id {i} is outside the teacher tokenizer's {vocab} tokens: is teacher.tokenizer "
                        f"the one the endpoint serves?")
    return i


UNKNOWN = -9999.0  # OpenAI's logprob for "no value": not a log-probability, so never stored as one
SLACK = 1e-3  # a logprob above 0 by rounding at most (a near-certain token's log-softmax)
BYTE_ESCAPES = re.compile(r"bytes:((?:\\x[0-9a-fA-F]{2})+)")  # the legacy API's spelling of a partial character


def _logprob(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not UNKNOWN < value <= SLACK:
        raise Malformed(f"{where}: logprob {value!r} is not a log-probability (NaN, infinite, {UNKNOWN:g} or less, "
                        f"or above 0)")
    return float(value)


def _raw_bytes(token, raw, where: str) -> bytes:
    """A token's raw bytes: its ``bytes`` when sent, else its string's UTF-8 (or the bytes a legacy
    ``bytes:\\xNN...`` spells)."""
    if raw is not None:
        if not isinstance(raw, list) or not all(type(b) is int and 0 <= b <= 255 for b in raw):
            raise Malformed(f"{where}: bytes {str(raw)[:40]} are not byte values (a list of ints 0-255)")
        return bytes(raw)
    if not isinstance(token, str):
        raise Malformed(f"{where}: token {str(token)[:20]!r} is not a string")
    if escaped := BYTE_ESCAPES.fullmatch(token):
        return bytes.fromhex(escaped.group(1).replace("\\x", ""))
    try:
        return token.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        raise Malformed(f"{where}: token {ascii(token)[:30]} is not valid Unicode") from None


def _positions(lp: dict, api: str) -> list[tuple]:
    """(token, logprob, bytes, [(token, logprob, bytes), ...]) at each generated position, as sent."""
    if api == "chat":
        return [(e.get("token"), e.get("logprob"), e.get("bytes"),
                 [(a.get("token"), a.get("logprob"), a.get("bytes")) for a in e.get("top_logprobs") or []])
                for e in lp.get("content") or []]
    tokens, tops = lp.get("tokens") or [], lp.get("top_logprobs") or []
    chosen = lp.get("token_logprobs") or [None] * len(tokens)
    if not len(tokens) == len(chosen) == len(tops):
        raise Malformed(f"{len(tokens)} tokens but {len(chosen)} token_logprobs and {len(tops)} top-logprob rows")
    return [(token, value, None, [(a, v, None) for a, v in (top or {}).items()])
            for token, value, top in zip(tokens, chosen, tops)]


def _stops(params: dict) -> list[str]:
    stop = params.get("stop") or []
    return [stop] if isinstance(stop, str) else list(stop)


def _check_spelling(tokens: list[bytes], text: str, finish: str, params: dict) -> None:
    """The chosen tokens' bytes spell the text's UTF-8: exactly, or followed by the stop string that
    ended it (vLLM returns the tokens through it, and cuts the text before it)."""
    for t, b in enumerate(tokens[:-1]):
        if not b:
            raise Malformed(f"position {t}: the token has no bytes, and is not the last")
    want, joined = text.encode(), b"".join(tokens)
    if joined == want or finish == "stop" and joined.startswith(want) and any(
            s and joined[len(want):].startswith(s.encode()) for s in _stops(params)):
        return
    at = next((i for i, (x, y) in enumerate(zip(joined, want)) if x != y), min(len(joined), len(want)))
    t = int(np.searchsorted(np.cumsum([len(b) for b in tokens]), at, side="right"))
    raise Malformed(f"position {min(t, len(tokens) - 1)}: the tokens' bytes differ from the text's UTF-8 at byte "
                    f"{at} ({len(joined)} bytes of tokens, {len(want)} of text)")


def logprob_fields(choice: dict, text: str, finish: str, params: dict, spec, vocab: int | None) -> dict:
    """The ``Completion`` fields a choice's logprobs give, checked: ids (token_ids) or raw bytes of
    the chosen tokens and of the k likeliest alternatives (descending), and their logprobs."""
    k = top_k(params)
    lp = choice.get("logprobs")
    if not lp:
        raise Malformed("asked for logprobs, the response has none")
    positions = _positions(lp, spec.api)
    if not positions:
        raise Malformed("asked for logprobs, the response has none for its tokens")
    if len(positions) > params["max_new_tokens"]:
        raise Malformed(f"{len(positions)} logprob positions, more than max tokens ({params['max_new_tokens']})")

    def name(token, raw, where):  # what a token is kept as
        return _token_id(token, vocab, where) if spec.token_ids else _raw_bytes(token, raw, where)

    chosen, chosen_lps, top, top_lps = [], [], [], []
    for t, (token, value, raw, alternatives) in enumerate(positions):
        where = f"position {t}"
        chosen_lps.append(_logprob(value, where))
        chosen.append(name(token, raw, where))
        if len(alternatives) < k:
            raise Malformed(f"{where}: {len(alternatives)} top_logprobs, asked for {k}")
        # more than k (vLLM's legacy completions add the sampled token): the k likeliest, ties in sent order
        row = sorted([(_logprob(v, f"{where} top_logprobs[{j}]"), name(a, b, f"{where} top_logprobs[{j}]"))
                      for j, (a, v, b) in enumerate(alternatives)], key=lambda e: -e[0])[:k]
        named = [n for _, n in row if n != b""]  # special tokens spell no text: several may have no bytes
        if len(set(named)) < len(named):
            twice = next(n for i, n in enumerate(named) if n in named[:i])
            raise Malformed(f"{where}: top_logprobs hold {twice!r} twice")
        top.append([n for _, n in row])
        top_lps.append([v for v, _ in row])
    fields = {"token_logprobs": np.array(chosen_lps, np.float32), "topk_logprobs": np.array(top_lps, np.float32)}
    if spec.token_ids:
        return {**fields, "token_ids": chosen, "topk_ids": np.array(top, np.int32)}
    _check_spelling(chosen, text, finish, params)
    return {**fields, "token_bytes": chosen, "topk_bytes": top}


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
    fields = logprob_fields(choice, text, finish, params, spec, vocab) if top_k(params) else {}
    return Completion(request_hash=request.request_hash, text=text, token_ids=fields.pop("token_ids", None),
                      topk_ids=fields.pop("topk_ids", None), topk_logprobs=fields.pop("topk_logprobs", None),
                      finish_reason=finish, prompt_tokens=used[0], seed=request_seed(request), seconds=seconds,
                      completion_tokens=used[1], **fields)


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
