"""The ledger: one SQLite file (WAL) holding every prompt, request and completion of a run.

It is the single source of truth for generated data. Rules it keeps:

- A request is keyed by ``request_hash`` = sha256(teacher key, messages, sampling params, sample
  index): the idempotency key. Planning the same request twice is a no-op. The teacher key hashes
  what decides the answers (``IDENTITY``), not provenance such as the teacher's id or terms.
- A completion and its request's ``done`` status are written in one transaction, so a request
  is never "done" without its completion, and a crash loses at most the batch in flight.
- Completions whose logprobs are not finite are not stored as valid: the request is marked
  ``failed`` with the reason, and is retried on the next run.

Top-k logprobs are stored compactly: ids as little-endian int32 and logprobs as float16, each
a (T, k) array in one blob (4 + 2 bytes per entry, so 120 bytes per token at k = 20, plus 4 for
the token id itself).

An endpoint that names tokens by their strings (OpenAI) gives bytes instead of ids: ``token_bytes``
(T strings) and ``topk_bytes`` (T x k, row by row) are each one blob of N as uint32, N lengths
as uint16, then the N byte strings joined, all little-endian (``records.TokenBytes``); and
``token_logprobs`` is the chosen tokens' logprobs, float16 (T,), which the top-k may not hold
(a sampled token). So 4 + 4k bytes per token (lengths, logprobs) plus the strings: 161 bytes per
token at k = 20 on English text (3.5-byte tokens; 201 with 5.8-byte alternatives), against 124
with ids (``bench/ledger_memory.py --bytes``). The three columns are additive: null in rows
without them, and added (null) to a ledger written before them when it is opened.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from potstill.errors import PotstillError
from potstill.prompts import Prompt
from potstill.provenance import library_versions
from potstill.records import Completion, Request, TokenBytes

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS teachers (
    teacher_key TEXT PRIMARY KEY,          -- sha256 of the description
    description TEXT NOT NULL              -- JSON: id, backend, weights/tokenizer/template hashes, terms
);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_sha256 TEXT PRIMARY KEY,
    messages TEXT NOT NULL,                -- JSON list of {role, content}
    meta TEXT NOT NULL,                    -- JSON: the prompt file's other keys (id, answer, ...)
    source TEXT                            -- file:line it was first read from
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    recipe_sha256 TEXT,
    versions TEXT NOT NULL,                -- JSON: python, potstill, torch, transformers, ...
    ended_at TEXT,                         -- null until it ends: a killed run never does
    stopped TEXT                           -- why it stopped early (budget, endpoint down, refusals); null if it did not
);
CREATE TABLE IF NOT EXISTS requests (
    request_hash TEXT PRIMARY KEY,
    prompt_sha256 TEXT NOT NULL REFERENCES prompts,
    teacher_key TEXT NOT NULL REFERENCES teachers,
    params TEXT NOT NULL,                  -- JSON sampling parameters, seed included
    sample_index INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status);
CREATE TABLE IF NOT EXISTS completions (
    request_hash TEXT PRIMARY KEY REFERENCES requests,
    session_id INTEGER NOT NULL REFERENCES sessions,
    text TEXT NOT NULL,
    token_ids BLOB,                        -- int32 (T,)
    top_k INTEGER NOT NULL,
    topk_ids BLOB,                         -- int32 (T, k)
    topk_logprobs BLOB,                    -- float16 (T, k), temperature 1
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER NOT NULL,
    seed INTEGER,
    seconds REAL,
    created_at TEXT NOT NULL,
    token_bytes BLOB,                      -- the T generated tokens' raw bytes (TokenBytes), when ids are not known
    topk_bytes BLOB,                       -- the (T, k) top-k tokens' raw bytes, in topk_logprobs' order
    token_logprobs BLOB                    -- float16 (T,): each generated token's logprob, temperature 1
);
CREATE TABLE IF NOT EXISTS attempts (      -- one row per HTTP send, written before it is sent
    attempt_id INTEGER PRIMARY KEY,
    request_hash TEXT NOT NULL,
    session_id INTEGER NOT NULL REFERENCES sessions,
    endpoint TEXT NOT NULL,
    sent_at TEXT NOT NULL,
    seconds REAL NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'retry', 'failed')),
    http_status INTEGER,                   -- null for transport errors (timeout, reset)
    error TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,          -- USD, from the recipe's prices
    usage_claimed TEXT                     -- JSON: the endpoint's usage when it was not counted as is
);
CREATE INDEX IF NOT EXISTS attempts_request ON attempts (request_hash);
CREATE TABLE IF NOT EXISTS batches (       -- OpenAI Batch API jobs
    local_id TEXT PRIMARY KEY,             -- sha256 of the session id and the input JSONL; the batch's metadata tag
    teacher_key TEXT NOT NULL REFERENCES teachers,
    batch_id TEXT,                         -- null until created
    input_file_id TEXT,
    status TEXT NOT NULL,                  -- prepared, then the API's status, then collected
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS terms_overrides (  -- --accept-terms-risk: who trained past the terms gate, and why
    override_id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    student TEXT NOT NULL,                 -- the student's folder name in the run
    use TEXT NOT NULL,                     -- the recipe's intended use
    reason TEXT NOT NULL,                  -- as given on the command line
    problems TEXT NOT NULL                 -- JSON list: what the gate would have stopped for
);
CREATE TABLE IF NOT EXISTS batch_requests (
    local_id TEXT NOT NULL REFERENCES batches,
    request_hash TEXT NOT NULL REFERENCES requests,
    PRIMARY KEY (local_id, request_hash)
);
CREATE TABLE IF NOT EXISTS plans (          -- what generate planned for a recipe: train and run read it, never re-plan
    plan_key TEXT PRIMARY KEY,             -- sha256 of the recipe's prompts (but their limit), teacher and generation
                                           -- sections and the files they name (ledger.plans.plan_key)
    teacher_key TEXT NOT NULL REFERENCES teachers,
    prompt_limit INTEGER,                  -- the prompts.limit planned for; null: every prompt of the file
    request_hashes TEXT NOT NULL,          -- JSON [[prompt index in the file, request hash], ...], all shards'
    created_at TEXT NOT NULL
);
"""
SCHEMA_VERSION = "2"  # 2 added attempts and batches; a version 1 ledger is upgraded in place
# (table, column, type) added since schema 2, at the end of their tables
ADDED_COLUMNS = (("attempts", "usage_claimed", "TEXT"), ("sessions", "ended_at", "TEXT"), ("sessions", "stopped", "TEXT"),
                 ("completions", "token_bytes", "BLOB"), ("completions", "topk_bytes", "BLOB"),
                 ("completions", "token_logprobs", "BLOB"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# What decides a teacher's answers, by backend. Provenance that does not (its id, revision, terms,
# where its folder lives) is left out, so editing it keeps every request's key, and the answers
# already generated or paid for.
IDENTITY = {
    "local": ("weights_sha256", "tokenizer_sha256", "chat_template_sha256", "dtype"),
    "openai": ("endpoint", "model", "api", "token_ids"),
    "imported": ("source_sha256", "format"),
}
# ... and what decides them only when a recipe opts in: keyed when present, so a teacher that does
# not opt in keeps the keys it always had
OPT_IN = {"local": ("generation_config", "code_sha256", "watermark")}


@contextmanager
def exclusive(ledger_path: Path) -> Iterator[None]:
    """Hold ``<ledger>.lock`` while generating: two processes sending the same to-do list would
    pay twice. The kernel drops the lock when its process dies, even by SIGKILL."""
    import fcntl

    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{ledger_path}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PotstillError(f"another potstill process is generating into {ledger_path}: wait for it, or give "
                                f"each process its own shard (--shard i/n)") from None
        yield


def teacher_key(description: dict) -> str:
    backend = description.get("backend")
    fields = IDENTITY.get(backend)
    if fields is None:  # an unknown kind of teacher: all of it
        return hashlib.sha256(_canonical(description).encode()).hexdigest()
    identity = {"backend": backend, **{k: description.get(k) for k in fields}}
    identity.update({k: description[k] for k in OPT_IN.get(backend, ()) if k in description})
    if backend == "openai" and (description.get("api") == "completions" or description.get("token_ids")):
        # the tokenizer shapes the prompt (completions) or names the ids we store
        identity.update({k: description.get(k) for k in ("tokenizer_sha256", "chat_template_sha256")})
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()


def request_hash(teacher_key: str, messages: list[dict], params: dict, sample_index: int) -> str:
    return hashlib.sha256(_canonical([teacher_key, messages, params, sample_index]).encode()).hexdigest()


def covers(planned: int | None, wanted: int | None) -> bool:
    """Whether a plan of the first ``planned`` prompts (None: all) holds the first ``wanted``."""
    return planned is None or (wanted is not None and wanted <= planned)


def requests_for(teacher_key: str, prompts: list[Prompt], params: dict, samples_per_prompt: int = 1,
                 shard: tuple[int, int] | None = None) -> list[tuple[str, Prompt, int]]:
    """(request hash, prompt, sample index) for every request of a prompt set, in order; with
    ``shard=(i, n)`` only the requests whose hash falls in shard i of n (stable across machines)."""
    out = []
    for p in prompts:
        for i in range(samples_per_prompt):
            h = request_hash(teacher_key, p.chat, params, i)
            if shard is None or int(h[:15], 16) % shard[1] == shard[0]:
                out.append((h, p, i))
    return out


@dataclass
class Attempt:
    """One HTTP send: what spend, budgets and re-send counts are computed from."""

    request_hash: str
    endpoint: str
    sent_at: str
    seconds: float
    outcome: str  # ok, retry, failed
    http_status: int | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    usage_claimed: str | None = None  # the endpoint's usage (JSON) when it was not counted as is
    attempt_id: int | None = None  # set once ``open_attempts`` wrote it; ``record`` then settles that row


@dataclass
class Example:
    """A done completion joined with its prompt and teacher: what training reads."""

    request_hash: str
    messages: list[dict]
    meta: dict
    teacher_key: str
    text: str
    token_ids: np.ndarray | None  # (T,) int32
    topk_ids: np.ndarray | None  # (T, k) int32
    topk_logprobs: np.ndarray | None  # (T, k) float16, as stored (read-only)
    finish_reason: str
    # the raw bytes from an endpoint that names tokens by their strings (None where ids are kept):
    # they join to ``text`` (+ the stop string that ended it, as vLLM returns it)
    token_bytes: TokenBytes | None = None  # (T,)
    topk_bytes: TokenBytes | None = None  # (T, k), in topk_logprobs' order
    # each generated token's logprob, from an HTTP teacher asked for a top-k (None for local or imported rows)
    token_logprobs: np.ndarray | None = None  # (T,) float16, as stored (read-only)


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # used from one thread at a time, but not always the one that opened it (the HTTP
            # dispatcher commits from a worker thread so the event loop keeps sending)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed completion survives power loss, not only a process crash
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise PotstillError(f"{self.path}: not a usable potstill ledger ({e})") from None
        version = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif version[0] == "1":
            self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
        elif version[0] != SCHEMA_VERSION:
            raise PotstillError(f"{self.path}: ledger schema {version[0]}, this potstill reads {SCHEMA_VERSION}")
        # additive columns: a ledger written before them gets them (null) when opened, and older potstills read it
        for table, column, kind in ADDED_COLUMNS:
            if column not in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, sqlite3.DatabaseError) and not hasattr(exc, "potstill_path"):
            exc.potstill_path = str(self.path)  # the CLI's one-line error names the file
        self.close()

    # -- writing ------------------------------------------------------------------------------

    def record_terms_override(self, student: str, use: str, reason: str, problems: list[str]) -> None:
        """Keep the reason a run trained past the terms gate (an additive table: a ledger written
        before it gets the table when opened, and older potstills ignore it)."""
        self.db.execute("INSERT INTO terms_overrides (created_at, student, use, reason, problems) VALUES (?,?,?,?,?)",
                        (_now(), student, use, reason, json.dumps(problems)))

    def terms_overrides(self) -> list[dict]:
        rows = self.db.execute("SELECT created_at, student, use, reason, problems FROM terms_overrides "
                               "ORDER BY override_id").fetchall()
        return [dict(zip(("created_at", "student", "use", "reason", "problems"), r[:4] + (json.loads(r[4]),)))
                for r in rows]

    def register_teacher(self, description: dict) -> str:
        key = teacher_key(description)
        # the newest description wins: provenance (terms, id) may be edited without changing the key
        self.db.execute("INSERT INTO teachers VALUES (?, ?) ON CONFLICT (teacher_key) DO UPDATE SET "
                        "description=excluded.description", (key, _canonical(description)))
        return key

    def record_plan(self, plan_key: str, description: dict, requests: list[tuple[int, str]],
                    prompt_limit: int | None) -> None:
        """Keep which requests a recipe asks for (its teacher, and (prompt index, hash) pairs for the
        first ``prompt_limit`` prompts, None: all) under its plan key, unless a plan kept there
        already covers more prompts."""
        old = self.db.execute("SELECT prompt_limit FROM plans WHERE plan_key=?", (plan_key,)).fetchone()
        if old is not None and covers(old[0], prompt_limit) and not covers(prompt_limit, old[0]):
            return
        key = self.register_teacher(description)
        self.db.execute("INSERT OR REPLACE INTO plans VALUES (?, ?, ?, ?, ?)",
                        (plan_key, key, prompt_limit, json.dumps(requests), _now()))

    def plan(self, plan_key: str, prompt_limit: int | None) -> tuple[dict, list[str]] | None:
        """The teacher's description and the request hashes of the first ``prompt_limit`` prompts
        (None: all) planned under ``plan_key``; None when no plan there covers them."""
        row = self.db.execute("SELECT t.description, p.prompt_limit, p.request_hashes FROM plans p "
                              "JOIN teachers t USING (teacher_key) WHERE p.plan_key=?", (plan_key,)).fetchone()
        if row is None or not covers(row[1], prompt_limit):
            return None
        return json.loads(row[0]), [h for i, h in json.loads(row[2]) if prompt_limit is None or i < prompt_limit]

    def start_session(self, recipe_sha256: str | None) -> int:
        cur = self.db.execute(
            "INSERT INTO sessions (started_at, recipe_sha256, versions) VALUES (?, ?, ?)",
            (_now(), recipe_sha256, _canonical(library_versions())),
        )
        return cur.lastrowid

    def end_session(self, session_id: int, stopped: str | None) -> None:
        """Record that a session ended, and why it stopped early (None: it did what it was asked)."""
        self.db.execute("UPDATE sessions SET ended_at=?, stopped=? WHERE session_id=?", (_now(), stopped, session_id))

    def sessions(self) -> list[dict]:
        """Every session, oldest first: id, started_at, ended_at (None: it never ended, or ended
        before ledgers recorded it) and why it stopped early (None if it did not)."""
        rows = self.db.execute("SELECT session_id, started_at, ended_at, stopped FROM sessions ORDER BY session_id")
        return [dict(zip(("session_id", "started_at", "ended_at", "stopped"), r)) for r in rows]

    def add_requests(self, teacher_key: str, planned: list[tuple[str, Prompt, int]], params: dict) -> list[Request]:
        """Record (request hash, prompt, sample index) triples (idempotent); return those not done,
        each hash once (the same request planned twice, e.g. a judge's two orders of two equal
        answers, is sent and paid for once)."""
        now = _now()
        with self.db:
            self.db.execute("BEGIN")
            for h, p, i in planned:
                self.db.execute("INSERT OR IGNORE INTO prompts VALUES (?, ?, ?, ?)",
                                (p.sha256, _canonical(p.chat), _canonical(p.meta), p.source))
                self.db.execute(
                    "INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?, 'pending', NULL, ?, ?)",
                    (h, p.sha256, teacher_key, _canonical(params), i, now, now),
                )
        done = {r[0] for r in self.db.execute(f"SELECT c.request_hash FROM {self._select([h for h, _, _ in planned])}")}
        seed = params.get("seed", 0)
        todo = {h: Request(h, p.chat, i, seed) for h, p, i in planned if h not in done}
        return list(todo.values())

    def record(self, session_id: int, completions: list[Completion], failures: dict[str, str] | None = None,
               attempts: list[Attempt] = (), collected_batch: str | None = None) -> int:
        """Store completions and mark their requests done, in one transaction, with the requests
        that failed for good (hash -> reason) and the HTTP attempts behind them. Returns how many
        completions were valid; the others (non-finite logprobs, ...) are marked failed with the reason.
        ``collected_batch``: the Batch API job these came from, marked collected in the same
        transaction, so a crash cannot collect (and count) it twice."""
        now = _now()
        valid = 0
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for a in attempts:
                if a.attempt_id is not None:
                    self.db.execute(
                        "UPDATE attempts SET seconds=?, outcome=?, http_status=?, error=?, prompt_tokens=?, "
                        "completion_tokens=?, cost=?, usage_claimed=? WHERE attempt_id=?",
                        (a.seconds, a.outcome, a.http_status, a.error, a.prompt_tokens, a.completion_tokens, a.cost,
                         a.usage_claimed, a.attempt_id))
                    continue
                self._insert_attempt(session_id, a)
            for h, reason in (failures or {}).items():
                self.db.execute("UPDATE requests SET status='failed', error=?, updated_at=? WHERE request_hash=?"
                                " AND status != 'done'", (reason, now, h))
            for c in completions:
                problem = completion_problem(c)
                if problem:
                    self.db.execute("UPDATE requests SET status='failed', error=?, updated_at=? WHERE request_hash=?",
                                    (problem, now, c.request_hash))
                    continue
                self.db.execute(f"INSERT OR REPLACE INTO completions ({', '.join(STORED)}) "
                                f"VALUES ({', '.join('?' * len(STORED))})", (c.request_hash, session_id, *stored(c), now))
                self.db.execute("UPDATE requests SET status='done', error=NULL, updated_at=? WHERE request_hash=?",
                                (now, c.request_hash))
                valid += 1
            if collected_batch is not None:
                self.db.execute("UPDATE batches SET status='collected', updated_at=? WHERE local_id=?",
                                (now, collected_batch))
        return valid

    def open_attempts(self, session_id: int, attempts: list[Attempt]) -> list[int]:
        """Write sends about to happen, at their worst case, and return their row ids: a send the
        process dies in is still counted (spend, budgets) when the ledger is next opened. ``record``
        settles each row with what came back."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            return [self._insert_attempt(session_id, a) for a in attempts]

    def _insert_attempt(self, session_id: int, a: Attempt) -> int:
        return self.db.execute(
            "INSERT INTO attempts (request_hash, session_id, endpoint, sent_at, seconds, outcome, http_status,"
            " error, prompt_tokens, completion_tokens, cost, usage_claimed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (a.request_hash, session_id, a.endpoint, a.sent_at, a.seconds, a.outcome, a.http_status,
             a.error, a.prompt_tokens, a.completion_tokens, a.cost, a.usage_claimed)).lastrowid

    # -- Batch API jobs -----------------------------------------------------------------------

    def add_batch(self, local_id: str, teacher_key: str, request_hashes: list[str]) -> None:
        """Persist a batch's requests before anything is uploaded (status 'prepared')."""
        now = _now()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR IGNORE INTO batches VALUES (?, ?, NULL, NULL, 'prepared', NULL, ?, ?)",
                            (local_id, teacher_key, now, now))
            self.db.executemany("INSERT OR IGNORE INTO batch_requests VALUES (?, ?)",
                                ((local_id, h) for h in request_hashes))

    def update_batch(self, local_id: str, **fields) -> None:
        """Set batch_id, input_file_id, status or error of a batch (committed at once)."""
        sets = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE batches SET {sets}, updated_at=? WHERE local_id=?", (*fields.values(), _now(), local_id))

    def open_batches(self, teacher_key: str) -> list[dict]:
        """Batches of this teacher not yet collected, oldest first."""
        rows = self.db.execute("SELECT local_id, batch_id, input_file_id, status, created_at FROM batches WHERE "
                               "teacher_key=? AND status != 'collected' ORDER BY created_at", (teacher_key,)).fetchall()
        return [dict(zip(("local_id", "batch_id", "input_file_id", "status", "created_at"), r)) for r in rows]

    def open_request(self, request_hash: str) -> tuple[Request, dict] | None:
        """A request not yet done, with its sampling params, rebuilt from the ledger; None if it is
        done or unknown."""
        row = self.db.execute("SELECT p.messages, r.sample_index, r.params FROM requests r JOIN prompts p "
                              "USING (prompt_sha256) WHERE r.request_hash=? AND r.status != 'done'",
                              (request_hash,)).fetchone()
        if row is None:
            return None
        params = json.loads(row[2])
        return Request(request_hash, json.loads(row[0]), row[1], params.get("seed", 0)), params

    def batch_request_hashes(self, local_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT request_hash FROM batch_requests WHERE local_id=?", (local_id,))}

        # -- reading ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "done": 0, "failed": 0}
        out.update(dict(self.db.execute("SELECT status, count(*) FROM requests GROUP BY status")))
        return out

    def spend(self, teacher_key: str | None = None) -> dict:
        """Totals over every session's HTTP attempts (of one teacher, or all)."""
        where = "" if teacher_key is None else \
            "WHERE request_hash IN (SELECT request_hash FROM requests WHERE teacher_key=?)"
        row = self.db.execute(f"SELECT count(*), ifnull(sum(prompt_tokens), 0), ifnull(sum(completion_tokens), 0), "
                              f"ifnull(sum(cost), 0) FROM attempts {where}", () if teacher_key is None else (teacher_key,)
                              ).fetchone()
        return dict(zip(("requests", "prompt_tokens", "completion_tokens", "cost"), row))

    def failed_count(self, request_hashes: list[str]) -> int:
        """How many of ``request_hashes`` failed for good (status failed)."""
        self._select(request_hashes)  # fills the temp table ``selected``
        return self.db.execute("SELECT count(*) FROM selected JOIN requests r USING (request_hash) "
                               "WHERE r.status='failed'").fetchone()[0]

    def identical_samples(self, request_hashes: list[str] | None = None) -> dict[str, int]:
        """Prompts sampled more than once at temperature > 0 (``prompts``), and how many of them got
        the same text every time (``identical``). All identical points to an endpoint that ignores
        sampling parameters (decodes greedily) while the ledger records the temperature asked for."""
        row = self.db.execute(
            f"""SELECT count(*), ifnull(sum(texts = 1), 0) FROM (
                    SELECT count(DISTINCT c.text) AS texts FROM {self._select(request_hashes)}
                    JOIN requests r USING (request_hash) WHERE json_extract(r.params, '$.temperature') > 0
                    GROUP BY r.prompt_sha256, r.teacher_key, r.params HAVING count(*) >= 2)""").fetchone()
        return {"prompts": row[0], "identical": row[1]}

    def failures(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT request_hash, error FROM requests WHERE status='failed'"))

    def teachers(self) -> dict[str, dict]:
        return {k: json.loads(d) for k, d in self.db.execute("SELECT teacher_key, description FROM teachers")}

    def teacher_problems(self, request_hashes: list[str] | None = None) -> list[str]:
        """Why the teacher rows behind these done rows (all, or those of ``request_hashes``) cannot
        be trusted, [] when they can: a description that no longer hashes to its teacher key (an
        identity field edited: endpoint, model, weights, source file), a key with no description,
        a row whose request hash does not recompute from its teacher key, prompt, parameters and
        sample index (moved to another teacher, or edited). The first of each kind."""
        problems, keys = {}, {}
        sql = f"""SELECT r.request_hash, r.teacher_key, p.messages, r.params, r.sample_index, t.description
                  FROM {self._select(request_hashes)} JOIN requests r USING (request_hash)
                  JOIN prompts p USING (prompt_sha256) LEFT JOIN teachers t USING (teacher_key)"""
        for h, key, messages, params, index, description in self.db.execute(sql):
            if key not in keys:
                keys[key] = description is not None and teacher_key(json.loads(description)) == key
                if description is None:
                    problems.setdefault("missing", f"teacher {key[:12]} has rows but no description")
                elif not keys[key]:
                    problems.setdefault("key", f"teacher {key[:12]}'s description ({json.loads(description).get('id')})"
                                               f" does not hash to its key: an identity field was edited")
            if request_hash(key, json.loads(messages), json.loads(params), index) != h:
                problems.setdefault("row", f"request {h[:12]} does not hash from its teacher {key[:12]}, prompt and "
                                           f"parameters: the row was edited or moved to another teacher")
        return list(problems.values())

    def _select(self, request_hashes: list[str] | None) -> str:
        """A FROM clause over done completions, restricted to ``request_hashes`` when given."""
        if request_hashes is None:
            return "completions c"
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS selected (request_hash TEXT PRIMARY KEY)")
        # in one transaction: in autocommit each insert is its own, about 50 us a row once the table was filled before
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN")
        self.db.execute("DELETE FROM selected")
        self.db.executemany("INSERT OR IGNORE INTO selected VALUES (?)", ((h,) for h in request_hashes))
        if own:
            self.db.execute("COMMIT")
        return "selected JOIN completions c USING (request_hash)"

    def examples(self, request_hashes: list[str] | None = None) -> Iterator[Example]:
        """Done completions (all, or those of ``request_hashes``) in a stable order: by prompt, then
        sample index, so the same prompts answered by another backend train in the same order."""
        sql = f"""SELECT c.request_hash, p.messages, p.meta, r.teacher_key, c.text, c.token_ids, c.top_k,
                         c.topk_ids, c.topk_logprobs, c.finish_reason, c.token_bytes, c.topk_bytes, c.token_logprobs
                  FROM {self._select(request_hashes)} JOIN requests r USING (request_hash)
                  JOIN prompts p USING (prompt_sha256) ORDER BY r.prompt_sha256, r.sample_index, c.request_hash"""
        for h, msgs, meta, tkey, text, ids, k, tids, tlp, finish, tb, kb, lps in self.db.execute(sql).fetchall():
            token_ids = None if ids is None else np.frombuffer(ids, "<i4")
            yield Example(
                h, json.loads(msgs), json.loads(meta), tkey, text, token_ids,
                None if tids is None else np.frombuffer(tids, "<i4").reshape(-1, k),
                # float16 as stored, a view: a float32 copy of every row doubled training's memory;
                # collate widens each batch
                None if tlp is None else np.frombuffer(tlp, "<f2").reshape(-1, k),
                finish,
                None if tb is None else TokenBytes(tb),
                None if kb is None else TokenBytes(kb, k),
                None if lps is None else np.frombuffer(lps, "<f2"),
            )

    def content_sha256(self, request_hashes: list[str] | None = None) -> str:
        """A hash of done completions (prompt, text, ids, logprobs, token bytes): names the training
        data. A column added since (token bytes, token logprobs) counts only where a row holds it, so
        rows without it hash as they always did."""
        h = hashlib.sha256()
        added = ("token_bytes", "topk_bytes", "token_logprobs")
        for row in self.db.execute(
            f"""SELECT c.request_hash, r.prompt_sha256, c.text, c.token_ids, c.topk_ids, c.topk_logprobs,
                       {', '.join('c.' + a for a in added)}
                FROM {self._select(request_hashes)} JOIN requests r USING (request_hash) ORDER BY c.request_hash"""
        ):
            for field in row[:6]:
                h.update(b"\x00" if field is None else (field.encode() if isinstance(field, str) else field))
                h.update(b"\x1f")
            for name, field in zip(added, row[6:]):
                if field is not None:  # named: which of them a row holds is part of what it hashes
                    h.update(b"\x1e" + name.encode() + b"\x1f" + field + b"\x1f")
        return h.hexdigest()

    def manifest_rows(self, request_hashes: list[str]) -> Iterator[tuple]:
        """What each done row of ``request_hashes`` was asked and answered, in request-hash order:
        (request hash, teacher key, messages, params, sample index, text, token ids, top_k, top-k
        ids, top-k logprobs, finish reason, token bytes, top-k bytes, token logprobs: the last three
        null but for an endpoint's answers). The Merkle manifest hashes these."""
        return self.db.execute(
            f"""SELECT c.request_hash, r.teacher_key, p.messages, r.params, r.sample_index, c.text, c.token_ids,
                       c.top_k, c.topk_ids, c.topk_logprobs, c.finish_reason, c.token_bytes, c.topk_bytes,
                       c.token_logprobs
                FROM {self._select(request_hashes)} JOIN requests r USING (request_hash)
                JOIN prompts p USING (prompt_sha256) ORDER BY c.request_hash""")

    def teacher_rows(self, request_hashes: list[str]) -> dict[str, int]:
        """How many done rows of ``request_hashes`` each teacher key answered."""
        return dict(self.db.execute(f"SELECT r.teacher_key, count(*) FROM {self._select(request_hashes)} "
                                    f"JOIN requests r USING (request_hash) GROUP BY r.teacher_key"))

    def bytes_per_token(self) -> float:
        """Stored bytes of token ids or bytes, top-k ids or bytes, and logprobs, per completion token."""
        columns = ("token_ids", "topk_ids", "topk_logprobs", "token_bytes", "topk_bytes", "token_logprobs")
        row = self.db.execute(
            f"SELECT sum({' + '.join(f'ifnull(length({c}), 0)' for c in columns)}), sum(completion_tokens) "
            f"FROM completions WHERE token_ids IS NOT NULL OR token_bytes IS NOT NULL").fetchone()
        return (row[0] or 0) / max(row[1] or 0, 1)


STORED = ("request_hash", "session_id", "text", "token_ids", "top_k", "topk_ids", "topk_logprobs", "finish_reason",
          "prompt_tokens", "completion_tokens", "seed", "seconds", "token_bytes", "topk_bytes", "token_logprobs",
          "created_at")


def stored(c: Completion) -> tuple:
    """A completion's columns, from text to token_logprobs (``STORED`` less the key, session and time)."""
    def blob(a, dtype):
        return None if a is None else np.ascontiguousarray(a, dtype).tobytes()

    k = next((a.shape[1] for a in (c.topk_logprobs, c.topk_ids) if a is not None), 0)
    if k == 0 and c.topk_bytes:
        k = len(c.topk_bytes[0])
    known = c.token_ids if c.token_ids is not None else c.token_bytes
    return (c.text, blob(c.token_ids, "<i4"), k, blob(c.topk_ids, "<i4"), blob(c.topk_logprobs, "<f2"), c.finish_reason,
            c.prompt_tokens, (c.completion_tokens or 0) if known is None else len(known), c.seed, c.seconds,
            None if c.token_bytes is None else TokenBytes.pack(c.token_bytes),
            None if c.topk_bytes is None else TokenBytes.pack([b for row in c.topk_bytes for b in row]),
            blob(c.token_logprobs, "<f2"))


def completion_problem(c: Completion) -> str | None:
    for name, lp in (("top-k", c.topk_logprobs), ("generated tokens", c.token_logprobs)):
        if lp is not None:
            lp = np.asarray(lp, np.float32)
            if np.isnan(lp).any() or np.isposinf(lp).any() or (lp > 1e-3).any():
                return f"non-finite or positive logprob in the teacher's {name}"
    known = c.token_ids if c.token_ids is not None else c.token_bytes
    if known is not None:
        for name in ("topk_logprobs", "token_logprobs", "topk_bytes"):
            rows = getattr(c, name)
            if rows is not None and len(rows) != len(known):
                return f"{name} rows ({len(rows)}) do not match completion tokens ({len(known)})"
    if c.topk_bytes is not None:
        k = None if c.topk_logprobs is None else np.shape(c.topk_logprobs)[1]
        if c.topk_logprobs is None or any(len(row) != k for row in c.topk_bytes):
            return f"topk_bytes rows are not the {k} entries of topk_logprobs"
    strings = [*(c.token_bytes or ()), *(b for row in c.topk_bytes or () for b in row)]
    if any(not isinstance(b, bytes) or len(b) > 0xFFFF for b in strings):
        return "a token's bytes are not a byte string of at most 65,535 bytes"
    if c.finish_reason not in ("stop", "length"):
        return f"unknown finish_reason {c.finish_reason!r}"
    return None
