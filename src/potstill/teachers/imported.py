"""Bring completions someone already has into the ledger, as the answers of an ``imported`` teacher.

Formats (``format="auto"`` picks Parquet by extension or magic bytes, else by the first line):

- ``openai_chat``: OpenAI chat JSONL, one of
  (a) fine-tuning lines ``{"messages": [..., {"role": "assistant", "content": ...}]}``: the last
      assistant turn is the completion, the turns before it the prompt;
  (b) request/response lines ``{"request": {"messages": ...}, "response": <chat.completion>}``
      (stored-completions exports; ``request.body.messages`` or a top-level ``messages`` also
      work), and Batch API output lines ``{"custom_id", "response": {"status_code", "body":
      <chat.completion>}, "error"}`` when they carry the request's messages too (a Batch output
      line alone holds no prompt). Each choice of a response is one completion.
  A choice's ``logprobs`` with ``top_logprobs`` are kept as the HTTP teacher keeps them: each token's
  raw ``bytes`` (else its string's UTF-8), its logprob and its k alternatives, checked by the same
  rules (``openai.wire.logprob_fields``: a choice whose logprobs are malformed, or whose tokens do not
  spell its text, is skipped with the reason), so cached logit KD across tokenizers can learn from
  them; k is the request's ``top_logprobs``, else the first position's count, one k per file.
  Logprobs without alternatives are dropped (the text is kept), and the teacher description says so.
- ``jsonl`` / ``parquet``: one row per completion with ``prompt`` (str) or ``messages`` (chat
  list), ``response`` (str), optional ``finish_reason`` (default "stop"), optional ``token_ids``
  (T ints) with ``topk_ids`` and ``topk_logprobs`` (T x k lists; rows are put in descending order
  of logprob if they are not). Every other key is kept as the prompt's metadata, as prompt files do.
  When the teacher's tokenizer is known (``n_tokens``: its length), an id outside it stops the import
  naming file:line, as any malformed row does: training on it would index past the embedding.

Identity: the teacher description names the file and its sha256; a row's request hash is
``request_hash(teacher_key(description), messages, {"imported": format}, n)`` with n the number of
earlier rows holding the same messages. So importing a file twice is a no-op, and
``imported_requests`` gives `train` the same hashes without a ledger.

A row the ledger cannot hold as a valid completion (a refusal, a tool call, an unknown
finish_reason, non-finite logprobs, ...) is skipped and counted with its reason; when its prompt is
readable its request is stored ``failed`` with ``file:line: reason``. A file that is not in the
format (bad JSON, a missing or mistyped field) stops the import with one line naming file:line and
the field, before anything is written: the file is read twice, once to check it and describe the
teacher, once to store it in chunks; it is streamed both times (JSONL by line, Parquet by record
batch), never held whole.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from potstill.errors import PotstillError
from potstill.ledger import Ledger, completion_problem, request_hash, teacher_key
from potstill.prompts import ROLES, Prompt, jsonl_objects, parse_prompt
from potstill.provenance import file_sha256
from potstill.records import Completion
from potstill.teachers.openai.wire import Malformed, batch_line_problem, logprob_fields

FORMATS = ("openai_chat", "jsonl", "parquet")
MAX_LINE_BYTES = 64 << 20  # a line with T x k top-k lists can be MBs; longer lines are refused unread
CHUNK_ROWS = 4096  # rows planned and recorded per transaction (one transaction each in Ledger.add_requests and Ledger.record)
CHUNK_BYTES = 64 << 20  # ... or fewer, once their top-k arrays hold this many bytes
PARQUET_BATCH_ROWS = 256
LOGPROBS_DROPPED = "dropped: logprobs without top_logprobs (no alternatives to learn from)"
COMPLETION_KEYS = ("response", "finish_reason", "token_ids", "topk_ids", "topk_logprobs")


class _ChatBytes:
    """The part of a teacher spec ``logprob_fields`` reads: chat logprobs, tokens kept as bytes."""

    api = "chat"
    token_ids = False


_CHAT_BYTES = _ChatBytes()


class _Unusable(Exception):
    """A well-formed row the ledger cannot hold (tool calls, images, ...): skipped, not an error."""


@dataclass
class _Row:
    """One completion read from the file; ``prompt`` is None when its messages cannot be held."""

    where: str  # file:line (JSONL) or "file row N" (Parquet)
    prompt: Prompt | None
    text: str = ""
    finish_reason: str = "stop"
    token_ids: np.ndarray | None = None  # (T,) int32
    topk_ids: np.ndarray | None = None  # (T, k) int32
    topk_logprobs: np.ndarray | None = None  # (T, k) float32, descending
    token_bytes: list[bytes] | None = None  # (T,) an OpenAI export's tokens as raw bytes (no ids)
    topk_bytes: list[list[bytes]] | None = None  # (T, k)
    token_logprobs: np.ndarray | None = None  # (T,) float32
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    logprobs_dropped: bool = False
    problem: str | None = None  # why it is not a usable completion

    def completion(self, request_hash: str) -> Completion:
        return Completion(request_hash, self.text, self.token_ids, self.topk_ids, self.topk_logprobs,
                          self.finish_reason, self.prompt_tokens, seed=None, seconds=None,
                          completion_tokens=self.completion_tokens, token_logprobs=self.token_logprobs,
                          token_bytes=self.token_bytes, topk_bytes=self.topk_bytes)

    @property
    def width(self) -> int | None:
        """k, the alternatives per token, when the row has a top-k."""
        if self.topk_ids is not None and self.topk_ids.size:
            return self.topk_ids.shape[1]
        return len(self.topk_bytes[0]) if self.topk_bytes else None

    @property
    def nbytes(self) -> int:
        arrays = sum(a.nbytes for a in (self.token_ids, self.topk_ids, self.topk_logprobs, self.token_logprobs)
                     if a is not None)
        return arrays + sum(len(b) + 2 for row in self.topk_bytes or () for b in row)


# -- public API -------------------------------------------------------------------------------


def imported_requests(path: str | Path, *, format: str = "auto", teacher_id: str | None = None,
                      terms_family: str = "unknown", terms_url: str | None = None,
                      n_tokens: int | None = None) -> tuple[dict, list[str]]:
    """The teacher description and the request hashes of the file's rows, in file order, computed
    without a ledger: what `train` reads from it."""
    path, fmt = _resolve(path, format)
    desc = _describe(path, fmt, teacher_id, terms_family, terms_url, n_tokens)
    return desc, [h for h, _, _ in _keyed(path, fmt, teacher_key(desc)) if h is not None]


def imported_description(path: str | Path, *, format: str = "auto", teacher_id: str | None = None,
                         terms_family: str = "unknown", terms_url: str | None = None,
                         n_tokens: int | None = None) -> dict:
    """The teacher description of the file (every row checked), without its request hashes."""
    path, fmt = _resolve(path, format)
    return _describe(path, fmt, teacher_id, terms_family, terms_url, n_tokens)


def import_file(ledger: Ledger, path: str | Path, *, format: str = "auto", teacher_id: str | None = None,
                terms_family: str = "unknown", terms_url: str | None = None, n_tokens: int | None = None) -> dict:
    """Store the file's completions in ``ledger``. Returns counts: read (rows), new (stored now),
    already (stored before), skipped (not usable; ``skipped_reasons`` maps each reason to its row
    count and first row), and the teacher's key."""
    path, fmt = _resolve(path, format)
    desc = _describe(path, fmt, teacher_id, terms_family, terms_url, n_tokens)
    key = ledger.register_teacher(desc)
    params = {"imported": fmt}
    counts = {"read": 0, "new": 0, "already": 0, "skipped": 0}
    reasons: dict[str, dict] = {}
    session = None
    for chunk in _chunks(_keyed(path, fmt, key)):
        planned = [(h, row.prompt, n) for h, n, row in chunk if h is not None]
        todo = {r.request_hash for r in ledger.add_requests(key, planned, params)}
        completions, failures = [], {}
        for h, _, row in chunk:
            counts["read"] += 1
            if h is not None and h not in todo:
                counts["already"] += 1
                continue
            completion = None if h is None else row.completion(h)
            problem = row.problem or completion_problem(completion)
            if problem:
                seen = reasons.setdefault(problem, {"rows": 0, "first": row.where})
                seen["rows"] += 1
                if h is not None:
                    failures[h] = f"{row.where}: {problem}"
            else:
                completions.append(completion)
        if completions or failures:
            session = session or ledger.start_session(None)
            counts["new"] += ledger.record(session, completions, failures)
    if session is not None:
        ledger.end_session(session, None)
    counts["skipped"] = counts["read"] - counts["new"] - counts["already"]
    return {**counts, "skipped_reasons": reasons, "teacher_key": key}


# -- the teacher and the request hashes ---------------------------------------------------------


def _resolve(path: str | Path, format: str) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise PotstillError(f"import file {path} not found")
    if format == "auto":
        return path, _detect(path)
    if format not in FORMATS:
        raise PotstillError(f"import format {format!r}: use auto, {', '.join(FORMATS)}")
    return path, format


def _describe(path: Path, fmt: str, teacher_id: str | None, terms_family: str, terms_url: str | None,
              n_tokens: int | None = None) -> dict:
    models, dropped = _scan(str(path), str(path.resolve()), *_stamp(path), fmt, n_tokens)
    desc = {"id": teacher_id or path.stem, "backend": "imported", "source": path.name,
            "source_sha256": file_sha256(path), "format": fmt, "terms_family": terms_family, "terms_url": terms_url}
    if models:
        desc["models"] = list(models)  # the models the responses name, e.g. gpt-4o-mini-2024-07-18
    if dropped:
        desc["logprobs"] = LOGPROBS_DROPPED
    return desc


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _scan(path: str, resolved: str, size: int, mtime_ns: int, fmt: str,
          n_tokens: int | None) -> tuple[tuple[str, ...], bool]:
    """Check every row (raising on the first bad one) and gather what the description names.
    Remembered per (file, size, mtime): `potstill run` describes the same file in several stages."""
    models, dropped, rows, k = set(), False, 0, None
    for row in _rows(Path(path), fmt):
        rows += 1
        if n_tokens is not None:
            for field in ("token_ids", "topk_ids"):
                ids = getattr(row, field)
                if ids is not None and ids.size and ids.max() >= n_tokens:
                    raise PotstillError(f"{row.where}: \"{field}\" holds id {int(ids.max())}, outside the teacher "
                                        f"tokenizer's {n_tokens} ids: these ids are another tokenizer's")
        dropped |= row.logprobs_dropped
        if row.model:
            models.add(row.model)
        if (width := row.width) is not None:
            # training batches hold one k: a file mixing widths would be misread, not just padded
            if k is None:
                k, first = width, row.where
            elif width != k:
                raise PotstillError(f"{row.where}: the top-k has {width} entries per token, {first} has {k}: one k "
                                    f"per file")
    if not rows:
        raise PotstillError(f"{path}: no rows to import")
    return tuple(sorted(models)), dropped


def _keyed(path: Path, fmt: str, key: str) -> Iterator[tuple[str | None, int, _Row]]:
    """(request hash or None, sample index, row) for each row, in file order."""
    params = {"imported": fmt}
    seen: dict[str, int] = {}  # prompt sha256 -> rows with these messages so far
    for row in _rows(path, fmt):
        if row.prompt is None:
            yield None, -1, row
            continue
        p = row.prompt.sha256
        n = seen[p] = seen.get(p, -1) + 1
        yield request_hash(key, row.prompt.chat, params, n), n, row


def _chunks(keyed: Iterator[tuple[str | None, int, _Row]]) -> Iterator[list]:
    chunk, nbytes = [], 0
    for item in keyed:
        chunk.append(item)
        nbytes += item[2].nbytes
        if len(chunk) >= CHUNK_ROWS or nbytes >= CHUNK_BYTES:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
        yield chunk


# -- reading ------------------------------------------------------------------------------------


def _rows(path: Path, fmt: str) -> Iterator[_Row]:
    if fmt == "parquet":
        for where, obj in _parquet_objects(path):
            yield _generic_row(obj, where)
    elif fmt == "jsonl":
        for where, obj in _jsonl_objects(path):
            yield _generic_row(obj, where)
    else:
        for where, obj in _jsonl_objects(path):
            yield from _openai_rows(obj, where)


def _detect(path: Path) -> str:
    with path.open("rb") as f:
        magic = f.read(4)
    if path.suffix.lower() in (".parquet", ".pq") or magic == b"PAR1":
        return "parquet"
    for where, obj in _jsonl_objects(path):
        if isinstance(obj, dict):
            if isinstance(obj.get("response"), str):
                return "jsonl"
            if any(k in obj for k in ("request", "response", "custom_id")):
                return "openai_chat"
            msgs = obj.get("messages")
            if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
                return "openai_chat"
        raise PotstillError(f"{where}: cannot tell the format: expected {{\"prompt\" or \"messages\", \"response\": "
                            f"str}} (jsonl) or OpenAI chat lines (messages ending with the assistant's reply, or a "
                            f"request and its response); set the format explicitly if it is one of these")
    raise PotstillError(f"{path}: no rows to import")


def _jsonl_objects(path: Path) -> Iterator[tuple[str, object]]:
    return jsonl_objects(path, MAX_LINE_BYTES, "split the file or drop the top-k lists")


def _parquet_objects(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PotstillError("reading Parquet needs pyarrow: pip install 'potstill[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PotstillError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = set(pf.schema_arrow.names)
    if "response" not in names or not names & {"prompt", "messages"}:
        raise PotstillError(f"{path}: needs a \"response\" column and a \"prompt\" or \"messages\" column "
                            f"(has {', '.join(sorted(names))})")
    arrays = [k for k in ("token_ids", "topk_ids", "topk_logprobs") if k in names]
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        # list columns straight to numpy: to_pylist would make a Python float of every logprob
        columns = {k: _numpy_rows(batch.column(k)) for k in arrays}
        for i, obj in enumerate(batch.select([n for n in batch.schema.names if n not in arrays]).to_pylist()):
            row += 1
            yield f"{path} row {row}", {**obj, **{k: v[i] for k, v in columns.items()}}


def _numpy_rows(col) -> list:
    """A list (T,) or list-of-lists (T, k) column -> one numpy array per row (None for null);
    a row with ragged or null inner lists comes back as Python lists, for ``_array`` to refuse."""
    import pyarrow as pa

    def is_list(t) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t)

    if not is_list(col.type) or col.values.null_count or (
            is_list(col.type.value_type) and col.values.values.null_count):
        return col.to_pylist()
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy()
    if not is_list(col.type.value_type):
        flat = col.values.to_numpy(zero_copy_only=False)
        return [flat[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(col))]
    inner, flat = col.values.offsets.to_numpy(), col.values.values.to_numpy(zero_copy_only=False)
    out = []
    for i in range(len(col)):
        a, b = offsets[i], offsets[i + 1]
        lengths = np.diff(inner[a:b + 1])
        if not valid[i]:
            out.append(None)
        elif len(lengths) and (lengths != lengths[0]).any():
            out.append(col[i].as_py())
        else:
            out.append(flat[inner[a]:inner[b]].reshape(b - a, lengths[0] if len(lengths) else 0))
    return out


def _generic_row(obj: object, where: str) -> _Row:
    if not isinstance(obj, dict):
        raise PotstillError(f"{where}: each row must be an object with \"prompt\" or \"messages\", and \"response\"")
    # a null in a known column is an absent value (Parquet rows have every column)
    obj = {k: v for k, v in obj.items() if v is not None or k not in (*COMPLETION_KEYS, "prompt", "messages")}
    if "response" not in obj:
        raise PotstillError(f"{where}: no \"response\" (the teacher's completion, a string)")
    if not isinstance(obj["response"], str):
        raise PotstillError(f"{where}: \"response\" must be a string, not {type(obj['response']).__name__}")
    finish = obj.get("finish_reason", "stop")
    if not isinstance(finish, str):
        raise PotstillError(f"{where}: \"finish_reason\" must be a string (stop or length)")
    prompt = parse_prompt({k: v for k, v in obj.items() if k not in COMPLETION_KEYS}, where)
    row = _Row(where, prompt, obj["response"], finish)
    if "token_ids" in obj:
        row.token_ids = _array(obj["token_ids"], where, "token_ids", 1, "iu").astype(np.int32)
        _check_ids(row.token_ids, where, "token_ids")
    has = [k for k in ("topk_ids", "topk_logprobs") if k in obj]
    if has:
        if len(has) == 1 or row.token_ids is None:
            raise PotstillError(f"{where}: \"topk_ids\" and \"topk_logprobs\" come together, with \"token_ids\"")
        ids = _array(obj["topk_ids"], where, "topk_ids", 2, "iu")
        lps = _array(obj["topk_logprobs"], where, "topk_logprobs", 2, "iuf")
        T = len(row.token_ids)
        if T == 0 and ids.size == lps.size == 0:
            return row  # no positions: nothing to keep
        if ids.shape != lps.shape or ids.shape[0] != T or ids.shape[1] == 0:
            raise PotstillError(f"{where}: \"topk_ids\" {ids.shape} and \"topk_logprobs\" {lps.shape} must both be "
                                f"(T, k) with T = {T} (the length of \"token_ids\") and k >= 1")
        _check_ids(ids, where, "topk_ids")
        lps = lps.astype(np.float32)
        if (np.diff(lps, axis=1) > 0).any():  # ascending or shuffled: reorder each row, ids with it
            order = np.argsort(-lps, axis=1, kind="stable")
            ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
        row.topk_ids, row.topk_logprobs = ids.astype(np.int32), lps
    return row


def _array(value: object, where: str, field: str, ndim: int, kinds: str) -> np.ndarray:
    shape = "a list of integers" if ndim == 1 else "a list of equal-length lists of " + (
        "integers" if kinds == "iu" else "numbers")
    try:
        a = np.asarray(value)
    except ValueError:  # ragged
        a = None
    if a is None or not isinstance(value, (list, np.ndarray)) or (a.size and a.dtype.kind not in kinds) \
            or (a.size and a.ndim != ndim):
        raise PotstillError(f"{where}: \"{field}\" must be {shape}")
    return a


def _check_ids(a: np.ndarray, where: str, field: str) -> None:
    if a.size and (a.min() < 0 or a.max() >= 2**31):
        raise PotstillError(f"{where}: \"{field}\" holds ids outside 0 .. 2^31-1")


# -- OpenAI chat shapes -------------------------------------------------------------------------


def _openai_rows(obj: object, where: str) -> list[_Row]:
    if not isinstance(obj, dict):
        raise PotstillError(f"{where}: each line must be a JSON object (OpenAI chat: \"messages\", or a request and "
                            f"its \"response\")")
    if "response" not in obj and "request" not in obj and "error" not in obj:
        return [_finetuning_row(obj, where)]
    request = obj.get("request")
    if request is not None and not isinstance(request, dict):
        raise PotstillError(f"{where}: \"request\" must be an object holding \"messages\"")
    request = request or {}
    body = request.get("body") if isinstance(request.get("body"), dict) else request  # a Batch input line's body
    messages = body.get("messages", obj.get("messages"))
    if messages is None:
        raise PotstillError(f"{where}: no request messages (a Batch output line holds only the response): add the "
                            f"input line's body.messages as \"messages\" (match them by custom_id), or export "
                            f"request and response together")
    meta = {k: v for k, v in obj.items() if k not in ("messages", "request", "response", "error", "id")}
    if params := {k: v for k, v in body.items() if k not in ("messages", "metadata")}:
        meta["request"] = params  # model, temperature, ...: how the completion was asked for
    if isinstance(body.get("metadata"), dict):
        meta["metadata"] = body["metadata"]
    try:
        prompt = Prompt(_chat(messages, where, "messages"), meta, where)
    except _Unusable as e:
        return [_Row(where, None, problem=str(e))]
    if not prompt.messages:
        raise PotstillError(f"{where}: \"messages\" is empty")
    if problem := batch_line_problem(obj):
        return [_Row(where, prompt, problem=problem)]
    response = obj.get("response")
    completion = response.get("body") if isinstance(response, dict) and "status_code" in response else response
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise PotstillError(f"{where}: \"response\" must be a chat.completion object with a non-empty \"choices\" "
                            f"list")
    usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
    model = completion.get("model") if isinstance(completion.get("model"), str) else None
    rows = []
    choices = sorted(choices, key=lambda c: c["index"] if isinstance(c.get("index"), int) else 0)
    for i, choice in enumerate(choices):
        row = _Row(where, prompt, model=model, prompt_tokens=_int(usage.get("prompt_tokens")))
        message = choice.get("message")
        if not isinstance(message, dict):
            raise PotstillError(f"{where}: response.choices[{i}].message must be an object")
        row.finish_reason = choice.get("finish_reason")
        try:
            row.text = _reply(message, where, f"response.choices[{i}].message")
        except _Unusable as e:
            row.problem = str(e)
        logprobs = choice.get("logprobs")
        tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
        if tokens:
            row.completion_tokens = len(tokens)
            if row.problem is None:
                _keep_logprobs(row, choice, tokens, body, where, i)
        elif len(choices) == 1:
            row.completion_tokens = _int(usage.get("completion_tokens"))
        rows.append(row)
    return rows


def _keep_logprobs(row: _Row, choice: dict, tokens: list, body: dict, where: str, i: int) -> None:
    """A choice's logprobs as the HTTP teacher keeps them (bytes, logprobs, k alternatives), checked
    by the same rules; without alternatives they are dropped; malformed, the row is skipped."""
    asked = body.get("top_logprobs")
    first = tokens[0].get("top_logprobs") if isinstance(tokens[0], dict) else None
    k = asked if type(asked) is int and asked > 0 else len(first) if isinstance(first, list) else 0
    if not k:
        row.logprobs_dropped = True
        return
    params = {"top_logprobs": k, "max_new_tokens": len(tokens), "stop": body.get("stop")}
    try:
        fields = logprob_fields(choice, row.text, row.finish_reason, params, _CHAT_BYTES, None)
    except Malformed as e:
        row.problem = f"response.choices[{i}].logprobs: {e}"
        return
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise PotstillError(f"{where}: response.choices[{i}].logprobs: unexpected shape ({type(e).__name__}: "
                            f"{str(e)[:80]})") from None
    row.token_bytes, row.topk_bytes = fields["token_bytes"], fields["topk_bytes"]
    row.token_logprobs, row.topk_logprobs = fields["token_logprobs"], fields["topk_logprobs"]


def _finetuning_row(obj: dict, where: str) -> _Row:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PotstillError(f"{where}: needs \"messages\" (a chat list ending with the assistant's reply), or a "
                            f"\"request\" and its \"response\"")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise PotstillError(f"{where}: the last of \"messages\" must be the assistant's reply (the completion)")
    if len(messages) == 1:
        raise PotstillError(f"{where}: \"messages\" holds only the reply; the prompt turns come before it")
    meta = {k: v for k, v in obj.items() if k != "messages"}
    try:
        prompt = Prompt(_chat(messages[:-1], where, "messages"), meta, where)
    except _Unusable as e:
        return _Row(where, None, problem=str(e))
    row = _Row(where, prompt)
    try:
        if last.get("weight") == 0:
            raise _Unusable("the reply has weight 0 (not trained on)")
        row.text = _reply(last, where, f"messages[{len(messages) - 1}]")
    except _Unusable as e:
        row.problem = str(e)
    return row


def _chat(messages: object, where: str, field: str) -> tuple[tuple[str, str], ...]:
    """OpenAI messages -> ((role, content), ...); "developer" is the newer name of "system"."""
    if not isinstance(messages, list):
        raise PotstillError(f"{where}: \"{field}\" must be a list of {{\"role\", \"content\"}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise PotstillError(f"{where}: {field}[{i}] must be an object with a \"role\"")
        role = "system" if m["role"] == "developer" else m["role"]
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise _Unusable("tool calls are not supported")
        if role not in ROLES:
            raise PotstillError(f"{where}: {field}[{i}].role {m['role']!r}: use system, developer, user or assistant")
        out.append((role, _content(m.get("content"), where, f"{field}[{i}].content")))
    return tuple(out)


def _reply(message: dict, where: str, field: str) -> str:
    if message.get("tool_calls") or message.get("function_call"):
        raise _Unusable("tool calls are not supported")
    if message.get("content") is None and message.get("refusal"):
        raise _Unusable("refusal")
    if message.get("content") is None:
        raise _Unusable("no text in the reply")
    return _content(message["content"], where, f"{field}.content")


def _content(content: object, where: str, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content} - {"text"}
        if kinds:
            raise _Unusable(f"non-text content ({', '.join(sorted(map(str, kinds)))})")
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise PotstillError(f"{where}: {field} must be a string or a list of {{\"type\": \"text\", \"text\": str}}")


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
