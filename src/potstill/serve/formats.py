"""What ``potstill serve`` answers with: a completion cut at its stop strings, each token's piece
of the text and its raw bytes, and the logprob formats (OpenAI chat ``logprobs.content``, the
completions endpoint's legacy ``logprobs``, vLLM's ``prompt_logprobs``), as JSON or server-sent
events."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from potstill.align import token_bytes
from potstill.records import Completion
from potstill.serve.batcher import Scores, Served
from potstill.serve.schema import CompletionRequest


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


def own_bytes(served: Served, i: int, skip_special: bool) -> bytes:
    """The bytes token ``i`` adds to a text: its vocabulary piece's (``align.token_bytes``: a
    byte-level BPE token or a ``<0xNN>`` byte may be part of a UTF-8 character); for a special
    token or a piece that is no text, the token decoded alone ("" for a special token skipped)."""
    if served.vocabulary is None:  # read once: the backend's JSON for the whole vocabulary
        served.vocabulary = token_bytes(served.tokenizer) if hasattr(served.tokenizer, "backend_tokenizer") else []
    raw = served.vocabulary[i] if i < len(served.vocabulary) else None
    return token_alone(served, i, skip_special).encode() if raw is None else raw


def piece_bytes(served: Served, ids: list[int], pieces: list[str], skip_special: bool) -> list[bytes]:
    """Each token's raw bytes, joining to the pieces' UTF-8 (the text): a token's own bytes where
    they spell its share (a token that ends inside a character holds its part of it, as OpenAI's
    ``bytes`` do), else its piece's UTF-8 (a tokenizer whose tokens read differently in context)."""
    out, run = [], []  # run: the tokens since the last that completed a piece
    for t, piece in enumerate(pieces):
        run.append(t)
        if piece or t == len(pieces) - 1:
            own = [own_bytes(served, ids[r], skip_special) for r in run]
            spelled = [pieces[r].encode() for r in run]
            out += own if b"".join(own) == b"".join(spelled) else spelled
            run = []
    return out


def legacy_name(piece: str, raw: bytes) -> str:
    """A token's string in the legacy completions format, which has no bytes: its piece, or as
    OpenAI spells a token that is not text on its own, ``bytes:\\xe2\\x80``."""
    if raw == piece.encode():
        return piece
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_name(i: int, text: str, as_ids: bool) -> str:
    return f"token_id:{i}" if as_ids else text


def chat_logprobs(served: Served, ch: Choice, as_ids: bool) -> list[dict]:
    """OpenAI's ``logprobs.content``: one entry per generated token, EOS included; ``bytes`` are the
    token's raw bytes (part of a character for a token that ends inside one)."""
    out = []
    for t, (i, piece, raw) in enumerate(zip(ch.ids, ch.pieces, piece_bytes(served, ch.ids, ch.pieces, True))):
        top = []
        if ch.top_ids is not None:
            for j, lp in zip(ch.top_ids[t].tolist(), ch.top_logprobs[t]):
                top.append({"token": token_name(j, token_alone(served, j, True), as_ids), "logprob": logprob(lp),
                            "bytes": list(own_bytes(served, j, True))})
        out.append({"token": token_name(i, piece, as_ids), "logprob": logprob(ch.logprobs[t]),
                    "bytes": list(raw), "top_logprobs": top})
    return out


def legacy_logprobs(served: Served, rows: list[tuple], as_ids: bool) -> dict:
    """The completions endpoint's logprobs. ``rows``, one per token of the returned text: (id, piece,
    raw bytes, logprob, top (id, logprob) pairs, skip_special), logprob and top None for an echoed
    prompt's first token. Two alternatives with the same string keep the likelier (it comes first)."""
    tops = []
    for i, piece, raw, lp, top, skip in rows:
        named = None if top is None else {}
        for j, v in top or ():
            name = legacy_name(token_alone(served, j, skip), own_bytes(served, j, skip))
            named.setdefault(token_name(j, name, as_ids), logprob(v))
        tops.append(named)
    return {"tokens": [token_name(r[0], legacy_name(r[1], r[2]), as_ids) for r in rows],
            "token_logprobs": [None if r[3] is None else logprob(r[3]) for r in rows],
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
            raw = piece_bytes(served, ids, prompt, False)
            rows.append((ids[0], prompt[0], raw[0], None, None, False))
            rows += [(i, piece, b, scores.logprobs[t], zip(scores.top_ids[t, :k].tolist(), scores.top_logprobs[t, :k]),
                      False) for t, (i, piece, b) in enumerate(zip(ids[1:], prompt[1:], raw[1:]))]
        rows += [(i, piece, b, ch.logprobs[t], () if ch.top_ids is None else zip(ch.top_ids[t].tolist(),
                                                                                 ch.top_logprobs[t]), True)
                 for t, (i, piece, b) in enumerate(zip(ch.ids, ch.pieces, piece_bytes(served, ch.ids, ch.pieces, True)))]
        choice["logprobs"] = legacy_logprobs(served, rows, body.return_tokens_as_token_ids)
    if body.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(served, ids, scores, body.prompt_logprobs,
                                                         body.return_tokens_as_token_ids)
    return choice, len(ch.ids)


async def sse(events: list[dict]):
    for event in events:
        yield f"data: {json.dumps(event, allow_nan=False)}\n\n"
    yield "data: [DONE]\n\n"
